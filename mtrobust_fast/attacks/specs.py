"""What an attack needs to know about one task of a model: where its output is and its per-sample loss.

Attacks work on any ``nn.Module`` whose output is a dict (keyed by task name), a tuple or a single tensor.
A :class:`TaskSpec` says which part of the output belongs to the task and how to turn
``(output, target, mask)`` into one loss per sample (shape ``[B]``). Task records (Taskonomy tasks from
:mod:`mtrobust_fast.tasks`, classification heads from :mod:`mtrobust_fast.tasks.classification`, or a model's own
``task_records``) become specs automatically; :func:`classification` makes one for any classifier output.
"""
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from mtrobust_fast.tasks import classification as heads
from mtrobust_fast import tasks as task_registry
from mtrobust_fast.tasks.protocol import TaskRecord


@dataclass(frozen=True)
class TaskSpec:
    """One attackable task. ``key``: dict key or tuple index of its output (None: the output is a tensor).
    ``top1``: its error is a classifier's 0/1 top-1 error (what a success stop reads)."""

    name: str
    loss: Callable[..., torch.Tensor]
    key: Optional[Union[str, int]] = None
    error: Optional[Callable[..., torch.Tensor]] = None
    top1: bool = False

    def damage(self, output, target, mask=None):
        """Per-sample error, or the loss for a spec without an error: what composite attacks (the ensemble, the
        grid search) rank adversarial points by."""
        return (self.loss if self.error is None else self.error)(output, target, mask)

    def output(self, outputs):
        if self.key is None:
            if not isinstance(outputs, torch.Tensor):
                raise ValueError(f"task {self.name!r} expects the model to return a tensor, got "
                                 f"{type(outputs).__name__}; give the spec a key")
            return outputs
        try:
            return outputs[self.key]
        except (KeyError, IndexError, TypeError) as error:
            raise ValueError(f"task {self.name!r}: the model output has no entry {self.key!r}") from error


def from_task(task):
    """The spec of a task record (a registry task, a :class:`~mtrobust_fast.tasks.classification.ClassificationTask`, ...)
    on a model whose output dict is keyed by the task's name."""
    return TaskSpec(task.name, task.loss, key=task.name, error=task.error,
                    top1=isinstance(task, heads.ClassificationTask))


def classification(name="label", key=None, loss="ce"):
    """Spec of a classification head: ``loss`` is "ce", "dlr" (needs at least 3 classes) or "bce" (sigmoid BCE
    on one-hot labels)."""
    if loss not in heads.LOSSES:
        raise ValueError(f"loss must be one of {heads.LOSSES}, got {loss!r}")
    return TaskSpec(name, heads.LOSS_FUNCTIONS[loss], key=key, error=heads.top1_error, top1=True)


def resolve_specs(model, tasks):
    """``tasks`` as a list of TaskSpec: None (the model's ``task_names``), a letter string like "sd", or a list
    mixing TaskSpec, registry tasks, letters and names."""
    records = dict(getattr(model, "task_records", {}) or {})
    if tasks is None:
        names = getattr(model, "task_names", None)
        if names is None:
            raise ValueError("tasks is required for a model without task_names: give TaskSpec objects, e.g. "
                             "[classification()] for a classifier that returns logits, or Taskonomy task letters")
        tasks = list(names)
    if isinstance(tasks, (str, TaskSpec)):
        tasks = [tasks] if isinstance(tasks, TaskSpec) or tasks in task_registry.BY_NAME or tasks in records \
            else tasks
    heads = list(getattr(model, "task_names", None) or ())
    specs = []
    for item in tasks:
        if isinstance(item, TaskSpec):
            specs.append(item)
        elif isinstance(item, str) and item in records:
            specs.append(from_task(records[item]))
        elif isinstance(item, TaskRecord):
            specs.append(from_task(item))
        elif isinstance(item, str) and item in heads and item not in task_registry.BY_NAME:
            raise ValueError(f"tasks: the model's head {item!r} has no task record; give a TaskSpec for it, e.g. "
                             f"TaskSpec({item!r}, loss, key={item!r}), or the model records")
        else:
            specs.extend(from_task(records.get(t.name, t)) for t in task_registry.resolve(item))  # the model's own
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"tasks names a task twice: {names}")
    if not specs:
        raise ValueError("tasks is empty")
    return specs
