"""The one registry of the 11 Taskonomy tasks: files, decoding, loss, error, metrics and weights.

Everything else in the project reads Taskonomy task facts from here. A task is a frozen record (LibMTL style:
loss + metric + direction) of the project's open task protocol (described in :mod:`mtrobust_fast.classification`,
its second provider). Losses and errors are per sample (shape [B]), masked, and normalised by
the sample's number of valid elements; reductions over the batch are the caller's.

Deliberate differences from MTRobust (the training code the AAAI'22 study forked):
- Masked means divide by the valid count. The source divided by all elements, so samples with many
  invalid pixels got smaller losses.
- Segmentation keeps Taskonomy's raw labels (0 uncertain -> ignored, 1 background, 2..17 objects) and
  uses no class re-weighting; the source folded "uncertain" into background and weighted classes by
  prior factors.
- Principal curvature decodes the R and G channels; the source read the RGB file as grayscale.
- Edge occlusion is clipped before it is mapped to [-1, 1]; the source left values up to about 21.
- Masks come from the raw values at full resolution (the loader resizes them with nearest neighbour);
  the source bilinearly resized masks and binarised them at 0.99.
- The autoencoder target is the input image in [0, 1], the project's pixel space (source: [-1, 1]).
"""
import math
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mtrobust_fast.task_names import NAMES, directions, letter_of, letters
from mtrobust_fast.task_protocol import TaskRecord

SEGMENT_CLASSES = 18  # logits; Taskonomy labels 0..17
SEGMENT_IGNORE = 0  # "uncertain" pixels
DEPTH_INVALID_FROM = 64500  # raw 16-bit depth at or above this is a hole (65535 marks sky / no mesh)
NORMAL_INVALID = 128  # (128, 128, 128) marks pixels without geometry
CURVATURE_MEAN = (123.572, 120.1)  # MTRobust's intended normalisation of the (R, G) = (k1, k2) channels
CURVATURE_STD = (31.922, 21.658)
KEYPOINTS2D_CLIP = 0.005  # fractions of 65535 mapped onto [-1, 1], as in MTRobust
EDGE_TEXTURE_CLIP = 0.08
EDGE_OCCLUSION_CLIP = 0.00625
OCCLUSION_BLUR_FRACTION = 1 / 64  # Gaussian sigma as a fraction of the height: 4 px at 256 x 256

FORMAT_NAMES = {"gray8": "8-bit grayscale", "rgb8": "8-bit RGB", "gray16": "16-bit grayscale"}


def image_array(image):
    """A PNG's pixels as numpy: uint8 [H,W] or [H,W,3], or uint16 [H,W] for 16-bit grayscale.

    Pillow opens 16-bit grayscale PNGs as mode "I;16" (recent versions) or "I" (older ones); both give uint16.
    Arrays pass through unchanged.
    """
    if isinstance(image, np.ndarray):
        return image
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a numpy array or a PIL image, got {type(image).__name__}")
    if image.mode in ("L", "RGB"):
        return np.asarray(image)
    if image.mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)
    if image.mode == "I":
        pixels = np.asarray(image)
        if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
            raise ValueError("mode 'I' image has values outside the 16-bit range")
        return pixels.astype(np.uint16)
    raise ValueError(f"unsupported image mode {image.mode!r}; Taskonomy PNGs are L, RGB or 16-bit grayscale")


def array_format(pixels):
    """The format name ("gray8", "rgb8", "gray16") of a pixel array, or a description of what it is."""
    if pixels.dtype == np.uint8 and pixels.ndim == 2:
        return "gray8"
    if pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3:
        return "rgb8"
    if pixels.dtype == np.uint16 and pixels.ndim == 2:
        return "gray16"
    return f"{pixels.dtype} array of shape {tuple(pixels.shape)}"


# ---- raw pixels -> (target, own validity or None) ----

def _chw(values):
    """float64 numpy [H,W] or [H,W,C] -> float32 torch [C,H,W]."""
    values = values[..., None] if values.ndim == 2 else values
    return torch.from_numpy(np.ascontiguousarray(values.transpose(2, 0, 1), dtype=np.float32))


def _segment_target(pixels):
    top = int(pixels.max()) if pixels.size else 0
    if top >= SEGMENT_CLASSES:
        raise ValueError(f"segment_semantic labels must be in 0..{SEGMENT_CLASSES - 1}, found {top}")
    return torch.from_numpy(pixels.astype(np.int64)), pixels != SEGMENT_IGNORE


def _depth_target(pixels):
    return _chw(np.log1p(pixels.astype(np.float64)) / math.log(2 ** 16)), pixels < DEPTH_INVALID_FROM


def _normal_target(pixels):
    return _chw(pixels / 127.5 - 1.0), ~np.all(pixels == NORMAL_INVALID, axis=2)


def _curvature_target(pixels):
    rg = (pixels[..., :2] - np.array(CURVATURE_MEAN)) / np.array(CURVATURE_STD)
    return _chw(rg), np.any(pixels != 0, axis=2)


def _reshading_target(pixels):
    gray = pixels if pixels.ndim == 2 else pixels[..., 0]
    return _chw(gray / 127.5 - 1.0), None


def _heatmap_target(pixels, clip):
    """16-bit map -> fraction of 65535, clipped to [0, clip], mapped onto [-1, 1]."""
    return _chw(np.clip(pixels / 65535.0, 0.0, clip) / clip * 2.0 - 1.0), None


def _gaussian_blur(x, sigma):
    """Separable Gaussian blur of [C,H,W], truncated at 4 sigma, edges replicated."""
    radius = max(1, int(4 * sigma + 0.5))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    padded = F.pad(x[:, None], (radius, radius, radius, radius), mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(rows, kernel.view(1, 1, -1, 1))[:, 0]


def _occlusion_target(pixels):
    """Clipped (unlike the source) then blurred with sigma = H/64, i.e. the source's 4 px at 256 x 256."""
    target, _ = _heatmap_target(pixels, EDGE_OCCLUSION_CLIP)
    blurred = _gaussian_blur(target, pixels.shape[0] * OCCLUSION_BLUR_FRACTION)
    return blurred.clamp_(-1.0, 1.0), None  # only float rounding can leave [-1, 1] here


def _autoencoder_target(pixels):
    return _chw(pixels / 255.0), None


# ---- per-sample losses and errors ----

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


def _label_mask(output, target, mask):
    """Valid pixels [B,H,W] of a labelled batch: target != 0 and the given mask."""
    if output.dim() != 4 or target.shape != output.shape[:1] + output.shape[2:]:
        raise ValueError(f"segmentation needs output [B,C,H,W] and target [B,H,W], "
                         f"got {tuple(output.shape)} and {tuple(target.shape)}")
    valid = target != SEGMENT_IGNORE
    mask = _dense_mask(mask)
    return valid if mask is None else valid & mask[:, 0]


def segment_loss(output, target, mask=None):
    """Cross-entropy per sample [B], averaged over the sample's pixels with a label other than 0 (uncertain)."""
    valid = _label_mask(output, target, mask)
    ce = F.cross_entropy(opmath(output), target, reduction="none", ignore_index=SEGMENT_IGNORE)
    return _masked_mean(ce, valid)


def segment_loss_balanced(output, target, mask=None):
    """Class-balanced cross-entropy per sample [B]: the mean over the classes present in the sample's valid
    pixels of that class's mean pixel cross-entropy. Every class of an image counts equally whatever its area,
    so a model cannot reach a low loss by predicting the dominant background everywhere (the failure of plain
    cross-entropy on small, background-heavy sets). A sample without valid pixels has loss 0."""
    valid = _label_mask(output, target, mask)
    ce = F.cross_entropy(opmath(output), target, reduction="none", ignore_index=SEGMENT_IGNORE)
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


def segment_error(output, target, mask=None):
    """1 - mIoU per sample [B], over classes present in the sample's target or prediction (valid pixels only).

    A sample without valid pixels has error 0.
    """
    valid = _label_mask(output, target, mask)
    iou, present = _class_iou(_confusion(output.argmax(1), target, valid, output.shape[1]))
    count = present.sum(-1)
    miou = (iou * present).sum(-1) / count.clamp_min(1)
    return torch.where(count > 0, 1.0 - miou, torch.zeros_like(miou))


# ---- clean metrics: summable statistics per batch, scores at the end ----

def segment_stats(output, target, mask=None):
    """Confusion counts over the batch's valid pixels, flattened (float64, summable across batches)."""
    valid = _label_mask(output, target, mask)
    return _confusion(output.argmax(1), target, valid, output.shape[1]).sum(0).flatten().double()


def segment_scores(stats):
    """mIoU (a fraction, over classes present in target or prediction) and pixel accuracy, on pixels whose label
    is not 0. The source averaged IoU x 100 over all 18 classes and counted uncertain pixels as background."""
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




# ---- the registry ----

@dataclass(frozen=True)
class Task:
    """One Taskonomy task. Loss and error are per sample and lower-is-better; metric directions are in
    ``higher_is_better``. ``geometric`` tasks are undefined where the scene has no mesh, so the loader
    also masks them with the sample's geometry validity (omnidata mask_valid or depth_euclidean < 64500)."""
    letter: str
    name: str  # Taskonomy domain folder name and the key used everywhere in the project
    folder: str  # folder the file is read from (autoencoder reads rgb)
    tag: str  # file name tag: point_P_view_V_domain_{tag}.png
    channels: int
    formats: tuple  # accepted PNG formats, keys of FORMAT_NAMES
    geometric: bool
    pixels_to_target: Callable = field(compare=False, repr=False)
    loss: Callable = field(compare=False, repr=False)
    divergence: Callable = field(compare=False, repr=False)  # (output, reference output, mask) -> [B]
    error: Callable = field(compare=False, repr=False)
    metric_stats: Callable = field(compare=False, repr=False)
    metric_scores: Callable = field(compare=False, repr=False)
    higher_is_better: Mapping = field(compare=False, repr=False)
    mirror_signs: tuple = ()  # per channel, the target's sign change when the image is mirrored left-right

    def __reduce__(self):
        """Pickle by letter (and segmentation loss): unpickling (e.g. in DataLoader workers) gives back the
        registry's own record."""
        if self.is_segmentation:
            return training_record, (self.letter, self.segment_loss_name)
        return get_task, (self.letter,)

    @property
    def segment_loss_name(self):
        """Which of :data:`SEGMENT_LOSSES` the record trains with (None for the other tasks)."""
        return next((k for k, f in SEGMENT_LOSSES.items() if f is self.loss), None) if self.is_segmentation else None

    @property
    def is_segmentation(self):
        return self.letter == "s"

    def decode(self, png, valid=None):
        """PNG pixels (numpy or PIL) -> (target, mask).

        target: float32 [C,H,W], or int64 [H,W] labels for segment_semantic; 0 wherever mask is False.
        mask: bool [1,H,W] = the encoding's own validity AND ``valid`` ([H,W], optional, e.g. geometry).
        """
        pixels = image_array(png)
        found = array_format(pixels)
        if found not in self.formats:
            wanted = " or ".join(FORMAT_NAMES[f] for f in self.formats)
            raise ValueError(f"{self.name} needs {wanted} pixels, got {FORMAT_NAMES.get(found, found)}")
        target, own = self.pixels_to_target(pixels)
        height, width = pixels.shape[:2]
        mask = torch.ones((1, height, width), dtype=torch.bool)
        if own is not None:
            mask &= torch.from_numpy(np.ascontiguousarray(own))
        if valid is not None:
            valid = torch.as_tensor(valid).bool()
            if valid.shape[-2:] != (height, width) or valid.numel() != height * width:
                raise ValueError(f"{self.name}: validity map of shape {tuple(valid.shape)} does not match "
                                 f"the {height}x{width} image")
            mask &= valid.reshape(1, height, width)
        return target.masked_fill(~mask[0] if self.is_segmentation else ~mask, 0), mask


def _task(letter, name, channels, formats, pixels_to_target, geometric, folder=None, tag=None, mirror_signs=()):
    segmentation = letter == "s"
    return Task(letter=letter, name=name, folder=folder or name, tag=tag or name, channels=channels,
                formats=formats, geometric=geometric, pixels_to_target=pixels_to_target,
                loss=segment_loss if segmentation else l1_loss,
                divergence=segment_divergence if segmentation else l1_loss,
                error=segment_error if segmentation else mse_error,
                metric_stats=segment_stats if segmentation else dense_stats,
                metric_scores=segment_scores if segmentation else dense_scores,
                higher_is_better=directions(letter), mirror_signs=mirror_signs)


TASKS = (
    _task("s", "segment_semantic", SEGMENT_CLASSES, ("gray8",), _segment_target, False, tag="segmentsemantic"),
    _task("d", "depth_zbuffer", 1, ("gray16",), _depth_target, True),
    _task("D", "depth_euclidean", 1, ("gray16",), _depth_target, True),
    _task("n", "normal", 3, ("rgb8",), _normal_target, True, mirror_signs=(-1.0, 1.0, 1.0)),  # x points right
    _task("k", "keypoints2d", 1, ("gray16",), partial(_heatmap_target, clip=KEYPOINTS2D_CLIP), False),
    _task("K", "keypoints3d", 1, ("gray16",), partial(_heatmap_target, clip=1.0), True),
    _task("e", "edge_texture", 1, ("gray16",), partial(_heatmap_target, clip=EDGE_TEXTURE_CLIP), False),
    _task("E", "edge_occlusion", 1, ("gray16",), _occlusion_target, True),
    _task("p", "principal_curvature", 2, ("rgb8",), _curvature_target, True),
    _task("r", "reshading", 1, ("rgb8", "gray8"), _reshading_target, True),
    _task("A", "autoencoder", 3, ("rgb8",), _autoencoder_target, False, folder="rgb", tag="rgb"),
)
BY_LETTER = {task.letter: task for task in TASKS}
assert {t.letter: t.name for t in TASKS} == dict(NAMES), "tasks and task_names disagree"
BY_NAME = {task.name: task for task in TASKS}


def record(task):
    """A task record of the open task protocol (:class:`~mtrobust_fast.task_protocol.TaskRecord`): ``task``
    itself when it is one, else the registry task with that letter or name."""
    if isinstance(task, TaskRecord):
        return task
    return get_task(task)


def training_record(key, segment_loss="ce"):
    """The registry task ``key`` with the training loss chosen for segmentation: ``"ce"`` (plain pixel
    cross-entropy, the registry's) or ``"balanced"`` (:func:`segment_loss_balanced`). Other tasks ignore it.
    Attacks and errors are unchanged: only what the model is trained on differs."""
    if segment_loss not in SEGMENT_LOSSES:
        raise ValueError(f"segment_loss must be one of {', '.join(SEGMENT_LOSSES)}, got {segment_loss!r}")
    task = get_task(key)
    if not task.is_segmentation or segment_loss == "ce":
        return task
    return replace(task, loss=SEGMENT_LOSSES[segment_loss])


def get_task(key):
    """A task by letter (case-sensitive), name, or the source's alias "segmentsemantic"."""
    return BY_LETTER[letter_of(key)]


def resolve(spec):
    """Tasks from a letter string ("sdnE"), one task name, or a list of letters/names/tasks.

    Returns them in the canonical order s d D n k K e E p r A, whatever the input order.
    """
    return [BY_LETTER[letter] for letter in letters(spec)]


def task_string(tasks):
    """The canonical letter string of a task set, e.g. "sdnE" (how models are named)."""
    return "".join(task.letter for task in resolve(tasks))


# AAAI'22 supplement App. B, "optimal Zamir weights": main task weight 1; auxiliary weight by main task,
# with one exception per main: main letter -> (usual auxiliary weight, {auxiliary letter: weight}).
ZAMIR_AUXILIARY_WEIGHTS = {
    "s": (0.1, {"d": 0.01}),
    "d": (0.1, {"n": 0.01}),
    "n": (0.1, {"d": 0.01}),
    "D": (0.01, {"s": 0.1}),
    "E": (0.1, {}),
}


def task_weights(tasks, main=None, mode="uniform"):
    """Loss weights keyed by task name.

    uniform: every task 1/N (``main`` is only checked to be one of the tasks).
    zamir: main task 1, each auxiliary from the paper's table; only mains s, d, D, n, E have a table row.
    """
    chosen = resolve(tasks)
    main_task = None if main is None else get_task(main)
    if main_task is not None and main_task not in chosen:
        raise ValueError(f"main task {main_task.name!r} is not one of {[t.name for t in chosen]}")
    if mode == "uniform":
        return {task.name: 1.0 / len(chosen) for task in chosen}
    if mode != "zamir":
        raise ValueError(f"mode must be 'uniform' or 'zamir', got {mode!r}")
    if main_task is None:
        if len(chosen) > 1:
            raise ValueError("mode='zamir' needs main= (the main task) when there are several tasks")
        main_task = chosen[0]
    if len(chosen) > 1 and main_task.letter not in ZAMIR_AUXILIARY_WEIGHTS:
        raise ValueError(f"the Zamir weight table has no row for main task {main_task.name!r}; "
                         f"mains with a row: {' '.join(ZAMIR_AUXILIARY_WEIGHTS)}")
    usual, exceptions = ZAMIR_AUXILIARY_WEIGHTS.get(main_task.letter, (None, {}))
    return {task.name: 1.0 if task is main_task else exceptions.get(task.letter, usual) for task in chosen}


class TaskMeter:
    """Accumulates a task's clean metrics over batches (pooled over all valid pixels, not a mean of batch
    means); statistics stay on the device until ``compute``."""

    def __init__(self, task):
        self.task = get_task(task)
        self.reset()

    def reset(self):
        self._stats = None

    def update(self, output, target, mask=None):
        stats = self.task.metric_stats(output.detach(), target, mask)
        self._stats = stats if self._stats is None else self._stats + stats

    def compute(self):
        """dict metric name -> float; directions are in ``task.higher_is_better``."""
        if self._stats is None:
            raise RuntimeError(f"TaskMeter({self.task.name!r}) has seen no batch")
        return self.task.metric_scores(self._stats.cpu())
