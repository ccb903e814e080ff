"""Reading a sweep's results table (one row per model × attacked set × evaluated task × attack config) for the
report and task-selection commands, with task columns normalised to registry letters so that tables written
with task names (``metrics.summary_rows`` uses names) and tables written with letters compare equal.
"""
from pathlib import Path

import numpy as np
import pandas as pd

from mtrobust_fast import task_names

# Columns that tell attack configurations apart; the ones present in a table split it into groups.
# ``attack_options``: every other declared setting of the attack set away from its default, as one label
# ("grid_weights=0,1 grid_task=d"), so a setting an attack declares splits groups with no change here.
# ``recipe``: how each model was trained apart from its tasks and seed (read() keeps only the settings in which
# the table's recipes differ), so models of different recipes are never averaged together; seeds are.
CONFIG_COLUMNS = ("encoder", "recipe", "checkpoint_epoch", "task_weights", "surrogate", "attack", "attack_options",
                  "norm", "eps", "alpha", "steps", "restarts", "split", "limit")
LABEL_ONLY = ("attack_options", "recipe")  # shown as their value alone: they are lists of key=value already


class TableError(ValueError):
    """A results table that cannot be used: missing, unreadable, or lacking columns."""


def read(path, required=()):
    """The table at ``path`` (Parquet, or CSV for any other suffix) with ``model_tasks``, ``attacked`` and
    ``task`` as canonical letter strings; ``required`` columns must be present."""
    path = Path(path)
    if not path.is_file():
        raise TableError(f"results table {path} does not exist")
    try:
        table = pd.read_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else pd.read_csv(path)
    except Exception as error:  # pandas raises many unrelated types for a corrupt file
        raise TableError(f"cannot read results table {path}: {error}") from error
    missing = [column for column in required if column not in table.columns]
    if missing:
        raise TableError(f"results table {path} lacks column(s) {', '.join(missing)} "
                         f"(it has {', '.join(map(str, table.columns))})")
    for column in ("model_tasks", "attacked", "task", "main"):
        if column in table.columns:
            table[column] = table[column].map(letters)
    if "recipe" in table.columns:
        table["recipe"] = distinguishing(table["recipe"])
    return table


def distinguishing(recipes):
    """Each "key=value ..." recipe reduced to the settings not shared by every recipe of the column ("" when all
    agree), so that labels say what tells the models apart: "adversarial=madry steps=3" vs "adversarial=none"."""
    tokens = recipes.fillna("").astype(str).map(str.split)
    common = set.intersection(*map(set, tokens)) if len(tokens) else set()
    return tokens.map(lambda items: " ".join(t for t in items if t not in common))


def letters(value):
    """Canonical letters of a task set written as letters ("ds"), one task name, or names joined with "+";
    a value that names no registry task is kept as it is."""
    text = str(value)
    items = text.split("+") if "+" in text else [text]
    try:
        return "".join(task_names.letters(items if len(items) > 1 else text))
    except ValueError:
        return text


def config_columns(table, varying=True):
    """The attack-configuration columns of ``table``: those whose value varies (constant ones split nothing),
    or every one present when not ``varying``."""
    return [c for c in CONFIG_COLUMNS
            if c in table.columns and (not varying or table[c].nunique(dropna=False) > 1)]


def fixed_settings(table):
    """``{column: value}`` of the configuration columns that hold one value in ``table``."""
    return {c: table[c].iloc[0] for c in CONFIG_COLUMNS
            if c in table.columns and len(table) and table[c].nunique(dropna=False) == 1}


def config_label(keys, values):
    """A short human label of one configuration, e.g. "attack=pgd norm=linf eps=0.0314"; settings the attack does
    not have (alpha of APGD or the ensemble: None/NaN in the table) are left out."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else (str(v) if k in LABEL_ONLY else f"{k}={v}")
                    for k, v in zip(keys, values) if not pd.isna(v) and v != "")


def pair_values(table, metric, attacked="single"):
    """The main task's ``metric`` per (config…, main, aux) from the two-task models {main, aux} and, as the
    diagonal main == aux, the one-task model {main}: a DataFrame with the config columns, ``main``, ``aux``,
    ``value`` and ``rows`` (rows averaged, e.g. several seeds), ``min`` and ``max`` (their spread), and ``low``,
    ``high``: the mean of the rows' interval bounds ``<metric>_low``/``_high`` (NaN when the table has none).

    With a ``main`` column, rows of weighted (non-uniform) models count only for their own main task.
    ``attacked``: "single" takes rows where only the main task is attacked, "multi" where every task of the
    model is (the diagonal then is the one-task model attacked on its task in both cases).
    """
    if attacked not in ("single", "multi"):
        raise ValueError(f"attacked must be 'single' or 'multi', got {attacked!r}")
    columns = ["model_tasks", "attacked", "task", metric]
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise TableError(f"results table lacks column(s) {', '.join(missing)}")
    rows = table[table["model_tasks"].astype(str).str.len().isin((1, 2))].copy()
    own = [len(t) == 1 and t in m for m, t in zip(rows["model_tasks"], rows["task"])]
    rows = rows[pd.Series(own, index=rows.index, dtype=bool)]
    wanted = rows["task"] if attacked == "single" else rows["model_tasks"]
    rows = rows[rows["attacked"] == wanted]
    if "main" in rows.columns and "task_weights" in rows.columns:
        # a weighted model favours its own main task: {s, d} weighted for s is not the pair (d, s)
        weighted = ~rows["task_weights"].fillna("").astype(str).isin(("", "uniform"))
        rows = rows[~weighted | (rows["main"].map(letters) == rows["task"])]
    rows["main"] = rows["task"]
    rows["aux"] = [m.replace(t, "") or t for m, t in zip(rows["model_tasks"], rows["task"])]
    keys = config_columns(rows, varying=False) + ["main", "aux"]
    rows = rows.dropna(subset=[metric])
    for bound in ("low", "high"):
        rows[bound] = rows[f"{metric}_{bound}"] if f"{metric}_{bound}" in rows.columns else np.nan
    grouped = rows.groupby(keys, dropna=False)
    return pd.concat([grouped[metric].mean().rename("value"), grouped.size().rename("rows"),
                      grouped[metric].min().rename("min"), grouped[metric].max().rename("max"),
                      grouped["low"].mean(), grouped["high"].mean()], axis=1).reset_index()
