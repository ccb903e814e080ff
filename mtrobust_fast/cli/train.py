"""``mtrobust-fast train``: clean multi-task training on synthetic or real Taskonomy (``torchrun`` for DDP).

Example (4 GPUs): ``torchrun --nproc-per-node 4 -m mtrobust_fast.cli train --tasks sd --data DIR --out RUN``.
"""
import dataclasses
import sys

from mtrobust_fast.models import list_encoders
from mtrobust_fast.training.config import (
    DEFAULT_SCHEDULES,
    DEFAULT_WEIGHT_DECAY,
    OPTIMIZERS,
    WEIGHT_MODES,
    TrainConfig,
)
from mtrobust_fast.training.runner import train


def _default(name):
    return next(field.default for field in dataclasses.fields(TrainConfig) if field.name == name)


def add_arguments(parser):
    add = parser.add_argument
    add("--tasks", default=_default("tasks"), help="task letters, e.g. sdnE (default %(default)s)")
    add("--encoder", default=_default("encoder"),
        help=f"one of {', '.join(list_encoders())} (default %(default)s)")
    add("--data", required=True, help="Taskonomy root (real or from `mtrobust-fast data synth`)")
    add("--out", required=True, help="run directory: checkpoints, metrics.jsonl, config.json")
    add("--size", type=int, default=_default("size"),
        help="image side in px, a multiple of 32 (default %(default)s)")
    add("--epochs", type=int, default=_default("epochs"), help="total epochs (default %(default)s)")
    add("--batch-size", type=int, default=_default("batch_size"),
        help="per-process batch size (default %(default)s)")
    add("--val-batch-size", type=int, default=None, help="validation batch size (default: --batch-size)")
    add("--optim", choices=OPTIMIZERS, default=_default("optim"), help="optimiser (default %(default)s)")
    add("--lr", type=float, default=None, help="constant learning rate (instead of --schedule)")
    add("--schedule", default=None,
        help="step schedule EPOCH:LR,... from 0-based epochs; default adam "
             f"{DEFAULT_SCHEDULES['adam']}, sgd {DEFAULT_SCHEDULES['sgd']}")
    add("--momentum", type=float, default=_default("momentum"), help="SGD momentum (default %(default)s)")
    add("--weight-decay", type=float, default=None,
        help=f"default adam {DEFAULT_WEIGHT_DECAY['adam']}, sgd {DEFAULT_WEIGHT_DECAY['sgd']}")
    add("--weights", choices=WEIGHT_MODES, default=_default("weights"),
        help="task loss weights: uniform 1/N, or the paper's main/auxiliary table (needs --main)")
    add("--main", default=None, help="main task letter for --weights zamir")
    add("--seed", type=int, default=_default("seed"), help="random seed (default %(default)s)")
    add("--save-every", type=int, default=_default("save_every"),
        help="also keep epoch_NNNN.pt every N epochs; 0: never (default %(default)s)")
    add("--resume", action="store_true", help="continue the run in --out from its last.pt")
    add("--amp", action="store_true", help="mixed precision (CUDA only)")
    add("--workers", type=int, default=_default("workers"),
        help="data-loading processes per training process (default %(default)s)")
    add("--limit-train", type=int, default=None, help="use only the first N training samples")
    add("--limit-val", type=int, default=None, help="use only the first N validation samples")
    add("--val-before", action="store_true", help="validate the initial model first (logged as epoch 0)")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: CUDA when available")
    add("--layout", choices=("auto", "flat", "omnidata"), default="auto", help="Taskonomy folder layout")
    add("--split-csv", default=None, help="official split CSV (default: the one in --data)")
    add("--point-threshold", type=int, default=None, help="split by point id (< N train) as the source")
    add("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args):
    names = {field.name for field in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    return TrainConfig(**values, progress=not args.no_progress)


def run(args):
    try:
        train(config_from_args(args))
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"mtrobust-fast train: error: {error}", file=sys.stderr)
        return 2
    return 0
