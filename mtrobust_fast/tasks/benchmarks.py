"""Task records of the dense multi-task benchmarks (NYUv2, Cityscapes), scored as the papers on them score.

Three kinds of head record, described in a model's ``config["heads"]`` like the classification heads:

- ``segmentation``: per-pixel labels over ``classes`` classes; pixels the data leave unlabelled are masked out
  (every label value is a class, unlike Taskonomy's "0 = uncertain"). Loss: pixel cross-entropy averaged over a
  sample's labelled pixels. Metrics: mIoU and pixel accuracy from the confusion matrix summed over the split.
  mIoU averages over the classes that occur in the labels or the predictions; it equals the mean over all
  classes that LibMTL reports whenever every class occurs (on the real validation sets they all do).
- ``depth``: one channel, pixels with depth 0 masked out. Loss and per-sample error: L1 over valid pixels.
  Metrics: absolute error (mean |pred − gt|) and relative error (mean |pred − gt| / gt) over all valid pixels of
  the split. LibMTL averages per-batch means weighted by batch size, which depends on how images fall into
  batches; pooling over pixels does not (the two agree when every batch has as many valid pixels).
- ``normal``: three channels, unit normals in the target, pixels whose target is the zero vector masked out.
  The prediction is normalised to unit length before it is scored. Loss: 1 − cosine similarity averaged over
  valid pixels; per-sample error: the mean angle in degrees. Metrics: mean and median angle error (degrees) and
  the fractions of valid pixels within 11.25°, 22.5° and 30°. The angle statistics are summed as a histogram of
  0.01° bins: the mean and the fractions are exact, the median is the centre of the bin where the cumulative
  count reaches half (within 0.005° of numpy's median of the raw angles).

On these datasets the heads take the names of the Taskonomy tasks that measure the same thing
(``segment_semantic``, ``depth_zbuffer``, ``normal``), so task letters (``s``, ``d``, ``n``) name them in every
command; the records here, not Taskonomy's, give their losses and metrics.
"""
import math
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F

from mtrobust_fast.task_names import SEGMENT_DIRECTIONS
from mtrobust_fast.tasks.classification import TASK_KINDS
from mtrobust_fast.tasks.losses import (_dense_mask, _masked_mean, l1_loss, opmath, segment_divergence,
                                        segment_error, segment_loss, segment_loss_balanced, segment_scores,
                                        segment_stats)

ANGLE_BINS_PER_DEGREE = 100
ANGLE_BINS = 180 * ANGLE_BINS_PER_DEGREE
ANGLE_THRESHOLDS = (11.25, 22.5, 30.0)
SEGMENT_TRAINING_LOSSES = {"ce": segment_loss, "balanced": segment_loss_balanced}


def _check_shapes(output, target, channels, what):
    if output.dim() != 4 or output.shape[1] != channels or target.shape != output.shape:
        raise ValueError(f"{what} needs output and target [B, {channels}, H, W], got {tuple(output.shape)} and "
                         f"{tuple(target.shape)}")


def _valid(target, mask):
    """[B, 1, H, W] validity: the given mask (any of [B,H,W], [B,1,H,W], [B,C,H,W]), else every pixel."""
    if mask is None:
        return torch.ones_like(target[:, :1], dtype=torch.bool)
    mask = _dense_mask(mask)
    return mask if mask.shape[1] == 1 else mask.all(1, keepdim=True)


@TASK_KINDS.register("segmentation")
@dataclass(frozen=True)
class SegmentationTask:
    """Semantic segmentation over ``classes`` classes, unlabelled pixels masked; ``loss_name``: the training loss
    ("ce", or "balanced": every class present in an image weighs the same). Errors and metrics do not depend on it."""

    name: str = "segment_semantic"
    classes: int = 13
    loss_name: str = "ce"
    higher_is_better = SEGMENT_DIRECTIONS
    is_segmentation = True
    ignore = None  # no label value means "unlabelled": the mask does
    mirror_signs = ()

    def __post_init__(self):
        if isinstance(self.classes, bool) or not isinstance(self.classes, int) or self.classes < 2:
            raise ValueError(f"classes must be an integer >= 2, got {self.classes!r}")
        if self.loss_name not in SEGMENT_TRAINING_LOSSES:
            raise ValueError(f"loss must be one of {', '.join(SEGMENT_TRAINING_LOSSES)}, got {self.loss_name!r}")

    @property
    def channels(self):
        return self.classes

    def _check(self, output, target):
        if output.dim() != 4 or output.shape[1] != self.classes:
            raise ValueError(f"{self.name}: needs logits [B, {self.classes}, H, W], got {tuple(output.shape)}")
        if target.dtype != torch.long:
            raise ValueError(f"{self.name}: labels must be int64 class indices, got {target.dtype}")

    def loss(self, output, target, mask=None):
        self._check(output, target)
        return SEGMENT_TRAINING_LOSSES[self.loss_name](output, target, mask, ignore=None)

    def error(self, output, target, mask=None):
        self._check(output, target)
        return segment_error(output, target, mask, ignore=None)

    def divergence(self, output, reference, mask=None):
        return segment_divergence(output, reference, mask)

    def metric_stats(self, output, target, mask=None):
        self._check(output, target)
        return segment_stats(output, target, mask, ignore=None)

    def metric_scores(self, stats):
        return segment_scores(stats)

    def with_loss(self, loss_name):
        return SegmentationTask(self.name, self.classes, loss_name)

    def trivial_prediction(self, means):
        """The most frequent training class everywhere (``means``: the training class frequencies)."""
        return "majority class", F.one_hot(means.argmax(), self.classes).double()

    def to_config(self):
        return {"kind": self.registered_name, "classes": self.classes, "loss": self.loss_name}

    @classmethod
    def from_config(cls, name, config):
        return cls(name, int(config["classes"]), config.get("loss", "ce"))


@TASK_KINDS.register("depth")
@dataclass(frozen=True)
class DepthTask:
    """Depth (or disparity) regression, one channel; pixels with depth 0 are invalid (masked by the reader)."""

    name: str = "depth_zbuffer"
    channels = 1
    higher_is_better = MappingProxyType({"abs_err": False, "rel_err": False})
    is_segmentation = False
    mirror_signs = ()

    def loss(self, output, target, mask=None):
        _check_shapes(output, target, 1, self.name)
        return l1_loss(output, target, _valid(target, mask))

    error = loss

    def divergence(self, output, reference, mask=None):
        return l1_loss(output, reference, mask)

    def metric_stats(self, output, target, mask=None):
        """(sum |e|, sum |e| / gt, valid pixels) over the batch, float64; pixels with gt <= 0 never count."""
        _check_shapes(output, target, 1, self.name)
        target = target.double()
        valid = _valid(target, mask) & (target > 0)
        error = (output.detach().double() - target).abs()
        return torch.stack([torch.where(valid, error, 0.0).sum(),
                            torch.where(valid, error / target.where(valid, 1.0), 0.0).sum(),
                            valid.sum().double()])

    def trivial_prediction(self, means):
        return "training mean", means.clone()

    def metric_scores(self, stats):
        count = float(stats[2])
        if not count:
            return {"abs_err": math.nan, "rel_err": math.nan}
        return {"abs_err": float(stats[0]) / count, "rel_err": float(stats[1]) / count}

    def to_config(self):
        return {"kind": self.registered_name}

    @classmethod
    def from_config(cls, name, config):
        return cls(name)


def _cosine(output, target):
    """Per-pixel cosine [B, 1, H, W] between the unit-normalised prediction and the target."""
    output = F.normalize(opmath(output), dim=1, eps=1e-12)
    return (output * target.to(output.dtype)).sum(1, keepdim=True)


def angles_degrees(output, target):
    """Per-pixel angle [B, 1, H, W] in degrees between the normalised prediction and the (unit) target."""
    return torch.rad2deg(torch.acos(_cosine(output, target).clamp(-1.0, 1.0)))


@TASK_KINDS.register("normal")
@dataclass(frozen=True)
class NormalTask:
    """Surface normals, three channels; the prediction is normalised to unit length before it is scored."""

    name: str = "normal"
    channels = 3
    higher_is_better = MappingProxyType({"mean": False, "median": False, **{f"within_{t:g}": True
                                                                          for t in ANGLE_THRESHOLDS}})
    is_segmentation = False
    mirror_signs = (-1.0, 1.0, 1.0)  # x points right: mirrored images flip it
    scale_invariant = True  # only the prediction's direction counts (heads must not start at the zero vector)

    def loss(self, output, target, mask=None):
        _check_shapes(output, target, 3, self.name)
        return _masked_mean(1.0 - _cosine(output, target), _valid(target, mask))

    def error(self, output, target, mask=None):
        _check_shapes(output, target, 3, self.name)
        return _masked_mean(angles_degrees(output, target), _valid(target, mask))

    def divergence(self, output, reference, mask=None):
        reference = F.normalize(opmath(reference), dim=1, eps=1e-12)
        return _masked_mean(1.0 - _cosine(output, reference), _dense_mask(mask))

    def trivial_prediction(self, means):
        """The direction of the mean training normal everywhere (facing the camera if the mean is 0)."""
        norm = means.norm()
        return "training mean", means / norm if norm > 0 else means.new_tensor([0.0, 0.0, 1.0])

    def metric_stats(self, output, target, mask=None):
        """(histogram of the valid pixels' angles in 0.01° bins, sum of angles), float64, summable."""
        _check_shapes(output, target, 3, self.name)
        angles = angles_degrees(output.detach().double(), target.double())[_valid(target, mask)]
        bins = (angles * ANGLE_BINS_PER_DEGREE).floor().long().clamp_(0, ANGLE_BINS - 1)
        histogram = torch.zeros(ANGLE_BINS, dtype=torch.float64, device=output.device)
        histogram.index_add_(0, bins, torch.ones_like(angles))
        return torch.cat([histogram, angles.sum().reshape(1)])

    def metric_scores(self, stats):
        histogram, total = stats[:-1], float(stats[-1])
        count = float(histogram.sum())
        if not count:
            return {name: math.nan for name in self.higher_is_better}
        cumulative = histogram.cumsum(0)
        median_bin = int(torch.searchsorted(cumulative, torch.tensor(count / 2, dtype=cumulative.dtype)))
        scores = {"mean": total / count, "median": (median_bin + 0.5) / ANGLE_BINS_PER_DEGREE}
        for threshold in ANGLE_THRESHOLDS:
            scores[f"within_{threshold:g}"] = float(histogram[:round(threshold * ANGLE_BINS_PER_DEGREE)].sum()) / count
        return scores

    def to_config(self):
        return {"kind": self.registered_name}

    @classmethod
    def from_config(cls, name, config):
        return cls(name)
