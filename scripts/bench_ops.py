"""Benchmark the fused attack-step op against the eager PyTorch reference, side by side in one run.

For each shape / dtype / norm / T it prints the reference time, the fused time, the speedup, the effective
bandwidth (the bytes the update must move: read x, x0 and T gradients, write the result; divided by the
fused time) and, on a GPU, that bandwidth as a % of the device's peak.

    python scripts/bench_ops.py                      # CPU: B in {32, 256}, 3x256x256, T in {1, 5}
    python scripts/bench_ops.py --device cuda        # GPU (float32 and bfloat16)
    python scripts/bench_ops.py --batch 32 --repeats 3

Issue #2 targets: CPU fused >= 3x the reference for linf T=1 and >= 4x for l2 T=5 normalised;
H100/H200 >= 80% of peak HBM bandwidth for B=256.
"""
import argparse
import statistics
import time

import torch

from mtrobust_fast import ops
from mtrobust_fast.ops import reference

# Peak HBM bandwidth (bytes/s) of the GPUs we report on, by a substring of the device name.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.039e12,
                  "A100": 1.555e12, "L40S": 0.864e12, "RTX 4090": 1.008e12}

CASES = [  # (norm, T, normalize_task_grads)
    ("linf", 1, False), ("linf", 5, False), ("linf", 5, True), ("l2", 1, False), ("l2", 5, True),
]


def peak_bandwidth(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BANDWIDTH.items():
        if key in name:
            return value
    return None


def timed(fn, device, repeats):
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_case(batch, dtype, norm, tasks, normalize, device, repeats, size):
    shape = (batch, 3, size, size)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.rand(shape, generator=gen).to(device=device, dtype=dtype)
    x = (x0 + 0.01 * torch.randn(shape, generator=gen).to(device=device, dtype=dtype)).clamp(0, 1)
    grads = torch.randn((tasks,) + shape, generator=gen).to(device=device, dtype=dtype)
    weights = torch.rand((batch, tasks), generator=gen).to(device)
    eps = torch.full((batch,), 8 / 255, device=device)
    alpha = torch.full((batch,), 2 / 255, device=device)
    kwargs = dict(eps=eps, alpha=alpha, norm=norm, normalize_task_grads=normalize)
    t_ref = timed(lambda: reference.attack_step(x, x0, grads, weights, **kwargs), device, repeats)
    t_fused = timed(lambda: ops.attack_step(x, x0, grads, weights, **kwargs), device, repeats)
    moved = (tasks + 3) * x.numel() * x.element_size()
    return t_ref, t_fused, moved / t_fused


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--size", type=int, default=256, help="image side (3 x size x size)")
    parser.add_argument("--dtype", nargs="+", default=None, help="default: float32 on CPU; float32 bfloat16 on GPU")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtypes = args.dtype or (["float32"] if device.type == "cpu" else ["float32", "bfloat16"])
    peak = peak_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; peak bandwidth: "
          f"{peak / 1e9:.0f} GB/s" if peak else f"device: {name}; torch {torch.__version__}")
    header = f"{'B':>4} {'dtype':>8} {'norm':>4} {'T':>2} {'normed':>6} {'ref ms':>9} {'fused ms':>9} {'speedup':>8} {'GB/s':>8}"
    print(header + (f" {'% peak':>7}" if peak else ""))
    for batch in args.batch:
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for norm, tasks, normalize in CASES:
                t_ref, t_fused, bandwidth = bench_case(batch, dtype, norm, tasks, normalize, device,
                                                       args.repeats, args.size)
                line = (f"{batch:>4} {dtype_name:>8} {norm:>4} {tasks:>2} {str(normalize):>6} {t_ref * 1e3:>9.2f} "
                        f"{t_fused * 1e3:>9.2f} {t_ref / t_fused:>7.2f}x {bandwidth / 1e9:>8.1f}")
                print(line + (f" {100 * bandwidth / peak:>6.1f}%" if peak else ""), flush=True)


if __name__ == "__main__":
    main()
