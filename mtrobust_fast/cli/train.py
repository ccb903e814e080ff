"""``mtrobust-fast train``: clean or adversarial training of a multi-task Taskonomy model (Taskonomy data) or a
classifier (an object set or CIFAR binary folder), single process or ``torchrun`` DDP.

Example (4 GPUs): ``torchrun --nproc-per-node 4 -m mtrobust_fast.cli train --tasks sd --data DIR --out RUN``.
"""
import dataclasses
import sys

from mtrobust_fast import tasks as task_registry
from mtrobust_fast.attacks import MODEL_MODES
from mtrobust_fast.tasks.auxiliary import AUXILIARY
from mtrobust_fast.cli.args import add_budget_units, budget, folder, pixel_budgets, run_reporting, seed, workers
from mtrobust_fast.cli.settings import add_setting_flags
from mtrobust_fast.models import list_encoders
from mtrobust_fast.training.config import (
    ADVERSARIAL,
    CLASS_LOSSES,
    CURVATURE,
    DEFAULT_ROBUST_VAL,
    DEFAULT_SCHEDULES,
    DEFAULT_TASKS,
    DEFAULT_WEIGHT_DECAY,
    KEEP,
    NORMS,
    OPTIMIZERS,
    SELECT,
    TrainConfig,
)
from mtrobust_fast.training.augment import AUGMENTS
from mtrobust_fast.training.gat import ROUTINGS
from mtrobust_fast.training.adversarial import OBJECTIVES
from mtrobust_fast.training.recipes import RECIPES
from mtrobust_fast.training.runner import train
from mtrobust_fast.weighting import WEIGHTINGS


def _default(name):
    return next(field.default for field in dataclasses.fields(TrainConfig) if field.name == name)


def add_arguments(parser):
    add = parser.add_argument
    add("--tasks", default=None,
        help=f"Taskonomy task letters, e.g. sdnE (default {DEFAULT_TASKS}); on NYUv2/Cityscapes a subset of their s, "
             f"d (, n) (default all); leave out on classification data")
    add("--encoder", default=_default("encoder"),
        help=f"one of {', '.join(list_encoders())} (default %(default)s)")
    add("--data", required=True,
        help="Taskonomy root (real or `mtrobust-fast data synth`), a NYUv2 or Cityscapes root in the MTAN/LibMTL "
             ".npy layout (real or `data synth --layout nyuv2`), or classification data: an object set "
             "(`mtrobust-fast data synth-objects`) or a CIFAR-10/100 binary folder")
    add("--out", required=True, type=lambda text: str(folder(text)), help="run directory: checkpoints, metrics.jsonl, config.json")
    add("--size", type=int, default=None,
        help="image side in px (default: the images' own; Taskonomy models need a multiple of 32; on "
             "NYUv2/Cityscapes the height, the width in proportion)")
    add("--epochs", type=int, default=_default("epochs"),
        help="total epochs (default %(default)s, the papers' schedule: hours on a GPU, days on a "
             "CPU; 5-10 epochs of the synthetic sets take minutes on a CPU)")
    add("--batch-size", type=int, default=_default("batch_size"),
        help="per-process batch size (default %(default)s)")
    add("--val-batch-size", type=int, default=None, help="validation batch size (default: --batch-size)")
    add("--optim", choices=OPTIMIZERS, default=_default("optim"), help="optimiser (default %(default)s)")
    add("--lr", type=float, default=None,
        help="constant learning rate (instead of --schedule); the peak of --schedule-kind cosine or onecycle")
    add("--schedule", default=None,
        help="step schedule EPOCH:LR,... from 0-based epochs; default adam "
             f"{DEFAULT_SCHEDULES['adam']}, sgd {DEFAULT_SCHEDULES['sgd']}")
    add_setting_flags(parser.add_argument_group("recipe: schedule, weight averaging, AWP, label smoothing, GradAlign"),
                      RECIPES)  # each part's declared settings (--schedule-kind, --ema, --awp-gamma, ...)
    add("--momentum", type=float, default=_default("momentum"), help="SGD momentum (default %(default)s)")
    add("--weight-decay", type=float, default=None,
        help=f"default adam {DEFAULT_WEIGHT_DECAY['adam']}, sgd {DEFAULT_WEIGHT_DECAY['sgd']}")
    add("--weights", default=_default("weights"),
        help="task loss weights: uniform (1/N), zamir (the paper's main/auxiliary table, needs --main), or "
             "TASK=W,... for every task, negative weights allowed, e.g. s=1,d=-0.1 (default %(default)s)")
    add("--weighting", choices=WEIGHTINGS.names(), default=_default("weighting"),
        help="how task losses become encoder gradients: static (the weighted sum), or a torchjd aggregator of the "
             "per-task encoder gradients (ew/mean, mgda, upgrad, pcgrad, imtlg, aligned_mtl, dualproj, graddrop; "
             "cagrad, nashmtl with their torchjd extras); --weights scale the losses first (default %(default)s)")
    add("--main", default=None, help="main task letter (for --weights zamir and --attack-tasks main)")
    add("--class-loss", choices=CLASS_LOSSES, default=_default("class_loss"),
        help="classifier loss: softmax cross-entropy, or sigmoid BCE on one-hot labels (the GAT source's)")
    add("--findings", default=_default("findings"),
        help="chest X-rays: comma-separated findings the main multi-label head predicts, e.g. "
             "Edema,Cardiomegaly (default: all of the CSV's)")
    add("--segment-loss", choices=tuple(task_registry.SEGMENT_LOSSES), default=_default("segment_loss"),
        help="segmentation training loss: ce (pixel cross-entropy) or balanced (each class present in an image "
             "weighs the same: the mean over its classes of the class's mean pixel cross-entropy; keeps small "
             "background-heavy sets from collapsing to background). Attacks and errors use plain ce "
             "(default %(default)s)")
    add("--augment", choices=AUGMENTS, default=_default("augment"),
        help="training batches: flip (mirror each image left-right with probability 1/2; normals' x component "
             "changes sign), crop (enlarge by 1.25 and cut a random window of the original size; labels and masks "
             "by nearest neighbour), or crop+flip (GAT's CIFAR recipe). Validation images are never augmented "
             "(default %(default)s)")
    adv = parser.add_argument_group("adversarial training")
    adv.add_argument("--adversarial", choices=ADVERSARIAL, default=_default("adversarial"),
                     help="objective: madry (loss at PGD x_adv), madry_mix (attacked tasks 0.5 clean + 0.5 adv), "
                          "trades (clean + beta * divergence), mart (boosted CE at x_adv + beta * KL weighted by "
                          "the clean misclassification; classification heads), fgsm_rs (one FGSM step from a "
                          "random start), nfgsm (noise of 2 eps, one step of eps, no projection onto the ball), "
                          "free (replayed batches; the perturbation reuses each backward) (default %(default)s)")
    adv.add_argument("--attack-tasks", default=_default("attack_tasks"),
                     help="tasks the inner attack raises: all, main, or letters such as s,d (default %(default)s)")
    adv.add_argument("--norm", choices=NORMS, default=_default("norm"), help="threat model (default %(default)s)")
    adv.add_argument("--eps", type=budget, default=_default("eps"),
                     help="ball radius in [0,1] pixels, e.g. 8/255 (default 8/255)")
    add_budget_units(adv)
    adv.add_argument("--alpha", type=budget, default=None,
                     help="step size (default: 2.5*eps/steps for PGD, 1.25*eps for fgsm_rs, eps for nfgsm and free)")
    adv.add_argument("--steps", type=int, default=_default("steps"),
                     help="PGD steps of the inner attack (default %(default)s)")
    add_setting_flags(adv, OBJECTIVES)  # each objective's declared settings (trades: --beta, free: --replays)
    adv.add_argument("--attack-mode", choices=MODEL_MODES, default=_default("attack_mode"),
                     help="model mode during the inner attack: eval, or train with BatchNorm statistics frozen "
                          "(default %(default)s)")
    gat = parser.add_argument_group("GAT: auxiliary self-supervised tasks (classifiers)")
    gat.add_argument("--aux", default=None,
                     help=f"auxiliary heads trained on labels made from the images, comma-separated: "
                          f"{', '.join(AUXILIARY)}; the main task is still trained by --adversarial")
    gat.add_argument("--domain-labels", action="store_true",
                     help="also train a 'domain' head on the data's coarse labels (CIFAR-100 superclasses, CIFAR-10 "
                          "vehicle/animal, the object set's free-standing/against-a-wall); weight it with --weights, "
                          "negative for a task to unlearn")
    gat.add_argument("--aux-routing", choices=ROUTINGS, default=_default("aux_routing"),
                     help="shared: the transformed batch replaces every head's input (the GAT code); separate: "
                          "the main head sees the original images, each auxiliary head its own copy "
                          "(default %(default)s)")
    add_setting_flags(gat, AUXILIARY)  # each auxiliary task's declared settings (--jigsaw-permutations, ...)
    adv.add_argument("--curvature", choices=CURVATURE, default=_default("curvature"),
                     help="gradient-curvature regulariser: xi = (1 - cos^2(g1, g2)) |g1 - g2|^2 / |g1 + g2|^2 between "
                          "the input gradients of two tasks, its batch mean added as one more loss. xi: its exact gradient "
                          "(double backprop); houdini-grad: value xi, Houdini gradient on cos(g1, g2); houdini-out: "
                          "value xi, Houdini gradient on the first task's softmax margin (no double backprop; needs a "
                          "class head first) (default %(default)s)")
    adv.add_argument("--curvature-tasks", default=None,
                     help="the two tasks it compares, e.g. s,d (default: --main, else the first task, and the next)")
    adv.add_argument("--curvature-weight", type=float, default=_default("curvature_weight"),
                     help="its weight (default %(default)s)")
    adv.add_argument("--robust-val", type=int, default=None,
                     help=f"validation images attacked with PGD every epoch (default {DEFAULT_ROBUST_VAL} when "
                          "training adversarially, else 0)")
    adv.add_argument("--robust-val-steps", type=int, default=_default("robust_val_steps"),
                     help="PGD steps of the robust validation (default %(default)s)")
    adv.add_argument("--select", choices=SELECT, default=_default("select"),
                     help="best.pt: lowest clean validation loss, or lowest adversarial validation error "
                          "(default %(default)s)")
    add("--seed", type=seed, default=_default("seed"), help="random seed (default %(default)s)")
    add("--save-every", type=int, default=_default("save_every"),
        help="also keep epoch_NNNN.pt (weights and optimiser state, like last.pt) every N epochs; 0: never "
             "(default %(default)s)")
    add("--keep", choices=KEEP, default=_default("keep"),
        help="what the finished run's last.pt keeps: all (weights and what --resume needs: the optimiser state, "
             "1x the weights more with SGD momentum, 2x with Adam, and the raw weights with --ema) or weights (a "
             "finished run can then not be extended). best.pt always holds the weights only (default %(default)s)")
    add("--resume", action="store_true", help="continue the run in --out from its last.pt")
    add("--amp", nargs="?", const="fp16", choices=("fp16", "bf16"), default=None,
        help="mixed precision: fp16 (CUDA only, with loss scaling; --amp alone) or bf16 (CUDA or CPU); the "
             "training attack runs under it too")
    add("--channels-last", action="store_true",
        help="keep weights and batches in channels-last memory order (same arithmetic precision; on this "
             "project's 2-core CPU a ResNet-18 step ran about 1.3x faster, see the README)")
    add("--workers", type=workers, default=_default("workers"),
        help="data-loading processes per training process (default %(default)s)")
    add("--limit-train", type=int, default=None, help="use only the first N training samples")
    add("--data-subset", type=float, default=None,
        help="limited-data training: use only this fraction of the training set, e.g. 0.1 (its first images)")
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
    def training():
        pixel_budgets(args)
        train(config_from_args(args))
        return 0

    try:
        return run_reporting("train", training, (ValueError, FileNotFoundError, FileExistsError, FloatingPointError))
    except KeyboardInterrupt:
        print(f"\nmtrobust-fast train: interrupted; the last finished epoch is in {args.out}/last.pt: run the same "
              f"command with --resume to continue", file=sys.stderr)
        return 130
