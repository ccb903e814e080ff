"""``mtrobust-fast quickstart``: the paper's Table 1 in miniature, end to end on embedded synthetic data.

Synthesises a small Taskonomy dataset, trains a ResNet-18 per task set at 64 px (the main task ``s`` alone and
with each auxiliary task d, D, n, E by default), attacks every model twice in one batch of rows (a single-task
attack on the main task, a multi-task attack on all the model's tasks), and prints the clean error of the main
task and its relative vulnerability under both attacks, one row per auxiliary task, as in the paper's Table 1
(Baseline A). Re-running reuses what is already in the work directory: the dataset, finished trainings and
attack results made with the same settings. Flags scale it up (images, size, epochs, steps).

Disk: only the first seed's models keep a checkpoint (``last.pt``, weights only); the models of the other seeds
keep their log and attack results, which is all the table reads (a 64-px ResNet-18 checkpoint is ~55 MB, so the
defaults stay under 300 MB). Such a model is trained again only when its attack settings change.
"""
import json
import math
import sys
import time
from pathlib import Path

import torch

from mtrobust_fast import evaluation
from mtrobust_fast.evaluation import metrics
from mtrobust_fast import tasks as task_registry
from mtrobust_fast.attacks import ATTACKS
from mtrobust_fast.cli import attack as attack_cli
from mtrobust_fast.cli.args import MAX_SEED, add_budget_units, budget, pixel_budgets, positive_int, seed, workers
from mtrobust_fast.data.synth import taskonomy
from mtrobust_fast.training import TrainConfig, train
from mtrobust_fast.files import atomic_write
from mtrobust_fast.models import read_checkpoint
from mtrobust_fast.training.loop import BEST, LAST, LOG_NAME

AUXILIARIES = "dDnE"  # the paper's Table 1 columns (besides the main task itself)
BUILDINGS = 10  # split 6/2/2 by building: 60% of the images train, 20% are attacked


def add_arguments(parser):
    parser.add_argument("--workdir", type=Path, default=Path("mtrobust-quickstart"),
                        help="where the dataset, runs and attack results go (default ./mtrobust-quickstart)")
    parser.add_argument("--main", default="s", help="main task letter (default s)")
    parser.add_argument("--models", default=None,
                        help="comma-separated task sets, each with the main task (default: the main task alone "
                             f"and with each of {', '.join(AUXILIARIES)})")
    parser.add_argument("--images", type=positive_int, default=240, help="synthetic images (default 240)")
    parser.add_argument("--size", type=positive_int, default=64, help="image side in px (default 64)")
    parser.add_argument("--epochs", type=positive_int, default=5, help="training epochs per model (default 5)")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--attack", choices=ATTACKS.names(), default="pgd", help="attack (default pgd)")
    parser.add_argument("--norm", choices=("linf", "l2"), default="linf")
    parser.add_argument("--eps", type=budget, default=8 / 255, help="default 8/255")
    parser.add_argument("--alpha", type=budget, default=None,
                        help="step size (default 2.5*eps/steps, 2/255 for the defaults; fgsm: eps; apgd adapts its own)")
    add_budget_units(parser)
    parser.add_argument("--steps", type=positive_int, default=10, help="attack steps (default 10; fgsm: 1)")
    parser.add_argument("--attack-limit", type=positive_int, default=None,
                        help="attack only the first N validation images (default: all)")
    parser.add_argument("--workers", type=workers, default=1, help="data-loading processes (default 1)")
    parser.add_argument("--seed", type=seed, default=0, help="random seed of the first model of each task set (default 0)")
    parser.add_argument("--seeds", type=positive_int, default=2,
                        help="models trained per task set, with seeds SEED, SEED+1, ...; Table 1 gives the mean and "
                             "the spread over them (default 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def model_sets(main, models):
    """The task sets to train, in canonical letters, each holding the main task."""
    main = task_registry.get_task(main)
    if models is None:
        chosen = [main.letter] + [main.letter + aux for aux in AUXILIARIES if aux != main.letter]
    else:
        chosen = [part.strip() for part in models.split(",") if part.strip()]
    sets = [task_registry.task_string(letters) for letters in chosen]
    lacking = [s for s in sets if main.letter not in s]
    if lacking:
        raise ValueError(f"--models: every task set must hold the main task {main.letter}; "
                         f"{', '.join(lacking)} do not")
    return sets


def _records(run_dir):
    lines = (run_dir / LOG_NAME).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def run_dir_of(args, tasks, seed):
    """Where the model of ``tasks`` trained with ``seed`` lives (the first seed keeps the plain name)."""
    suffix = "" if seed == args.seed else f"_seed{seed}"
    return args.workdir / f"resnet18_{tasks}{suffix}"


def _train(args, data, tasks, run_dir, seed):
    """Train (or finish training) one model, then keep only what the quickstart reads: ``last.pt`` without the
    optimiser state, no ``best.pt`` (a third of the disk per model). ValueError on a bad setting."""
    train(TrainConfig(data=str(data), out=str(run_dir), tasks=tasks, encoder="resnet18", size=args.size,
                      epochs=args.epochs, batch_size=args.batch_size, lr=1e-3, seed=seed,
                      workers=args.workers, val_before=True, resume=True, save_every=0,
                      progress=not args.no_progress))
    last = run_dir / LAST
    payload = read_checkpoint(last)
    if "optimizer" in payload["meta"] or "scaler" in payload["meta"]:
        meta = {k: v for k, v in payload["meta"].items() if k not in ("optimizer", "scaler")}
        atomic_write(last, lambda tmp: torch.save({**payload, "meta": meta}, tmp))
    (run_dir / BEST).unlink(missing_ok=True)


def attack_settings(args):
    """(alpha, steps) for the attack, from the settings it declares it takes (None for the others). The step size
    is always explicit where the attack takes one, so saved results record it: --alpha, else the attack's
    default for this budget."""
    cls = ATTACKS[args.attack]
    if args.alpha is not None and not cls.takes("alpha"):
        raise ValueError(f"--alpha: {cls.refused['alpha']}; leave --alpha out")
    steps = args.steps if cls.takes("steps") else None
    if not cls.takes("alpha"):
        return None, steps
    return (args.alpha if args.alpha is not None else cls.default_alpha(args.eps, steps or 1)), steps


def _attack_out(args, run_dir):
    return run_dir / f"attack_{args.attack}_{args.norm}"


def _saved_summary(args, run_dir, seed):
    """The attack summary saved in ``run_dir`` when it was made with these settings, else None."""
    alpha, steps = attack_settings(args)
    wanted = {"attack": args.attack, "norm": args.norm, "eps": args.eps, "alpha": alpha, "steps": steps or 1,
              "limit": args.attack_limit, "seed": seed, "checkpoint_epoch": args.epochs}
    json_path = attack_cli.output_paths(_attack_out(args, run_dir))[1]
    if json_path.exists():
        saved = json.loads(json_path.read_text())
        if all(saved["config"].get(k) == v for k, v in wanted.items()):
            print(f"reusing {json_path}")
            return saved["summary"]
    return None


def _finished_without_checkpoint(args, run_dir, seed):
    """The saved summary of a model whose checkpoint the quickstart dropped (see ``run``), when its log reached
    ``--epochs`` and its attack matches these settings; else None (the model is trained again)."""
    if (run_dir / LAST).exists() or not (run_dir / LOG_NAME).exists():
        return None
    records = _records(run_dir)
    if not records or records[-1]["epoch"] != args.epochs:
        return None
    return _saved_summary(args, run_dir, seed)


def _attack(args, data, tasks, run_dir, seed):
    """The attack results of one model (read back from its JSON when made with the same settings)."""
    saved = _saved_summary(args, run_dir, seed)
    if saved is not None:
        return saved
    out = _attack_out(args, run_dir)
    alpha, steps = attack_settings(args)
    config, summary = evaluation.evaluate_checkpoint(
        run_dir / LAST, data, attack=args.attack, norm=args.norm, eps=args.eps, alpha=alpha,
        steps=steps, sets=[args.main, "all"], batch_size=args.batch_size,
        limit=args.attack_limit, seed=seed, workers=args.workers, progress=not args.no_progress)
    print(attack_cli.format_report(config, summary))
    attack_cli.write_results(out, config, summary, metrics.summary_rows(summary))
    return summary


def _clean_rows(tasks, run_dir):
    records = _records(run_dir)
    before = next(r for r in records if r["epoch"] == 0)["val"]["tasks"]
    after = records[-1]["val"]["tasks"]
    return [(tasks, name, metric, f"{before[name][metric]:.4f}", f"{value:.4f}")
            for name, scores in after.items() for metric, value in scores.items()]


def _table(header, rows):
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(header, widths))]
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _value(values):
    """A value, or the mean ± half the range of several (one per seed); "nan" when any is undefined."""
    values = values if isinstance(values, list) else [values]
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        return "nan"
    mean = sum(values) / len(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {(max(values) - min(values)) / 2:.3f}"


def table1_rows(main, results):
    """Rows (auxiliary, clean error, rel. vulnerability single-task attack, multi-task attack) of the main task;
    ``results``: ``{task set: [attack summary per seed]}`` (or one summary). With several seeds each cell is the
    mean ± half the range over them. The main task alone has no multi-task attack ("-")."""
    main_task = task_registry.get_task(main)
    rows = []
    for tasks, summaries in results.items():
        summaries = summaries if isinstance(summaries, list) else [summaries]

        def rel_vuln(attacked):
            return [summary["attacks"][attacked]["tasks"][main_task.name]["rel_vuln"] for summary in summaries]

        multi = "-" if tasks == main_task.letter else _value(rel_vuln(tasks))
        clean = [summary["clean"][main_task.name]["error"] for summary in summaries]
        rows.append((tasks.replace(main_task.letter, "") or "∅", _value(clean), _value(rel_vuln(main_task.letter)),
                     multi))
    return rows


def run(args):
    start = time.perf_counter()
    try:
        pixel_budgets(args)
        if args.seed + args.seeds - 1 > MAX_SEED:
            raise ValueError(f"--seeds: seeds {args.seed} to {args.seed + args.seeds - 1} pass the largest seed "
                             f"{MAX_SEED}")
        sets = model_sets(args.main, args.models)
        attack_settings(args)
    except ValueError as error:
        print(f"mtrobust-fast quickstart: error: {error}", file=sys.stderr)
        return 2
    data = args.workdir / "data"
    if not (data / taskonomy.SPLIT_CSV).exists():
        buildings = [f"synth{b:03d}" for b in range(BUILDINGS)] if args.images >= 5 * BUILDINGS else None
        taskonomy.synthesize(data, args.images, size=args.size, seed=args.seed, progress=not args.no_progress,
                         buildings=buildings)
    clean_rows, results = [], {}
    seeds = range(args.seed, args.seed + args.seeds)
    for tasks in sets:
        for seed_value in seeds:
            run_dir = run_dir_of(args, tasks, seed_value)
            try:
                summary = _finished_without_checkpoint(args, run_dir, seed_value)
                if summary is None:
                    _train(args, data, tasks, run_dir, seed_value)
                    summary = _attack(args, data, tasks, run_dir, seed_value)
                    if seed_value != args.seed:  # its numbers are in its log and attack results: disk for one model
                        (run_dir / LAST).unlink()
                clean_rows += _clean_rows(tasks if args.seeds == 1 else f"{tasks} (seed {seed_value})", run_dir)
                results.setdefault(tasks, []).append(summary)
            except ValueError as error:
                print(f"mtrobust-fast quickstart: error: {error}", file=sys.stderr)
                return 2
    print(f"\nClean validation metrics, ResNet-18 at {args.size} px, {args.epochs} epochs "
          f"(mIoU and pixel accuracy: higher is better; losses, L1, MSE: lower is better)")
    print(_table(("model", "task", "metric", "before", "after"), clean_rows))
    main = task_registry.get_task(args.main)
    scores = {tasks: [_records(run_dir_of(args, tasks, k))[-1]["val"]["tasks"].get(main.name, {}).get("miou")
                      for k in seeds] for tasks in sets}
    if all(v is not None for values in scores.values() for v in values):
        print(f"\nmIoU of {main.letter} on the validation images after training (per model; the dataset mIoU over "
              f"the classes present): " + ", ".join(f"{tasks} {_value(values)}" for tasks, values in scores.items()))
    samples = next(iter(results.values()))[0]["samples"]
    print(f"\nTable 1 (Baseline A) in miniature: main task {main.letter} ({main.name}), {args.attack.upper()} "
          f"{args.norm} eps={args.eps:.4g}, {attack_settings(args)[1] or 1} steps, {samples} validation images. The clean "
          f"per-image error of {main.letter} (averaged over images: 1 - the image's own mIoU for s, masked MSE "
          f"otherwise; not 1 - the dataset mIoU above) and its relative vulnerability (lower is better) when only "
          f"{main.letter} is attacked and when all the model's tasks are attacked"
          + (f"; mean ± half the range over {args.seeds} models per row (seeds {seeds[0]}-{seeds[-1]})."
             if args.seeds > 1 else "."))
    print(_table(("auxiliary", f"per-image error {main.letter}", "rel vuln single-task attack",
                  "rel vuln multi-task attack"), table1_rows(main.letter, results)))
    print(f"\nquickstart wall time {time.perf_counter() - start:.0f} s")
    return 0
