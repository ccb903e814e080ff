"""``mtrobust-fast select``: rank auxiliary tasks by cheap surrogates and correlate the surrogates with the full
cost (see :mod:`mtrobust_fast.analysis.selection`). Reads results tables only, so it starts without torch."""
import argparse
import math
import sys
from pathlib import Path

import pandas as pd

from mtrobust_fast import task_names
from mtrobust_fast.analysis import results_table, selection
from mtrobust_fast.cli.args import budget, folder


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
    add("--out", type=folder, default=None, help="write OUT/pairs.csv, OUT/correlations.csv, OUT/selection.json")


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
        scores = selection.surrogate_scores(
            args.full, args.main, surrogates=args.surrogate, clean=args.clean, metric=args.metric,
            attacked=args.attacked, candidates=args.candidates, where=args.where,
            filters={key: getattr(args, key) for key in selection.FILTERS})
    except selection.SeveralConfigurations as error:
        print(f"mtrobust-fast select: {error.name}: several attack configurations remain ({error.listed}); choose "
              f"one with {', '.join('--' + k.replace('_', '-') for k in selection.FILTERS)} or --where "
              f"COLUMN=VALUE", file=sys.stderr)
        return 2
    except results_table.TableError as error:
        print(f"mtrobust-fast select: {str(error).replace(': where ', ': --where ')}", file=sys.stderr)
        return 2
    found = set(zip(scores["main"], scores["aux"]))
    absent = [f"{m}+{a}" for m in args.main for a in args.candidates or () if (m, a) not in found]
    if absent:
        print(f"note: {args.full} has no model pair for {', '.join(absent)}", file=sys.stderr)
    ranked = selection.rank(scores, surrogates)
    records = selection.correlations(scores, surrogates)
    print(format_tables(ranked, records, surrogates))
    if args.out is not None:
        selection.write(args.out, ranked, records)
        print(f"wrote {args.out / 'pairs.csv'}, {args.out / 'correlations.csv'}, {args.out / 'selection.json'}")
    return 0
