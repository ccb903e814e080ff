"""GradAlign (Andriushchenko & Flammarion, NeurIPS'20): keep single-step adversarial training from collapsing.

FGSM training fails catastrophically when the loss stops being locally linear inside the ε-ball: the FGSM point
then no longer approximates the worst case. GradAlign measures that non-linearity as the misalignment of the input
gradients at a sample and at a random point of its ball, and penalises it:

    term = mean over samples of 1 − cos(∇ₓ ℓ(x), ∇ₓ ℓ(clip(x + η))),   η ~ U([−ε, ε]^d),

with ℓ the summed per-sample loss of the attacked tasks and ε the inner attack's current budget (so the ε
warm-up scales it too); x + η is clipped to the [0, 1] image box. Both gradients keep their graph (double
backprop), so the term costs two forward and two double-backward passes per batch. Samples where either gradient
is exactly zero have no direction and are left out of the mean. The term joins the objective's losses as
``"gradalign"`` and is weighted by ``gradalign`` (λ; the paper's values for CIFAR-10 grow with ε, e.g. 0.2 at
8/255). The extra passes do not count in BatchNorm's running statistics (restored after the optimiser step). The
term is defined for any differentiable task loss, classification or dense.
"""
import torch

from mtrobust_fast.attacks.base import unwrap
from mtrobust_fast.registry import Setting, number
from mtrobust_fast.training.objectives import Objective, Wrapper
from mtrobust_fast.training.recipes import RECIPES

GRADALIGN = Setting("gradalign", number, 0.0, low=0,
                    help="GradAlign: weight of 1 - cos(input gradient at x, at x + uniform noise in the eps-ball) on "
                         "the attacked tasks' loss (Andriushchenko & Flammarion use 0.2 at 8/255 with FGSM); "
                         "0: off")


def gradient_misalignment(g1, g2):
    """Mean of 1 − cos(g1, g2) per sample of two gradient batches ``[B, ...]`` over the samples where both are
    non-zero (0 when none is), with a gradient free of NaN."""
    a, b = g1.flatten(1), g2.flatten(1)
    aa, bb = (a * a).sum(1), (b * b).sum(1)
    keep = (aa > 0) & (bb > 0)
    cos = (a * b).sum(1) / torch.where(keep, aa * bb, torch.ones_like(aa)).sqrt()
    return torch.where(keep, 1 - cos, torch.zeros_like(cos)).sum() / keep.sum().clamp_min(1)


@RECIPES.register("gradalign")
class GradAlign(Wrapper):
    """``inner`` (an adversarial objective with one update per batch) with GradAlign's term on the tasks it
    attacks."""

    settings = (GRADALIGN,)

    def __init__(self, inner, losses, attacked):
        if not hasattr(inner, "attack") or type(inner).updates is not Objective.updates:
            raise ValueError("gradalign: needs an adversarial objective with one update per batch (its eps sets the "
                             "noise; free replays batches)")
        self.inner, self.losses, self.attacked = inner, losses, list(attacked)
        self._saved = []  # (BatchNorm buffer, its value before the term's passes)

    def after_step(self):
        """After the optimiser step (the term's backward is done): BatchNorm's statistics back to what they were
        before the term's passes (restoring them earlier would change tensors its backward still needs)."""
        with torch.no_grad():
            for buffer, saved in self._saved:
                buffer.copy_(saved)
        self._saved = []
        self.inner.after_step()

    def _input_gradient(self, model, x, targets, masks):
        x = x.detach().requires_grad_(True)
        per_sample = self.losses.per_sample(model(x), targets, masks, tasks=self.attacked)
        return torch.autograd.grad(sum(per_sample.values()).sum(), x, create_graph=True)[0]

    def term(self, model, images, targets, masks):
        """The batch's GradAlign term (the mean misalignment), with its graph."""
        self._saved = [(b, b.clone()) for b in unwrap(model).buffers()]  # restored by after_step
        noise = (torch.rand_like(images) * 2 - 1) * self.inner.attack.eps
        g1 = self._input_gradient(model, images, targets, masks)
        g2 = self._input_gradient(model, (images + noise).clamp(0, 1), targets, masks)
        return gradient_misalignment(g1, g2)

    def __call__(self, model, images, targets, masks):
        out = self.inner(model, images, targets, masks)
        out.task_losses["gradalign"] = self.term(model, images, targets, masks)
        return out

    def describe(self):
        return {**self.inner.describe(), "gradalign": True}
