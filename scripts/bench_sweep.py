"""Sweep throughput in one run: cells per minute in-process vs on Ray, and attacked subsets batched in one cell vs
one cell per subset.

Model: an untrained Taskonomy ResNet-18 with tasks sdn (timing does not depend on the weights), on synthetic data.
Printed side by side:
  - local vs ray: the same grid of ``--cells`` cells (eps × steps, every subset of sdn attacked), run by the
    in-process executor and by Ray (a local cluster with ``--ray-cpus`` CPUs, one task per cell; on a GPU node one
    GPU per task). Ray's wall time includes starting the cluster; its cells/min without start-up is also shown.
  - batched vs separate: the 7 attacked subsets of sdn as one cell (``run_subsets``) vs 7 one-set cells.
  - early exit on vs off: one cell attacking all 15 subsets of sdnE (an untrained sdnE model, or ``--checkpoint``
    with ``--data``), PGD ``--exit-steps`` steps at step size eps/4, run with and without early exit: cells per
    minute, gradient passes per attacked row, and whether the rows are identical (cost and timing columns aside).

    python scripts/bench_sweep.py                           # CPU: 8 images at 64 px, 4 cells, 3 steps
    python scripts/bench_sweep.py --device cuda --size 256 --images 64 --cells 8
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch

from mtrobust_fast.data.synth.taskonomy import synthesize
from mtrobust_fast.models import build_model, save_checkpoint
from mtrobust_fast.sweep import plan
from mtrobust_fast.sweep.executors import run_local, run_ray
from mtrobust_fast.sweep.store import Store


def timed_sweep(executor, cells, out, **options):
    store = Store(out)
    start = time.perf_counter()
    first = []

    def on_done(cell, result):
        if not first:
            first.append(time.perf_counter())
        store.write(cell.cell_id, result["rows"])

    executor(cells, on_done, lambda cell: store.claim(cell.cell_id), progress=False, **options)
    return time.perf_counter() - start, (first[0] if first else start) - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--images", type=int, default=8, help="evaluation images per cell (default 8)")
    parser.add_argument("--size", type=int, default=64, help="image side in px (default 64)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="attack steps (default 3)")
    parser.add_argument("--cells", type=int, default=4, help="cells in the local-vs-ray grid (default 4)")
    parser.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in-process (default 1, as a Ray "
                        "task with one CPU gets)")
    parser.add_argument("--exit-steps", type=int, default=20, help="PGD steps of the early-exit comparison")
    parser.add_argument("--checkpoint", default=None, help="a trained model (with --data) for the early-exit part")
    parser.add_argument("--data", default=None, help="its data folder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = synthesize(tmp / "data", args.images * 4, size=args.size, seed=0, workers=1, progress=False)
        torch.manual_seed(0)
        checkpoint = save_checkpoint(tmp / "sdn.pt", build_model("sdn", "resnet18", input_size=args.size), epoch=0)
        base = {"data": str(data), "models": [str(checkpoint)], "limit": args.images, "batch_size": args.batch_size,
                "steps": [args.steps], "sets": "subsets"}
        grid = plan.expand({**base, "eps": [(k + 1) / 255 for k in range(args.cells)]}, tmp / "plan")
        options = dict(device=args.device)

        local, _ = timed_sweep(run_local, grid, tmp / "local", **options)
        ray_wall, ray_first = timed_sweep(run_ray, grid, tmp / "ray", num_cpus=args.ray_cpus, **options)

        batched_cell = plan.expand(base, tmp / "plan")
        separate_cells = [cell for label in batched_cell[0].sets
                          for cell in plan.expand({**base, "sets": [label]}, tmp / "plan")]
        batched, _ = timed_sweep(run_local, batched_cell, tmp / "batched", **options)
        separate, _ = timed_sweep(run_local, separate_cells, tmp / "separate", **options)

        if args.checkpoint:
            exit_model, exit_data = args.checkpoint, args.data
        else:
            exit_data = data
            torch.manual_seed(0)
            exit_model = save_checkpoint(tmp / "sdnE.pt", build_model("sdnE", "resnet18", input_size=args.size),
                                         epoch=0)
        exits = {}
        for on in (True, False):
            cells = plan.expand({"data": str(exit_data), "models": [str(exit_model)], "limit": args.images,
                                 "batch_size": args.batch_size, "steps": [args.exit_steps], "eps": [8 / 255],
                                 "alpha": [2 / 255], "sets": "subsets", "early_exit": on}, tmp / "plan")
            wall, _ = timed_sweep(run_local, cells, tmp / f"exit_{on}", **options)
            exits[on] = (wall, Store(tmp / f"exit_{on}").table())

    n = len(grid)
    print(f"{n} cells of {args.images} images at {args.size} px, PGD {args.steps} steps, 7 attacked sets each "
          f"(device {args.device}, {args.threads} torch thread(s) in-process)")
    print(f"{'':28}{'local':>12}{'ray':>12}")
    print(f"{'wall s':28}{local:12.2f}{ray_wall:12.2f}")
    print(f"{'cells/min':28}{60 * n / local:12.2f}{60 * n / ray_wall:12.2f}")
    after_start = ray_wall - ray_first
    per_min = 60 * (n - 1) / after_start if n > 1 and after_start > 0 else float("nan")
    print(f"{'cells/min after 1st cell':28}{'':12}{per_min:12.2f}")
    print(f"\n7 attacked subsets of sdn{'':3}{'batched':>12}{'separate':>12}")
    print(f"{'wall s':28}{batched:12.2f}{separate:12.2f}")
    print(f"{'subset-evaluations/min':28}{60 * 7 / batched:12.2f}{60 * 7 / separate:12.2f}")
    print(f"{'speed-up':28}{separate / batched:12.2f}x")
    (on_wall, on_rows), (off_wall, off_rows) = exits[True], exits[False]
    same = [c for c in on_rows.columns if not c.startswith("cost_") and c not in ("seconds", "early_exit",
                                                                                  "attack_options")]
    identical = on_rows[same].sort_values(["attacked", "task"]).reset_index(drop=True).equals(
        off_rows[same].sort_values(["attacked", "task"]).reset_index(drop=True))
    print(f"\nearly exit, one cell of all 15 subsets of sdnE, PGD {args.exit_steps} steps (eps 8/255, alpha 2/255)"
          f"{'':2}{'on':>10}{'off':>10}")
    print(f"{'wall s':28}{on_wall:10.2f}{off_wall:10.2f}")
    print(f"{'cells/min':28}{60 / on_wall:10.2f}{60 / off_wall:10.2f}")
    print(f"{'backward passes per row':28}{on_rows['cost_backward_per_row'].iloc[0]:10.1f}"
          f"{off_rows['cost_backward_per_row'].iloc[0]:10.1f}")
    print(f"rows identical (cost and timing columns aside): {'yes' if identical else 'NO'}")


if __name__ == "__main__":
    main()
