"""Pure-PyTorch reference ("oracle") for the fused attack-step and projection ops.

Written for clarity, not speed: the tests compare the fused C++/CUDA op against these functions.
Argument checking is minimal (this is an oracle), but every input form the fused wrappers accept is
handled: ``grads`` as ``[T, B, *S]`` or ``[B, *S]`` (T=1), ``weights`` as ``[B, T]`` or ``None``,
``eps``/``alpha`` as a python float or a ``[B]`` tensor.

Math (per row b; norms are over all of ``*S`` for one sample, never over the batch)::

    g_b  = sum_t w[b,t] * gh[t,b],   gh = G / max(||G[t,b]||_2, tiny) if normalize_task_grads else G
    linf: x' = clamp(x + alpha_b * sign(g_b), max(x0 - eps_b, lo), min(x0 + eps_b, hi))
    l2:   y = x + alpha_b * g_b / max(||g_b||_2, tiny);  d = y - x0
          d <- d * min(1, eps_b / max(||d||_2, tiny));   x' = clamp(x0 + d, lo, hi)

``clamp`` follows ``torch.clamp``: where the lower bound exceeds the upper one, the upper bound wins.

Non-finite inputs: L∞ works element by element; a NaN in an element's x, x0 or combined gradient gives NaN
there (``sign`` keeps NaN, where ``torch.sign`` would give 0: a NaN gradient must not become a silent "no
move"), and ±inf gradients are signs like any other. L2 couples a row through its norms: a non-finite value
in a row's x, x0 or combined gradient makes the whole row NaN.
Everything is computed in the "opmath" dtype (float32 for float16/bfloat16/float32, float64 for
float64) and the result is returned in ``x.dtype``.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["TINY", "opmath_dtype", "attack_step", "project", "fingerprint"]

TINY = 1e-12


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math is done in for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_row(value, batch: int, like: torch.Tensor) -> torch.Tensor:
    """``value`` (float or [B] tensor) as an opmath tensor of shape [B, 1, ..., 1] broadcasting over ``like``."""
    if isinstance(value, torch.Tensor):
        v = value.to(device=like.device, dtype=like.dtype)
        v = v.expand(batch) if v.dim() == 0 else v.reshape(batch)
    else:
        v = torch.full((batch,), float(value), dtype=like.dtype, device=like.device)
    return v.reshape((batch,) + (1,) * (like.dim() - 1))


def _row_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row of ``t`` ([B, *S]), shaped [B, 1, ..., 1]."""
    b = t.shape[0]
    return t.reshape(b, math.prod(t.shape[1:])).norm(dim=1).reshape((b,) + (1,) * (t.dim() - 1))


def _nan_rows(t: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """``t`` with every row that holds a non-finite value in ``t`` or ``others`` set to NaN."""
    bad = torch.zeros(t.shape[0], dtype=torch.bool, device=t.device)
    for u in (t,) + others:
        bad |= ~torch.isfinite(u).reshape(u.shape[0], math.prod(u.shape[1:])).all(dim=1)
    return torch.where(bad.reshape((-1,) + (1,) * (t.dim() - 1)), torch.full_like(t, math.nan), t)


def _project_opmath(x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, norm: str, lo: float, hi: float):
    """Projection of ``x`` onto the ``norm`` ball of radius ``eps`` around ``x0``, then onto [lo, hi]."""
    if norm == "linf":
        lower = torch.clamp(x0 - eps, min=lo)  # max(x0 - eps, lo)
        upper = torch.clamp(x0 + eps, max=hi)  # min(x0 + eps, hi)
        # torch.clamp with tensor bounds: min(max(x, lower), upper), so the upper bound wins on conflict.
        return torch.clamp(x, min=lower, max=upper)
    if norm == "l2":
        delta = x - x0
        factor = torch.clamp(eps / torch.clamp(_row_norm(delta), min=TINY), max=1.0)
        return _nan_rows(torch.clamp(x0 + delta * factor, min=lo, max=hi), x, x0)
    raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")


def project(x: torch.Tensor, x0: torch.Tensor, *, eps, norm: str = "linf", lo: float = 0.0,
            hi: float = 1.0) -> torch.Tensor:
    """Reference projection of ``x`` onto the eps-ball around ``x0`` intersected with [lo, hi]."""
    op = opmath_dtype(x.dtype)
    b = x.shape[0]
    xf = x.to(op)
    x0f = x0.to(device=x.device, dtype=op)
    out = _project_opmath(xf, x0f, _per_row(eps, b, xf), norm, lo, hi)
    return out.to(x.dtype)


def attack_step(x: torch.Tensor, x0: torch.Tensor, grads: torch.Tensor, weights: torch.Tensor | None = None, *,
                eps, alpha, norm: str = "linf", normalize_task_grads: bool = False, lo: float = 0.0,
                hi: float = 1.0) -> torch.Tensor:
    """Reference attack step: combine task gradients, take a signed/normalised step, project."""
    op = opmath_dtype(x.dtype)
    b = x.shape[0]
    xf = x.to(op)
    x0f = x0.to(device=x.device, dtype=op)
    g = grads.to(device=x.device, dtype=op)
    if g.dim() == x.dim():  # [B, *S] means a single task
        g = g.unsqueeze(0)
    n_tasks = g.shape[0]
    if weights is None:
        w = torch.ones((b, n_tasks), dtype=op, device=x.device)
    else:
        w = weights.to(device=x.device, dtype=op).reshape(b, n_tasks)

    # Weighted sum over tasks, in task order t = 0, 1, ..., T-1.
    combined = torch.zeros_like(xf)
    for t in range(n_tasks):
        g_t = g[t]
        if normalize_task_grads:
            g_t = g_t / torch.clamp(_row_norm(g_t), min=TINY)
        combined = combined + _per_row(w[:, t], b, xf) * g_t

    eps_r = _per_row(eps, b, xf)
    alpha_r = _per_row(alpha, b, xf)
    if norm == "linf":
        y = xf + alpha_r * torch.where(torch.isnan(combined), combined, torch.sign(combined))
    elif norm == "l2":
        y = xf + alpha_r * combined / torch.clamp(_row_norm(combined), min=TINY)
    else:
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    out = _project_opmath(y, x0f, eps_r, norm, lo, hi)
    return (_nan_rows(out, xf, x0f, combined) if norm == "l2" else out).to(x.dtype)


_MASK = (1 << 64) - 1
_UINT = {2: "uint16", 4: "uint32", 8: "uint64"}


def _mix64(z):
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def fingerprint(x):
    """The [B, 2] int64 fingerprint ``attack_step_`` writes for output rows ``x``: per row, the wrapping sums over
    its elements i of mix(mix(i + c) ^ bits) and mix(mix(mix(i + c) + d) + bits), bits being the element's stored
    bit pattern and i its position in the row as the op walks it: memory order for channels_last tensors,
    row-major order otherwise. Plain NumPy uint64 arithmetic, written for clarity."""
    x = x.detach().cpu()
    for dims, layout in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        if x.dim() == dims and not x.is_contiguous() and x.is_contiguous(memory_format=layout):
            x = x.permute(0, *range(2, dims), 1)  # the memory order of a channels_last row
    rows = x.contiguous().reshape(x.shape[0], -1)
    bits = rows.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[rows.element_size()]).numpy()
    bits = bits.view(_UINT[rows.element_size()]).astype(np.uint64)
    with np.errstate(over="ignore"):
        position = _mix64(np.arange(bits.shape[1], dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15))
        first = _mix64(position[None] ^ bits).sum(axis=1, dtype=np.uint64)
        second = _mix64(_mix64(position + np.uint64(0x632BE59BD9B4E019))[None] + bits).sum(axis=1, dtype=np.uint64)
    return torch.from_numpy(np.stack([first, second], axis=1).view(np.int64).copy())
