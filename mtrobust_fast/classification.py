"""Classification heads as task records: the second provider of the project's task protocol.

A task record is anything with ``name``, per-sample ``loss(output, target, mask) -> [B]`` and
``error(output, target, mask) -> [B]`` (lower is better), summable ``metric_stats(output, target, mask)``,
``metric_scores(stats) -> {metric: float}`` with ``higher_is_better`` directions, and
``divergence(output, reference, mask) -> [B]`` (how far an output moved from a reference output; TRADES
penalises it). The 11 Taskonomy tasks (:mod:`mtrobust_fast.tasks`) are one provider; this module's
:class:`ClassificationTask` is another; attacks, metrics, training and validation read only the protocol.

Losses keep float32 and float64 logits as they are and compute half-precision ones in float32, so a float64
model is attacked and trained on float64 losses.
"""
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F

from mtrobust_fast.tasks import opmath

ACCURACY_DIRECTIONS = MappingProxyType({"accuracy": True})


def _check(logits, labels):
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"classification needs logits [B, K] and labels [B], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")


def cross_entropy(logits, labels, mask=None):
    """Per-sample softmax cross-entropy."""
    _check(logits, labels)
    return F.cross_entropy(opmath(logits), labels, reduction="none")


def dlr(logits, labels, mask=None):
    """Per-sample Difference-of-Logits-Ratio loss (Croce & Hein 2020), a loss to maximise:
    −(z_y − max_{k≠y} z_k) / (z_π1 − z_π3), with z sorted decreasingly as z_π1 ≥ z_π2 ≥ z_π3. Needs K ≥ 3."""
    _check(logits, labels)
    if logits.shape[1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, got {logits.shape[1]}")
    logits = opmath(logits)
    ordered, _ = logits.sort(dim=1)
    true = logits.gather(1, labels[:, None]).squeeze(1)
    best_other = torch.where(ordered[:, -1] == true, ordered[:, -2], ordered[:, -1])
    return -(true - best_other) / (ordered[:, -1] - ordered[:, -3] + 1e-12)


def bce_one_hot(logits, labels, mask=None):
    """Per-sample mean over the K classes of the sigmoid binary cross-entropy against one-hot labels (the GAT
    source's main-task loss for CIFAR-style data: K independent sigmoids, not a softmax)."""
    _check(logits, labels)
    logits = opmath(logits)
    target = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1)


def kl_divergence(logits, reference, mask=None):
    """Per-sample KL(softmax(reference) ‖ softmax(logits)): how far ``logits`` moved from ``reference``."""
    logits, reference = opmath(logits), opmath(reference)
    return F.kl_div(F.log_softmax(logits, 1), F.log_softmax(reference, 1), reduction="none",
                    log_target=True).sum(1)


def top1_error(logits, labels, mask=None):
    """Per-sample 0/1 error of the top-1 prediction."""
    _check(logits, labels)
    return (logits.argmax(1) != labels).to(opmath(logits).dtype)


LOSS_FUNCTIONS = {"ce": cross_entropy, "dlr": dlr, "bce": bce_one_hot}
LOSSES = tuple(LOSS_FUNCTIONS)


@dataclass(frozen=True)
class ClassificationTask:
    """A classifier head with ``classes`` logits. ``loss_name``: "ce" (softmax cross-entropy), "dlr" (an attack
    loss), or "bce" (sigmoid BCE on one-hot labels). Error: 1 for a wrong top-1 prediction, else 0."""

    name: str = "class"
    classes: int = 10
    loss_name: str = "ce"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a classification task needs a non-empty name, got {self.name!r}")
        if isinstance(self.classes, bool) or not isinstance(self.classes, int) or self.classes < 2:
            raise ValueError(f"classes must be an integer >= 2, got {self.classes!r}")
        if self.loss_name not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss_name!r}")
        if self.loss_name == "dlr" and self.classes < 3:
            raise ValueError("the DLR loss needs at least 3 classes")

    higher_is_better = ACCURACY_DIRECTIONS

    def loss(self, logits, labels, mask=None):
        return LOSS_FUNCTIONS[self.loss_name](logits, labels, mask)

    def error(self, logits, labels, mask=None):
        return top1_error(logits, labels, mask)

    def divergence(self, logits, reference, mask=None):
        return kl_divergence(logits, reference, mask)

    def metric_stats(self, logits, labels, mask=None):
        """(correct top-1 predictions, samples), float64, summable over batches and processes."""
        _check(logits, labels)
        correct = (logits.detach().argmax(1) == labels).sum()
        return torch.stack([correct.double(), torch.tensor(float(labels.shape[0]), dtype=torch.float64,
                                                            device=labels.device)])

    def metric_scores(self, stats):
        count = float(stats[1])
        return {"accuracy": float(stats[0]) / count if count else float("nan")}

    def with_loss(self, loss_name):
        """The same head scored with another loss (e.g. "dlr" for an attack)."""
        return ClassificationTask(self.name, self.classes, loss_name)

    def to_config(self):
        """Plain data that rebuilds this record (stored in model configs and checkpoints)."""
        return {"kind": "classification", "classes": self.classes, "loss": self.loss_name}


def task_from_config(name, config):
    """The record a ``to_config`` dict describes: a classification head, or an auxiliary task's
    (:mod:`mtrobust_fast.auxiliary`)."""
    if config.get("kind") != "classification":
        from mtrobust_fast import auxiliary

        return auxiliary.from_config(name, config)
    return ClassificationTask(name, int(config["classes"]), config.get("loss", "ce"))
