"""``mtrobust-fast complexity``: parameters and MACs per image of each architecture and task set (a table, and
optionally a CSV), counted by :mod:`mtrobust_fast.models.complexity`."""
import argparse
import csv
from pathlib import Path

from mtrobust_fast.evaluation import metrics
from mtrobust_fast import tasks as task_registry
from mtrobust_fast.cli.args import positive_int, run_reporting
from mtrobust_fast.models import build_model, list_encoders, load_checkpoint
from mtrobust_fast.models.complexity import model_complexity, set_complexity


def _items(text):
    items = [part.strip() for part in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"empty item in {text!r}")
    return items


def add_arguments(parser):
    add = parser.add_argument
    add("--encoders", type=_items, default=["resnet18"],
        help=f"architectures, comma-separated (default resnet18): {', '.join(list_encoders())}")
    add("--tasks", default="sdnE", help="the model's task letters (default sdnE)")
    add("--sets", type=_items, default=None,
        help="task sets to cost, comma-separated letters (default: each task alone and all of them)")
    add("--checkpoint", type=Path, default=None, help="cost this checkpoint's model instead of --encoders/--tasks")
    add("--size", type=positive_int, default=256, help="image side in px (default %(default)s)")
    add("--out", type=Path, default=None, help="also write the table to this CSV file")


def complexity_rows(args):
    """One dict per (architecture, task set): encoder, tasks, parameters, MACs per image."""
    if args.checkpoint is not None:
        model, _ = load_checkpoint(args.checkpoint)
        models = [model]
    else:
        models = [build_model(args.tasks, encoder, input_size=32) for encoder in args.encoders]
    rows = []
    for model in models:
        if args.size % model.config.get("input_stride", 32):
            raise ValueError(f"--size: must be a multiple of {model.config.get('input_stride', 32)}, got {args.size}")
        names = list(model.decoders)
        sets = args.sets or [[n] for n in names] + ([names] if len(names) > 1 else [])
        counted = model_complexity(model, args.size)
        for chosen in sets:
            chosen = chosen if isinstance(chosen, list) else _set(chosen, names)
            cost = set_complexity(counted, chosen)
            rows.append({"encoder": model.config["encoder"], "tasks": metrics.set_label(chosen), "size": args.size,
                         "parameters": cost["parameters"], "macs": cost["macs"],
                         "encoder_macs": counted["encoder"]["macs"]})
    return rows


def _set(letters, names):
    chosen = [t.name for t in task_registry.resolve(letters)] if letters != "all" else names
    missing = [n for n in chosen if n not in names]
    if missing:
        raise ValueError(f"--sets: the model has tasks {metrics.set_label(names)}, not {metrics.set_label(missing)}")
    return chosen


def run(args):
    def report():
        rows = complexity_rows(args)
        header = ("encoder", "tasks", "parameters (M)", f"GMACs/image at {args.size} px", "of which encoder")
        table = [header] + [(r["encoder"], r["tasks"], f"{r['parameters'] / 1e6:.2f}", f"{r['macs'] / 1e9:.3f}",
                             f"{r['encoder_macs'] / r['macs']:.0%}") for r in rows]
        widths = [max(len(line[i]) for line in table) for i in range(len(header))]
        print("counted: convolutions and linear layers (forward hooks); MAC = one multiply-accumulate")
        for line in table:
            print("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths))))
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            print(f"wrote {args.out}")
        return 0

    return run_reporting("complexity", report)
