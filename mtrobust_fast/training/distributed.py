"""Process-group plumbing for ``torchrun`` (DDP): which process am I, on which device, and how to sum stats.

A plain ``python`` launch is a world of one: every helper here then works without a process group, so the
training loop has a single code path.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from mtrobust_fast.device import resolve_device


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def init(device_choice="auto"):
    """Join the ``torchrun`` process group if launched by it (nccl on CUDA, gloo on CPU); else a world of one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_choice, local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world_size, local_rank, device)


def shutdown(ctx):
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(ctx, tensor):
    """Sum ``tensor`` over all processes (in place, and returned); a no-op in a world of one."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(ctx):
    if ctx.distributed:
        dist.barrier()


class ShardSampler(Sampler):
    """Every ``world_size``-th index starting at ``rank``, in order: each sample is seen exactly once overall.

    Used for validation, where ``DistributedSampler`` would pad with repeated samples and bias the metrics.
    """

    def __init__(self, length, rank=0, world_size=1):
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)
