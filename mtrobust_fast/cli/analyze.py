"""``mtrobust-fast analyze cka``, ``analyze landscape``, ``analyze paired`` and ``analyze delta-p``: representation
similarity between checkpoints (linear CKA of their encoder features, :mod:`mtrobust_fast.analysis.cka`) and
input-space loss landscapes around a batch of images (:mod:`mtrobust_fast.analysis.landscape`), each as a table, a
JSON/CSV file and a figure; paired tests between two attack runs' per-image results
(:mod:`mtrobust_fast.analysis.per_sample`); LibMTL's Δp of a multi-task model over single-task baselines
(:mod:`mtrobust_fast.analysis.delta_p`)."""
import argparse
import csv
import json
from pathlib import Path

from mtrobust_fast import budgets
from mtrobust_fast.cli.args import budget, folder, positive_int, run_reporting, seed
from mtrobust_fast.files import writable_folder
from mtrobust_fast.data.taskonomy import SPLITS


def _paths(text):
    items = [Path(part.strip()) for part in text.split(",") if part.strip()]
    if len(items) < 2:
        raise argparse.ArgumentTypeError(f"give at least two checkpoints, comma-separated, got {text!r}")
    return items


def _common(parser):
    add = parser.add_argument
    add("--data", required=True, type=Path, help="the images (any dataset `attack` reads)")
    add("--split", choices=SPLITS, default="val", help="data split (default %(default)s)")
    add("--size", type=positive_int, default=None, help="image side in px (default: the first model's input size)")
    add("--batch-size", type=positive_int, default=16, help="images per batch (default %(default)s)")
    add("--out", required=True, type=folder, help="a folder for the results and the figure")
    add("--dpi", type=positive_int, default=120, help="PNG resolution (default %(default)s)")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: CUDA when available")
    add("--no-progress", action="store_true", help="no progress bars")


def _out(path):
    return writable_folder(path, "--out")


def _load(path, device):
    from mtrobust_fast.models import load_checkpoint

    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    return load_checkpoint(path, map_location=device)[0]


def add_cka_arguments(parser):
    parser.add_argument("--checkpoints", required=True, type=_paths,
                        help="two or more checkpoints, comma-separated; every pair is compared on the same images")
    parser.add_argument("--limit", type=positive_int, default=256, help="images to use (default %(default)s)")
    parser.add_argument("--pool", action="store_true",
                        help="average each feature map over positions first (compare channels, not positions)")
    _common(parser)


def run_cka(args):
    def work():
        from mtrobust_fast.analysis.cka import cka_from_grams, encoder_features, gram
        from mtrobust_fast.device import resolve_device
        from mtrobust_fast.evaluation import make_loader

        out = _out(args.out)
        device = resolve_device(args.device)
        models = [_load(path, device) for path in args.checkpoints]
        loader = make_loader(args.data, models[0], args.split, args.size, args.limit, args.batch_size)
        grams = [gram(encoder_features(model, loader, device, pool=args.pool, progress=not args.no_progress,
                                       desc=f"features {i + 1}/{len(models)}")) for i, model in enumerate(models)]
        names = [str(path) for path in args.checkpoints]
        matrix = [[cka_from_grams(k, l) for l in grams] for k in grams]
        print(f"linear CKA of the encoder features ({'pooled' if args.pool else 'flattened'}) on "
              f"{grams[0].shape[0]} {args.split} images:")
        for i, name in enumerate(names):
            print(f"  [{i}] {name}: " + " ".join(f"{v:.4f}" for v in matrix[i]))
        with open(out / "cka.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["checkpoint"] + names)
            writer.writerows([name] + row for name, row in zip(names, matrix))
        _draw_matrix(matrix, short_names(args.checkpoints), out / "cka.png", args.dpi)
        print(f"wrote {out / 'cka.csv'} and {out / 'cka.png'}")
        return 0

    return run_reporting("analyze cka", work)


def short_names(paths):
    """Labels for checkpoints in a figure: the run folder for RUN/last.pt or RUN/best.pt, else the file name
    without suffix; the whole path where two would read the same."""
    from mtrobust_fast.sweep.plan import default_model_name

    names = [default_model_name(Path(path)) for path in paths]
    return names if len(set(names)) == len(names) else [str(path) for path in paths]


def _draw_matrix(matrix, labels, path, dpi):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 0.7 * len(labels), 1.2 + 0.6 * len(labels)))
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="magma")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if value > 0.6 else "white")
    fig.colorbar(image, ax=ax)
    ax.set_title("linear CKA of the encoders' features", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def add_landscape_arguments(parser):
    add = parser.add_argument
    add("--checkpoint", required=True, type=Path, help="the model")
    add("--limit", type=positive_int, default=8, help="images the losses are averaged over (default %(default)s)")
    add("--target", default=None,
        help="tasks whose summed loss gives the adversarial direction: letters or a head name (default: all)")
    add("--radius", type=budget, default=16 / 255, help="largest step along each direction (default 16/255)")
    add("--points", type=positive_int, default=21, help="odd number of points per axis (default %(default)s)")
    add("--no-2d", action="store_true", help="only the two 1-D curves (points² fewer forward passes)")
    add("--seed", type=seed, default=0, help="seed of the random direction (default %(default)s)")
    _common(parser)


def run_landscape(args):
    def work():
        from mtrobust_fast.analysis import landscape
        from mtrobust_fast.device import resolve_device, to_device
        from mtrobust_fast.evaluation import make_loader, resolve_sets

        radius = budgets.to_pixels(args.radius, 1, "--radius", "give it as a fraction of the range, like 16/255")
        out = _out(args.out)
        device = resolve_device(args.device)
        model = _load(args.checkpoint, device)
        names = model.evaluated_task_names
        attacked = list(resolve_sets([args.target or "all"], names, f"the model in {args.checkpoint}")[0])
        loader = make_loader(args.data, model, args.split, args.size, args.limit, args.limit)
        x, targets, masks = to_device(next(iter(loader)), device)
        records = [model.task_records[n] for n in names]
        result = landscape.landscape(model, x, targets, masks, records, attacked, radius, args.points,
                                     args.seed, two_d=not args.no_2d, progress=not args.no_progress)
        result.update(checkpoint=str(args.checkpoint), images=int(x.shape[0]), attacked=attacked)
        (out / "landscape.json").write_text(json.dumps(result) + "\n")
        centre = len(result["a"]) // 2
        print(f"loss landscape of {args.checkpoint} on {x.shape[0]} {args.split} images, direction from "
              f"{', '.join(attacked)}; loss at 0 -> at +{args.radius * 255:.3g}/255 along u (adversarial) / v (random):")
        for name in result["adversarial"]:
            along_u, along_v = result["adversarial"][name], result["random"][name]
            print(f"  {name}: {along_u[centre]:.4f} -> {along_u[-1]:.4f} / {along_v[-1]:.4f}")
        path = landscape.draw(result, out / "landscape.png", f"{args.checkpoint.name}: {x.shape[0]} images",
                              args.dpi)
        print(f"wrote {out / 'landscape.json'} and {path}")
        return 0

    return run_reporting("analyze landscape", work, flags={"sets": "--target"})


def add_paired_arguments(parser):
    add = parser.add_argument
    add("--a", required=True, type=Path,
        help="the first run: an `attack --per-sample --out` folder or its per_sample.csv")
    add("--b", required=True, type=Path, help="the second run, on the same images (data, split, limit)")
    add("--value", choices=("adv_error", "clean_error", "adv_loss", "clean_loss"), default="adv_error",
        help="the per-image value compared (default %(default)s)")
    add("--out", type=Path, default=None, help="also write the tests to this CSV file")


def run_paired(args):
    def work():
        from mtrobust_fast.analysis import per_sample

        if args.out is not None and args.out.is_dir():
            raise ValueError(f"--out: {args.out} is a folder; --out names a CSV file")
        results = per_sample.compare(per_sample.read(args.a), per_sample.read(args.b), args.value)
        print(f"{args.value} per image, a = {args.a}, b = {args.b}; difference a - b with its 95 % bootstrap "
              f"interval over images and the paired permutation test" + (
                  "; McNemar: images only a gets right, only b gets right" if "mcnemar" in results[0] else ""))
        rows = []
        for r in results:
            line = (f"  attacked {r['attacked']}, task {r['task']} ({r['pairs']} images): a {r['mean_a']:.4f} vs b "
                    f"{r['mean_b']:.4f}, difference {r['difference']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}], "
                    f"p = {r['p']:.3g}")
            row = {k: v for k, v in r.items() if k != "mcnemar"}
            if "mcnemar" in r:
                m = r["mcnemar"]
                line += f"; McNemar {m['only_a']} vs {m['only_b']}, p = {m['p']:.3g}"
                row.update(mcnemar_only_a=m["only_a"], mcnemar_only_b=m["only_b"], mcnemar_p=m["p"])
            print(line)
            rows.append(row)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
                writer.writeheader()
                writer.writerows(rows)
            print(f"wrote {args.out}")
        return 0

    return run_reporting("analyze paired", work)


def add_delta_p_arguments(parser):
    add = parser.add_argument
    add("--model", required=True, type=Path, help="the multi-task model: a checkpoint written by `train`")
    add("--baselines", required=True, type=lambda t: [Path(p.strip()) for p in t.split(",") if p.strip()],
        help="comma-separated checkpoints of the baselines (usually one single-task model per task); each task of "
             "--model is compared with the first baseline that has it")


def run_delta_p(args):
    def work():
        from mtrobust_fast.analysis.delta_p import checkpoint_scores, defined, delta_p
        from mtrobust_fast.models import read_checkpoint

        scores, directions = checkpoint_scores(read_checkpoint(args.model))
        baseline = {}
        for path in args.baselines:
            found, _ = checkpoint_scores(read_checkpoint(path))
            for task, values in found.items():
                baseline.setdefault(task, (path, values))
        missing = [task for task in scores if task not in baseline]
        if missing:
            raise ValueError(f"--baselines: none of them has the task(s) {', '.join(missing)} of --model")
        print(f"validation scores the checkpoints were saved with; relative change vs the baseline, positive = "
              f"better; one run each (train more seeds for a spread)")
        for task, values in scores.items():
            path, base = baseline[task]
            parts = [f"{m} {values[m]:.4g} vs {base[m]:.4g} "
                     + (f"({(1 if up else -1) * (values[m] - base[m]) / base[m]:+.1%})" if defined(values[m], base[m])
                        else "(no relative change: left out)") for m, up in directions[task].items()]
            print(f"  {task} (baseline {path}): " + ", ".join(parts))
        value = delta_p(scores, {t: baseline[t][1] for t in scores}, directions, skip_undefined=True)
        print(f"delta_p {value:+.2f} % (mean over tasks of the mean relative improvement over their metrics)")
        return 0

    return run_reporting("analyze delta-p", work)
