"""Square attack strength against the official AutoAttack implementation, side by side on the same model and images.

A small classifier (resnet18_cpu, 8 epochs with light Gaussian-noise augmentation) is trained on the synthetic
object set at ``--size`` px (cached in ``--work``), then attacked on ``--images`` test images by the official
``SquareAttack`` (margin loss, p_init 0.8, rescaled schedule) and by this project's ``square``, with the same
budget, queries and seeds. Lower robust accuracy = stronger attack. The official code is imported from
``--official`` (a checkout of github.com/fra31/auto-attack, MIT-licensed; nothing of it is part of this project):

    git clone https://github.com/fra31/auto-attack /tmp/auto-attack
    python scripts/compare_square.py --official /tmp/auto-attack --size 16 --eps 0.2 --norm l2
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import binomtest

from mtrobust_fast.attacks import ATTACKS
from mtrobust_fast.data.classification import open_classification
from mtrobust_fast.data.synth.objects import synthesize_objects
from mtrobust_fast.models import build_classifier


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", required=True, type=Path, help="a checkout of fra31/auto-attack")
    p.add_argument("--size", type=int, default=16, help="image side in px")
    p.add_argument("--eps", type=float, default=0.2)
    p.add_argument("--norm", choices=("l2", "linf"), default="l2")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--work", type=Path, default=Path("/tmp/compare_square"), help="data and model cache")
    return p.parse_args()


def trained_classifier(work, size):
    root = work / f"objects{size}"
    if not root.exists():
        synthesize_objects(root, 3000, size, 0, None, False)
    train = open_classification(root, "train", size)
    model = build_classifier("resnet18_cpu", train.classes, size, normalization=train.normalization)
    path = work / f"classifier{size}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), root
    torch.manual_seed(0)
    x = torch.stack([train[i][0] for i in range(len(train))])
    y = torch.tensor([int(train[i][1]["class"]) for i in range(len(train))])
    optimiser = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    for _ in range(8):
        order = torch.randperm(len(x))
        for start in range(0, len(x) - 63, 64):
            batch = order[start:start + 64]
            noisy = (x[batch] + 0.05 * torch.randn_like(x[batch])).clamp(0, 1)
            loss = F.cross_entropy(model(noisy)["class"], y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    torch.save(model.state_dict(), path)
    return model.eval(), root


def main():
    args = parse_args()
    sys.path.insert(0, str(args.official))
    from autoattack.square import SquareAttack

    args.work.mkdir(parents=True, exist_ok=True)
    model, root = trained_classifier(args.work, args.size)
    test = open_classification(root, "test", args.size)
    count = min(args.images, len(test))
    x = torch.stack([test[i][0] for i in range(count)])
    y = torch.tensor([int(test[i][1]["class"]) for i in range(count)])

    def predict(points):
        return model(points)["class"]

    with torch.no_grad():
        clean = (predict(x).argmax(1) == y).float().mean().item()
    print(f"{args.size} px, {args.norm} eps {args.eps:g}, {args.queries} queries, {count} images; clean accuracy "
          f"{clean:.3f}; robust accuracy (lower = stronger), 95 % interval over images")
    for seed in args.seeds:
        start = time.perf_counter()
        official = SquareAttack(predict, norm="L2" if args.norm == "l2" else "Linf", n_queries=args.queries,
                                eps=args.eps, p_init=0.8, seed=seed, loss="margin", resc_schedule=True, device="cpu")
        with torch.no_grad():
            right_official = predict(official.perturb(x, y)).argmax(1) == y
        middle = time.perf_counter()
        ours = ATTACKS["square"](model, ["class"], eps=args.eps, norm=args.norm, steps=args.queries, seed=seed)
        with torch.no_grad():
            right_ours = predict(ours(x, {"class": y})).argmax(1) == y
        end = time.perf_counter()
        line = []
        for name, right in (("official", right_official), ("ours", right_ours)):
            ci = binomtest(int(right.sum()), count).proportion_ci()
            line.append(f"{name} {right.float().mean():.3f} [{ci.low:.3f}, {ci.high:.3f}]")
        only_official, only_ours = int((right_ours & ~right_official).sum()), int((right_official & ~right_ours).sum())
        p = binomtest(only_official, only_official + only_ours).pvalue if only_official + only_ours else 1.0
        print(f"  seed {seed}: " + " | ".join(line) + f"; images only the official fools {only_official}, only ours "
              f"{only_ours} (McNemar p = {p:.2g}); {middle - start:.0f} s vs {end - middle:.0f} s", flush=True)


if __name__ == "__main__":
    main()
