"""Adversarial weight perturbation (AWP, Wu et al., NeurIPS'20) around any one-update objective.

AT finds the worst input for the current weights; AWP also moves the weights, within a small ball, towards
where the training loss is highest, and trains the model from there, which flattens the weight loss landscape
that robust generalisation depends on. Per batch: the wrapped objective's adversarial points are computed once
(at the weights w); the gradient g of its weighted loss with respect to the weights gives, per layer l, the
perturbation v_l = γ·‖w_l‖·g_l/‖g_l‖ (relative to the layer's own size; one ascent step, as in the paper; only
weight tensors of two or more dimensions, not biases or normalisation parameters); the objective is evaluated
again at w + v on the same adversarial points and the optimiser steps from there; the perturbation is then
taken back, so the step lands at w − η·∇L(w + v). Cost: one more forward and backward pass per batch.
"""
import torch

from mtrobust_fast.attacks.base import unwrap
from mtrobust_fast.registry import Setting, integer, number
from mtrobust_fast.training.objectives import Objective, Wrapper
from mtrobust_fast.training.recipes import RECIPES

AWP_GAMMA = Setting("awp_gamma", number, 0.0, low=0, high=1,
                    help="adversarial weight perturbation: its size relative to each layer's weights (Wu et al. "
                         "use 5e-3 to 1e-2); wraps any objective but free; 0: off")
AWP_WARMUP = Setting("awp_warmup", integer, 0, low=0, help="epochs trained before the weight perturbation starts")


@RECIPES.register("awp")
class AWP(Wrapper):
    """``inner`` trained at adversarially perturbed weights. ``weights``: the static task weights that combine
    its losses into the loss the perturbation raises; ``gamma``, ``warmup``: see the settings."""

    settings = (AWP_GAMMA, AWP_WARMUP)

    def __init__(self, inner, weights, gamma, warmup=0):
        if type(inner).updates is not Objective.updates:
            raise ValueError("awp_gamma: AWP wraps objectives that make one update per batch (free replays batches)")
        self.inner, self.weights = inner, dict(weights)
        self.gamma, self.warmup = AWP_GAMMA.parse(gamma), AWP_WARMUP.parse(warmup)
        if not self.gamma > 0:
            raise ValueError(f"awp_gamma must be > 0 to perturb the weights, got {gamma!r}")
        self.active, self._applied = False, []

    def start_epoch(self, epoch):
        self.active = epoch >= self.warmup
        self.inner.start_epoch(epoch)

    def perturbation(self, module, task_losses):
        """[(parameter, v)]: the per-layer ascent step of relative size ``gamma`` on the weighted loss."""
        parameters = [p for p in module.parameters() if p.requires_grad and p.dim() > 1]
        total = sum(self.weights.get(name, 0.0) * loss for name, loss in task_losses.items())
        grads = torch.autograd.grad(total, parameters, allow_unused=True)
        out = []
        for parameter, grad in zip(parameters, grads):
            if grad is None:
                continue
            norm = grad.norm()
            if norm > 0:
                out.append((parameter, grad * (self.gamma * parameter.detach().norm() / norm)))
        return out

    def __call__(self, model, images, targets, masks):
        if not self.active:
            return self.inner(model, images, targets, masks)
        module = unwrap(model)
        buffers = {name: b.clone() for name, b in module.named_buffers()}
        with self.inner.holding():
            first = self.inner(model, images, targets, masks)
            steps = self.perturbation(module, first.task_losses)
            del first
            with torch.no_grad():  # the first pass only finds v: BatchNorm statistics count the batch once
                for name, b in module.named_buffers():
                    b.copy_(buffers[name])
            with torch.no_grad():
                for parameter, v in steps:
                    parameter.add_(v)
            self._applied = steps
            return self.inner(model, images, targets, masks)

    def after_step(self):
        with torch.no_grad():
            for parameter, v in self._applied:
                parameter.sub_(v)
        self._applied = []
        self.inner.after_step()

    def describe(self):
        return {**self.inner.describe(), "awp": {"gamma": self.gamma, "warmup": self.warmup}}
