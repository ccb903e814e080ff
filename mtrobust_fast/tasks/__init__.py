"""Tasks: what a model is trained and attacked on.

- ``protocol.py``: the open task protocol every task record follows (:class:`TaskRecord`);
- ``taskonomy.py``: the 11 Taskonomy tasks as records, and their lookups (``get_task``, ``resolve``, ...);
- ``decoding.py``: Taskonomy's label PNGs to targets and masks;
- ``losses.py``: per-sample losses, errors and summable metric statistics of the Taskonomy tasks;
- ``weights.py``: task loss weights (uniform, the AAAI'22 Zamir table);
- ``classification.py``: classification, multi-label and regression heads (the head kinds of ``TASK_KINDS``);
- ``benchmarks.py``: the segmentation, depth and normal heads of NYUv2 and Cityscapes (more kinds of ``TASK_KINDS``);
- ``auxiliary.py``: GAT's self-supervised auxiliary tasks (``AUXILIARY``);
- ``meter.py``: a task's clean metrics accumulated over batches.

This package exports the Taskonomy registry and the losses other modules use (``from mtrobust_fast import tasks``
then ``tasks.get_task("s")``); the torch-free task table (letters, names, parsing) is
:mod:`mtrobust_fast.task_names`.
"""
from mtrobust_fast.tasks.decoding import DEPTH_INVALID_FROM, FORMAT_NAMES, SEGMENT_IGNORE, image_array
from mtrobust_fast.tasks.losses import (SEGMENT_LOSSES, dense_scores, dense_stats, l1_loss, label_mask, opmath,
                                        segment_error, segment_loss, segment_loss_balanced)
from mtrobust_fast.tasks.meter import TaskMeter
from mtrobust_fast.tasks.protocol import TaskRecord
from mtrobust_fast.tasks.taskonomy import (BY_LETTER, BY_NAME, TASKS, Task, get_task, record, resolve, task_string,
                                           training_record)
from mtrobust_fast.tasks.weights import task_weights
from mtrobust_fast.tasks import benchmarks  # noqa: F401  (registers its head kinds in TASK_KINDS)

__all__ = ["BY_LETTER", "BY_NAME", "DEPTH_INVALID_FROM", "FORMAT_NAMES", "SEGMENT_IGNORE", "SEGMENT_LOSSES", "TASKS",
           "Task", "TaskMeter", "TaskRecord", "dense_scores", "dense_stats", "get_task", "image_array", "l1_loss",
           "label_mask", "opmath", "record", "resolve", "segment_error", "segment_loss", "segment_loss_balanced",
           "task_string", "task_weights", "training_record"]
