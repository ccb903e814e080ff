"""``mtrobust-fast attack``: attack a checkpoint's model (a multi-task Taskonomy model or a classifier) and report, per
attacked set and evaluated task, the clean and adversarial error, the relative and adversarial vulnerability and
the first-order gradient terms (see :mod:`mtrobust_fast.evaluation.metrics`), as a table, a CSV and a JSON file.

Several attacked sets (``--target s,sd,all``) are attacked in one batch of rows (``Attack.run_subsets``), and the
marginal vulnerability between sets that differ by one task is reported. Budgets are in [0, 1] pixel units
(``--eps 8/255`` means 8/255), not the source's "integer × 2/255" units.
"""
import argparse
import csv
import json
import math
from pathlib import Path

from mtrobust_fast import evaluation
from mtrobust_fast.evaluation import metrics
from mtrobust_fast import tasks as task_registry
from mtrobust_fast.attacks import ATTACKS
from mtrobust_fast.cli.args import (add_budget_units, budget, folder, pixel_budgets, positive_int, run_reporting, seed,
                                   workers)
from mtrobust_fast.cli.settings import add_setting_flags, flag_names, given_settings
from mtrobust_fast.data.taskonomy import SPLITS
from mtrobust_fast.files import writable_folder
from mtrobust_fast.models import load_checkpoint, read_checkpoint
from mtrobust_fast.analysis import per_sample
from mtrobust_fast.analysis.panels import PanelCollector


def target_sets(text):
    """Comma-separated attacked sets: Taskonomy task letters ("s", "sd"), "all", or a head's name (a classifier's
    "class"); membership in the model is checked once it is loaded."""
    sets = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise argparse.ArgumentTypeError(f"empty attacked set in {text!r}")
        if item == "all" or not all(letter in task_registry.BY_LETTER for letter in item):
            sets.append(item)
            continue
        try:
            sets.append(metrics.set_label(t.name for t in task_registry.resolve(item)))
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return sets


def eps_or_train(text):
    """A budget, or "train" (the checkpoint's adversarial-training budget, read once it is loaded)."""
    return "train" if text.strip() == "train" else budget(text)


def training_budget(checkpoint):
    """(eps, norm) a checkpoint was adversarially trained with; ValueError for a clean-trained one."""
    meta = read_checkpoint(checkpoint)["meta"]
    train_config = meta.get("train_config") or {}
    if train_config.get("adversarial", "none") == "none" or train_config.get("eps") is None:
        raise ValueError(f"--eps train: {checkpoint} was not adversarially trained (no training eps); give --eps")
    return float(train_config["eps"]), train_config.get("norm", "linf")


def add_arguments(parser):
    add = parser.add_argument
    add("--checkpoint", required=True, type=Path, help="a checkpoint written by `mtrobust-fast train`")
    add("--data", required=True, type=Path,
        help="the data the model was trained on: a Taskonomy root, a NYUv2 or Cityscapes root (.npy layout), an object set, a CIFAR or STL-10 binary folder, an image folder or a chest X-ray set")
    add("--attack", choices=ATTACKS.names(), default="pgd", help="attack (default %(default)s)")
    add("--surrogate", type=Path, default=None,
        help="transfer attack: craft the adversarial examples on this checkpoint's model and evaluate them on "
             "--checkpoint's (it must have the attacked tasks)")
    add("--norm", choices=("linf", "l2"), default="linf", help="threat model (default %(default)s)")
    add("--eps", type=eps_or_train, default=8 / 255,
        help="ball radius in [0,1] pixels, e.g. 8/255, or 'train': the eps and norm the checkpoint was "
             "adversarially trained with (default 8/255)")
    add_budget_units(parser)
    add_setting_flags(parser, ATTACKS)
    add("--restarts", type=positive_int, default=1, help="random restarts, worst case kept (default 1)")
    add("--target", type=target_sets, default=["all"],
        help="attacked sets, comma-separated: task letters, a head name, or 'all' (default all), e.g. s,sd,all")
    add("--split", choices=SPLITS, default="val", help="data split (default %(default)s)")
    add("--size", type=positive_int, default=None, help="image side in px (default: the model's input size)")
    add("--batch-size", type=positive_int, default=16, help="images per batch (default %(default)s)")
    add("--limit", type=positive_int, default=None, help="attack only the first N images of the split")
    add("--seed", type=seed, default=0, help="random-start seed (default %(default)s)")
    add("--deterministic", action="store_true",
        help="random starts that depend only on (seed, image index), and deterministic algorithms")
    add("--no-gradients", action="store_true",
        help="skip the clean input-gradient statistics (one extra backward pass per task and batch)")
    add("--adv-gradients", action="store_true",
        help="also measure the input-gradient norms (L1, L2, Linf) per task and of the joint loss at each attacked "
             "set's adversarial input (one more backward per task and set and batch)")
    add("--out", type=folder, default=None, help="a folder: write OUT/results.csv and OUT/results.json")
    add("--overwrite", action="store_true", help="replace the results an earlier attack wrote into --out")
    add("--per-sample", action="store_true",
        help="also write OUT/per_sample.csv: each image's clean and adversarial error and loss per attacked set "
             "and task, for paired tests between runs on the same images (`mtrobust-fast analyze paired`); "
             "needs --out")
    add("--panels", type=positive_int, default=None,
        help="also draw the first N images (clean and adversarial input, perturbation, each task's target and "
             "predictions before and after) as OUT/panels/imageK_SET.png; needs --out")
    add("--tracker", choices=("local", "comet", "comet-offline"), default=None,
        help="also log the settings, metrics and panels to a tracker run in OUT (see mtrobust_fast.tracking); needs --out")
    add("--project", default=None, help="Comet project name (with --tracker comet or comet-offline)")
    add("--workers", type=workers, default=0, help="data-loading processes (default %(default)s)")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: CUDA when available")
    add("--no-progress", action="store_true", help="no progress bar")


def attack_dataset(args, on_batch=None):
    """Run the attack the ``attack`` arguments describe; returns ``(config, summary)``."""
    return evaluation.evaluate_checkpoint(
        args.checkpoint, args.data, attack=args.attack, norm=args.norm, eps=args.eps, restarts=args.restarts,
        sets=args.target, options=given_settings(args, ATTACKS), split=args.split, size=args.size, batch_size=args.batch_size, limit=args.limit, seed=args.seed,
        deterministic=args.deterministic, gradients=not args.no_gradients, adv_gradients=args.adv_gradients,
        workers=args.workers, device=args.device, progress=not args.no_progress, on_batch=on_batch,
        surrogate=args.surrogate, intervals=True, per_sample=args.per_sample)


def _with_ci(values, key):
    """``values[key]``, followed by its interval ``values[key + "_ci"]`` when there is one."""
    ci = values.get(f"{key}_ci")
    return _fmt(values[key]) + ("" if ci is None else f" [{_fmt(ci[0])}, {_fmt(ci[1])}]")


def _fmt(value):
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


HEADLINE_METRICS = ("accuracy", "auc", "miou", "mae")  # printed clean and adversarial (all are in the JSON)


def format_report(config, summary):
    """The per-task table of every attacked set, then the joint, marginal and first-order lines."""
    header = ("task", "clean err/img", "adv err/img", "rel vuln", "rel vuln (ratio of means)", "adv vuln")
    steps = ATTACKS[config["attack"]].describe_steps(config["alpha"], config["eps"], config["steps"])
    lines = [f"{config['attack'].upper()} {config['norm']} eps={config['eps']:.5g} "
             f"{steps} restarts={config['restarts']} on {summary['samples']} {config['split']} "
             f"images, model {config['model']} ({config['encoder']})"
             + (f", transferred from {config['surrogate']}" if config.get("surrogate") else ""),
             "err/img: the per-image error averaged over images (1 - the image's own mIoU for segmentation, masked "
             "MSE for regression, 0/1 for classification); [low, high]: 95 % bootstrap interval over images",
             "rel vuln: the mean over images of (adv - clean error) / clean error, images with clean error 0 left "
             "out (n/a for 0/1 errors, where only wrong images remain and cannot get worse: read robust accuracy and "
             "its drop); ratio of means: (mean adv - mean clean error) / mean clean error; adv vuln: the mean over "
             "images of |adv - clean loss|"]
    for label, entry in summary["attacks"].items():
        rows = [header] + [(metrics.set_label([t]), _with_ci(summary["clean"][t], "error"), _with_ci(v, "adv_error"),
                            "n/a (0/1 error)" if "adv_accuracy" in v else _with_ci(v, "rel_vuln"),
                            _fmt(v["rel_vuln_ratio_of_means"]), _with_ci(v, "adv_vuln"))
                           for t, v in entry["tasks"].items()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines.append(f"\nattacked set {label}: joint adversarial vulnerability {_with_ci(entry, 'joint_adv_vuln')}"
                     + (f" (first order {_fmt(entry['first_order_joint'])})" if "first_order_joint" in entry else ""))
        lines += ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in rows]
        scored = [f"{metrics.set_label([t])} {m} {_with_ci(summary['clean'][t], m)} -> {_with_ci(v, 'adv_' + m)}"
                  + (f" (drop {_fmt(summary['clean'][t][m] - v['adv_' + m])})" if m == "accuracy" else "")
                  for t, v in entry["tasks"].items() for m in HEADLINE_METRICS if "adv_" + m in v]
        if scored:
            lines.append("  clean -> adversarial: " + ", ".join(scored))
        if "perturbation" in entry:
            pert = entry["perturbation"]
            lines.append(f"  perturbation per image: L1 {_fmt(pert['l1'])}, L2 {_fmt(pert['l2'])}, Linf "
                         f"{_fmt(pert['linf'])} (max {_fmt(pert['linf_max'])}), L2 SNR {pert['snr_db']:.2f} dB"
                         + (f" ({pert['unperturbed']} images unperturbed)" if pert["unperturbed"] else ""))
        if "adv_joint_grad_norms" in entry:
            lines.append("  input-gradient L2 norm clean -> adversarial: " + ", ".join(
                f"{metrics.set_label([t])} {_fmt(summary['gradients']['norms'][t]['l2']) if 'gradients' in summary else '-'}"
                f" -> {_fmt(v['l2'])}" for t, v in entry["adv_grad_norms"].items()))
        undefined = {t: v["rel_vuln_undefined"] for t, v in entry["tasks"].items() if v["rel_vuln_undefined"]}
        if undefined:
            lines.append("  samples left out of rel vuln (clean error 0): "
                         + ", ".join(f"{metrics.set_label([t])} {n}" for t, n in undefined.items()))
    for task, why in (summary.get("collapsed") or {}).items():
        lines.append(f"warning: {metrics.set_label([task])} looks collapsed ({why}): the attack cannot change its "
                     f"answers, so its adversarial error equals its clean one; that is not robustness")
    if "cost" in summary:
        lines.append(format_cost(summary["cost"]))
    if "members" in summary:
        lines.append("cascade (robust accuracy after each member, seconds): " + ", ".join(
            f"{name} {_fmt(v['robust_accuracy'])} ({v['seconds']:.1f} s)" for name, v in summary["members"].items()))
    for label, ensemble in (summary.get("ensemble") or {}).items():
        lines.append(f"ensemble on {label} ({', '.join(ensemble['members'])}): worst-case err/img per task (member "
                     f"that won most often): " + ", ".join(
                         f"{metrics.set_label([t])} {_fmt(v)} ({max(ensemble['wins'][t], key=ensemble['wins'][t].get)})"
                         for t, v in ensemble["worst_error"].items()))
    for item in summary["marginal"]:
        bound = f" (Theorem-4 bound {_fmt(item['theorem4_bound'])})" if "theorem4_bound" in item else ""
        lines.append(f"marginal vulnerability {metrics.set_label(item['base'])} + "
                     f"{metrics.set_label([item['added']])}: {_fmt(item['delta'])}{bound}")
    if "gradients" in summary:
        first = summary["gradients"]["first_order"]
        lines.append(f"first order eps*E||grad L||_{summary['dual_norm'][1:]}: "
                     + ", ".join(f"{metrics.set_label([t])} {_fmt(v)}" for t, v in first.items()))
    return "\n".join(lines)


def format_cost(cost):
    """One line: what the attack spent per attacked row (an image once per attacked set) and in all."""
    if not cost["rows"]:
        return "cost: no row attacked"
    saved = (f", early exit: {cost['rows_exited']} of {cost['rows']} rows left early, {cost['steps_saved']} steps "
             f"saved" if cost["rows_exited"] else "")
    return (f"cost: {cost['forward_per_row']:.1f} forward and {cost['backward_per_row']:.1f} backward passes per "
            f"attacked row ({cost['forward_rows']} / {cost['backward_rows']} rows in all){saved}; "
            f"{cost['seconds']:.1f} s attacking")


def output_paths(out):
    """``OUT/results.csv`` and ``OUT/results.json``: ``--out`` names a folder (ValueError if it is a file)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} is a file; --out names a folder (results.csv and results.json go inside)")
    return out / "results.csv", out / "results.json"


def _plain(value):
    """JSON-safe copy: non-finite floats become null."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_results(out, config, summary, rows):
    """``OUT/results.csv`` (one row per attacked set and task, the config repeated) and ``OUT/results.json``
    (config + summary)."""
    csv_path, json_path = output_paths(out)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    flat_config = {k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in config.items() if k != "target"}
    table = [{**flat_config, **row} for row in rows]
    fields = list(dict.fromkeys(key for row in table for key in row))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(table)
    json_path.write_text(json.dumps(_plain({"config": config, "summary": summary}), indent=1) + "\n")
    return csv_path, json_path


def track(args, config, rows, figures):
    """Log the settings, every float metric (prefixed attacked-set/task) and the panels to a tracker run in OUT."""
    from mtrobust_fast.tracking import make_tracker

    name = f"{config['model']} {config['attack']} {config['norm']} eps={config['eps']:.4g}"
    try:
        with make_tracker(args.tracker, args.out, project=args.project, experiment_name=name) as tracker:
            tracker.log_parameters({k: v for k, v in config.items() if k != "seconds"})
            for row in rows:
                tracker.log_metrics({k: v for k, v in row.items() if isinstance(v, float)},
                                    prefix=f"{row['attacked']}/{metrics.set_label([row['task']])}")
            for path in figures:
                tracker.log_figure(path)
    except (ImportError, RuntimeError) as error:
        raise ValueError(f"--tracker {args.tracker}: {error}") from error


def run(args):
    def attack():
        from_training = args.eps == "train"
        if from_training:
            args.eps = None
        pixel_budgets(args)
        if from_training:
            args.eps, args.norm = training_budget(args.checkpoint)
        for option in ("panels", "tracker", "per_sample"):
            if getattr(args, option) not in (None, False) and args.out is None:
                raise ValueError(f"--{option.replace('_', '-')} needs --out (a folder to write into)")
        if args.out is not None:  # a bad --out, or one holding earlier results, is refused before the work
            earlier = [path for path in output_paths(args.out) if path.exists()]
            if earlier and not args.overwrite:
                raise FileExistsError(f"--out: {args.out} already holds the results of an attack ({earlier[0].name}); "
                                      f"pass --overwrite to replace them, or choose another folder")
            writable_folder(args.out, "--out")
        collector = PanelCollector(args.panels) if args.panels else None
        config, summary = attack_dataset(args, on_batch=collector)
        print(format_report(config, summary))
        if args.out is None:
            return 0
        rows = metrics.summary_rows(summary)
        paths = list(write_results(args.out, config, {k: v for k, v in summary.items() if k != "per_sample"}, rows))
        if args.per_sample:
            paths.append(per_sample.write(args.out / per_sample.FILE, summary))
        print("wrote " + ", ".join(str(p) for p in paths))
        figures = []
        if collector is not None:
            model, _ = load_checkpoint(args.checkpoint)
            figures = collector.write(model, args.out / "panels", label=metrics.set_label)
            print(f"wrote {len(figures)} panels in {args.out / 'panels'}")
        if args.tracker is not None:
            track(args, config, rows, figures)
        return 0

    return run_reporting("attack", attack, flags=flag_names(ATTACKS, {"sets": "--target"}))
