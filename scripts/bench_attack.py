"""Per-step cost of our attacks against a bare forward+backward and against torchattacks, in one run.

Model: Taskonomy ResNet-18 with tasks sdnE (untrained weights: timing does not depend on them). Printed:
  - bare fwd+bwd: one forward of the whole model and a backward of the segmentation loss to the input (what
    an eager loop, or torchattacks, computes), and the minimal one for attacking s: encoder + s head only
    (our attacks run only the heads of attacked tasks);
  - PGD step (also with ``fold_batchnorm=True``: the model's BatchNorms folded into its convolutions), WGD step
    (r-weighted, and with per-task normalised gradients): marginal time per step,
    (time of steps+1 steps − time of 1 step) / steps, so set-up and random start are excluded;
  - torchattacks PGD on the segmentation head (the same model, plain cross-entropy), measured the same way;
  - run_subsets over the 15 attacked sets of the 4 tasks vs 15 separate runs (images per second).
Install torchattacks for its row: `pip install --no-deps torchattacks` (its torchvision dependency cannot
import next to a CPU torch, and its PGD does not need it).

    python scripts/bench_attack.py                         # CPU: batch 32 at 128 px
    python scripts/bench_attack.py --device cuda --size 256 --batch 64 --autocast bf16

Issue #4 targets: PGD step <= 1.10x bare fwd+bwd on CPU (<= 1.05x on GPU); ours >= 1.3x faster per step than
torchattacks; run_subsets >= 2x the throughput of 15 separate runs on GPU.
"""
import argparse

import torch
import torch.nn as nn

from mtrobust_fast import tasks
from mtrobust_fast.attacks import PGD, WGD
from mtrobust_fast.models import build_model
from timing import timed

SEG = tasks.BY_LETTER["s"]


def per_step(make_attack, run, steps, device, repeats):
    """Marginal seconds per step: (t(steps + 1) − t(1)) / steps."""
    long_run, short_run = make_attack(steps + 1), make_attack(1)
    return (timed(lambda: run(long_run), device, repeats) - timed(lambda: run(short_run), device, repeats)) / steps


def inputs(model, batch, size, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=gen).to(device)
    targets, masks = {}, {}
    for task in tasks.resolve("sdnE"):
        if task.is_segmentation:
            targets[task.name] = torch.randint(1, 17, (batch, size, size), generator=gen).to(device)
        else:
            targets[task.name] = torch.rand(batch, task.channels, size, size, generator=gen).to(device)
        masks[task.name] = torch.ones(batch, 1, size, size, dtype=torch.bool, device=device)
    return x, targets, masks


class SegmentationHead(nn.Module):
    """The multi-task model seen as a single-output model (what torchattacks accepts)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)[SEG.name]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="steps timed per attack (default 4)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--subset-batch", type=int, default=4, help="images per run in the subsets comparison")
    parser.add_argument("--autocast", choices=["none", "bf16"], default="none")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    autocast = torch.bfloat16 if args.autocast == "bf16" else None

    model = build_model("sdnE", "resnet18", input_size=args.size).to(device).eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    x, targets, masks = inputs(model, args.batch, args.size, device)
    common = dict(eps=8 / 255, alpha=2 / 255, autocast=autocast, channels_last=args.channels_last)

    def bare():
        xg = x.clone().requires_grad_(True)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            out = model(xg)
        loss = SEG.loss(out[SEG.name].float(), targets[SEG.name], masks[SEG.name]).sum()
        torch.autograd.grad(loss, xg)

    def bare_s_head():
        xg = x.clone().requires_grad_(True)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            out = model.decoders[SEG.name](model.encode(xg))
        loss = SEG.loss(out.float(), targets[SEG.name], masks[SEG.name]).sum()
        torch.autograd.grad(loss, xg)

    rows = [("bare fwd+bwd to the input", timed(bare, device, args.repeats)),
            ("bare fwd+bwd, encoder + s head only", timed(bare_s_head, device, args.repeats))]
    attack = lambda atk: atk(x, targets, masks)  # noqa: E731
    rows.append(("PGD step (attack s)", per_step(
        lambda n: PGD(model, steps=n, target_tasks="s", **common), attack, args.steps, device, args.repeats)))
    rows.append(("PGD step (attack s), BatchNorms folded", per_step(
        lambda n: PGD(model, steps=n, target_tasks="s", fold_batchnorm=True, **common), attack, args.steps, device,
        args.repeats)))
    rows.append(("PGD step (attack sdnE)", per_step(
        lambda n: PGD(model, steps=n, **common), attack, args.steps, device, args.repeats)))
    rows.append(("WGD step (attack sdnE)", per_step(
        lambda n: WGD(model, steps=n, **common), attack, args.steps, device, args.repeats)))
    for batched in (False, True):
        rows.append((f"WGD step, normalised task grads, {'batched VJP' if batched else 'a backward per task'}",
                      per_step(lambda n: WGD(model, steps=n, normalize_task_grads=True, batched_vjp=batched, **common),
                               attack, args.steps, device, args.repeats)))
    try:
        import torchattacks
    except ImportError:
        torchattacks = None
    if torchattacks is not None:
        head = SegmentationHead(model)
        labels = targets[SEG.name]
        rows.append((f"torchattacks {torchattacks.__version__} PGD step (s)", per_step(
            lambda n: torchattacks.PGD(head, eps=8 / 255, alpha=2 / 255, steps=n, random_start=True),
            lambda atk: atk(x, labels), args.steps, device, args.repeats)))

    bare_time = rows[0][1]
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads; ResNet-18 sdnE, batch {args.batch} at {args.size} px; "
          f"autocast {args.autocast}; channels_last {args.channels_last}")
    print(f"{'measurement':<58} {'ms':>10} {'x bare':>8}")
    for name, seconds in rows:
        print(f"{name:<58} {seconds * 1e3:>10.1f} {seconds / bare_time:>8.3f}")
    ours = dict(rows)["PGD step (attack s)"]
    print(f"PGD step (attack s) / bare encoder + s head: {ours / dict(rows)['bare fwd+bwd, encoder + s head only']:.3f}x")
    ta = [s for n, s in rows if n.startswith("torchattacks")]
    if ta:
        print(f"torchattacks step / our PGD step: {ta[0] / ours:.2f}x")
    else:
        print("torchattacks not installed (pip install --no-deps torchattacks): comparison skipped")

    # Batched subsets vs one run per subset, on a smaller batch.
    xs = x[: args.subset_batch]
    ts = {k: v[: args.subset_batch] for k, v in targets.items()}
    ms = {k: v[: args.subset_batch] for k, v in masks.items()}
    atk = PGD(model, steps=args.steps, **common)
    names = atk.target_tasks
    subsets = [[n for i, n in enumerate(names) if mask >> i & 1] for mask in range(1, 2 ** len(names))]
    batched = timed(lambda: atk.run_subsets(xs, ts, ms, subsets=subsets), device, args.repeats)
    separate = timed(lambda: [PGD(model, steps=args.steps, target_tasks=s, **common)(xs, ts, ms) for s in subsets],
                     device, args.repeats)
    images = len(subsets) * args.subset_batch
    print(f"run_subsets over {len(subsets)} attacked sets, {args.subset_batch} images, {args.steps} steps: "
          f"batched {images / batched:.2f} img/s, separate {images / separate:.2f} img/s, "
          f"ratio {separate / batched:.2f}x")


if __name__ == "__main__":
    main()
