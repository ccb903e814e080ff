"""Trivial predictors: what a model must beat before its numbers mean anything.

Each labelled task gets the constant prediction that needs no image:
- segmentation: background everywhere (the class that covers most pixels of indoor scenes);
- dense regression (depth, normals, ...): the per-channel mean of the training targets over valid pixels;
- single-label classification: the most frequent training class (its accuracy is at least chance, 1/classes);
- multi-label classification: each label's training prevalence (AUC 0.5);
- scalar regression: the training mean.
A record may define its own ``trivial_prediction(means) -> (description, constant [C])``, given the masked
per-channel training means of its target (one-hot for class labels).

The means come from at most ``max_batches`` training batches; the scores from the same validation images and
metric code as the model's, so the two are directly comparable.
"""
import math

import torch
import torch.nn.functional as F

from mtrobust_fast.device import to_device
from mtrobust_fast.tasks import benchmarks, classification
from mtrobust_fast.tasks.decoding import SEGMENT_IGNORE
from mtrobust_fast.tasks.taskonomy import Task

BACKGROUND = 1  # the Taskonomy label of walls, floors, ceilings and unlabelled furniture
MAX_BATCHES = 64


DENSE_RECORDS = (Task, benchmarks.SegmentationTask, benchmarks.DepthTask, benchmarks.NormalTask)


def _is_dense(record):
    return isinstance(record, DENSE_RECORDS)


def _is_class_label(record):
    return (_is_dense(record) and record.is_segmentation) or isinstance(record, classification.ClassificationTask)


def _channels(record):
    return record.channels if _is_dense(record) else record.classes


def _encoded(record, target, mask):
    """(target as per-channel values [B, C, ...], validity of the same shape)."""
    channels = _channels(record)
    if _is_class_label(record):
        ignore = SEGMENT_IGNORE if isinstance(record, Task) else None  # benchmark labels: the mask says
        valid = target != ignore if ignore is not None else torch.ones_like(target, dtype=torch.bool)
        values = F.one_hot(target.long().clamp(0, channels - 1), channels).movedim(-1, 1).double()
        valid = valid.unsqueeze(1).expand_as(values)
    else:
        values = target.double().reshape(target.shape[0], channels, *target.shape[2:]) if _is_dense(record) \
            else target.double().reshape(target.shape[0], -1)
        valid = torch.ones_like(values, dtype=torch.bool)
    if mask is not None:
        mask = mask.bool()
        if _is_dense(record) and mask.dim() == values.dim() - 1:
            mask = mask.unsqueeze(1)
        valid = valid & mask.reshape(mask.shape[0], -1, *values.shape[2:]).expand_as(values) if _is_dense(record) \
            else valid & mask.reshape(values.shape)
    return values, valid


def training_means(records, loader, device="cpu", max_batches=MAX_BATCHES):
    """``{task name: masked per-channel mean of the training target [C]}`` over at most ``max_batches``
    batches of ``loader`` (class labels one-hot encoded)."""
    sums = {r.name: torch.zeros(_channels(r), dtype=torch.float64) for r in records}
    counts = {r.name: torch.zeros(_channels(r), dtype=torch.float64) for r in records}
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        _, targets, masks = to_device(batch, device)
        for record in records:
            values, valid = _encoded(record, targets[record.name], masks.get(record.name))
            dims = [d for d in range(values.dim()) if d != 1]
            sums[record.name] += torch.where(valid, values, 0.0).sum(dims).cpu()
            counts[record.name] += valid.sum(dims).double().cpu()
    return {name: sums[name] / counts[name].clamp_min(1) for name in sums}


def trivial_prediction(record, means):
    """(description, constant output [C]) of ``record``'s trivial predictor, or None when it has none."""
    if hasattr(record, "trivial_prediction"):
        return record.trivial_prediction(means)
    channels = _channels(record)
    if isinstance(record, Task) and record.is_segmentation:
        return "all-background", F.one_hot(torch.tensor(BACKGROUND), channels).double()
    if isinstance(record, Task):
        return "training mean", means.clone()
    if isinstance(record, classification.ClassificationTask):
        return "majority class", F.one_hot(means.argmax(), channels).double()
    if isinstance(record, classification.MultiLabelTask):
        p = means.clamp(1e-6, 1 - 1e-6)
        return "training prevalence", torch.log(p / (1 - p))
    if isinstance(record, classification.RegressionTask):
        return "training mean", means.clone()
    return None


def _constant_output(record, constant, images):
    batch = images.shape[0]
    if _is_dense(record):
        return constant.to(images.dtype).view(1, -1, 1, 1).expand(batch, -1, *images.shape[-2:])
    return constant.to(images.dtype).view(1, -1).expand(batch, -1)


@torch.no_grad()
def trivial_scores(records, train_loader, val_loader, device="cpu", max_batches=MAX_BATCHES):
    """``{task name: {"predictor": description, "error": mean per-sample error, **metric scores}}`` of the
    trivial predictor of every record that has one, on ``val_loader``'s images."""
    records = list(records)
    means = training_means(records, train_loader, device, max_batches)
    predictors = {r.name: trivial_prediction(r, means[r.name]) for r in records}
    records = [r for r in records if predictors[r.name] is not None]
    stats, errors, samples = {}, {r.name: 0.0 for r in records}, 0
    for batch in val_loader:
        images, targets, masks = to_device(batch, device)
        for record in records:
            output = _constant_output(record, predictors[record.name][1].to(device), images)
            value = record.metric_stats(output, targets[record.name], masks.get(record.name))
            stats[record.name] = value if record.name not in stats else stats[record.name] + value
            errors[record.name] += float(record.error(output, targets[record.name], masks.get(record.name)).sum())
        samples += images.shape[0]
    return {r.name: {"predictor": predictors[r.name][0], "error": errors[r.name] / samples if samples else math.nan,
                     **r.metric_scores(stats[r.name].cpu())} for r in records if r.name in stats}


def compare(scores, trivial, higher_is_better):
    """One phrase per metric: the model's score, the trivial one and their ratio, e.g. "mse 0.012 vs 0.041
    (0.29x)"; ``higher_is_better`` maps metric names to directions."""
    parts = []
    for metric, value in scores.items():
        if metric not in trivial or metric not in higher_is_better or metric.startswith("auc_"):
            continue
        base = trivial[metric]
        ratio = f" ({value / base:.2f}x)" if base and math.isfinite(base) and math.isfinite(value) else ""
        parts.append(f"{metric} {value:.4g} vs {base:.4g}{ratio}")
    return ", ".join(parts)
