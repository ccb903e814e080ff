"""``mtrobust-fast select``: auxiliary-task selection from cheap surrogates (AAAI'22 RQ4, Table 3).

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
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from mtrobust_fast import results_table
from mtrobust_fast.cli.args import budget
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


def _one_config(pairs, name):
    """``pairs`` without its config columns, after checking they hold a single configuration."""
    keys = results_table.config_columns(pairs)
    configs = pairs[keys].drop_duplicates() if keys else pairs.iloc[:0]
    if len(configs) > 1:
        listed = "; ".join(results_table.config_label(keys, row) for row in configs.itertuples(index=False))
        raise results_table.TableError(f"{name}: several attack configurations remain ({listed}); choose one "
                                       f"with {', '.join('--' + k.replace('_', '-') for k in FILTERS)} or "
                                       f"--where COLUMN=VALUE")
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


def _filtered(table, args, name, keys=FILTERS):
    wanted = [(key, getattr(args, key)) for key in keys if getattr(args, key) is not None] + list(args.where)
    for key, value in wanted:
        if key in table.columns:
            table = table[_matches(table[key], value)]
        elif (key, value) in args.where:
            raise results_table.TableError(f"{name}: --where {key}=...: the table has no column {key}")
    if table.empty:
        raise results_table.TableError(f"{name}: no row matches the filters")
    return table


def surrogate_scores(args):
    """One DataFrame (main, aux, full, <surrogate>...) over the pairs that the full table has."""
    required = ("model_tasks", "attacked", "task", args.metric, *args.clean)
    full_table = _filtered(results_table.read(args.full, required), args, str(args.full))
    scores = _one_config(results_table.pair_values(full_table, args.metric, args.attacked), str(args.full))
    scores = scores.rename(columns={"value": "full"}).drop(columns="rows")
    sources = [(column, full_table, column, str(args.full)) for column in args.clean]
    keys = tuple(k for k in FILTERS if k != "encoder")  # a surrogate encoder may differ from the full one
    for name, path in args.surrogate:
        table = results_table.read(path, ("model_tasks", "attacked", "task", args.metric))
        sources.append((name, _filtered(table, args, str(path), keys), args.metric, str(path)))
    for name, table, metric, where in sources:
        values = _one_config(results_table.pair_values(table, metric, args.attacked), f"{where} ({metric})")
        scores = scores.merge(values.rename(columns={"value": name}).drop(columns="rows"),
                              on=["main", "aux"], how="left")
    scores = scores[scores["main"].isin(args.main)]
    if args.candidates:
        scores = scores[scores["aux"].isin(args.candidates)]
    if scores.empty:
        raise results_table.TableError(f"{args.full}: no model pairs {{main, aux}} for main task(s) "
                                       f"{''.join(args.main)} and the candidates")
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


def _task_letters(text):
    try:
        return task_names.letters(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _assignment(text):
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def add_arguments(parser):
    add = parser.add_argument
    add("--main", required=True, type=_task_letters, help="main task letter(s), e.g. s or sdDnE")
    add("--candidates", type=_task_letters, default=None,
        help="auxiliary task letters to rank, e.g. dDnE (default: every pair in --full, the one-task model "
             "included); include the main letter to rank the one-task model too")
    add("--full", required=True, type=Path, help="full-cost results table (Parquet or CSV)")
    add("--surrogate", type=_assignment, action="append", default=[],
        help="NAME=TABLE: a cheaper results table, e.g. few_epochs=e50.parquet (repeatable)")
    add("--clean", action="append", default=[],
        help="a clean-performance column of --full as a surrogate, e.g. clean_error or clean_miou (repeatable)")
    add("--metric", default="rel_vuln", help="vulnerability column (default %(default)s)")
    add("--attacked", choices=("single", "multi"), default="single",
        help="rows where the main task alone (single) or every model task (multi) is attacked")
    add("--attack", default=None, help="keep rows of this attack (pgd, wgd, apgd, fgsm)")
    add("--norm", default=None, help="keep rows of this norm")
    add("--eps", type=budget, default=None, help="keep rows of this eps in [0,1] pixels, e.g. 8/255")
    add("--steps", type=int, default=None, help="keep rows of this number of steps")
    add("--encoder", default=None, help="keep --full rows of this encoder (surrogate tables may use another)")
    add("--task-weights", dest="task_weights", default=None, help="keep rows of these task weights")
    add("--where", type=_assignment, action="append", default=[], metavar="COLUMN=VALUE",
        help="keep rows of every table whose COLUMN equals VALUE, e.g. limit=256 (repeatable)")
    add("--out", type=Path, default=None, help="write OUT/pairs.csv, OUT/correlations.csv, OUT/selection.json")


def _fmt(value):
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_tables(ranked, records, surrogates):
    """Plain-text ranking and correlation tables."""
    header = ["main", "aux", "full", "rank"] + [c for s in surrogates for c in (s, "rank")]
    rows = [[r["main"], r["aux"], _fmt(r["full"]), _fmt(r["full_rank"])]
            + [c for s in surrogates for c in (_fmt(r[s]), _fmt(r[f"{s}_rank"]))] for _, r in ranked.iterrows()]
    lines = _aligned([header] + rows)
    fields = ["surrogate", "main", "n", "pearson_r", "pearson_p", "spearman_rho", "spearman_p", "note"]
    lines += [""] + _aligned([fields] + [[_fmt(r[f]) for f in fields] for r in records])
    return "\n".join(lines)


def _aligned(rows):
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]


def write(out, ranked, records):
    """OUT/pairs.csv (scores and ranks; read by `mtrobust-fast report --selection`), OUT/correlations.csv and
    OUT/selection.json (both, NaN as null)."""
    out.mkdir(parents=True, exist_ok=True)
    ranked.to_csv(out / "pairs.csv", index=False)
    pd.DataFrame(records).to_csv(out / "correlations.csv", index=False)
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in records]
    pairs = json.loads(ranked.to_json(orient="records"))
    (out / "selection.json").write_text(json.dumps({"pairs": pairs, "correlations": clean}, indent=2))


def run(args):
    surrogates = [name for name, _ in args.surrogate] + list(args.clean)
    if not surrogates:
        print("mtrobust-fast select: give at least one --surrogate NAME=TABLE or --clean COLUMN", file=sys.stderr)
        return 2
    duplicates = {name for name in surrogates if surrogates.count(name) > 1} | ({"full"} & set(surrogates))
    if duplicates:
        print(f"mtrobust-fast select: surrogate name(s) {', '.join(sorted(duplicates))} used twice or reserved",
              file=sys.stderr)
        return 2
    try:
        scores = surrogate_scores(args)
    except results_table.TableError as error:
        print(f"mtrobust-fast select: {error}", file=sys.stderr)
        return 2
    found = set(zip(scores["main"], scores["aux"]))
    absent = [f"{m}+{a}" for m in args.main for a in args.candidates or () if (m, a) not in found]
    if absent:
        print(f"note: {args.full} has no model pair for {', '.join(absent)}", file=sys.stderr)
    ranked = rank(scores, surrogates)
    records = correlations(scores, surrogates)
    print(format_tables(ranked, records, surrogates))
    if args.out is not None:
        write(args.out, ranked, records)
        print(f"wrote {args.out / 'pairs.csv'}, {args.out / 'correlations.csv'}, {args.out / 'selection.json'}")
    return 0
