"""Attack objectives for dense heads: stronger than the plain training loss at finding where a segmentation or
regression head breaks, because they steer the perturbation towards pixels that are not yet fooled.

Each is a per-sample loss ``(output, target, mask, progress) -> [B]`` (``progress``: the fraction of the attack's
steps already taken, in [0, 1)), averaged over the sample's valid pixels like the tasks' own losses; weights that
depend on the prediction are detached, so they steer without adding gradient terms of their own.

Segmentation (logits [B, C, H, W], labels [B, H, W], label 0 ignored):
- ``segpgd`` (Gu et al., ECCV'22): pixel cross-entropy weighted 1 − λ on pixels still classified correctly and λ
  on those already wrong, λ = progress / 2 rising from 0 to ½: first push the correct pixels over, later keep
  the wrong ones wrong.
- ``cospgd`` (Agnihotri et al., ICML'24): pixel cross-entropy weighted by the cosine between the softmax
  prediction and the one-hot label, so pixels the model is still confident and right about weigh most.
- ``masked_ce`` (SEA, Croce et al., ECCV'24): cross-entropy of the pixels still classified correctly only, divided
  by all valid pixels (so the value does not jump when a pixel flips; SegPGD at its start).
- ``balanced_masked_ce`` (SEA): the same, with every class among those pixels weighing equally.
- ``js`` (SEA): the Jensen–Shannon divergence between the softmax prediction and the one-hot label (bounded, so
  hopeless pixels cannot dominate).
Regression (outputs and targets [B, C, H, W]): ``cospgd`` weights each pixel's L1 error (summed over channels)
by the cosine between the channel-softmax of prediction and target (1 for one-channel heads, where it is the L1
loss); the other objectives leave regression heads on their own loss.
"""
import torch
import torch.nn.functional as F

from mtrobust_fast import tasks as task_registry
from mtrobust_fast.tasks import SEGMENT_IGNORE, opmath

LOSSES = ("task", "segpgd", "cospgd", "masked_ce", "balanced_masked_ce", "js")
STEP_DEPENDENT = ("segpgd",)  # objectives that change with the step count (no exact early exit)


def _pixels(output, target, mask):
    """(float logits, labels with ignored pixels set to 0, valid [B, H, W]) of a segmentation batch."""
    valid = task_registry.label_mask(output, target, mask)
    return opmath(output), target, valid


def _mean(values, valid):
    return torch.where(valid, values, torch.zeros_like(values)).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)


def _ce(logits, target):
    return F.cross_entropy(logits, target, reduction="none", ignore_index=SEGMENT_IGNORE)


def segpgd(output, target, mask=None, progress=0.0):
    logits, target, valid = _pixels(output, target, mask)
    lam = 0.5 * float(progress)
    correct = (logits.detach().argmax(1) == target)
    weight = torch.where(correct, 1.0 - lam, lam).to(logits.dtype)
    return _mean(weight * _ce(logits, target), valid)


def cospgd(output, target, mask=None, progress=0.0):
    logits, target, valid = _pixels(output, target, mask)
    with torch.no_grad():
        probs = logits.softmax(1)
        cos = probs.gather(1, target[:, None])[:, 0] / probs.norm(dim=1).clamp_min(1e-12)  # one-hot has norm 1
    return _mean(cos * _ce(logits, target), valid)


def masked_ce(output, target, mask=None, progress=0.0):
    logits, target, valid = _pixels(output, target, mask)
    correct = logits.detach().argmax(1) == target
    return _mean(torch.where(correct, _ce(logits, target), 0.0), valid)


def balanced_masked_ce(output, target, mask=None, progress=0.0):
    logits, target, valid = _pixels(output, target, mask)
    keep = valid & (logits.detach().argmax(1) == target)
    return task_registry.segment_loss_balanced(logits, torch.where(keep, target, SEGMENT_IGNORE))


def js(output, target, mask=None, progress=0.0):
    logits, target, valid = _pixels(output, target, mask)
    probs = logits.softmax(1)
    one_hot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    middle = 0.5 * (probs + one_hot)
    log_middle = middle.clamp_min(1e-12).log()
    kl_p = (probs * (probs.clamp_min(1e-12).log() - log_middle)).sum(1)
    kl_y = (one_hot * (one_hot.clamp_min(1e-12).log() - log_middle)).sum(1)
    return _mean(0.5 * (kl_p + kl_y), valid)


def cospgd_regression(output, target, mask=None, progress=0.0):
    output = opmath(output)
    target = target.to(output.dtype)
    if output.shape != target.shape or output.dim() != 4:
        raise ValueError(f"cospgd needs regression outputs and targets [B, C, H, W] of one shape, got "
                         f"{tuple(output.shape)} and {tuple(target.shape)}")
    with torch.no_grad():
        cos = F.cosine_similarity(output.softmax(1), target.softmax(1), dim=1)
    valid = torch.ones_like(cos, dtype=torch.bool) if mask is None else mask.bool().all(1)
    error = (output - target).abs().sum(1) / output.shape[1]
    return _mean(cos * error, valid)


SEGMENTATION = {"segpgd": segpgd, "cospgd": cospgd, "masked_ce": masked_ce,
                "balanced_masked_ce": balanced_masked_ce, "js": js}
REGRESSION = {"cospgd": cospgd_regression}


def loss_for(task_loss, name, progress):
    """The per-sample loss ``(output, target, mask) -> [B]`` that objective ``name`` puts in place of a task's
    own ``task_loss`` at ``progress``: segmentation and Taskonomy regression heads change, others keep theirs."""
    if name == "task":
        return task_loss
    if name not in LOSSES:
        raise ValueError(f"dense loss must be one of {LOSSES}, got {name!r}")
    if task_loss is task_registry.segment_loss:
        chosen = SEGMENTATION[name]
    elif task_loss is task_registry.l1_loss and name in REGRESSION:
        chosen = REGRESSION[name]
    else:
        return task_loss
    return lambda output, target, mask=None: chosen(output, target, mask, progress)

