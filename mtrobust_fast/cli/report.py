"""``mtrobust-fast report RESULTS --out DIR``: the figures and ``summary.md`` of a results table (see
:mod:`mtrobust_fast.analysis.report`). Reads results tables only, so it starts without torch."""
import sys
from pathlib import Path

from mtrobust_fast.cli.args import folder, positive_int


def add_arguments(parser):
    add = parser.add_argument
    add("results", type=Path, help="results table written by the sweep (Parquet or CSV)")
    add("--out", type=folder, required=True, help="folder for the PNGs and summary.md")
    add("--metric", default="rel_vuln",
        help="heatmap metric, e.g. rel_vuln or rel_vuln_ratio_of_means (default %(default)s)")
    add("--selection", type=Path, default=None,
        help="output folder (or its pairs.csv) of `mtrobust-fast select`, for the surrogate scatter")
    add("--dpi", type=positive_int, default=120, help="PNG resolution (default %(default)s)")
    add("--tracker", choices=("local", "comet", "comet-offline"), default=None,
        help="also log the figures and summary to a tracker run in OUT (see mtrobust_fast.tracking)")
    add("--project", default=None, help="Comet project name")


def run(args):
    from mtrobust_fast.analysis import report, results_table  # matplotlib and pandas: only when the command runs

    try:
        paths = report.build(args.results, args.out, args.metric, args.selection, args.dpi)
    except results_table.TableError as error:
        print(f"mtrobust-fast report: {error}", file=sys.stderr)
        return 2
    print("\n".join(f"wrote {p}" for p in paths))
    if args.tracker is not None:
        from mtrobust_fast.tracking import make_tracker

        try:
            with make_tracker(args.tracker, args.out, project=args.project, experiment_name="report") as tracker:
                tracker.log_parameters({"results": str(args.results), "metric": args.metric})
                for path in paths:
                    tracker.log_figure(path)
        except (RuntimeError, ImportError) as error:
            print(f"mtrobust-fast report: --tracker {args.tracker}: {error}", file=sys.stderr)
            return 2
    return 0
