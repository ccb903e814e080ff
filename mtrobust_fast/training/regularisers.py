"""The gradient-curvature regulariser of GAT: penalise the conflict between two tasks' input gradients.

For the input gradients g1, g2 of two task losses at the same sample (a main task and an auxiliary one),

    ξ = (1 − cos²(g1, g2)) · ‖g1 − g2‖² / ‖g1 + g2‖²

is PCGrad's (Yu et al. 2020) measure of how much the two directions conflict, weighted by how much their sum
cancels: 0 when the gradients are parallel and pointing the same way, large when they disagree. GAT adds the
batch mean of ξ to the training loss (its gradient needs the gradients' own gradients: double backprop).

ξ is undefined where ‖g1‖, ‖g2‖ or ‖g1 + g2‖ is 0 (a sample whose loss is flat, or gradients exactly opposed).
Such samples are left out of the mean, and their gradients are swapped for harmless values before the formula, so
no NaN reaches the backward pass either (the GAT code dropped the whole term when it came out NaN).

Besides ξ itself (``xi``: its exact gradient, double backprop), two Houdini surrogates (Cisse et al. 2017) keep
ξ's value but give it another gradient: the per-sample value v times the probability 1 − Φ(m) that a standard
normal variable exceeds a margin m, so the gradient is −v·φ(m)·∂m, strong where the margin is small:
- ``houdini-grad``: m = cos(g1, g2), the alignment of the two input gradients (still double backprop; it pushes
  the two directions together with a force set by how much they conflict);
- ``houdini-out``: m = p_y − max_{k≠y} p_k, the softmax margin of the first task's true class over its best other
  class on the clean images. The gradient goes through the head's outputs only, so g1 and g2 need no graph of
  their own: no double backprop. The GAT code applied the surrogate with the top class in place of the runner-up,
  which gives no gradient at all on correctly classified samples; the runner-up keeps it informative.
The value (and so the logged loss) is ξ in all three.
"""
import math

import torch

from mtrobust_fast.training.objectives import Wrapper

TINY = 1e-30  # squared norms at or below this count as zero


def curvature_xi(g1, g2):
    """Per-sample ξ ``[B]`` of two gradient batches ``[B, ...]``; NaN where it is undefined."""
    if g1.shape != g2.shape or g1.dim() < 1:
        raise ValueError(f"g1 and g2 must be batches of the same shape, got {tuple(g1.shape)} and {tuple(g2.shape)}")
    a, b = g1.flatten(1), g2.flatten(1)
    return _xi(a, b, torch.ones(a.shape[0], dtype=torch.bool, device=a.device)).where(_defined(a, b), torch.nan)


def _defined(a, b):
    with torch.no_grad():
        return ((a * a).sum(1) > TINY) & ((b * b).sum(1) > TINY) & (((a + b) ** 2).sum(1) > TINY)


def _xi(a, b, keep):
    """The formula on rows ``keep`` (others replaced by unit vectors first, so their value and gradient are
    finite and unused)."""
    unit = torch.zeros_like(a)
    unit[:, 0] = 1
    a, b = torch.where(keep[:, None], a, unit), torch.where(keep[:, None], b, unit)
    dot, aa, bb = (a * b).sum(1), (a * a).sum(1), (b * b).sum(1)
    cos2 = dot * dot / (aa * bb)
    return (1 - cos2) * ((a - b) ** 2).sum(1) / ((a + b) ** 2).sum(1)


def curvature_penalty(g1, g2):
    """The mean ξ over the samples where it is defined (0 when none is), with a gradient free of NaN."""
    a, b = g1.flatten(1), g2.flatten(1)
    keep = _defined(a, b)
    return _mean_where(_xi(a, b, keep), keep)


KINDS = ("xi", "houdini-grad", "houdini-out")


def houdini(value, margin):
    """Per-sample surrogate whose value is ``value`` (detached) and whose gradient is −value·φ(margin)·∂margin
    (φ: the standard normal density)."""
    value = value.detach()
    surrogate = value * 0.5 * torch.erfc(margin / math.sqrt(2))  # value · P(N(0, 1) > margin)
    return value + (surrogate - surrogate.detach())


def softmax_margin(logits, labels):
    """p_y − max_{k≠y} p_k per sample of ``logits`` [B, K] and class indices ``labels`` [B]."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1] or labels.is_floating_point():
        raise ValueError(f"houdini-out: the first curvature task must be a single-label classification head "
                         f"(logits [B, K], class indices [B]); got outputs {tuple(logits.shape)} and labels "
                         f"{tuple(labels.shape)} {labels.dtype}")
    probs = logits.float().softmax(1)
    true = probs.gather(1, labels[:, None])[:, 0]
    others = probs.scatter(1, labels[:, None], -1.0).amax(1)
    return true - others


def _mean_where(values, keep):
    return torch.where(keep, values, torch.zeros_like(values)).sum() / keep.sum().clamp_min(1)


def curvature_term(kind, g1, g2, logits=None, labels=None):
    """The regulariser's batch term: mean over samples where ξ is defined of ξ (``xi``) or its Houdini surrogate
    (``houdini-grad``; ``houdini-out``, which needs the first task's clean ``logits`` and ``labels``)."""
    if kind not in KINDS:
        raise ValueError(f"curvature must be one of {KINDS}, got {kind!r}")
    if kind == "xi":
        return curvature_penalty(g1, g2)
    a, b = g1.flatten(1), g2.flatten(1)
    keep = _defined(a, b)
    if kind == "houdini-grad":
        xi = _xi(a, b, keep)
        unit = torch.zeros_like(a)
        unit[:, 0] = 1
        a, b = torch.where(keep[:, None], a, unit), torch.where(keep[:, None], b, unit)
        cos = (a * b).sum(1) / ((a * a).sum(1) * (b * b).sum(1)).sqrt()
        return _mean_where(houdini(xi, cos), keep)
    with torch.no_grad():
        xi = _xi(a, b, keep)
    return _mean_where(houdini(xi, softmax_margin(logits, labels)), keep)


class CurvatureRegularised(Wrapper):
    """Wraps an objective: each of its outputs gains a ``"curvature"`` term, the mean ξ between the input
    gradients of tasks ``first`` and ``second`` at the clean images (the objective's own batch when it replaced
    it, e.g. GAT's transformed images with their auxiliary labels; one extra forward pass, double backprop),
    which the weighting then treats as one more loss. ``losses`` must cover both tasks."""

    name = "curvature"

    def __init__(self, inner, losses, first, second, kind="xi"):
        if kind not in KINDS:
            raise ValueError(f"curvature must be one of {KINDS}, got {kind!r}")
        names = losses.names
        for name in (first, second):
            if name not in names:
                raise ValueError(f"curvature: {name!r} is not one of the trained tasks {names}")
        if first == second:
            raise ValueError("curvature: needs two different tasks")
        self.inner, self.losses, self.first, self.second, self.kind = inner, losses, first, second, kind

    def updates(self, model, images, targets, masks):
        for out in self.inner.updates(model, images, targets, masks):
            inputs, labels, valid = out.batch or (images, targets, masks)
            x = inputs.detach().requires_grad_(True)
            outputs = model(x)
            per_sample = self.losses.per_sample(outputs, labels, valid, tasks=[self.first, self.second])
            graph = self.kind != "houdini-out"  # the surrogate on outputs needs the gradients' values only
            g1 = torch.autograd.grad(per_sample[self.first].sum(), x, create_graph=graph, retain_graph=True)[0]
            g2 = torch.autograd.grad(per_sample[self.second].sum(), x, create_graph=graph, retain_graph=True)[0]
            out.task_losses["curvature"] = curvature_term(self.kind, g1, g2, outputs.get(self.first),
                                                          labels.get(self.first))
            out.features = None  # the term reaches the encoder through input gradients, not the representation
            yield out

    def describe(self):
        return {**self.inner.describe(), "curvature": [self.first, self.second], "curvature_kind": self.kind}
