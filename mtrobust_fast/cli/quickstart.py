"""``mtrobust-fast quickstart``: the paper's Table 1 in miniature, end to end on embedded synthetic data.

Synthesises a small Taskonomy dataset of the ``large`` scene preset (2-4 big pieces of furniture per room, seen
from close by), trains a small CPU-scale model per task set at 64 px (by default ``s`` and ``n`` alone, ``s``
with ``d`` and ``s`` with ``n``, two seeds each), attacks every model in one batch of rows (each main task alone,
then all the model's tasks), and prints, per model, its validation metrics against the trivial predictor of
each task (all-background segmentation, the training-mean prediction otherwise); per main task, Table 1
(Baseline A): the clean error and the relative vulnerability under the single- and the multi-task attack with
95 % bootstrap intervals over images and the spread over seeds; and one verdict line per paper claim the runs
test (paired permutation tests over the same images). The tables are also written as Markdown and CSV.
Re-running reuses what is already in the work directory: the dataset, finished trainings and attack results
made with the same settings.

Disk: only the first seed's models keep a checkpoint (``last.pt``, weights only, ~4 MB for resnet18_cpu); the
models of the other seeds keep their log and attack results, which is all the tables read. Such a model is
trained again only when its attack settings change.
"""
import csv
import json
import math
import sys
import time
from pathlib import Path

import torch

from mtrobust_fast import evaluation
from mtrobust_fast.analysis import statistics
from mtrobust_fast.evaluation import baselines, metrics
from mtrobust_fast import tasks as task_registry
from mtrobust_fast.attacks import ATTACKS
from mtrobust_fast.cli import attack as attack_cli
from mtrobust_fast.cli.args import MAX_SEED, add_budget_units, budget, pixel_budgets, positive_int, seed, workers
from mtrobust_fast.data.synth import taskonomy
from mtrobust_fast.training import TrainConfig, train
from mtrobust_fast.models import build_model
from mtrobust_fast.models.registry import canonical_encoder_name
from mtrobust_fast.training.loop import BEST, LAST, LOG_NAME, keep_weights_only

MAIN_TASKS = "s,n"  # segmentation and one regression task (surface normals)
MODELS = "s,sd,sn,n"  # each main task alone and with auxiliary tasks: Table 1's rows
BUILDINGS = 16  # split 12/2/2 by building: 75% of the images train, 12.5% are validated and attacked
ENCODER = "resnet18_cpu"
SCENE = "large"


def add_arguments(parser):
    parser.add_argument("--workdir", type=Path, default=Path("mtrobust-quickstart"),
                        help="where the dataset, runs and attack results go (default ./mtrobust-quickstart)")
    parser.add_argument("--main", default=MAIN_TASKS,
                        help=f"comma-separated main task letters: one Table 1 per main task (default {MAIN_TASKS})")
    parser.add_argument("--models", default=MODELS,
                        help="comma-separated task sets to train, each holding at least one main task; a set is a "
                             f"row of the table of every main task it holds (default {MODELS})")
    parser.add_argument("--encoder", default=ENCODER,
                        help=f"encoder of every model (default {ENCODER}: a quarter-width ResNet-18 at stride 16 "
                             "that learns on a CPU in minutes; resnet18 is the paper's)")
    parser.add_argument("--images", type=positive_int, default=480,
                        help="synthetic images (default 480: 360 train, 60 validated and attacked)")
    parser.add_argument("--size", type=positive_int, default=64, help="image side in px (default 64)")
    parser.add_argument("--epochs", type=positive_int, default=8, help="training epochs per model (default 8)")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    dense = [name for name in ATTACKS if not ATTACKS[name].classifier_only]
    parser.add_argument("--attack", choices=dense, default="pgd",
                        help="attack (default pgd); the classifier-head attacks (AutoAttack and its members) do not "
                             "apply to the quickstart's dense models: ensemble is the dense AutoAttack")
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
                        help="models trained per task set, with seeds SEED, SEED+1, ...; every number is given "
                             "with its spread over them (default 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main_tasks(text):
    """The main task letters of ``--main``, in the order given."""
    letters = [task_registry.get_task(part.strip()).letter for part in text.split(",") if part.strip()]
    if not letters or len(set(letters)) != len(letters):
        raise ValueError(f"--main: give distinct task letters, e.g. s,n; got {text!r}")
    return letters


def model_sets(mains, models):
    """The task sets to train, in canonical letters, each holding at least one main task."""
    sets = [task_registry.task_string(part.strip()) for part in models.split(",") if part.strip()]
    lacking = [s for s in sets if not any(m in s for m in mains)]
    if lacking or not sets:
        raise ValueError(f"--models: every task set must hold a main task ({', '.join(mains)}); "
                         + (f"{', '.join(lacking)} do not" if lacking else "none given"))
    return list(dict.fromkeys(sets))


def _records(run_dir):
    lines = (run_dir / LOG_NAME).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def run_dir_of(args, tasks, seed):
    """Where the model of ``tasks`` trained with ``seed`` lives (the first seed keeps the plain name)."""
    suffix = "" if seed == args.seed else f"_seed{seed}"
    return args.workdir / f"{args.encoder}_{tasks}{suffix}"


def schedule(epochs):
    """Adam at 2e-3, then 5e-4 for the last third of the epochs (the first epoch always at 2e-3)."""
    decay = max(1, round(2 * epochs / 3))
    return "0:2e-3" if decay >= epochs else f"0:2e-3,{decay}:5e-4"


def _train(args, data, tasks, run_dir, seed):
    """Train (or finish training) one model, then keep only what the quickstart reads: ``last.pt`` without the
    optimiser state, no ``best.pt``. ValueError on a bad setting."""
    train(TrainConfig(data=str(data), out=str(run_dir), tasks=tasks, encoder=args.encoder, size=args.size,
                      epochs=args.epochs, batch_size=args.batch_size, schedule=schedule(args.epochs), seed=seed,
                      workers=args.workers, val_before=True, resume=True, save_every=0,
                      progress=not args.no_progress))
    keep_weights_only(run_dir / LAST)
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


def attacked_sets(mains, tasks):
    """Each main task of the model alone, then all the model's tasks together (a multi-task model only)."""
    return [m for m in mains if m in tasks] + (["all"] if len(tasks) > 1 else [])


def _attack_out(args, run_dir):
    return run_dir / f"attack_{args.attack}_{args.norm}"


def _saved_summary(args, run_dir, seed):
    """The attack summary saved in ``run_dir`` when it was made with these settings (and holds per-image
    values), else None."""
    alpha, steps = attack_settings(args)
    wanted = {"attack": args.attack, "norm": args.norm, "eps": args.eps, "alpha": alpha, "steps": steps or 1,
              "limit": args.attack_limit, "seed": seed, "checkpoint_epoch": args.epochs}
    json_path = attack_cli.output_paths(_attack_out(args, run_dir))[1]
    if json_path.exists():
        saved = json.loads(json_path.read_text())
        if all(saved["config"].get(k) == v for k, v in wanted.items()) and "per_sample" in saved["summary"]:
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


def _attack(args, data, tasks, run_dir, seed, mains):
    """The attack results of one model (read back from its JSON when made with the same settings)."""
    saved = _saved_summary(args, run_dir, seed)
    if saved is not None:
        return saved
    out = _attack_out(args, run_dir)
    alpha, steps = attack_settings(args)
    config, summary = evaluation.evaluate_checkpoint(
        run_dir / LAST, data, attack=args.attack, norm=args.norm, eps=args.eps, alpha=alpha,
        steps=steps, sets=attacked_sets(mains, tasks), batch_size=args.batch_size, limit=args.attack_limit,
        seed=seed, workers=args.workers, gradients=False, progress=not args.no_progress, intervals=True,
        per_sample=True)
    print(attack_cli.format_report(config, summary))
    attack_cli.write_results(out, config, summary, metrics.summary_rows(summary))
    return summary


def _table(header, rows):
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(header, widths))]
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows])


def _spread(values):
    """Mean ± half the range over seeds ("nan" when any is undefined)."""
    if any(v is None or not math.isfinite(v) for v in values):
        return "nan"
    mean = sum(values) / len(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {(max(values) - min(values)) / 2:.3f}"


def per_image_change(summaries, attacked, name):
    """Per-image relative change of task ``name``'s error under the attack of set ``attacked``, averaged over
    the seeds' models (NaN where every seed's clean error is 0), and each seed's mean."""
    rows, means = [], []
    for summary in summaries:
        clean = torch.tensor(summary["per_sample"]["clean"][name]["error"], dtype=torch.float64)
        adv = torch.tensor(summary["per_sample"]["attacks"][attacked][name]["error"], dtype=torch.float64)
        change = metrics.relative_change(clean, adv)
        rows.append(change)
        means.append(float(change[~change.isnan()].mean()) if (~change.isnan()).any() else math.nan)
    return torch.stack(rows).nanmean(0).numpy(), means


def _cell(summaries, attacked, name):
    """"mean [95% interval over images] (seeds: spread)" of the relative vulnerability."""
    values, means = per_image_change(summaries, attacked, name)
    text = statistics.format_interval(*statistics.mean_interval(values))
    return text if len(means) == 1 else f"{text} (seeds {_spread(means)})"


def table1(main, results):
    """Rows (auxiliary tasks, clean per-image error, relative vulnerability of the main task under the
    single-task attack and under the multi-task attack) for every task set holding ``main``; ``results``:
    ``{task set: [attack summary per seed]}``."""
    record = task_registry.get_task(main)
    rows = []
    for tasks, summaries in sorted(results.items(), key=lambda item: item[0] != main):
        if main not in tasks:
            continue
        clean = [s["clean"][record.name]["error"] for s in summaries]
        multi = "-" if len(tasks) == 1 else _cell(summaries, tasks, record.name)
        rows.append((tasks.replace(main, "") or "∅", _spread(clean), _cell(summaries, main, record.name), multi))
    return rows


def verdicts(main, results):
    """One line per paper claim the runs can test, from paired comparisons over the same validation images of
    the seed-averaged per-image relative vulnerability of ``main``: (1) an auxiliary task lowers the main task's
    vulnerability to an attack on the main task (each task set with auxiliaries against the main task alone);
    (2) attacking all of a model's tasks at once hurts the main task less than attacking it alone."""
    record = task_registry.get_task(main)
    lines = []
    alone = results.get(main)
    for tasks, summaries in results.items():
        if main not in tasks or tasks == main:
            continue
        added = tasks.replace(main, "")
        if alone is not None:
            with_aux = per_image_change(summaries, main, record.name)[0]
            reference = per_image_change(alone, main, record.name)[0]
            test = statistics.paired_difference(with_aux, reference)
            lines.append(_verdict_line(f"claim 1, adding {added} to {main}", f"with {added}", "alone", test))
        single = per_image_change(summaries, main, record.name)[0]
        multi = per_image_change(summaries, tasks, record.name)[0]
        test = statistics.paired_difference(multi, single)
        lines.append(_verdict_line(f"claim 2, model {tasks}", f"attacking {tasks}", f"attacking {main} alone",
                                   test))
    return lines


def _verdict_line(claim, label_a, label_b, test):
    word = {"better": "lower (supports the claim)", "worse": "higher (contradicts the claim)",
            "no significant change": "no significant change"}[statistics.verdict(test)]
    return (f"{claim}: relative vulnerability {test['mean_a']:.3f} {label_a} vs {test['mean_b']:.3f} {label_b}, "
            f"difference {statistics.format_interval(test['difference'], test['low'], test['high'])} — {word} "
            f"(paired permutation test over {test['pairs']} images, p = {test['p']:.3g})")


def _check_data(data, args):
    """The dataset in ``data`` must be the one these settings describe (else: another --workdir)."""
    info = json.loads((data / taskonomy.INFO_JSON).read_text())
    wanted = {"images": args.images, "size": args.size, "seed": args.seed, "scene": SCENE}
    differ = {k: (info.get(k), v) for k, v in wanted.items() if info.get(k) != v}
    if differ:
        raise ValueError(f"--workdir: {data} holds a dataset made with other settings ("
                         + ", ".join(f"{k} {a} there, {b} now" for k, (a, b) in differ.items())
                         + "); choose another --workdir")


def _trivial(args, data, sets):
    """The trivial predictors' validation scores of every task the models have."""
    letters = task_registry.task_string("".join(dict.fromkeys("".join(sets))))
    model = build_model(letters, encoder=args.encoder, input_size=args.size)
    loaders = [evaluation.make_loader(data, model, split, args.size, None, args.batch_size, args.workers)
               for split in ("train", "val")]
    return baselines.trivial_scores([model.task_records[n] for n in model.task_names], *loaders)


def _model_line(tasks, seed_value, run_dir, trivial):
    after = _records(run_dir)[-1]["val"]["tasks"]
    parts = []
    for name, scores in after.items():
        record = task_registry.get_task(name)
        base = trivial[name]
        parts.append(f"{record.letter}: {baselines.compare(scores, base, record.higher_is_better)} "
                     f"[{base['predictor']}]")
    return f"  {tasks} (seed {seed_value}): " + "; ".join(parts)


def run(args):
    start = time.perf_counter()
    try:
        pixel_budgets(args)
        if args.seed + args.seeds - 1 > MAX_SEED:
            raise ValueError(f"--seeds: seeds {args.seed} to {args.seed + args.seeds - 1} pass the largest seed "
                             f"{MAX_SEED}")
        mains = main_tasks(args.main)
        sets = model_sets(mains, args.models)
        attack_settings(args)
        canonical_encoder_name(args.encoder)
        if args.size % taskonomy.SIZE_MULTIPLE:
            raise ValueError(f"--size: {args.size} px is not a multiple of {taskonomy.SIZE_MULTIPLE} (what the models "
                             f"accept), e.g. {taskonomy.SIZE_MULTIPLE * max(1, round(args.size / taskonomy.SIZE_MULTIPLE))}")
        data = args.workdir / "data"
        if (data / taskonomy.SPLIT_CSV).exists():
            _check_data(data, args)
    except ValueError as error:
        print(f"mtrobust-fast quickstart: error: {error}", file=sys.stderr)
        return 2
    if not (data / taskonomy.SPLIT_CSV).exists():
        buildings = [f"synth{b:03d}" for b in range(BUILDINGS)] if args.images >= 5 * BUILDINGS else None
        taskonomy.synthesize(data, args.images, size=args.size, seed=args.seed, progress=not args.no_progress,
                             buildings=buildings, preset=SCENE, overwrite=True)
    trivial = _trivial(args, data, sets)
    results, model_lines = {}, []
    seeds = range(args.seed, args.seed + args.seeds)
    for tasks in sets:
        for seed_value in seeds:
            run_dir = run_dir_of(args, tasks, seed_value)
            try:
                summary = _finished_without_checkpoint(args, run_dir, seed_value)
                if summary is None:
                    _train(args, data, tasks, run_dir, seed_value)
                    summary = _attack(args, data, tasks, run_dir, seed_value, mains)
                    if seed_value != args.seed:  # its numbers are in its log and attack results: disk for one model
                        (run_dir / LAST).unlink()
            except ValueError as error:
                print(f"mtrobust-fast quickstart: error: {error}", file=sys.stderr)
                return 2
            model_lines.append(_model_line(tasks, seed_value, run_dir, trivial))
            results.setdefault(tasks, []).append(summary)
    samples = next(iter(results.values()))[0]["samples"]
    print(f"\nModels: {args.encoder} at {args.size} px, {args.epochs} epochs (Adam, {schedule(args.epochs)}), on "
          f"synthetic '{SCENE}' scenes (data synth --scene {SCENE}: 2-4 large pieces of furniture per room). "
          f"Validation metrics after training vs the trivial predictor of each task (in brackets; the ratio in "
          f"parentheses; mIoU and pixel accuracy: higher is better, L1 and MSE: lower is better):")
    print("\n".join(model_lines))
    header = ("auxiliary", "clean error/img", "rel vuln single-task attack", "rel vuln multi-task attack")
    markdown = []
    for main in mains:
        record = task_registry.get_task(main)
        rows = table1(main, results)
        title = (f"Table 1 (Baseline A) in miniature, main task {main} ({record.name}): {args.attack.upper()} "
                 f"{args.norm} eps={args.eps:.4g}, {attack_settings(args)[1] or 1} steps, {samples} validation "
                 f"images. Clean per-image error of {main} ({'1 - the image mIoU' if record.is_segmentation else 'masked MSE'}) "
                 f"and its relative vulnerability (lower is better) when only {main} is attacked and when all "
                 f"the model's tasks are attacked: mean over images of the seed-averaged per-image value [95 % "
                 f"bootstrap interval over images]" + (f" (seeds: mean ± half the range over {args.seeds} models)"
                                                          if args.seeds > 1 else ""))
        print(f"\n{title}")
        print(_table(header, rows))
        lines = verdicts(main, results)
        if lines:
            print("Verdicts (level 0.05):\n" + "\n".join(f"  {line}" for line in lines))
        markdown += [f"## {title}", "", _markdown(header, rows), ""] + [f"- {line}" for line in lines] + [""]
        _write_csv(args.workdir / f"table1_{main}.csv", header, rows)
    (args.workdir / "table1.md").write_text("\n".join(markdown))
    print(f"\ntables written to {args.workdir / 'table1.md'} and {args.workdir}/table1_<main>.csv")
    print(f"quickstart wall time {time.perf_counter() - start:.0f} s")
    return 0


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
