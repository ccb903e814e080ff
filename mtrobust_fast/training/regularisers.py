"""The gradient-curvature regulariser of GAT: penalise the conflict between two tasks' input gradients.

For the input gradients g1, g2 of two task losses at the same sample (a main task and an auxiliary one),

    ξ = (1 − cos²(g1, g2)) · ‖g1 − g2‖² / ‖g1 + g2‖²

is PCGrad's (Yu et al. 2020) measure of how much the two directions conflict, weighted by how much their sum
cancels: 0 when the gradients are parallel and pointing the same way, large when they disagree. GAT adds the
batch mean of ξ to the training loss (its gradient needs the gradients' own gradients: double backprop).

ξ is undefined where ‖g1‖, ‖g2‖ or ‖g1 + g2‖ is 0 (a sample whose loss is flat, or gradients exactly opposed).
Such samples are left out of the mean, and their gradients are swapped for harmless values before the formula, so
no NaN reaches the backward pass either (the GAT code dropped the whole term when it came out NaN).
"""
import torch

from mtrobust_fast.training.objectives import Objective

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
    xi = _xi(a, b, keep)
    count = keep.sum().clamp_min(1)
    return torch.where(keep, xi, torch.zeros_like(xi)).sum() / count


class CurvatureRegularised(Objective):
    """Wraps an objective: each of its outputs gains a ``"curvature"`` term, the mean ξ between the input
    gradients of tasks ``first`` and ``second`` at the clean images (the objective's own batch when it replaced
    it, e.g. GAT's transformed images with their auxiliary labels; one extra forward pass, double backprop),
    which the weighting then treats as one more loss. ``losses`` must cover both tasks."""

    name = "curvature"

    def __init__(self, inner, losses, first, second):
        names = losses.names
        for name in (first, second):
            if name not in names:
                raise ValueError(f"curvature: {name!r} is not one of the trained tasks {names}")
        if first == second:
            raise ValueError("curvature: needs two different tasks")
        self.inner, self.losses, self.first, self.second = inner, losses, first, second

    def start_epoch(self, epoch):
        self.inner.start_epoch(epoch)

    def updates(self, model, images, targets, masks):
        for out in self.inner.updates(model, images, targets, masks):
            inputs, labels, valid = out.batch or (images, targets, masks)
            x = inputs.detach().requires_grad_(True)
            per_sample = self.losses.per_sample(model(x), labels, valid, tasks=[self.first, self.second])
            g1, g2 = (torch.autograd.grad(per_sample[name].sum(), x, create_graph=True)[0]
                      for name in (self.first, self.second))
            out.task_losses["curvature"] = curvature_penalty(g1, g2)
            out.features = None  # the term reaches the encoder through input gradients, not the representation
            yield out

    def describe(self):
        return {**self.inner.describe(), "curvature": [self.first, self.second]}
