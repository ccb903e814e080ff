"""What an attack needs to know about one task of a model: where its output is and its per-sample loss.

Attacks work on any ``nn.Module`` whose output is a dict (keyed by task name), a tuple or a single tensor.
A :class:`TaskSpec` says which part of the output belongs to the task and how to turn
``(output, target, mask)`` into one loss per sample (shape ``[B]``). Taskonomy tasks from
:mod:`mtrobust_fast.tasks` become specs automatically; :func:`classification` makes one for a classifier head.
"""
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from mtrobust_fast import tasks as task_registry


@dataclass(frozen=True)
class TaskSpec:
    """One attackable task. ``key``: dict key or tuple index of its output (None: the output is a tensor)."""

    name: str
    loss: Callable[..., torch.Tensor]
    key: Optional[Union[str, int]] = None
    error: Optional[Callable[..., torch.Tensor]] = None

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
    """The spec of a registry task on a multi-task model whose dict is keyed by task name."""
    return TaskSpec(task.name, task.loss, key=task.name, error=task.error)


def cross_entropy(logits, labels, mask=None):
    """Per-sample cross-entropy of a classifier ([B, K] logits, [B] labels)."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


def dlr(logits, labels, mask=None):
    """Per-sample Difference-of-Logits-Ratio loss (Croce & Hein 2020), as a loss to maximise."""
    logits = logits.float()
    ordered, _ = logits.sort(dim=1)
    true = logits.gather(1, labels[:, None]).squeeze(1)
    top_is_true = ordered[:, -1] == true
    best_other = torch.where(top_is_true, ordered[:, -2], ordered[:, -1])
    return -(true - best_other) / (ordered[:, -1] - ordered[:, -3] + 1e-12)


def classification(name="label", key=None, loss="ce"):
    """Spec of a classification head: ``loss`` is "ce" or "dlr" (needs at least 3 classes)."""
    losses = {"ce": cross_entropy, "dlr": dlr}
    if loss not in losses:
        raise ValueError(f"loss must be one of {sorted(losses)}, got {loss!r}")
    return TaskSpec(name, losses[loss], key=key,
                    error=lambda logits, labels, mask=None: (logits.argmax(1) != labels).float())


def resolve_specs(model, tasks):
    """``tasks`` as a list of TaskSpec: None (the model's ``task_names``), a letter string like "sd", or a list
    mixing TaskSpec, registry tasks, letters and names."""
    if tasks is None:
        names = getattr(model, "task_names", None)
        if names is None:
            raise ValueError("tasks is required for a model without task_names (give TaskSpec objects)")
        tasks = list(names)
    if isinstance(tasks, (str, TaskSpec)):
        tasks = [tasks] if isinstance(tasks, TaskSpec) or tasks in task_registry.BY_NAME else tasks
    specs = []
    for item in tasks:
        if isinstance(item, TaskSpec):
            specs.append(item)
        elif isinstance(item, task_registry.Task):
            specs.append(from_task(item))
        else:
            specs.extend(from_task(t) for t in task_registry.resolve(item))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"tasks names a task twice: {names}")
    if not specs:
        raise ValueError("tasks is empty")
    return specs
