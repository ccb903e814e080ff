"""How strong and how fast the robustness evaluation is, side by side in one run.

1. A classifier (ResNet-18, 32 px) trained briefly with Madry PGD-2 on the synthetic object set (or
   ``--classifier CHECKPOINT``): wall time and robust accuracy of our standard AutoAttack and of torchattacks'
   (both APGD-CE, APGD-T, FAB-T, Square) on the same test images, with torchattacks' budgets (10 iterations
   for the APGD and FAB members, 9 target classes, 5000 Square queries).
   Target: ours >= 1.5x faster at equal or lower robust accuracy. The script also prints a floor no
   implementation can beat: Square's queries on the points that stay robust, as bare forward passes.
2. A Taskonomy model for s and d (ResNet-18, 64 px) trained briefly on synthetic Taskonomy (or
   ``--taskonomy CHECKPOINT``): per task, the per-image error and relative vulnerability under PGD and under the
   dense ensemble (APGD, SegPGD, CosPGD, WGD, relative), attacking {s, d} at the same budget.
3. The fast screen (``--parts fast``): our ``AutoAttack(version="fast")`` (APGD-CE, then targeted APGD on 3
   MALT-ranked classes) against our standard cascade and the official AutoAttack's standard version
   (fra31/auto-attack, from a local copy: ``--official PATH``; its row is skipped without one), all at the
   official budgets (100 iterations, 9 targets, 5000 Square queries), on the classifier of part 1: robust
   accuracy with its 95 % interval over images, wall time, forward and backward passes per image (ours).
   torchattacks' standard AutoAttack (its own budgets: 10 APGD iterations) is shown too when installed.
   Target: fast >= 3x faster than the official standard at robust accuracy <= standard + 0.5 points.
4. Early exit: PGD-50 and PGD-200 (L-inf, the classifier's budget, step sizes 2.5 eps/steps and eps/4) on the
   classifier of part 1 and on an s+d model trained with Madry PGD-2 (resnet18_cpu, 64 px): backward passes per
   image and wall time with and without early exit, and whether the adversarial batches are bit for bit equal.
   Target: >= 3x fewer backward passes at 50 steps on the classifier.

Install torchattacks with `pip install --no-deps torchattacks==3.5.1` (its torchvision dependency cannot import
next to a CPU torch). Everything is written under ``--work`` and reused on a second run.

    python scripts/bench_eval.py                  # CPU, a few minutes
    python scripts/bench_eval.py --parts early-exit
    python scripts/bench_eval.py --parts fast --official /path/to/auto-attack   # a checkout of fra31/auto-attack
    python scripts/bench_eval.py --device cuda --images 256
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from mtrobust_fast.analysis.statistics import format_interval, mean_interval
from mtrobust_fast.evaluation import metrics
from mtrobust_fast.attacks import AutoAttack, build_attack
from mtrobust_fast.data.synth import taskonomy
from mtrobust_fast.data.synth.objects import synthesize_objects
from mtrobust_fast.evaluation import evaluate, make_loader
from mtrobust_fast.models import load_checkpoint
from mtrobust_fast.training import TrainConfig, train


class Head(nn.Module):
    """The classifier's main head as a plain logits model (what torchattacks accepts). Build it in eval mode:
    torchattacks puts a model back into the mode it found, and a wrapper left in training mode would switch the
    classifier's BatchNorm to batch statistics after the attack."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["class"]


def trained(path, config):
    if not Path(path, "last.pt").is_file():
        train(config)
    return load_checkpoint(Path(path, "last.pt"))[0]


def batch_of(data, model, split, images, device):
    loader = make_loader(data, model, split, batch_size=images)
    x, targets, masks = next(iter(loader))
    return x.to(device), {k: v.to(device) for k, v in targets.items()}, {k: v.to(device) for k, v in masks.items()}


def accuracy(model, x, labels):
    with torch.no_grad():
        return (model(x)["class"].argmax(1) == labels).float().mean().item()


def classifier(args, device):
    """The classifier of part 1 (trained here unless given) in eval mode, and its test batch (x, labels)."""
    work = Path(args.work)
    if args.classifier:
        model = load_checkpoint(args.classifier)[0]
        data = args.classifier_data
    else:
        data = work / "objects"
        if not (data / "objects.json").is_file():
            synthesize_objects(data, 600, size=32, seed=0, progress=False)
        model = trained(work / "classifier", TrainConfig(
            data=str(data), out=str(work / "classifier"), epochs=args.classifier_epochs, batch_size=50, lr=1e-3,
            adversarial="madry", steps=2, eps=4 / 255, robust_val=0, workers=0, progress=False))
    model = model.to(device).eval()
    x, targets, _ = batch_of(data, model, "test", args.images, device)
    return model, x, targets["class"]


def classifier_rows(args, device):
    model, x, labels = classifier(args, device)
    eps = args.eps_255 / 255
    print(f"classifier: clean accuracy {accuracy(model, x, labels):.3f} on {x.shape[0]} test images, "
          f"Linf eps = {args.eps_255:g}/255")
    start = time.perf_counter()
    ours = AutoAttack(model, ["class"], eps=eps, steps=args.apgd_steps, queries=args.queries, seed=0,
                      target_tasks="class")
    adv = ours(x, {"class": labels})
    ours_time = time.perf_counter() - start
    ours_acc = accuracy(model, adv, labels)
    print(f"{'mtrobust-fast AutoAttack standard':<58} robust acc {ours_acc:.3f}  {ours_time:7.1f} s")
    for name, entry in ours.summary().items():
        print(f"    after {name:<9} {entry['robust_accuracy']:.3f}  ({entry['seconds']:.1f} s)")
    try:
        import torchattacks
    except ImportError:
        print("torchattacks not installed (pip install --no-deps torchattacks==3.5.1): comparison skipped")
        return
    classes = model.task_records["class"].classes
    theirs = torchattacks.AutoAttack(Head(model).eval(), norm="Linf", eps=eps, version="standard", n_classes=classes,
                                     seed=0)
    start = time.perf_counter()
    their_adv = theirs(x, labels)
    their_time = time.perf_counter() - start
    their_acc = accuracy(model, their_adv, labels)
    print(f"{f'torchattacks {torchattacks.__version__} AutoAttack standard':<58} robust acc {their_acc:.3f}  "
          f"{their_time:7.1f} s")
    speed = their_time / ours_time
    verdict = "yes" if speed >= 1.5 and ours_acc <= their_acc else "NO"
    print(f"speed-up {speed:.2f}x, robust accuracy ours - theirs {ours_acc - their_acc:+.3f} "
          f"(target >= 1.5x at equal or lower accuracy: {verdict})")
    square_floor(model, adv, labels, args.queries, their_time)


def fast_screen_rows(args, device):
    model, x, labels = classifier(args, device)
    eps = args.eps_255 / 255
    clean = accuracy(model, x, labels)
    print(f"\nfast screen vs standard at the official budgets: {x.shape[0]} test images, clean accuracy "
          f"{clean:.3f}, Linf eps {args.eps_255:g}/255")
    print(f"{'attack':<44} {'robust acc [95% CI]':>24} {'seconds':>8} {'fwd/img':>8} {'bwd/img':>8}")
    rows = {}
    for version in ("fast", "standard"):
        atk = AutoAttack(model, ["class"], eps=eps, version=version, steps=100, queries=5000, seed=0,
                         target_tasks="class")
        start = time.perf_counter()
        adv = atk(x, {"class": labels})
        rows[version] = (robust(model, adv, labels), time.perf_counter() - start)
        cost = atk.cost.as_dict()
        print(f"{'mtrobust-fast AutoAttack ' + version:<44} {_acc(rows[version][0]):>24} {rows[version][1]:>8.1f} "
              f"{cost['forward_per_row']:>8.0f} {cost['backward_per_row']:>8.0f}")
    if args.official:
        sys.path.insert(0, str(Path(args.official).resolve()))
        from autoattack import AutoAttack as Official

        official = Official(Head(model).eval(), norm="Linf", eps=eps, version="standard", seed=0, verbose=False,
                            device=str(device))
        start = time.perf_counter()
        adv = official.run_standard_evaluation(x, labels, bs=x.shape[0])
        rows["official"] = (robust(model, adv, labels), time.perf_counter() - start)
        print(f"{'official AutoAttack standard (fra31)':<44} {_acc(rows['official'][0]):>24} "
              f"{rows['official'][1]:>8.1f} {'-':>8} {'-':>8}")
    else:
        print("official AutoAttack: no --official PATH (a checkout of fra31/auto-attack): row skipped")
    try:
        import torchattacks
    except ImportError:
        print("torchattacks not installed (pip install --no-deps torchattacks==3.5.1): row skipped")
    else:
        theirs = torchattacks.AutoAttack(Head(model).eval(), norm="Linf", eps=eps, version="standard",
                                         n_classes=model.task_records["class"].classes, seed=0)
        start = time.perf_counter()
        adv = theirs(x, labels)
        seconds = time.perf_counter() - start
        print(f"{'torchattacks standard (its own budgets)':<44} {_acc(robust(model, adv, labels)):>24} "
              f"{seconds:>8.1f} {'-':>8} {'-':>8}")
    reference = rows.get("official", rows["standard"])
    speed = reference[1] / rows["fast"][1]
    gap = 100 * (rows["fast"][0].float().mean() - rows["standard"][0].float().mean()).item()
    print(f"fast vs {'official' if 'official' in rows else 'our'} standard: {speed:.2f}x faster; robust accuracy "
          f"fast - our standard {gap:+.1f} points (target >= 3x at <= +0.5: "
          f"{'yes' if speed >= 3 and gap <= 0.5 else 'NO'})")


def robust(model, adv, labels):
    with torch.no_grad():
        return model(adv)["class"].argmax(1) == labels


def _acc(correct):
    return format_interval(*mean_interval(correct.double().cpu().numpy()))


def square_floor(model, adv, labels, queries, their_time):
    """A lower bound on any standard AutoAttack's time here: Square queries every point that stays robust once per
    query, so those points cost at least ``queries`` bare forward passes of their batch, whoever implements it."""
    with torch.no_grad():
        robust = adv[model(adv)["class"].argmax(1) == labels]
        if robust.shape[0] == 0:
            return
        for _ in range(3):
            model(robust)
        start = time.perf_counter()
        for _ in range(20):
            model(robust)
    floor = (time.perf_counter() - start) / 20 * queries
    print(f"floor: Square's {queries} queries on the {robust.shape[0]} points robust at the end take >= {floor:.1f} s "
          f"of bare forwards in any implementation, so no standard AutoAttack can be more than "
          f"{their_time / floor:.2f}x faster than torchattacks' here")


def dense_rows(args, device):
    work = Path(args.work)
    if args.taskonomy:
        model = load_checkpoint(args.taskonomy)[0]
        data = args.taskonomy_data
    else:
        data = work / "synth"
        if not (data / taskonomy.SPLIT_CSV).exists():
            taskonomy.synthesize(data, 240, size=64, seed=0, progress=False,
                             buildings=[f"synth{b:03d}" for b in range(10)])
        # The class-balanced loss keeps a briefly trained s head from predicting background everywhere (with plain
        # CE, 3 epochs here gave such a head, which neither PGD nor the ensemble moved: its row compared nothing).
        out = work / "taskonomy_sd_balanced"
        model = trained(out, TrainConfig(
            data=str(data), out=str(out), tasks="sd", encoder="resnet18", size=64, segment_loss="balanced",
            epochs=args.epochs, batch_size=16, lr=1e-3, workers=0, progress=False))
    model = model.to(device).eval()
    loader = make_loader(data, model, "val", limit=args.dense_images, batch_size=args.dense_images)
    print(f"\ndense model {model.config['tasks']}: attacked set sd, Linf eps = 4/255, {args.dense_steps} steps "
          f"per attack, {len(loader.dataset)} val images")
    results = {}
    for name in ("pgd", "ensemble"):
        atk = build_attack(name, model, model.evaluated_task_names, eps=4 / 255, steps=args.dense_steps, seed=0)
        start = time.perf_counter()
        summary = evaluate(model, loader, atk, gradients=False, device=device)
        results[name] = (summary, time.perf_counter() - start)
    print(f"{'task':<18} {'clean err':>9} {'PGD err':>9} {'ens err':>9} {'PGD rel':>9} {'ens rel':>9}")
    pgd, ensemble = results["pgd"][0], results["ensemble"][0]
    (label,) = pgd["attacks"]
    for task in model.evaluated_task_names:
        p, e = pgd["attacks"][label]["tasks"][task], ensemble["attacks"][label]["tasks"][task]
        print(f"{task:<18} {pgd['clean'][task]['error']:>9.4f} {p['adv_error']:>9.4f} {e['adv_error']:>9.4f} "
              f"{p['rel_vuln']:>9.4f} {e['rel_vuln']:>9.4f}")
    worst = ensemble["ensemble"][label]["worst_error"]
    print("ensemble per-task worst case over its members (err/img): "
          + ", ".join(f"{metrics.set_label([t])} {v:.4f}" for t, v in worst.items()))
    print("winners: " + "; ".join(f"{metrics.set_label([t])} " + ", ".join(f"{m} {n}" for m, n in w.items())
                                  for t, w in ensemble["ensemble"][label]["wins"].items()))
    print(f"time: PGD {results['pgd'][1]:.1f} s, ensemble {results['ensemble'][1]:.1f} s")


def madry_sd(args, device):
    """An s+d model trained with Madry PGD-2 at the classifier's budget (resnet18_cpu, 64 px), and a val batch."""
    work = Path(args.work)
    data = work / "synth"
    if not (data / taskonomy.SPLIT_CSV).exists():
        taskonomy.synthesize(data, 240, size=64, seed=0, progress=False, buildings=[f"synth{b:03d}" for b in range(10)])
    out = work / "taskonomy_sd_madry"
    model = trained(out, TrainConfig(
        data=str(data), out=str(out), tasks="sd", encoder="resnet18_cpu", size=64, segment_loss="balanced",
        adversarial="madry", steps=2, eps=args.eps_255 / 255, epochs=args.epochs, batch_size=16, lr=1e-3,
        robust_val=0, workers=0, progress=False)).to(device).eval()
    return model, *batch_of(data, model, "val", args.dense_images, device)


def early_exit_rows(args, device):
    eps = args.eps_255 / 255
    model, x, labels = classifier(args, device)
    dense, dx, dtargets, dmasks = madry_sd(args, device)
    cases = [("classifier", lambda on, **kw: build_attack("pgd", model, ["class"], target_tasks="class", early_exit=on,
                                                          **kw), lambda atk: atk(x, {"class": labels})),
             ("sd Madry", lambda on, **kw: build_attack("pgd", dense, dense.evaluated_task_names, early_exit=on, **kw),
              lambda atk: atk(dx, dtargets, dmasks))]
    print(f"\nearly exit: PGD L-inf eps {args.eps_255:g}/255 from a random start; backward passes per image "
          f"(x: without / with), wall time (x: without / with)")
    print(f"{'model':<11} {'steps':>5} {'alpha':>11} {'bwd/img off':>11} {'on':>7} {'x':>6} {'s off':>7} {'s on':>7} "
          f"{'x':>6} {'rows left':>9} identical")
    for name, make, run in cases:
        for steps in (50, 200):
            for alpha, shown in ((2.5 * eps / steps, "2.5eps/n"), (eps / 4, "eps/4")):
                results = {}
                for on in (False, True):
                    atk = make(on, eps=eps, alpha=alpha, steps=steps, seed=0)
                    start = time.perf_counter()
                    adv = run(atk)
                    results[on] = (adv, time.perf_counter() - start, atk.cost)
                (off_adv, off_s, off), (on_adv, on_s, on) = results[False], results[True]
                off_b, on_b = off.backward_rows / off.rows, on.backward_rows / on.rows
                print(f"{name:<11} {steps:>5} {shown:>11} {off_b:>11.1f} {on_b:>7.1f} {off_b / on_b:>6.2f} "
                      f"{off_s:>7.2f} {on_s:>7.2f} {off_s / on_s:>6.2f} {on.rows_exited:>4}/{on.rows:<4} "
                      f"{'yes' if torch.equal(off_adv, on_adv) else 'NO'}")
    print("success stops (classifier, PGD-50, step eps/4): robust accuracy [95% CI] and backward passes per image")
    for stop in (False, True):
        atk = build_attack("pgd", model, ["class"], target_tasks="class", eps=eps, alpha=eps / 4, steps=50, seed=0,
                           stop_on_success=stop)
        start = time.perf_counter()
        adv = atk(x, {"class": labels})
        seconds = time.perf_counter() - start
        print(f"  stop_on_success={stop!s:<5} robust acc {_acc(robust(model, adv, labels))}  "
              f"{atk.cost.backward_rows / atk.cost.rows:6.1f} bwd/img  {seconds:6.2f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="bench-eval", help="folder for data and models (reused)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=64, help="classifier test images")
    parser.add_argument("--queries", type=int, default=5000, help="Square's query budget (ours)")
    parser.add_argument("--apgd-steps", type=int, default=10,
                        help="iterations of our APGD and FAB members (default 10: what torchattacks' AutoAttack runs; "
                             "the original AutoAttack runs 100)")
    parser.add_argument("--eps-255", type=float, default=4, help="the classifier's Linf budget in grey levels")
    parser.add_argument("--classifier-epochs", type=int, default=8,
                        help="epochs of Madry PGD-2 (eps 4/255) training of the classifier made here")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of the Taskonomy model made here")
    parser.add_argument("--dense-images", type=int, default=16)
    parser.add_argument("--dense-steps", type=int, default=10)
    parser.add_argument("--classifier", default=None, help="a trained classifier checkpoint instead")
    parser.add_argument("--classifier-data", default=None)
    parser.add_argument("--taskonomy", default=None, help="a trained Taskonomy checkpoint (tasks incl. s, d)")
    parser.add_argument("--taskonomy-data", default=None)
    parser.add_argument("--parts", default="autoattack,dense,fast,early-exit",
                        help="comma-separated parts to run: autoattack, dense, fast, early-exit (default all)")
    parser.add_argument("--official", default=None,
                        help="a local checkout of the official AutoAttack (github fra31/auto-attack) for part 3")
    args = parser.parse_args()
    device = torch.device(args.device)
    parts = {"autoattack": classifier_rows, "dense": dense_rows, "fast": fast_screen_rows,
             "early-exit": early_exit_rows}
    chosen = [p.strip() for p in args.parts.split(",")]
    unknown = [p for p in chosen if p not in parts]
    if unknown:
        parser.error(f"--parts: unknown part(s) {', '.join(unknown)}; choose from {', '.join(parts)}")
    for part in chosen:
        torch.manual_seed(0)
        parts[part](args, device)


if __name__ == "__main__":
    main()
