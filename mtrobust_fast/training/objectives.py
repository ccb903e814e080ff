"""Per-batch training objectives: what the ``Trainer`` minimises, kept separate from the loop.

An objective maps a batch to one loss per trained task, each a scalar with its graph (:class:`ObjectiveOutput`);
the weighting strategy (:mod:`mtrobust_fast.weighting`) turns them into gradients. ``updates`` yields one
output per parameter update: one for most objectives, several when an objective replays a batch (Free
adversarial training). The clean objective is here; the adversarial ones are in ``adversarial.py``.
"""
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

from mtrobust_fast import tasks as task_registry
from mtrobust_fast.models.multitask import MultiTaskModel
from mtrobust_fast.registry import Setting, number
from mtrobust_fast.tasks.classification import ClassificationTask, cross_entropy
from mtrobust_fast.training.recipes import RECIPES


@dataclass
class ObjectiveOutput:
    """``task_losses``: ``{task name: batch-mean loss}``, scalars that keep their graph. ``features``: the
    shared representations the losses were computed from (one per forward pass), for gradient-based
    weightings; None for models without a shared encoder. ``batch``: ``(images, targets, masks)`` the losses
    refer to when the objective replaced the trainer's batch (GAT's transformed images and auxiliary labels),
    else None. ``clean_outputs``: the model's outputs (every head) on the clean images, when the objective
    computed them, so a wrapper can score more heads without another forward pass."""

    task_losses: dict = field(default_factory=dict)
    features: Optional[list] = None
    batch: Optional[tuple] = None
    clean_outputs: Optional[dict] = None


def forward(model, images, features=None):
    """The model's outputs at ``images``; a multi-task model's shared representation is appended to the list
    ``features`` (when given)."""
    module = getattr(model, "module", model)
    if features is None or not isinstance(module, MultiTaskModel):
        return model(images)
    outputs, representation = model(images, with_features=True)
    features.append(representation)
    return outputs


LABEL_SMOOTHING = Setting("label_smoothing", number, 0.0, low=0, high=0.99,
                          help="train softmax classification heads against (1 - s) one-hot + s/K labels; attacks, "
                               "validation and robust validation keep plain cross-entropy")


@RECIPES.register("label_smoothing")
class TaskLosses:
    """The per-sample losses of the trained tasks (task records of the open protocol, or registry names).

    ``label_smoothing``: the training losses (:meth:`means`) of softmax classification heads use smoothed
    labels; :meth:`per_sample` (validation, regularisers) and every attack keep the records' own losses, so a
    smoothed model is attacked and scored on plain cross-entropy."""

    settings = (LABEL_SMOOTHING,)

    def __init__(self, tasks, label_smoothing=0.0):
        self.tasks = [task_registry.record(t) for t in tasks]
        if not self.tasks:
            raise ValueError("at least one task must be trained")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"a task is given twice: {names}")
        self.label_smoothing = LABEL_SMOOTHING.parse(label_smoothing)
        self.smoothed = [t.name for t in self.tasks if isinstance(t, ClassificationTask) and t.loss_name == "ce"] \
            if self.label_smoothing else []
        if self.label_smoothing and not self.smoothed:
            raise ValueError(f"label_smoothing: none of the trained tasks {names} is a softmax classification head "
                             f"(cross-entropy over classes); leave it at 0")

    @property
    def names(self):
        return [t.name for t in self.tasks]

    def per_sample(self, outputs, targets, masks, tasks=None):
        """{task name: per-sample loss [B]} for ``tasks`` (default every trained task)."""
        chosen = self.tasks if tasks is None else [t for t in self.tasks if t.name in tasks]
        missing = [t.name for t in chosen if t.name not in outputs or t.name not in targets]
        if missing:
            raise KeyError(f"outputs and targets must hold every trained task; missing {missing}")
        return {t.name: t.loss(outputs[t.name], targets[t.name], masks.get(t.name)) for t in chosen}

    def means(self, outputs, targets, masks, tasks=None):
        """{task name: batch-mean training loss} (with graph; smoothed labels where ``label_smoothing`` applies)."""
        losses = self.per_sample(outputs, targets, masks, [n for n in self.names if n not in self.smoothed
                                                           and (tasks is None or n in tasks)])
        for name in self.smoothed:
            if tasks is None or name in tasks:
                losses[name] = cross_entropy(outputs[name], targets[name], label_smoothing=self.label_smoothing)
        return {name: losses[name].mean() for name in self.names if name in losses}


class Objective:
    """Base of the objectives. A subclass defines ``__call__(model, images, targets, masks) -> ObjectiveOutput``
    (one update per batch), or overrides ``updates`` when it makes several (Free replays a batch)."""

    def updates(self, model, images, targets, masks):
        """The outputs to back-propagate for this batch, one per optimiser step (the trainer steps after each)."""
        yield self(model, images, targets, masks)

    def start_epoch(self, epoch):
        """Called before each training epoch (0-based); objectives that carry state across batches reset it."""

    def scale_budget(self, factor):
        """Called before each batch with the fraction of the adversarial budget in force (the ε warm-up)."""

    def after_step(self):
        """Called after each optimiser step (AWP takes its weight perturbation back here)."""

    def holding(self):
        """A context in which the adversarial points of the batch are computed once and reused (see
        :meth:`~mtrobust_fast.training.adversarial.AdversarialObjective.holding`); nothing to hold here."""
        return nullcontext()

    def describe(self):
        """Plain-data settings recorded with checkpoints."""
        return {"objective": "clean"}


class Wrapper(Objective):
    """An objective around another (``inner``): the trainer's calls reach the inner objective unless a wrapper
    adds to them (AWP, GradAlign, the curvature term, GAT)."""

    inner: Objective

    def start_epoch(self, epoch):
        self.inner.start_epoch(epoch)

    def scale_budget(self, factor):
        self.inner.scale_budget(factor)

    def after_step(self):
        self.inner.after_step()

    def holding(self):
        return self.inner.holding()


class CleanObjective(Objective):
    """Standard (non-adversarial) multi-task training: every task's loss on the clean images."""

    def __init__(self, losses):
        self.losses = losses

    def __call__(self, model, images, targets, masks):
        features = []
        outputs = forward(model, images, features)
        return ObjectiveOutput(self.losses.means(outputs, targets, masks), features or None, clean_outputs=outputs)
