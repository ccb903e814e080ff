"""Robustness evaluation as a library.

- ``robustness.py``: attack a model over a loader (:func:`evaluate`) or a checkpoint over a data folder
  (:func:`evaluate_checkpoint`) and collect every vulnerability metric; ``mtrobust-fast attack``, the sweep, the
  quickstart and training-time robust validation all measure through these two functions;
- ``metrics.py``: the per-sample vulnerability metrics and the meter that aggregates them.
"""
from mtrobust_fast.evaluation import metrics
from mtrobust_fast.evaluation.robustness import (SettingError, evaluate, evaluate_checkpoint, format_value,
                                                 load_surrogate, make_loader, options_label, recorded_options,
                                                 resolve_sets, task_letters)

__all__ = ["SettingError", "evaluate", "evaluate_checkpoint", "format_value", "load_surrogate", "make_loader",
           "metrics", "options_label", "recorded_options", "resolve_sets", "task_letters"]
