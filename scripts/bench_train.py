"""Seconds per training batch of each adversarial objective, as ratios to clean training, in one run.

One model, one batch, the same optimiser step for every objective: clean, Madry with PGD-k (k = 1, 3, 10),
TRADES-10, FGSM-RS and Free (m = 4 replays: four parameter updates per batch); for classifiers also GAT rows
(madry_mix PGD-10 on the main task plus one rotation head, weighted by EW, MGDA, PCGrad or UPGrad, with and
without the curvature term: exact xi, or its Houdini surrogate on the outputs) as ratios to Madry PGD-10 (targets: MGDA
<= 1.3x, curvature <= 2x). Each row is the median over
``--repeats`` timed batches after a warm-up batch. The ratio to clean is compared with the issue's target for
Madry PGD-k: at most (k + 1) x clean x 1.10 (k attack steps that each cost at most a forward and an input
backward, plus the training step). On CPU the model runs in float32; on a GPU pass ``--autocast bf16
--channels-last`` (the training step and the inner attack both run under bf16 autocast, on channels_last
tensors).

    python scripts/bench_train.py                          # CPU: CIFAR ResNet-18, batch 32 at 32 px
    python scripts/bench_train.py --model taskonomy        # Taskonomy ResNet-18 (s, d) at 64 px
    python scripts/bench_train.py --device cuda --batch 256 --autocast bf16 --channels-last
"""
import argparse

import torch

from mtrobust_fast.tasks import auxiliary
from mtrobust_fast.models import build_classifier, build_model
from mtrobust_fast.training import AttackSettings, CleanObjective, TaskLosses, make_objective
from mtrobust_fast.training.gat import GAT
from mtrobust_fast.training.regularisers import CurvatureRegularised
from mtrobust_fast.weighting import make_weighting
from timing import timed

TARGET_SLACK = 1.10


def make_inputs(model, batch, size, device, channels_last):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=generator)
    targets = {}
    for name in model.evaluated_task_names:
        task = model.task_records[name]
        if name == "class":
            targets[name] = torch.randint(0, task.classes, (batch,), generator=generator)
        elif task.is_segmentation:
            targets[name] = torch.randint(1, task.channels, (batch, size, size), generator=generator)
        else:
            targets[name] = torch.rand(batch, task.channels, size, size, generator=generator)
    x = x.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, {k: v.to(device) for k, v in targets.items()}


def time_objective(model, objective, x, targets, device, repeats, autocast, weighting=None):
    """Median seconds of one batch: every update's forward, weighting backward and optimiser step."""
    weighting = weighting or make_weighting("static", model.config["task_weights"])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    model.train()

    def one_batch():
        updates = objective.updates(model, x, targets, {})
        while True:
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                out = next(updates, None)
            if out is None:
                break
            optimizer.zero_grad(set_to_none=True)
            extra = dict(model=model, features=out.features) if weighting.needs_model else {}
            weighting.backward(out.task_losses, **extra)
            optimizer.step()

    return timed(one_batch, device, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("classifier", "taskonomy"), default="classifier")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=None, help="default 32 (classifier) or 64 (taskonomy)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", choices=("none", "bf16", "fp16"), default="none")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast]
    torch.manual_seed(0)
    if args.model == "classifier":
        size = args.size or 32
        model = build_classifier(args.encoder, classes=10, input_size=size)
    else:
        size = args.size or 64
        model = build_model("sd", args.encoder, input_size=size)
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    x, targets = make_inputs(model, args.batch, size, device, args.channels_last)
    losses = TaskLosses(model.task_records.values())
    attacked = model.task_names
    eps = 8 / 255

    def adversarial(name, attack="pgd", steps=10, **kw):
        settings = AttackSettings(attack, "linf", eps, None, steps, "eval", autocast)
        return make_objective(name, losses, settings, attacked, **kw)

    rows = [("clean", CleanObjective(losses), None)]
    rows += [(f"madry PGD-{k}", adversarial("madry", steps=k), (k + 1) * TARGET_SLACK) for k in (1, 3, 10)]
    rows += [("trades-10", adversarial("trades", steps=10), None),
             ("fgsm_rs", adversarial("fgsm_rs", attack="fgsm"), None),
             ("free m=4 (4 updates)", adversarial("free", attack="free", replays=4), None)]
    print(f"{args.model} {args.encoder} batch {args.batch} at {size} px on {device}, autocast {args.autocast}, "
          f"channels_last {args.channels_last}, threads {torch.get_num_threads()}, median of {args.repeats}")
    print(f"{'objective':<22} {'ms/batch':>10} {'x clean':>8} {'target':>8}  ok")
    clean = madry = None
    for label, objective, target in rows:
        seconds = time_objective(model, objective, x, targets, device, args.repeats, autocast)
        clean = clean or seconds
        ratio = seconds / clean
        verdict = "" if target is None else ("yes" if ratio <= target else "NO")
        shown = "" if target is None else f"<= {target:.2f}"
        print(f"{label:<22} {seconds * 1e3:>10.1f} {ratio:>8.2f} {shown:>8}  {verdict}", flush=True)
        if label == "madry PGD-10":
            madry = seconds
    if args.model == "classifier":
        gat_rows(args, size, device, autocast, madry)


def gat_rows(args, size, device, autocast, madry):
    """GAT with one rotation head: seconds per batch relative to Madry PGD-10 on the plain classifier."""
    torch.manual_seed(0)
    model = build_classifier(args.encoder, classes=10, input_size=size, aux=[auxiliary.make_task("rotation")])
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    x, targets = make_inputs(model, args.batch, size, device, args.channels_last)
    main = TaskLosses([model.task_records["class"]])
    settings = AttackSettings("pgd", "linf", 8 / 255, None, 10, "eval", autocast)
    print(f"{'GAT (+rotation)':<22} {'ms/batch':>10} {'x madry':>8} {'target':>8}  ok")
    for weighting_name in ("ew", "mgda", "pcgrad", "upgrad"):
        for curvature in (None, "xi", "houdini-out"):
            objective = GAT(make_objective("madry_mix", main, settings, ["class"]), [model.task_records["rotation"]])
            weights = {"class": 1.0, "rotation": 1.0}
            if curvature:
                objective = CurvatureRegularised(objective, TaskLosses(model.task_records.values()), "class",
                                                 "rotation", curvature)
                weights["curvature"] = 1.0
            seconds = time_objective(model, objective, x, targets, device, args.repeats, autocast,
                                     make_weighting(weighting_name, weights))
            target = 2.0 if curvature else (1.3 if weighting_name == "mgda" else None)
            ratio = seconds / madry
            verdict = "" if target is None else ("yes" if ratio <= target else "NO")
            label = f"{weighting_name}{f' + {curvature}' if curvature else ''}"
            print(f"{label:<22} {seconds * 1e3:>10.1f} {ratio:>8.2f} {'' if target is None else f'<= {target:.1f}':>8}"
                  f"  {verdict}", flush=True)


if __name__ == "__main__":
    main()
