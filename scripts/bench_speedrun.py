"""Time to robustness: how long each adversarial-training recipe takes to reach a PGD-20 accuracy, in one run.

On the synthetic object set (10 classes, 32 px; `mtrobust-fast data synth-objects`), one model architecture, one
seed, the same batches in the same order, the same optimiser (SGD, momentum 0.9, weight decay 5e-4) and the same
one-cycle learning rate for every recipe:

- ``plain``: a PGD-k adversarial-training loop written here in plain PyTorch, the way such loops are usually
  written (a perturbation tensor with ``requires_grad``, ``loss.backward()``, a signed step, clamping), with
  ``torch.optim.swa_utils.AveragedModel`` for its weight average;
- ``madry``: this library's Madry PGD-k through its ``Trainer`` (attack on the fused op, input-only gradients,
  on the model with its BatchNorms folded into the convolutions);
- ``fgsm_rs`` (α = 1.25ε) and ``nfgsm`` (noise 2ε, α = ε): the single-step recipes, through the ``Trainer``.

Every run keeps a weight average (EMA, decay ``--ema``), so each recipe gives two models from one training
trajectory: its raw weights and its average (the average costs one buffer update per step, included in every
time). After each epoch both are scored by the same PGD-20 (ε = 8/255, α = 2.5ε/20, the library's PGD in eval
mode, on the folded model to save time) on ``--val-images`` validation images; that scoring is not counted in
the training time. The final test scores run on the models as they are. The table gives,
per model: the training seconds to the end of the first epoch whose PGD-20 accuracy reaches ``--target``
(default: the plain loop's best PGD-20 accuracy minus 2 points), the ratio of that time to the plain loop's, and
the final clean, PGD-20 and AutoAttack (standard, our implementation) accuracy on ``--test-images`` test images
with 95 % Wilson intervals. Data are held in memory as tensors for every recipe, so the times compare the
training steps, not image decoding.

    python scripts/bench_speedrun.py                           # CPU defaults (about 25-40 min on 2 cores)
    python scripts/bench_speedrun.py --images 600 --epochs 2 --aa-images 16   # a quick check
    python scripts/bench_speedrun.py --device cuda --images 20000 --epochs 15 --autocast bf16 --channels-last
"""
import argparse
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import binomtest
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mtrobust_fast.attacks import PGD, AutoAttack
from mtrobust_fast.data.classification import open_classification
from mtrobust_fast.data.synth.objects import synthesize_objects
from mtrobust_fast.models import build_classifier
from mtrobust_fast.tasks.classification import ClassificationTask
from mtrobust_fast.training import AttackSettings, TaskLosses, Trainer, make_objective
from mtrobust_fast.training.averaging import WeightAverage
from mtrobust_fast.training.distributed import DistContext
from mtrobust_fast.training.schedules import Schedule
from mtrobust_fast.weighting import make_weighting

EPS = 8 / 255


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="an object set (default: synthesised into a temporary folder)")
    p.add_argument("--images", type=int, default=3000, help="images to synthesise (70/15/15 split)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--encoder", default="resnet18_cpu")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak of the one-cycle learning rate")
    p.add_argument("--pgd-steps", type=int, default=5, help="k of the PGD-k training attack (plain and madry)")
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--recipes", default="plain,madry,fgsm_rs,nfgsm")
    p.add_argument("--val-images", type=int, default=256)
    p.add_argument("--test-images", type=int, default=500)
    p.add_argument("--aa-images", type=int, default=100, help="test images AutoAttack runs on")
    p.add_argument("--target", type=float, default=None, help="PGD-20 accuracy to reach (default: see above)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--autocast", choices=("none", "bf16"), default="none")
    p.add_argument("--channels-last", action="store_true")
    return p.parse_args()


def tensors(dataset, limit=None):
    count = len(dataset) if limit is None else min(limit, len(dataset))
    items = [dataset[i] for i in range(count)]
    return torch.stack([x for x, _, _ in items]), torch.stack([t["class"] for _, t, _ in items])


def batches(x, y, batch, seed, epoch):
    """The epoch's shuffled full batches, identical for every recipe."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    for start in range(0, len(y) - batch + 1, batch):
        index = order[start:start + batch]
        yield x[index], y[index]


def onecycle(lr, total):
    """The piecewise-linear one-cycle rate of update u (the library's ``Schedule`` formula, written out for the
    plain loop): up over the first 2/5 of the updates, then down."""
    warmup = round(0.4 * total)
    return lambda u: lr * (u + 1) / warmup if u < warmup else lr * (total - u) / (total - warmup)


def plain_pgd_epoch(model, average, optimizer, rate, x, y, args, epoch, update):
    """One epoch of PGD-k adversarial training as commonly written in plain PyTorch."""
    device = torch.device(args.device)
    alpha = 2.5 * EPS / args.pgd_steps
    for images, labels in batches(x, y, args.batch, args.seed, epoch):
        images, labels = images.to(device), labels.to(device)
        model.eval()
        delta = (torch.rand_like(images) * 2 - 1) * EPS
        delta = ((images + delta).clamp(0, 1) - images).requires_grad_(True)
        for _ in range(args.pgd_steps):
            loss = F.cross_entropy(model(images + delta)["class"], labels)
            loss.backward()
            with torch.no_grad():
                delta += alpha * delta.grad.sign()
                delta.clamp_(-EPS, EPS)
                delta.copy_((images + delta).clamp(0, 1) - images)
            delta.grad.zero_()
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = rate(update)
        optimizer.zero_grad()
        F.cross_entropy(model((images + delta).detach())["class"], labels).backward()
        optimizer.step()
        average.update_parameters(model)
        update += 1
    return update


def library_trainer(recipe, model, average, x, y, args, per_epoch):
    """The library's Trainer for ``recipe`` over in-memory batches (its ``train_epoch`` is what is timed)."""
    losses = TaskLosses([ClassificationTask("class", 10)])
    inner = {"madry": AttackSettings("pgd", "linf", EPS, None, args.pgd_steps),
             "fgsm_rs": AttackSettings("fgsm", "linf", EPS), "nfgsm": AttackSettings("nfgsm", "linf", EPS)}[recipe]
    amp = torch.bfloat16 if args.autocast == "bf16" else None
    inner = replace(inner, autocast=amp)
    objective = make_objective(recipe, losses, inner, ["class"])
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    schedule = Schedule([(0, args.lr)], args.epochs, per_epoch, kind="onecycle")

    class Epoch:  # the same shuffled batches as the plain loop, as the trainer's loader
        epoch = 0

        def __iter__(self):
            for images, labels in batches(x, y, args.batch, args.seed, self.epoch):
                yield images, {"class": labels}, {}

        def __len__(self):
            return per_epoch

    loader = Epoch()
    trainer = Trainer(model, objective, make_weighting("static", {"class": 1.0}), optimizer, schedule, loader,
                      loader, losses, run_dir=tempfile.mkdtemp(), progress=False, average=average, amp=amp,
                      channels_last=args.channels_last,
                      ctx=DistContext(device=torch.device(args.device)))
    return trainer, loader


def accuracy(model, x, y, args, attack=None):
    """Correct predictions (a bool tensor) of ``model`` on x, after ``attack`` when given."""
    device = torch.device(args.device)
    model.eval()
    correct = []
    for start in range(0, len(y), 128):
        images, labels = x[start:start + 128].to(device), y[start:start + 128].to(device)
        if attack is not None:
            images = attack(model)(images, labels)
        with torch.no_grad():
            correct.append(model(images)["class"].argmax(1).eq(labels).cpu())
    return torch.cat(correct)


def pgd20(model, fold_batchnorm=False):
    return PGD(model, ["class"], eps=EPS, steps=20, seed=0, fold_batchnorm=fold_batchnorm)


def pgd20_folded(model):
    return pgd20(model, fold_batchnorm=True)


def autoattack(model):
    return AutoAttack(model, ["class"], eps=EPS, version="standard", seed=0)


def wilson(correct):
    n, k = len(correct), int(correct.sum())
    low, high = binomtest(k, n).proportion_ci(method="wilson")
    return f"{k / n:.3f} [{low:.3f}, {high:.3f}]"


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    if args.data is None:
        args.data = str(Path(tempfile.mkdtemp()) / "objects")
        synthesize_objects(args.data, args.images, size=args.size, seed=args.seed, workers=1, progress=False)
    train_x, train_y = tensors(open_classification(args.data, "train"))
    val_x, val_y = tensors(open_classification(args.data, "val"), args.val_images)
    test_set = open_classification(args.data, "test")
    test_x, test_y = tensors(test_set, args.test_images)
    per_epoch = len(train_y) // args.batch
    print(f"{len(train_y)} training images ({per_epoch} batches of {args.batch}), {len(val_y)} validation, "
          f"{len(test_y)} test; {args.encoder} at {args.size} px; {args.epochs} epochs; PGD-{args.pgd_steps} "
          f"training attack; eps 8/255; device {args.device}", flush=True)
    curves = {}
    for recipe in args.recipes.split(","):
        torch.manual_seed(args.seed)
        model = build_classifier(args.encoder, 10, args.size, "ce", test_set.normalization).to(args.device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if recipe == "plain":
            average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True)
            optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
            rate, update = onecycle(args.lr, args.epochs * per_epoch), 0
            averaged = average.module
        else:
            average = WeightAverage(model, args.ema, warmup=1)  # warmup 1: the plain loop's EMA exactly
            trainer, loader = library_trainer(recipe, model, average, train_x, train_y, args, per_epoch)
            averaged = average.model
        seconds, curve = 0.0, []
        for epoch in range(args.epochs):
            started = time.perf_counter()
            if recipe == "plain":
                with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.autocast == "bf16"):
                    update = plain_pgd_epoch(model, average, optimizer, rate, train_x, train_y, args, epoch, update)
            else:
                loader.epoch = epoch
                trainer.train_epoch(epoch, args.epochs)  # the trainer's own amp and channels_last
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - started
            raw_acc = float(accuracy(model, val_x, val_y, args, pgd20_folded).float().mean())
            ema_acc = float(accuracy(averaged, val_x, val_y, args, pgd20_folded).float().mean())
            curve.append((seconds, raw_acc, ema_acc))
            print(f"{recipe} epoch {epoch + 1}: {seconds:.0f} s of training; PGD-20 val accuracy raw {raw_acc:.3f}, "
                  f"EMA {ema_acc:.3f}", flush=True)
        curves[recipe] = (curve, model, averaged)
    target = args.target
    if target is None:
        target = max(max(raw, ema) for _, raw, ema in curves["plain"][0]) - 0.02 if "plain" in curves else 0.2
    print(f"\ntarget: PGD-20 validation accuracy >= {target:.3f}")

    def reached(curve, column):
        return next((s for s, *accs in curve if accs[column] >= target), math.inf)

    base = {column: reached(curves["plain"][0], column) for column in (0, 1)} if "plain" in curves else None
    rows = []
    for recipe, (curve, model, averaged) in curves.items():
        for column, (label, net) in enumerate((("raw", model), ("EMA", averaged))):
            time_to = reached(curve, column)
            ratio = time_to / base[column] if base and math.isfinite(time_to) and math.isfinite(base[column]) else math.nan
            clean = accuracy(net, test_x, test_y, args)
            robust = accuracy(net, test_x, test_y, args, pgd20)
            aa = accuracy(net, test_x[:args.aa_images], test_y[:args.aa_images], args, autoattack)
            rows.append((f"{recipe} ({label})", time_to, ratio, curve[-1][0], wilson(clean), wilson(robust), wilson(aa)))
            print(f"  scored {recipe} ({label})", flush=True)
    verdicts(curves)
    print(f"\n| recipe | s to target | x plain | total s | clean acc [95% CI] | PGD-20 acc | AutoAttack acc "
          f"({args.aa_images} imgs) |\n|---|---|---|---|---|---|---|")
    for name, time_to, ratio, total, clean, robust, aa in rows:
        shown = "not reached" if not math.isfinite(time_to) else f"{time_to:.0f}"
        print(f"| {name} | {shown} | {ratio:.2f} | {total:.0f} | {clean} | {robust} | {aa} |")


def verdicts(curves):
    """The issue's two targets, per weight set: the library's Madry against the plain loop at the plain loop's best
    accuracy, and each single-step recipe against Madry's best accuracy minus 2 points."""
    def first(curve, column, level):
        return next((s for s, *accs in curve if accs[column] >= level), math.inf)

    for column, label in ((0, "raw"), (1, "EMA")):
        if "plain" in curves and "madry" in curves:
            level = max(accs[column] for _, *accs in curves["plain"][0])
            ratio = first(curves["madry"][0], column, level) / first(curves["plain"][0], column, level)
            print(f"{label}: madry reaches the plain loop's best PGD-20 accuracy {level:.3f} in {ratio:.2f}x its "
                  f"time (target <= 0.90)")
        if "madry" in curves:
            best = max(accs[column] for _, *accs in curves["madry"][0])
            madry_time = first(curves["madry"][0], column, best)
            for recipe in ("fgsm_rs", "nfgsm"):
                if recipe in curves:
                    ratio = first(curves[recipe][0], column, best - 0.02) / madry_time
                    print(f"{label}: {recipe} reaches madry's best PGD-20 accuracy {best:.3f} minus 2 points in "
                          f"{ratio:.2f}x madry's time to its best (target <= 0.40; inf: never)")


if __name__ == "__main__":
    main()
