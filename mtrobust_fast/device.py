"""Where tensors run: choosing the device, and moving a data batch onto it."""
import torch


def resolve_device(choice, local_rank=0):
    """"auto" → this process's GPU if CUDA is available, else the CPU; "cuda" without CUDA is an error."""
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {choice!r}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but CUDA is not available")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def to_device(batch, device):
    """An ``(images, targets, masks)`` batch (targets and masks: dicts by task name) moved to ``device``."""
    images, targets, masks = batch

    def move(tensor):
        return tensor.to(device, non_blocking=True)

    return move(images), {k: move(v) for k, v in targets.items()}, {k: move(v) for k, v in masks.items()}
