"""Each image's result in one attack run (``attack --per-sample`` writes ``OUT/per_sample.csv``) and paired tests
between two such runs on the same images: two models under one attack, or two attacks on one model.

A paired test removes the spread between images, which dominates the interval of each run's mean: two models whose
robust accuracies' intervals overlap can still differ significantly image by image. Columns: ``image`` (position
in the evaluated split, from 0), ``attacked`` (the attacked set's label), ``task``, ``clean_error``,
``clean_loss``, ``adv_error``, ``adv_loss``. Torch-free.
"""
from pathlib import Path

import numpy as np
import pandas as pd

from mtrobust_fast.analysis import statistics

FILE = "per_sample.csv"
COLUMNS = ("image", "attacked", "task", "clean_error", "clean_loss", "adv_error", "adv_loss")
VALUES = ("clean_error", "clean_loss", "adv_error", "adv_loss")


def table(summary):
    """The long table of a summary computed with ``per_sample=True`` (one row per image, attacked set and task)."""
    if "per_sample" not in summary:
        raise ValueError("summary has no per-image values: compute it with per_sample=True")
    per = summary["per_sample"]
    frames = []
    for attacked, tasks in per["attacks"].items():
        for task, adv in tasks.items():
            clean = per["clean"][task]
            frames.append(pd.DataFrame({"image": np.arange(len(adv["error"])), "attacked": attacked, "task": task,
                                        "clean_error": clean["error"], "clean_loss": clean["loss"],
                                        "adv_error": adv["error"], "adv_loss": adv["loss"]}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(COLUMNS))


def write(path, summary):
    """Write :func:`table` of ``summary`` to ``path`` (a CSV file); returns the path."""
    path = Path(path)
    table(summary).to_csv(path, index=False)
    return path


def read(path):
    """The table in ``path``: a ``per_sample.csv`` or the folder an ``attack --out`` wrote it into."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE
    if not path.is_file():
        raise ValueError(f"no per-image results at {path} (a {FILE} file or the folder holding one)")
    frame = pd.read_csv(path, dtype={"attacked": str, "task": str})
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} is not a per-image results file: it lacks the columns {', '.join(missing)}")
    return frame


def _binary(values):
    return bool(np.isin(values[np.isfinite(values)], (0.0, 1.0)).all())


def compare(a, b, value="adv_error"):
    """Paired tests of ``value`` between two per-image tables (from :func:`read` or :func:`table`), one per
    (attacked set, task) the two share: ``{"attacked", "task", "value", **paired_difference}`` (a minus b), plus
    the exact McNemar test ``"mcnemar"`` when both hold 0/1 errors (classification), where an image counts as
    right when its error is 0. The two must cover the same images (ValueError otherwise)."""
    if value not in VALUES:
        raise ValueError(f"value must be one of {', '.join(VALUES)}, got {value!r}")
    keys = ["attacked", "task"]
    shared = a[keys].drop_duplicates().merge(b[keys].drop_duplicates())
    if shared.empty:
        raise ValueError("the two runs share no attacked set and task: "
                         f"{sorted(set(map(tuple, a[keys].values)))} vs {sorted(set(map(tuple, b[keys].values)))}")
    results = []
    for attacked, task in shared.itertuples(index=False):
        left = a[(a.attacked == attacked) & (a.task == task)].set_index("image")[value].sort_index()
        right = b[(b.attacked == attacked) & (b.task == task)].set_index("image")[value].sort_index()
        if not left.index.equals(right.index):
            raise ValueError(f"the two runs did not evaluate the same images ({len(left)} and {len(right)} for "
                             f"set {attacked}, task {task}); use the same data, split and limit")
        x, y = left.to_numpy(np.float64), right.to_numpy(np.float64)
        result = {"attacked": attacked, "task": task, "value": value, **statistics.paired_difference(x, y)}
        if value.endswith("error") and _binary(x) and _binary(y):
            result["mcnemar"] = statistics.mcnemar(x == 0, y == 0)
        results.append(result)
    return results
