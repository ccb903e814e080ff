"""``mtrobust-fast sweep`` flags: a settings file (``--config``), flags, or both (a flag given replaces the
file's key), expanded by :mod:`.plan`, run by an executor, collected by :mod:`.store`."""
import importlib.util
import json
import shutil
import sys
from pathlib import Path

from mtrobust_fast.attacks import ATTACKS
from mtrobust_fast.cli.args import flagged, folder
from mtrobust_fast.files import writable_folder
from mtrobust_fast.cli.settings import add_sweep_flags
from mtrobust_fast.evaluation import SettingError, format_value
from mtrobust_fast.sweep import plan as planning
from mtrobust_fast.sweep.executors import EXECUTORS
from mtrobust_fast.sweep.store import Store
from mtrobust_fast.tracking import redact

# flag dest -> settings key, for flags that take a comma-separated list
LIST_FLAGS = {"attack": "attacks", "norm": "norms", "eps": "eps", "restarts": "restarts", "seed": "seeds",
              "checkpoint": "models"}
SCALAR_FLAGS = {"data": "data", "main": "main", "split": "split", "limit": "limit", "size": "size",
                "batch_size": "batch_size", "eps_units": "eps_units", "max_cells": "max_cells"}


def _list(text):
    return [item.strip() for item in text.split(",")]


def add_arguments(parser):
    add = parser.add_argument
    add("--config", type=Path, default=None, help="settings file (.yaml/.yml/.toml); see mtrobust_fast.sweep")
    add("--out", type=folder, required=True, help="sweep folder: cells/, results.parquet, results.csv, models/")
    add("--data", default=None, help="the dense data the models are evaluated on: a Taskonomy root, or a NYUv2 or "
                                     "Cityscapes root in the .npy layout")
    add("--checkpoint", type=_list, default=None, help="checkpoints, comma-separated (replaces the file's models)")
    add("--attack", type=_list, default=None,
        help="attacks, comma-separated: any dense attack of `mtrobust-fast attack --attack` (pgd, wgd, apgd, "
             "cyclic_step, grid, segpgd, ensemble, ...; not the classifier-head apgdt, fab, square, autoattack)")
    add("--norm", type=_list, default=None, help="threat models, comma-separated: linf, l2")
    add("--eps", type=_list, default=None, help="budgets in [0,1] pixels, comma-separated, e.g. 4/255,8/255")
    add("--eps-units", type=int, choices=(1, 255), default=None,
        help="units of --eps and --alpha: 1 = [0,1] pixels (default), 255 = grey levels (8 means 8/255)")
    add("--restarts", type=_list, default=None, help="random restarts, comma-separated")
    add("--seed", type=_list, default=None, help="seeds, comma-separated")
    add("--sets", default=None, help="attacked sets, comma-separated: main, all, subsets or task letters")
    add("--main", default=None, help="main task letter for the set 'main' (default: the model's, else its first)")
    add("--split", default=None, help="evaluation split (default val)")
    add("--limit", type=int, default=None, help="evaluate only the first N images of the split")
    add("--max-cells", type=int, default=None,
        help="refuse a grid of more cells than this before building it (default 10000)")
    add("--size", type=int, default=None, help="image side in px (default: each model's input size)")
    add("--batch-size", type=int, default=None, help="images per batch (default 16)")
    add_sweep_flags(parser, ATTACKS)  # alpha, steps and every other sweep key an attack declares
    add("--no-gradients", action="store_true", help="skip the clean input-gradient statistics")
    add("--deterministic", action="store_true", help="random starts that depend only on (seed, image index)")
    add("--per-sample", action="store_true",
        help="also keep each image's values per cell in OUT/per_sample/CELL_ID.parquet, for paired tests "
             "(finished cells without them run again)")
    add("--executor", choices=tuple(EXECUTORS), default="local", help="local (default) or ray")
    add("--address", default=None, help="ray: cluster address ('auto', host:port); default: start a local one")
    add("--ray-cpus", type=int, default=None, help="ray: CPUs of the local cluster it starts (default: all)")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: CUDA when available")
    add("--tracker", choices=("local", "comet", "comet-offline"), default=None,
        help="log each cell's parameters, metrics and attack curves (under OUT/runs/CELL_ID)")
    add("--project", default=None, help="Comet project name")
    add("--dry-run", action="store_true", help="print the cells and whether each is finished; run nothing")
    add("--no-progress", action="store_true", help="no progress bar")


def _number(text):
    """Flags come as text; ints stay ints so "2" and 2 in a file give the same cell."""
    try:
        return int(text)
    except ValueError:
        return text


def settings_from(args):
    """The file's settings with every given flag replacing its key."""
    settings = planning.load_file(args.config) if args.config else {}
    for dest, key in LIST_FLAGS.items():
        value = getattr(args, dest)
        if value is not None:
            settings[key] = [_number(v) for v in value] if dest in ("restarts", "seed") else value
    for key in planning.attack_keys():
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.sets is not None:
        settings["sets"] = args.sets
    for dest, key in SCALAR_FLAGS.items():
        if getattr(args, dest) is not None:
            settings[key] = getattr(args, dest)
    if args.no_gradients:
        settings["gradients"] = False
    if args.deterministic:
        settings["deterministic"] = True
    if args.per_sample:
        settings["per_sample"] = True
    return settings


def _train_models(cells):
    """Train (or finish training) each train-spec model that a pending cell needs, in this process."""
    from mtrobust_fast.training import train

    for model in {cell.model for cell in cells if cell.model.train}:
        print(redact(f"sweep: training {model.name} into {Path(model.checkpoint).parent}"), flush=True)
        try:
            train(planning.train_config(json.loads(model.train), cells[0].data, model.checkpoint))
        except (ValueError, FileExistsError) as error:
            raise SettingError("models", redact(f"training {model.name}: {error}")) from error


def _tracker_callback(args):
    """``on_done`` extension logging a finished cell to its own tracker run (None without --tracker)."""
    if args.tracker is None:
        return None
    from mtrobust_fast.tracking import make_tracker

    def log(cell, result):
        # A cell tracked before a kill but never written is tracked again: start its local run afresh so its
        # files hold it once (a Comet online experiment of the first attempt stays on the server).
        shutil.rmtree(args.out / "runs" / cell.cell_id, ignore_errors=True)
        try:
            tracker = make_tracker(args.tracker, args.out / "runs" / cell.cell_id, project=args.project,
                                   experiment_name=f"{cell.model.name} {cell.attack} {cell.norm} eps={cell.eps:.4g}")
        except (ImportError, RuntimeError) as error:  # no comet_ml, no API key
            raise SettingError("tracker", str(error), args.tracker) from error
        try:
            tracker.log_parameters({k: v for k, v in cell.settings().items() if k != "model"}
                                   | {f"model_{k}": v for k, v in cell.settings()["model"].items()})
            for row in result["rows"]:
                tracker.log_metrics({k: v for k, v in row.items() if isinstance(v, float)},
                                    prefix=f"{row['attacked']}/{row['task_letter']}")
            for label, curves in result["curves"].items():
                for task, values in curves.items():
                    tracker.log_curve(f"{label}/{task}/step_loss", values)
        finally:
            tracker.close()
    return log


def run(args):
    try:
        cells = planning.expand(settings_from(args), args.out)
    except planning.PlanError as error:
        print(f"mtrobust-fast sweep: error: {error}", file=sys.stderr)
        return 2
    try:  # before any model is trained or cell run (and in a dry run, which promises the run would start)
        if args.tracker is not None:
            from mtrobust_fast.tracking import check_tracker
            check_tracker(args.tracker)
        if args.executor == "ray" and importlib.util.find_spec("ray") is None:
            raise ImportError("--executor ray needs the ray package: pip install ray (or use --executor local)")
        if not args.dry_run:
            writable_folder(args.out, "--out")
    except (ValueError, ImportError, RuntimeError) as error:
        print(f"mtrobust-fast sweep: error: {error}", file=sys.stderr)
        return 2
    store = Store(args.out)
    changed = store.changed_checkpoints(cells)
    if changed:  # before any work: its new cells could never be exported next to the old ones
        print(f"mtrobust-fast sweep: error: checkpoint {next(iter(changed))} changed since the cells in "
              f"{Path(args.out) / 'cells'} measured it (retrained in place?); sweep it into another --out, or move "
              f"the older parts out of that folder", file=sys.stderr)
        return 2
    done = store.done()
    # a finished cell runs again when per-image values are asked for and it has none
    pending = [cell for cell in cells if cell.cell_id not in done
               or (cell.per_sample and not store.per_sample_path(cell.cell_id).is_file())]
    if args.dry_run:
        for cell in cells:
            state = "pending" if cell in pending else "done"
            print(f"{cell.cell_id} {state:7} {redact(cell.model.name)} {cell.attack} {cell.norm} eps={cell.eps:.5g} "
                  f"{ATTACKS[cell.attack].describe_steps(cell.alpha, cell.eps, cell.steps)} restarts={cell.restarts} "
                  f"seed={cell.seed} sets={','.join(cell.sets)}"
                  + "".join(f" {k}={format_value(v)}" for k, v in cell.options.items() if v is not None))
        return 0
    planned = {cell.cell_id for cell in cells}
    earlier = len(done - planned)
    print(f"sweep: {len(cells)} cells, {len(cells) - len(pending)} already finished, {len(pending)} to run"
          + (f"; {earlier} finished cells of earlier sweeps in {args.out} join the exported table too" if earlier
             else ""), flush=True)
    track = _tracker_callback(args)

    def on_done(cell, result):
        if track is not None:  # first: a cell whose logging failed is not marked finished
            track(cell, result)
        # a model name or path that holds the tracker's API key must not carry it into the table
        store.write(cell.cell_id, [{k: redact(v) for k, v in row.items()} for row in result["rows"]],
                    result["per_sample"])

    try:
        _train_models(pending)
        options = dict(device=args.device, record_steps=track is not None, progress=not args.no_progress)
        if args.executor == "ray":
            options.update(address=args.address, num_cpus=args.ray_cpus)
        ran = EXECUTORS[args.executor](pending, on_done, lambda cell: store.claim(cell.cell_id, again=cell.cell_id in done), **options)
    except SettingError as error:  # named as the sweep's keys are (sets, models, ...) or by the flag
        print(f"mtrobust-fast sweep: error: {flagged(error, {'models': 'models', 'sets': 'sets'})}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sweep: interrupted with {len(store.done())} of {len(cells)} cells finished; run the same command "
              "again to continue", file=sys.stderr)
        return 130
    elsewhere = [cell for cell in pending if cell not in ran and cell.cell_id not in store.done()]
    if elsewhere:
        print(f"sweep: {len(elsewhere)} cells are being run by another sweep on {args.out}; their rows join the "
              f"table when it exports (or when this command is run again)", flush=True)
    try:
        table, paths = store.export()
    except ValueError as error:
        print(f"mtrobust-fast sweep: error: {error}", file=sys.stderr)
        return 2
    print(f"sweep: ran {len(ran)} cells; {len(table)} rows from {len(store.done())} cells; wrote "
          + " and ".join(map(str, paths)))
    print("\n".join(result_lines(table)))
    print(f"next: mtrobust-fast report {paths[0]} --out {Path(args.out) / 'report'}  (figures and tables)")
    return 0


SHOWN = 12  # result lines printed at the end of a sweep; the table has them all


def result_lines(table):
    """A few lines of what the sweep found: each model's main task under each attack configuration when only it
    is attacked (clean -> adversarial error/img, relative vulnerability), and any collapsed head."""
    needed = {"model", "attacked", "task_letter", "main", "attack", "eps", "clean_error", "adv_error", "rel_vuln"}
    if not needed <= set(table.columns) or table.empty:
        return []
    own = table[(table["attacked"].astype(str) == table["main"].astype(str))
                & (table["task_letter"].astype(str) == table["main"].astype(str))]
    keys = [c for c in ("model", "attack", "norm", "eps", "steps") if c in own.columns]
    grouped = own.groupby(keys, dropna=False, sort=True)[["clean_error", "adv_error", "rel_vuln"]].mean()
    lines = ["main task attacked alone (mean over seeds and rows; err/img clean -> adversarial, rel vuln):"]
    for index, row in list(grouped.iterrows())[:SHOWN]:
        label = " ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in index)
        lines.append(f"  {label}: {row['clean_error']:.4f} -> {row['adv_error']:.4f}, rel vuln {row['rel_vuln']:.4f}")
    if len(grouped) > SHOWN:
        lines.append(f"  ... {len(grouped) - SHOWN} more in the table")
    if "collapsed" in table.columns:
        collapsed = table[table["collapsed"].fillna("").astype(str) != ""].drop_duplicates(["model", "task"])
        lines += [f"warning: {row['model']} {row['task']} looks collapsed ({row['collapsed']}); its numbers mean "
                  f"no robustness" for _, row in collapsed.iterrows()]
    return lines
