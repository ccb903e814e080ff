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
import math
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F

from mtrobust_fast.registry import Registry
from mtrobust_fast.tasks import opmath

# The kinds of head record a model's config can describe (``config["heads"][name]["kind"]``); each registered
# class rebuilds itself with ``from_config(name, config)`` from what its ``to_config()`` wrote. GAT's auxiliary
# tasks are kinds of their own registry (:data:`mtrobust_fast.tasks.auxiliary.AUXILIARY`).
TASK_KINDS = Registry("task kind")

ACCURACY_DIRECTIONS = MappingProxyType({"accuracy": True})


def _check(logits, labels):
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"classification needs logits [B, K] and labels [B], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")


def cross_entropy(logits, labels, mask=None, label_smoothing=0.0):
    """Per-sample softmax cross-entropy; ``label_smoothing`` s trains against (1 − s)·one-hot + s/K."""
    _check(logits, labels)
    return F.cross_entropy(opmath(logits), labels, reduction="none", label_smoothing=label_smoothing)


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


def targeted_dlr(logits, labels, target_classes):
    """Per-sample targeted DLR loss (Croce & Hein 2020), to maximise: −(z_y − z_t) / (z_π1 − ½(z_π3 + z_π4)),
    t the target class of each sample. Needs K ≥ 4."""
    _check(logits, labels)
    if logits.shape[1] < 4:
        raise ValueError(f"the targeted DLR loss needs at least 4 classes, got {logits.shape[1]}")
    logits = opmath(logits)
    ordered, _ = logits.sort(dim=1, descending=True)
    true = logits.gather(1, labels[:, None])[:, 0]
    target = logits.gather(1, target_classes.to(labels.device)[:, None])[:, 0]
    return -(true - target) / (ordered[:, 0] - 0.5 * (ordered[:, 2] + ordered[:, 3]) + 1e-12)


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


@TASK_KINDS.register("classification")
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
        return {"kind": self.registered_name, "classes": self.classes, "loss": self.loss_name}

    @classmethod
    def from_config(cls, name, config):
        return cls(name, int(config["classes"]), config.get("loss", "ce"))


# The summable AUC statistics are histograms of asinh(logit) over [-AUC_RANGE, AUC_RANGE] in AUC_BINS bins; pairs
# within one bin count as ties. The logit's asinh does not saturate as the sigmoid score does (a confident model's
# scores all fell into the last of 4096 sigmoid bins): bins are 0.00044 wide in the logit near 0, 0.0008 at a
# logit of 1.5 (the sigmoid bins: 0.001 and 0.0016) and 0.044 % of the logit for large ones, up to |logit| = 10^6.
# 2 x 65536 doubles per label (1 MiB) per batch's statistics.
AUC_BINS = 65536
AUC_RANGE = math.asinh(1e6)


def auc_bins(logits):
    """The AUC histogram bin of each logit (long, same shape)."""
    scaled = (torch.asinh(logits.double()) + AUC_RANGE) * (AUC_BINS / (2 * AUC_RANGE))
    return scaled.floor().long().clamp_(0, AUC_BINS - 1)


def _check_multilabel(logits, labels, mask):
    if logits.dim() != 2 or labels.shape != logits.shape or (mask is not None and mask.shape != logits.shape):
        raise ValueError(f"a multi-label head needs logits [B, K], labels [B, K] and a mask [B, K], got "
                         f"{tuple(logits.shape)}, {tuple(labels.shape)} and "
                         f"{None if mask is None else tuple(mask.shape)}")
    return torch.ones_like(labels, dtype=torch.bool) if mask is None else mask.bool()


def _masked_row_mean(values, mask):
    return torch.where(mask, values, torch.zeros_like(values)).sum(1) / mask.sum(1).clamp_min(1)


def binned_auc(positives, negatives):
    """ROC AUC from score histograms of the positive and negative examples (``[..., bins]``, bins in increasing
    score): P(positive score > negative score) + ½ P(equal bin). NaN where either class is absent."""
    below = negatives.cumsum(-1) - negatives  # negatives in strictly lower bins
    wins = (positives * (below + 0.5 * negatives)).sum(-1)
    pairs = positives.sum(-1) * negatives.sum(-1)
    return torch.where(pairs > 0, wins / pairs.clamp_min(1), torch.full_like(wins, float("nan")))


@TASK_KINDS.register("multilabel")
@dataclass(frozen=True)
class MultiLabelTask:
    """A head of ``labels`` independent binary labels (e.g. chest X-ray findings): one logit each, sigmoid BCE.
    Labels are 0/1 floats with a mask of the known ones (uncertain and blank labels are masked out of loss,
    error and metrics). Error: the fraction of a sample's known labels predicted wrongly (logit > 0 means
    positive). Metrics: the AUC of each label (``auc_<name>``), their mean over labels with both classes present
    (``auc``) and the accuracy over known labels; AUCs come from histograms of the logits (:func:`auc_bins`: 65536
    bins of asinh(logit), which do not saturate for confident models), exact up to pairs that share a bin."""

    name: str = "class"
    labels: int = 1
    label_names: tuple = ()

    def __post_init__(self):
        if isinstance(self.labels, bool) or not isinstance(self.labels, int) or self.labels < 1:
            raise ValueError(f"labels must be a positive integer, got {self.labels!r}")
        names = tuple(self.label_names) or tuple(str(i) for i in range(self.labels))
        if len(names) != self.labels:
            raise ValueError(f"{len(names)} label names for {self.labels} labels")
        object.__setattr__(self, "label_names", names)

    @property
    def classes(self):
        """Outputs of the head (its linear layer's width)."""
        return self.labels

    @property
    def higher_is_better(self):
        return MappingProxyType({"auc": True, "accuracy": True, **{f"auc_{n}": True for n in self.label_names}})

    def loss(self, logits, labels, mask=None):
        known = _check_multilabel(logits, labels, mask)
        logits = opmath(logits)
        bce = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
        return _masked_row_mean(bce, known)

    def error(self, logits, labels, mask=None):
        known = _check_multilabel(logits, labels, mask)
        wrong = ((logits > 0) != (labels > 0.5)).to(opmath(logits).dtype)
        return _masked_row_mean(wrong, known)

    def divergence(self, logits, reference, mask=None):
        """Per-sample mean over labels of the Bernoulli KL(sigmoid(reference) ‖ sigmoid(logits))."""
        logits, reference = opmath(logits), opmath(reference)
        p = torch.sigmoid(reference)
        kl = p * (F.logsigmoid(reference) - F.logsigmoid(logits)) + \
            (1 - p) * (F.logsigmoid(-reference) - F.logsigmoid(-logits))
        return kl.mean(1)

    def metric_stats(self, logits, labels, mask=None):
        """Per label: histograms (:func:`auc_bins`) of the logits of its known positives and negatives, then (correct known
        predictions, known labels); float64, flattened, summable over batches and processes."""
        known = _check_multilabel(logits, labels, mask)
        logits = logits.detach()
        bins = auc_bins(logits)
        positive = (labels > 0.5) & known
        negative = (labels <= 0.5) & known
        column = torch.arange(self.labels, device=logits.device).expand_as(bins)
        hist = torch.zeros(2, self.labels * AUC_BINS, dtype=torch.float64, device=logits.device)
        for row, chosen in enumerate((positive, negative)):
            index = (column * AUC_BINS + bins)[chosen]
            hist[row].index_add_(0, index, torch.ones_like(index, dtype=torch.float64))
        correct = (((logits > 0) == (labels > 0.5)) & known).sum().double()
        return torch.cat([hist.flatten(), torch.stack([correct, known.sum().double()])])

    def metric_scores(self, stats):
        hist = stats[:-2].view(2, self.labels, AUC_BINS)
        aucs = binned_auc(hist[0], hist[1])
        defined = ~torch.isnan(aucs)
        count = float(stats[-1])
        return {"auc": float(aucs[defined].mean()) if defined.any() else float("nan"),
                "accuracy": float(stats[-2]) / count if count else float("nan"),
                **{f"auc_{n}": float(a) for n, a in zip(self.label_names, aucs)}}

    def to_config(self):
        return {"kind": self.registered_name, "labels": self.labels, "label_names": list(self.label_names)}

    @classmethod
    def from_config(cls, name, config):
        return cls(name, int(config["labels"]), tuple(config.get("label_names", ())))


@TASK_KINDS.register("regression")
@dataclass(frozen=True)
class RegressionTask:
    """A head of one scalar per sample (e.g. a patient's age, scaled by the dataset) with an L1 loss; samples
    whose value is unknown are masked out. Error: the absolute error; metric: the mean absolute error."""

    name: str = "age"
    classes: int = 1  # outputs of the head's linear layer
    higher_is_better = MappingProxyType({"mae": False})

    def _check(self, output, target, mask):
        if output.dim() != 2 or output.shape[1] != 1 or target.shape != output.shape[:1]:
            raise ValueError(f"a regression head needs outputs [B, 1] and targets [B], got {tuple(output.shape)} "
                             f"and {tuple(target.shape)}")
        return torch.ones_like(target, dtype=torch.bool) if mask is None else mask.bool().reshape(target.shape)

    def loss(self, output, target, mask=None):
        known = self._check(output, target, mask)
        error = (opmath(output)[:, 0] - target.to(opmath(output).dtype)).abs()
        return torch.where(known, error, torch.zeros_like(error))

    error = loss

    def divergence(self, output, reference, mask=None):
        return (opmath(output) - opmath(reference)).abs()[:, 0]

    def metric_stats(self, output, target, mask=None):
        known = self._check(output, target, mask)
        return torch.stack([self.loss(output.detach(), target, mask).double().sum(), known.sum().double()])

    def metric_scores(self, stats):
        return {"mae": float(stats[0]) / float(stats[1]) if float(stats[1]) else float("nan")}

    def to_config(self):
        return {"kind": self.registered_name}

    @classmethod
    def from_config(cls, name, config):
        return cls(name)


def task_from_config(name, config):
    """The record a ``to_config`` dict describes: a registered task kind, or an auxiliary task's
    (:mod:`mtrobust_fast.tasks.auxiliary`)."""
    from mtrobust_fast.tasks.auxiliary import AUXILIARY

    kind = config.get("kind")
    for registry in (TASK_KINDS, AUXILIARY):
        if kind in registry:
            return registry[kind].from_config(name, config)
    raise ValueError(f"head {name!r}: unknown kind {kind!r}; known kinds are "
                     f"{', '.join(list(TASK_KINDS) + list(AUXILIARY))}")
