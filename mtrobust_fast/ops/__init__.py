"""The fused attack-step engine: one operator does a whole iterative-attack update for a batch of rows.

``attack_step`` combines T per-task input gradients with per-row task weights (optionally L2-normalising
each task's gradient first), takes a Linf sign step or an L2 normalised step of per-row size ``alpha``,
projects onto the per-row ``eps`` ball around ``x0`` and clamps to ``[lo, hi]``.
``project`` is the projection alone (random starts, APGD). Both run as registered torch operators
(``torch.ops.mtrobust_fast.*``) with CPU and CUDA kernels and a fake implementation, so they work under
``torch.compile`` and CUDA graphs. ``mtrobust_fast.ops.reference`` is the plain-PyTorch oracle.

Arguments are checked here on the host, without a device synchronisation: a per-row ``eps``/``alpha``
tensor that lives on a CUDA device is checked asynchronously (``torch._assert_async``). This module owns the
rules: an attack brings its arguments to the operator's form once when it starts (:func:`check_norm`,
:func:`check_bounds`, :func:`row_values`) and then steps through :func:`attack_step_prepared_` and
:func:`project_prepared_`, which skip the checks in the hot loop.
"""
import math
import numbers

import torch

from mtrobust_fast import _C  # loads the library that registers the operators

__all__ = ["attack_step", "attack_step_", "project", "project_", "NORMS", "MAX_TASKS", "check_norm", "check_bounds",
           "row_values", "attack_step_prepared_", "project_prepared_"]

NORMS = ("linf", "l2")
MAX_TASKS = _C.MAX_TASKS  # the kernels' limit on tasks per call (kMaxTasks in csrc/attack_step_math.h)
_ops = torch.ops.mtrobust_fast


def _opmath(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} requires grad, but the attack step is not differentiable (no gradient would "
                         f"reach it); pass {name}.detach()")


def _check_like_x(name, t, x):
    _check_tensor(name, t)
    if t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; cast them to one dtype")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _check_x(x, x0):
    _check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have a leading batch dimension, got a 0-d tensor")
    _check_like_x("x0", x0, x)
    if x0.shape != x.shape:
        raise ValueError(f"x0 has shape {tuple(x0.shape)} but x has shape {tuple(x.shape)}")


def check_norm(norm):
    """``norm`` lower-cased, one of ``NORMS``."""
    if not isinstance(norm, str) or norm.lower() not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return norm.lower()


def check_bounds(lo, hi):
    """(lo, hi) as floats, lo <= hi and neither NaN."""
    lo, hi = float(lo), float(hi)
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise ValueError(f"lo must be <= hi (and not NaN), got lo={lo}, hi={hi}")
    return lo, hi


def row_values(name, value, x):
    """eps/alpha as a [B] tensor in the opmath dtype on x's device; a float is broadcast to every row; every value
    finite and >= 0."""
    batch = x.shape[0]
    dtype = _opmath(x.dtype)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        v = float(value)
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {v}")
        return torch.full((batch,), v, dtype=dtype, device=x.device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a float or a [B] tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.dim() == 0:
        value = value.expand(batch)
    if value.dim() != 1 or value.shape[0] != batch:
        raise ValueError(f"{name} must be a float or a tensor of shape [{batch}] (one per row), "
                         f"got shape {tuple(value.shape)}")
    if value.device != x.device and value.device.type != "cpu":
        raise ValueError(f"{name} is on {value.device} but x is on {x.device}")
    if value.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
            raise ValueError(f"{name} must be finite and >= 0 in every row")
    else:  # checking on the host would synchronise with the device (or break a compiled graph)
        torch._assert_async(torch.isfinite(value).all() & (value >= 0).all(),
                            f"{name} must be finite and >= 0 in every row")
    return value.to(device=x.device, dtype=dtype, non_blocking=True)


def _task_grads(grads, weights, x):
    _check_like_x("grads", grads, x)
    if grads.shape == x.shape:
        grads = grads.unsqueeze(0)
    if grads.dim() != x.dim() + 1 or grads.shape[1:] != x.shape:
        raise ValueError(f"grads must have shape [T, {', '.join(map(str, x.shape))}] or the shape of x, "
                         f"got {tuple(grads.shape)}")
    tasks = grads.shape[0]
    if tasks == 0:
        raise ValueError("grads holds no task (T=0); pass at least one gradient")
    if tasks > MAX_TASKS:
        raise ValueError(f"grads holds {tasks} tasks; at most {MAX_TASKS} are supported per call")
    if weights is not None:
        _check_tensor("weights", weights)
        if weights.device != x.device:
            raise ValueError(f"weights is on {weights.device} but x is on {x.device}")
        if weights.numel() == 0 and x.shape[0] > 0:
            raise ValueError("weights is empty; pass a [B, T] tensor or None for all-ones weights")
        if weights.shape != (x.shape[0], tasks):
            raise ValueError(f"weights must have shape [B, T] = [{x.shape[0]}, {tasks}] to match x and grads, "
                             f"got {tuple(weights.shape)}")
    return grads


def _step_args(x, x0, grads, weights, eps, alpha, norm, normalize_task_grads, lo, hi):
    _check_x(x, x0)
    grads = _task_grads(grads, weights, x)
    lo, hi = check_bounds(lo, hi)
    return (x, x0, grads, weights, row_values("eps", eps, x), row_values("alpha", alpha, x),
            check_norm(norm), bool(normalize_task_grads), lo, hi)


def attack_step(x, x0, grads, weights=None, *, eps, alpha, norm="linf", normalize_task_grads=False,
                lo=0.0, hi=1.0):
    """One attack update of every row of ``x``; returns a new tensor.

    Args:
        x: current points ``[B, *S]`` (float16, bfloat16, float32 or float64; contiguous or channels_last).
        x0: clean points ``[B, *S]``, the centres of the eps-balls.
        grads: per-task input gradients ``[T, B, *S]``, or ``[B, *S]`` for a single task.
        weights: ``[B, T]`` per-row task weights, or None for all ones.
        eps, alpha: ball radius and step size, a float or a ``[B]`` tensor (per row), >= 0.
        norm: ``"linf"`` (sign step, box projection) or ``"l2"`` (normalised step, ball projection).
        normalize_task_grads: divide each task's gradient by its per-row L2 norm before weighting.
        lo, hi: the valid input range (pixel space [0, 1] by default).

    Norms are per row; reductions accumulate in float64 and elementwise math in float32 (float64 for
    float64 inputs). A zero combined gradient gives no step (the projection still applies).
    """
    return _ops.attack_step(*_step_args(x, x0, grads, weights, eps, alpha, norm, normalize_task_grads, lo, hi))


def attack_step_(x, x0, grads, weights=None, *, eps, alpha, norm="linf", normalize_task_grads=False,
                 lo=0.0, hi=1.0, fingerprint=None):
    """In-place form of :func:`attack_step`: updates and returns ``x``.

    ``fingerprint``: None, or an int64 ``[B, 2]`` tensor on x's device that receives each updated row's
    fingerprint, computed in the same pass: two 64-bit wrapping sums of a mixed word per element made from its
    position and stored bit pattern (``mtrobust_fast.ops.reference.fingerprint`` computes the same). Rows with
    equal stored values get equal fingerprints; two different rows collide with probability about 2^-128. It
    lets an attack recognise an iterate it has seen before (see :mod:`mtrobust_fast.attacks.early_exit`)."""
    if fingerprint is not None:
        if not isinstance(fingerprint, torch.Tensor) or fingerprint.dtype != torch.int64:
            raise TypeError("fingerprint must be an int64 tensor")
        if fingerprint.shape != (x.shape[0], 2) or not fingerprint.is_contiguous() or fingerprint.device != x.device:
            raise ValueError(f"fingerprint must be a contiguous [{x.shape[0]}, 2] tensor on {x.device}, got "
                             f"{tuple(fingerprint.shape)} on {fingerprint.device}")
    _ops.attack_step_(*_step_args(x, x0, grads, weights, eps, alpha, norm, normalize_task_grads, lo, hi), fingerprint)
    return x


def _project_args(x, x0, eps, norm, lo, hi):
    _check_x(x, x0)
    lo, hi = check_bounds(lo, hi)
    return x, x0, row_values("eps", eps, x), check_norm(norm), lo, hi


def project(x, x0, *, eps, norm="linf", lo=0.0, hi=1.0):
    """Project each row of ``x`` onto its ``eps`` ball around ``x0`` (Linf box or L2 ball), then clamp to
    ``[lo, hi]``; returns a new tensor. Same arguments as :func:`attack_step`."""
    return _ops.project(*_project_args(x, x0, eps, norm, lo, hi))


def project_(x, x0, *, eps, norm="linf", lo=0.0, hi=1.0):
    """In-place form of :func:`project`: updates and returns ``x``."""
    _ops.project_(*_project_args(x, x0, eps, norm, lo, hi))
    return x


def attack_step_prepared_(x, x0, grads, weights, eps, alpha, norm, normalize_task_grads, lo, hi, fingerprint=None):
    """:func:`attack_step_` on arguments already in the operator's form (``grads`` ``[T, B, *S]``, ``eps`` and
    ``alpha`` from :func:`row_values`, ``norm`` from :func:`check_norm`, bounds from :func:`check_bounds`),
    without checking them again: the hot loop of an attack that checked them when it started.
    ``fingerprint``: an int64 ``[B, 2]`` tensor (see :func:`attack_step_`)."""
    _ops.attack_step_(x, x0, grads, weights, eps, alpha, norm, normalize_task_grads, lo, hi, fingerprint)
    return x


def project_prepared_(x, x0, eps, norm, lo, hi):
    """:func:`project_` on arguments already in the operator's form (see :func:`attack_step_prepared_`)."""
    _ops.project_(x, x0, eps, norm, lo, hi)
    return x


def _fake_output(x):
    # Mirrors the kernels' layout rule (csrc/ops.cpp): contiguous and channels_last keep their layout.
    kept = (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
            or x.is_contiguous(memory_format=torch.channels_last_3d))
    return torch.empty_like(x) if kept else torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.register_fake("mtrobust_fast::attack_step")
def _attack_step_fake(x, x0, grads, weights, eps, alpha, norm, normalize_task_grads, lo, hi):
    return _fake_output(x)


@torch.library.register_fake("mtrobust_fast::attack_step_")
def _attack_step_inplace_fake(x, x0, grads, weights, eps, alpha, norm, normalize_task_grads, lo, hi,
                              fingerprint=None):
    return None


@torch.library.register_fake("mtrobust_fast::project")
def _project_fake(x, x0, eps, norm, lo, hi):
    return _fake_output(x)


@torch.library.register_fake("mtrobust_fast::project_")
def _project_inplace_fake(x, x0, eps, norm, lo, hi):
    return None
