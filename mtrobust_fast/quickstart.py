"""``mtrobust-fast quickstart``: the main job end to end on embedded synthetic data, in a few minutes on a CPU.

Synthesises a small Taskonomy dataset, trains a ResNet-18 model per task set (``s`` and ``sd`` by default) at
64 px, and prints every task's clean validation metrics before and after training. Re-running it reuses what
is already in the work directory (the dataset, finished runs). Attacks and the paper's Table 1 join it once
the attack engine lands.
"""
import json
from pathlib import Path

from mtrobust_fast import cli
from mtrobust_fast.data import synth
from mtrobust_fast.training.loop import LOG_NAME


def add_arguments(parser):
    parser.add_argument("--workdir", type=Path, default=Path("mtrobust-quickstart"),
                        help="where the dataset and runs go (default ./mtrobust-quickstart)")
    parser.add_argument("--models", default="s,sd", help="comma-separated task sets to train (default s,sd)")
    parser.add_argument("--images", type=int, default=320, help="synthetic images (default 320)")
    parser.add_argument("--size", type=int, default=64, help="image side in px (default 64)")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs per model (default 6)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _records(run_dir):
    lines = (run_dir / LOG_NAME).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _table(rows):
    header = ("model", "task", "metric", "before", "after")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(header, widths))]
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def run(args):
    data = args.workdir / "data"
    if not (data / synth.SPLIT_CSV).exists():
        synth.synthesize(data, args.images, size=args.size, seed=args.seed, progress=not args.no_progress)
    rows = []
    for tasks in [t.strip() for t in args.models.split(",") if t.strip()]:
        run_dir = args.workdir / f"resnet18_{tasks}"
        argv = ["train", "--tasks", tasks, "--encoder", "resnet18", "--data", str(data), "--size", str(args.size),
                "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", "1e-3",
                "--seed", str(args.seed), "--out", str(run_dir), "--val-before", "--resume"]
        if args.no_progress:
            argv.append("--no-progress")
        status = cli.main(argv)
        if status:
            return status
        records = _records(run_dir)
        before = next(r for r in records if r["epoch"] == 0)["val"]["tasks"]
        after = records[-1]["val"]["tasks"]
        for name, scores in after.items():
            for metric, value in scores.items():
                rows.append((tasks, name, metric, f"{before[name][metric]:.4f}", f"{value:.4f}"))
    print(f"\nClean validation metrics, ResNet-18 at {args.size} px, {args.epochs} epochs "
          f"(mIoU and pixel accuracy: higher is better; losses, L1, MSE: lower is better)")
    print(_table(rows))
    return 0
