"""Wall-clock timing shared by the benchmark scripts: the median of repeated calls after a warm-up call,
with the device synchronised around each (CUDA work is asynchronous)."""
import statistics
import time

import torch


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats):
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
