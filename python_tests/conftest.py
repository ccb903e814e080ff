"""Suite-wide settings. One intra-op thread: the tests use small tensors, and on a shared 2-core machine
OpenMP's spin-waiting made small models 10-50x slower with two. Tests that exercise threading (the fused
op's parallel paths) set the thread count themselves."""
import torch

torch.set_num_threads(1)
