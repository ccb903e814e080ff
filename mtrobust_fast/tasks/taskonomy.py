"""The one registry of the 11 Taskonomy tasks: each a frozen record (LibMTL style: loss + metric + direction) of
the open task protocol (:class:`mtrobust_fast.tasks.protocol.TaskRecord`) that also knows its files and how to
decode them. Everything else in the project reads Taskonomy task facts from here."""
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable, Mapping

import numpy as np
import torch

from mtrobust_fast.task_names import NAMES, directions, letter_of, letters
from mtrobust_fast.tasks.decoding import (EDGE_TEXTURE_CLIP, FORMAT_NAMES, KEYPOINTS2D_CLIP, SEGMENT_CLASSES,
                                          array_format, autoencoder_target, curvature_target, depth_target,
                                          heatmap_target, image_array, normal_target, occlusion_target,
                                          reshading_target, segment_target)
from mtrobust_fast.tasks.losses import (SEGMENT_LOSSES, dense_scores, dense_stats, l1_loss, mse_error,
                                        segment_divergence, segment_error, segment_loss, segment_scores,
                                        segment_stats)
from mtrobust_fast.tasks.protocol import TaskRecord


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
    _task("s", "segment_semantic", SEGMENT_CLASSES, ("gray8",), segment_target, False, tag="segmentsemantic"),
    _task("d", "depth_zbuffer", 1, ("gray16",), depth_target, True),
    _task("D", "depth_euclidean", 1, ("gray16",), depth_target, True),
    _task("n", "normal", 3, ("rgb8",), normal_target, True, mirror_signs=(-1.0, 1.0, 1.0)),  # x points right
    _task("k", "keypoints2d", 1, ("gray16",), partial(heatmap_target, clip=KEYPOINTS2D_CLIP), False),
    _task("K", "keypoints3d", 1, ("gray16",), partial(heatmap_target, clip=1.0), True),
    _task("e", "edge_texture", 1, ("gray16",), partial(heatmap_target, clip=EDGE_TEXTURE_CLIP), False),
    _task("E", "edge_occlusion", 1, ("gray16",), occlusion_target, True),
    _task("p", "principal_curvature", 2, ("rgb8",), curvature_target, True),
    _task("r", "reshading", 1, ("rgb8", "gray8"), reshading_target, True),
    _task("A", "autoencoder", 3, ("rgb8",), autoencoder_target, False, folder="rgb", tag="rgb"),
)
BY_LETTER = {task.letter: task for task in TASKS}
assert {t.letter: t.name for t in TASKS} == dict(NAMES), "tasks and task_names disagree"
BY_NAME = {task.name: task for task in TASKS}


def record(task):
    """A task record of the open task protocol (:class:`~mtrobust_fast.tasks.protocol.TaskRecord`): ``task``
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
