"""Auxiliary-task selection from cheap surrogates (AAAI'22 RQ4, Table 3; the ``mtrobust-fast select`` command).

For a main task m and candidate auxiliaries a, the full-cost score of a is the relative vulnerability of m on
the fully trained model {m, a} (the one-task model {m} when a == m). A surrogate gives the same quantity at a
lower cost — a model trained for fewer epochs, a smaller encoder — or the clean performance of m on {m, a}
(a ``clean_*`` column of the full table: no attack needed). Candidates are ranked by each surrogate, and the
Pearson and Spearman correlations (scipy.stats, with p-values) between surrogate and full cost are reported
per main task and over all (main, aux) pairs pooled, as the paper's Table 3 does.

The tables come from the sweep, one per cost level, e.g. (paths illustrative)::

    mtrobust-fast train --tasks sd --epochs 150 --out runs/r50/sd --encoder resnet50 ...   # each {m, a}, and {m}
    mtrobust-fast train --tasks sd --epochs 50  --out runs/r50_e50/sd --encoder resnet50 ...
    mtrobust-fast train --tasks sd --epochs 150 --out runs/r18/sd --encoder resnet18 ...
    # the sweep attacks each group of checkpoints (main task alone, and all tasks) into full.parquet,
    # few_epochs.parquet and resnet18.parquet; then
    mtrobust-fast select --main s --candidates dDnE --full full.parquet \\
        --surrogate few_epochs=few_epochs.parquet --surrogate resnet18=resnet18.parquet --clean clean_error
"""
import json
import math

import numpy as np
import pandas as pd
from scipy import stats

from mtrobust_fast.analysis import results_table
from mtrobust_fast import task_names

MIN_CANDIDATES = 3  # Pearson/Spearman of fewer points is ±1 or undefined: not evidence
CAUTION_BELOW = 5  # fewer points than this get a printed caution next to their p-values
FILTERS = ("attack", "norm", "eps", "steps", "encoder", "task_weights")


def correlate(surrogate, full):
    """Pearson and Spearman correlation (with two-sided p-values) of two equal-length sequences; NaN with a
    ``note`` when there are fewer than MIN_CANDIDATES points or either side is constant."""
    x, y = np.asarray(surrogate, dtype=float), np.asarray(full, dtype=float)
    result = {"n": int(len(x)), "pearson_r": math.nan, "pearson_p": math.nan,
              "spearman_rho": math.nan, "spearman_p": math.nan, "note": ""}
    if len(x) < MIN_CANDIDATES:
        result["note"] = f"undefined: {len(x)} pair(s), correlation needs at least {MIN_CANDIDATES}"
    elif np.ptp(x) == 0 or np.ptp(y) == 0:
        result["note"] = "undefined: constant values"
    else:
        pearson, spearman = stats.pearsonr(x, y), stats.spearmanr(x, y)
        result.update(pearson_r=float(pearson.statistic), pearson_p=float(pearson.pvalue),
                      spearman_rho=float(spearman.statistic), spearman_p=float(spearman.pvalue))
        cautions = []
        if len(x) < CAUTION_BELOW:
            cautions.append(f"only {len(x)} points: p-values are unreliable")
        ties = (len(x) - len(np.unique(x))) + (len(y) - len(np.unique(y)))
        if ties:
            cautions.append(f"{ties} tied value(s): Spearman's ranks are averaged")
        if cautions:
            result["note"] = "caution: " + "; ".join(cautions)
    return result


class SeveralConfigurations(results_table.TableError):
    """A table left with several attack configurations; ``listed`` describes them."""

    def __init__(self, name, listed):
        super().__init__(f"{name}: several attack configurations remain ({listed}); choose one with the filters "
                         f"({', '.join(FILTERS)}) or a where condition COLUMN=VALUE")
        self.name, self.listed = name, listed


def _one_config(pairs, name):
    """``pairs`` without its config columns, after checking they hold a single configuration."""
    keys = results_table.config_columns(pairs)
    configs = pairs[keys].drop_duplicates() if keys else pairs.iloc[:0]
    if len(configs) > 1:
        raise SeveralConfigurations(name, "; ".join(results_table.config_label(keys, row)
                                                    for row in configs.itertuples(index=False)))
    return pairs.drop(columns=results_table.config_columns(pairs, varying=False))


def _matches(column, wanted):
    """Rows of ``column`` equal to ``wanted``: numerically (to a relative 1e-6, so eps=0.0314 finds 8/255
    written in full) for numeric columns, as text otherwise."""
    if pd.api.types.is_numeric_dtype(column):
        try:
            return np.isclose(column.astype(float), float(wanted), rtol=1e-6, atol=0)
        except ValueError:
            raise results_table.TableError(f"column {column.name} is numeric; {wanted!r} is not a number") from None
    return column.astype(str) == str(wanted)


def _filtered(table, filters, where, name, keys=FILTERS):
    """Rows of ``table`` matching ``filters`` ({column of FILTERS: value}, None: any) and every ``where``
    (column, value) condition; a ``where`` column the table lacks is an error."""
    wanted = [(key, filters.get(key)) for key in keys if filters.get(key) is not None] + list(where)
    for key, value in wanted:
        if key in table.columns:
            table = table[_matches(table[key], value)]
        elif (key, value) in where:
            raise results_table.TableError(f"{name}: where {key}=...: the table has no column {key}")
    if table.empty:
        raise results_table.TableError(f"{name}: no row matches the filters")
    return table


def surrogate_scores(full, main, *, surrogates=(), clean=(), metric="rel_vuln", attacked="single",
                     candidates=None, filters=None, where=()):
    """One DataFrame (main, aux, full, <surrogate>...) over the pairs that the ``full`` table has.

    ``surrogates``: (name, table path) pairs; ``clean``: clean-performance columns of ``full`` used as
    surrogates; ``main``/``candidates``: task letters; ``filters``: {column of FILTERS: value} kept in every
    table (encoder in ``full`` only: a surrogate's encoder may differ); ``where``: (column, value) conditions."""
    filters = dict(filters or {})
    required = ("model_tasks", "attacked", "task", metric, *clean)
    full_table = _filtered(results_table.read(full, required), filters, where, str(full))
    scores = _one_config(results_table.pair_values(full_table, metric, attacked), str(full))
    scores = scores.rename(columns={"value": "full"}).drop(columns="rows")
    sources = [(column, full_table, column, str(full)) for column in clean]
    keys = tuple(k for k in FILTERS if k != "encoder")  # a surrogate encoder may differ from the full one
    for name, path in surrogates:
        table = results_table.read(path, ("model_tasks", "attacked", "task", metric))
        sources.append((name, _filtered(table, filters, where, str(path), keys), metric, str(path)))
    for name, table, column, place in sources:
        values = _one_config(results_table.pair_values(table, column, attacked), f"{place} ({column})")
        scores = scores.merge(values.rename(columns={"value": name}).drop(columns="rows"),
                              on=["main", "aux"], how="left")
    scores = scores[scores["main"].isin(main)]
    if candidates:
        scores = scores[scores["aux"].isin(candidates)]
    if scores.empty:
        raise results_table.TableError(f"{full}: no model pairs {{main, aux}} for main task(s) "
                                       f"{''.join(main)} and the candidates")
    return scores.sort_values(["main", "aux"], key=_canonical).reset_index(drop=True)


def _canonical(column):
    order = task_names.CANONICAL_ORDER
    return column.map(lambda v: order.index(v) if v in order else len(order))


def lower_is_better(name):
    """Ranking direction of a surrogate: vulnerabilities and errors rank low first; clean scores that the task
    registry marks higher-is-better (mIoU, pixel accuracy) rank high first."""
    metric = name[len("clean_"):] if name.startswith("clean_") else None
    return not any(task_names.directions(letter).get(metric, False) for letter in task_names.NAMES)


def rank(scores, surrogates):
    """Per main task, the rank of each candidate (1 = best) by the full cost and by each surrogate."""
    ranked = scores.copy()
    for column in ["full"] + list(surrogates):
        ranked[f"{column}_rank"] = ranked.groupby("main")[column].rank(
            method="min", ascending=lower_is_better(column)).astype("Int64")
    return ranked


def correlations(scores, surrogates):
    """One record per (surrogate, main task or "all") with :func:`correlate`'s fields."""
    records = []
    mains = list(dict.fromkeys(scores["main"]))
    for name in surrogates:
        groups = [(main, scores[scores["main"] == main]) for main in mains]
        if len(mains) > 1:
            groups.append(("all", scores))
        for main, group in groups:
            group = group.dropna(subset=[name, "full"])
            records.append({"surrogate": name, "main": main, **correlate(group[name], group["full"])})
    return records


def write(out, ranked, records):
    """OUT/pairs.csv (scores and ranks; read by `mtrobust-fast report --selection`), OUT/correlations.csv and
    OUT/selection.json (both, NaN as null)."""
    out.mkdir(parents=True, exist_ok=True)
    ranked.to_csv(out / "pairs.csv", index=False)
    pd.DataFrame(records).to_csv(out / "correlations.csv", index=False)
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in records]
    pairs = json.loads(ranked.to_json(orient="records"))
    (out / "selection.json").write_text(json.dumps({"pairs": pairs, "correlations": clean}, indent=2))
