"""Per-batch training objectives: what the ``Trainer`` minimises, kept separate from the loop.

An objective is any callable ``objective(model, images, targets, masks) -> ObjectiveOutput``. The clean one
below runs the model on the images; adversarial training (Madry, TRADES, FGSM-RS) plugs in as an objective
that first perturbs ``images`` with the attack engine, and GAT as one that adds auxiliary heads, weights the
task losses (MGDA, PCGrad, …) and a curvature regulariser — the loop, AMP, DDP and checkpoints stay as they are.
"""
from dataclasses import dataclass, field

import torch

from mtrobust_fast import tasks as task_registry


@dataclass
class ObjectiveOutput:
    """``loss``: the scalar to back-propagate. ``task_losses``: detached per-task batch means, for logging."""

    loss: torch.Tensor
    task_losses: dict = field(default_factory=dict)


class WeightedTaskLoss:
    """Σ_t w_t · mean_b L_t(b), with each task's per-sample masked loss from ``mtrobust_fast.tasks``.

    ``task_weights`` maps task names or letters to weights (a model's ``config["task_weights"]``).
    """

    def __init__(self, task_weights):
        if not task_weights:
            raise ValueError("task_weights must name at least one task")
        self.weights = {task_registry.get_task(key).name: float(w) for key, w in task_weights.items()}
        self.tasks = task_registry.resolve(list(self.weights))

    def per_sample(self, outputs, targets, masks):
        """{task name: per-sample loss [B]} for the loss's tasks."""
        missing = [t.name for t in self.tasks if t.name not in outputs or t.name not in targets]
        if missing:
            raise KeyError(f"outputs and targets must hold every trained task; missing {missing}")
        return {t.name: t.loss(outputs[t.name], targets[t.name], masks.get(t.name)) for t in self.tasks}

    def combine(self, per_task_means):
        """The weighted sum of per-task scalars (or any tensors of one shape)."""
        return sum(self.weights[name] * value for name, value in per_task_means.items())

    def __call__(self, outputs, targets, masks):
        means = {name: loss.mean() for name, loss in self.per_sample(outputs, targets, masks).items()}
        return ObjectiveOutput(self.combine(means), {name: m.detach() for name, m in means.items()})


class CleanObjective:
    """Standard (non-adversarial) multi-task training: the weighted task loss on the clean images."""

    def __init__(self, loss):
        self.loss = loss

    def __call__(self, model, images, targets, masks):
        return self.loss(model(images), targets, masks)
