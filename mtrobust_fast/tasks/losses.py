"""Per-sample losses, errors and summable metric statistics of the Taskonomy tasks.

Losses and errors are per sample (shape [B]), masked, and normalised by the sample's number of valid elements
(the source divided by all elements, so samples with many invalid pixels got smaller losses); reductions over the
batch are the caller's. Segmentation uses no class re-weighting (the source weighted classes by prior factors).
"""
import math

import torch
import torch.nn.functional as F

from mtrobust_fast.tasks.decoding import SEGMENT_IGNORE

def opmath(tensor):
    """The precision losses are computed in: half-precision values in float32, float32 and float64 unchanged
    (a float64 model is attacked and trained on float64 losses)."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _dense_mask(mask):
    """None or a bool/0-1 mask [B,H,W], [B,1,H,W] or [B,C,H,W] -> None or bool with a channel axis."""
    if mask is None:
        return None
    mask = mask if mask.dtype == torch.bool else mask != 0
    return mask.unsqueeze(1) if mask.dim() == 3 else mask


def _masked_mean(values, mask):
    """Per-sample mean over valid elements: [B,...] -> [B]; 0 for a sample without valid elements."""
    if mask is None:
        return values.flatten(1).mean(1)
    mask = mask.expand_as(values)
    total = torch.where(mask, values, 0.0).flatten(1).sum(1)
    return total / mask.flatten(1).sum(1).clamp_min(1)


def _check_dense(output, target):
    if output.shape != target.shape:
        raise ValueError(f"output shape {tuple(output.shape)} does not match target shape {tuple(target.shape)}")


def l1_loss(output, target, mask=None):
    """Masked L1 per sample [B], normalised by the valid count (the source's mean over all elements is not)."""
    _check_dense(output, target)
    output = opmath(output)
    return _masked_mean((output - target.to(output.dtype)).abs(), _dense_mask(mask))


def mse_error(output, target, mask=None):
    """Masked MSE per sample [B] over valid elements."""
    _check_dense(output, target)
    output = opmath(output)
    return _masked_mean((output - target.to(output.dtype)).square(), _dense_mask(mask))


def label_mask(output, target, mask, ignore=SEGMENT_IGNORE):
    """Valid pixels [B,H,W] of a labelled batch: target != ``ignore`` (Taskonomy's 0, "uncertain"; None: every
    label is a class and only ``mask`` says which pixels count) and the given mask."""
    if output.dim() != 4 or target.shape != output.shape[:1] + output.shape[2:]:
        raise ValueError(f"segmentation needs output [B,C,H,W] and target [B,H,W], "
                         f"got {tuple(output.shape)} and {tuple(target.shape)}")
    valid = torch.ones_like(target, dtype=torch.bool) if ignore is None else target != ignore
    mask = _dense_mask(mask)
    return valid if mask is None else valid & mask[:, 0]


def segment_loss(output, target, mask=None, ignore=SEGMENT_IGNORE):
    """Cross-entropy per sample [B], averaged over the sample's valid pixels (:func:`label_mask`)."""
    valid = label_mask(output, target, mask, ignore)
    ce = F.cross_entropy(opmath(output), target, reduction="none", ignore_index=-100 if ignore is None else ignore)
    return _masked_mean(ce, valid)


def segment_loss_balanced(output, target, mask=None, ignore=SEGMENT_IGNORE):
    """Class-balanced cross-entropy per sample [B]: the mean over the classes present in the sample's valid
    pixels of that class's mean pixel cross-entropy. Every class of an image counts equally whatever its area,
    so a model cannot reach a low loss by predicting the dominant background everywhere (the failure of plain
    cross-entropy on small, background-heavy sets). A sample without valid pixels has loss 0."""
    valid = label_mask(output, target, mask, ignore)
    ce = F.cross_entropy(opmath(output), target, reduction="none", ignore_index=-100 if ignore is None else ignore)
    batch, classes = output.shape[0], output.shape[1]
    index = (torch.arange(batch, device=target.device).view(batch, 1, 1) * classes + target)[valid]
    sums = ce.new_zeros(batch * classes).index_add(0, index, ce[valid]).view(batch, classes)
    counts = ce.new_zeros(batch * classes).index_add(0, index, torch.ones_like(ce[valid])).view(batch, classes)
    present = counts > 0
    per_class = torch.where(present, sums / counts.clamp_min(1), torch.zeros_like(sums))
    return per_class.sum(1) / present.sum(1).clamp_min(1)


SEGMENT_LOSSES = {"ce": segment_loss, "balanced": segment_loss_balanced}


def segment_divergence(output, reference, mask=None):
    """Per-sample mean over (masked) pixels of KL(softmax(reference) ‖ softmax(output)) over the classes."""
    _check_dense(output, reference)
    output, reference = opmath(output), opmath(reference)
    kl = F.kl_div(F.log_softmax(output, 1), F.log_softmax(reference, 1), reduction="none", log_target=True)
    return _masked_mean(kl.sum(1, keepdim=True), _dense_mask(mask))


def _confusion(pred, target, valid, classes):
    """Per-sample confusion counts [B, classes (target), classes (prediction)] over valid pixels."""
    batch = pred.shape[0]
    sample = torch.arange(batch, device=pred.device).view(batch, 1, 1)
    index = (sample * classes + target) * classes + pred
    index = torch.where(valid, index, batch * classes * classes)  # invalid pixels go to a spare bin
    counts = torch.zeros(batch * classes * classes + 1, dtype=torch.int64, device=pred.device)
    counts.scatter_add_(0, index.flatten(), torch.ones_like(index.flatten()))
    return counts[:-1].view(batch, classes, classes)


def _class_iou(confusion):
    """IoU per class and whether the class occurs in target or prediction, over the last two axes."""
    inter = confusion.diagonal(dim1=-2, dim2=-1)
    union = confusion.sum(-1) + confusion.sum(-2) - inter
    return inter / union.clamp_min(1), union > 0


def segment_error(output, target, mask=None, ignore=SEGMENT_IGNORE):
    """1 - mIoU per sample [B], over classes present in the sample's target or prediction (valid pixels only).

    A sample without valid pixels has error 0.
    """
    valid = label_mask(output, target, mask, ignore)
    iou, present = _class_iou(_confusion(output.argmax(1), target, valid, output.shape[1]))
    count = present.sum(-1)
    miou = (iou * present).sum(-1) / count.clamp_min(1)
    return torch.where(count > 0, 1.0 - miou, torch.zeros_like(miou))


def segment_stats(output, target, mask=None, ignore=SEGMENT_IGNORE):
    """Confusion counts over the batch's valid pixels, flattened (float64, summable across batches)."""
    valid = label_mask(output, target, mask, ignore)
    return _confusion(output.argmax(1), target, valid, output.shape[1]).sum(0).flatten().double()


def segment_scores(stats):
    """mIoU (a fraction, over classes present in target or prediction) and pixel accuracy, on the valid pixels.
    The Taskonomy source averaged IoU x 100 over all 18 classes and counted uncertain pixels as background."""
    classes = math.isqrt(stats.numel())
    confusion = stats.view(classes, classes)
    iou, present = _class_iou(confusion)
    total = confusion.sum()
    return {"miou": float((iou * present).sum() / present.sum()) if present.any() else math.nan,
            "pixel_acc": float(confusion.trace() / total) if total > 0 else math.nan}


def dense_stats(output, target, mask=None):
    """(sum |error|, sum error^2, valid element count) over the batch (float64, summable)."""
    _check_dense(output, target)
    diff = output.detach().double() - target.double()
    mask = _dense_mask(mask)
    mask = torch.ones_like(diff, dtype=torch.bool) if mask is None else mask.expand_as(diff)
    diff = torch.where(mask, diff, 0.0)
    return torch.stack([diff.abs().sum(), diff.square().sum(), mask.sum().double()])


def dense_scores(stats):
    """Masked L1 and MSE over all valid elements seen."""
    count = float(stats[2])
    if count == 0:
        return {"l1": math.nan, "mse": math.nan}
    return {"l1": float(stats[0]) / count, "mse": float(stats[1]) / count}
