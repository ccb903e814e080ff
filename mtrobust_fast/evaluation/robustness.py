"""Robustness evaluation as a library: attack a model over a data loader and collect every vulnerability metric.

:func:`evaluate` takes a model, a loader of ``(images, targets, masks)`` batches and an attack; per batch it
scores the clean input, optionally the clean per-task input gradients, and the adversarial input of every
attacked set (all sets attacked in one batch of rows, ``Attack.run_subsets``), and returns the
:class:`~mtrobust_fast.evaluation.metrics.VulnerabilityMeter` summary. :func:`evaluate_checkpoint` does the same from a
checkpoint file and a data folder; ``mtrobust-fast attack``, the sweep, the quickstart and training-time
robust validation all measure through these two functions.
"""
import copy
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from mtrobust_fast import task_names
from mtrobust_fast.evaluation import metrics
from mtrobust_fast.evaluation.collapse import CollapseDetector
from mtrobust_fast import tasks as task_registry
from mtrobust_fast.attacks import build_attack, dense
from mtrobust_fast.data import open_dataset
from mtrobust_fast.device import resolve_device, to_device
from mtrobust_fast.models import STRIDE, load_checkpoint
from mtrobust_fast.registry import SettingValueError


class SettingError(SettingValueError):
    """A bad evaluation argument; ``setting`` names the argument of :func:`evaluate_checkpoint` (``sets``,
    ``checkpoint``, ``data``, ...), ``reason`` says what is wrong."""


def task_letters(names):
    """A model's task names as registry letters where they have one ("sd"), else the names joined by "+"."""
    return metrics.set_label(names)


def resolve_sets(sets, model_tasks, where="the model"):
    """Attacked sets as tuples of task names in the model's order. Each set is "all", or what
    :func:`~mtrobust_fast.task_names.model_tasks` reads (a head name, registry letters such as "sd", a sequence of
    task names); every task must be one of ``model_tasks``."""
    resolved = []
    for item in sets:
        try:
            chosen = tuple(model_tasks if item == "all" else task_names.model_tasks(item, model_tasks, "sets"))
        except task_names.TaskNotInModel as error:
            raise SettingError("sets", f"{where} has tasks {task_letters(model_tasks)}: {error.reason}") from None
        except SettingValueError as error:
            raise SettingError("sets", error.reason) from None
        if chosen not in resolved:
            resolved.append(chosen)
    return resolved


class _Curves:
    """Mean per-step loss of each attacked task, per attacked set, over every attacked image (attack curves)."""

    def __init__(self, sets):
        self.sets, self.sums, self.count = sets, {}, 0

    def add(self, step_losses, batch):
        for k, attacked in enumerate(self.sets):
            for name in attacked:
                block = step_losses[name][:, k * batch:(k + 1) * batch].double().sum(1).cpu()
                key = (metrics.set_label(attacked), name)
                self.sums[key] = block if key not in self.sums else self.sums[key] + block
        self.count += batch

    def result(self):
        return {label: {name: (total / self.count).tolist() for (lab, name), total in self.sums.items()
                        if lab == label} for label in dict.fromkeys(lab for lab, _ in self.sums)}


def _records(model, tasks):
    records = dict(getattr(model, "task_records", {}) or {})
    if tasks is None:
        tasks = list(getattr(model, "evaluated_task_names", None) or getattr(model, "task_names", records))
    chosen = [records[t] if isinstance(t, str) and t in records else task_registry.record(t) for t in tasks]
    return [records.get(t.name, t) for t in chosen]  # a letter names the model's own head record


def evaluate(model, loader, attack, tasks=None, *, sets=None, gradients=True, adv_gradients=False, progress=False,
             record_steps=False, device=None, first_id=0, on_batch=None, intervals=False, per_sample=False):
    """Attack every batch of ``loader`` and return the :class:`~mtrobust_fast.evaluation.metrics.VulnerabilityMeter` summary.

    ``tasks``: the evaluated tasks (records or names; default the model's). ``sets``: attacked sets (tuples of
    task names; default one set, the attack's ``target_tasks``). ``gradients``: also collect the clean
    per-task input-gradient statistics; ``adv_gradients``: also the per-task and joint input-gradient norms at
    every attacked set's adversarial input (one more backward per task and set). The perturbation's norms and
    SNR are always measured. ``on_batch(x, targets, masks, adv, sets)``: called with every batch and its
    adversarial inputs ``[len(sets), B, ...]`` (e.g. :class:`mtrobust_fast.analysis.panels.PanelCollector`). ``record_steps``: add ``step_losses`` ``{set: {task: [mean loss per
    step]}}`` (the attack must have been built with ``record_steps=True``). Sample ids (for deterministic
    attacks) count from ``first_id`` in loader order. The model is scored in eval mode; the attack runs in its
    own ``model_mode``; the model's mode is restored afterwards. The summary's ``cost`` is what the attack spent
    (:class:`~mtrobust_fast.attacks.cost.Cost`: passes per attacked row, steps saved by early exit, seconds). ``intervals``, ``per_sample``: 95 % bootstrap
    intervals over samples next to every per-sample mean, and the per-sample errors and losses (see
    :meth:`~mtrobust_fast.evaluation.metrics.VulnerabilityMeter.compute`). ``collapsed``: ``{task: why}`` for
    heads whose clean outputs do not depend on the input (:mod:`~mtrobust_fast.evaluation.collapse`): their
    adversarial error equals the clean one, which is no robustness.
    """
    records = _records(model, tasks)
    sets = [tuple(attack.target_tasks)] if sets is None else [tuple(s) for s in sets]
    device = device or next(model.parameters()).device
    meter = metrics.VulnerabilityMeter(records, eps=_scalar(attack.eps), norm=attack.norm)
    curves = _Curves(sets)
    collapse = CollapseDetector(records)
    seen = first_id
    was_training = model.training
    model.eval()
    # Work done inside a batch: rows whose input gradient was evaluated (rows that left early cost nothing more),
    # shown only once a batch has run for a few seconds.
    steps = tqdm(desc="  attack gradients", unit="row", leave=False, delay=3, disable=not progress)
    attack.on_gradient = steps.update if progress else None

    def stage(description, total):  # a cascade's member: its name, the points left, and a total for an ETA
        steps.reset(total=total)
        steps.set_description(f"  {description}")

    attack.on_stage = stage if progress else None
    spent = copy.copy(attack.cost)
    try:
        for batch in tqdm(loader, desc=f"attack {type(attack).__name__}", unit="batch", disable=not progress):
            x, targets, masks = to_device(batch, device)
            # rows x steps x restarts of gradient work at most (early exits finish short; a cascade sets its own)
            steps.reset(total=x.shape[0] * len(sets) * getattr(attack, "steps", 1) * getattr(attack, "restarts", 1))
            steps.set_description("  attack gradients")
            ids = torch.arange(seen, seen + x.shape[0])
            seen += x.shape[0]
            with torch.no_grad():
                outputs = model(x)
                clean = metrics.evaluate(outputs, targets, masks, records)
                collapse.add(outputs, targets, masks)
            grads = metrics.input_gradients(model, x, targets, masks, records) if gradients else None
            if len(sets) == 1:
                adv = attack(x, targets, masks, sample_ids=ids)[None]
            else:
                adv = attack.run_subsets(x, targets, masks, subsets=[list(s) for s in sets], sample_ids=ids)
            if record_steps:
                curves.add(attack.step_losses, x.shape[0])
            with torch.no_grad():
                evaluations = {s: metrics.evaluate(model(adv[i]), targets, masks, records) for i, s in enumerate(sets)}
            adv_grads = {s: metrics.input_gradients(model, adv[i], targets, masks, records)
                         for i, s in enumerate(sets)} if adv_gradients else None
            meter.update(clean, evaluations, grads, perturbations={s: (x, adv[i]) for i, s in enumerate(sets)},
                         adv_grads=adv_grads)
            if on_batch is not None:
                on_batch(x, targets, masks, adv, sets)
    finally:
        model.train(was_training)
        attack.on_gradient = attack.on_stage = None
        steps.close()
    if meter.samples == 0:
        raise SettingError("data", "the loader yielded no batch to evaluate")
    summary = meter.compute(intervals=intervals, per_sample=per_sample)
    summary["cost"] = attack.cost.since(spent).as_dict()
    summary["collapsed"] = collapse.result()
    if attack.summary_key is not None:  # a cascade or an ensemble: what each member achieved
        summary[attack.summary_key] = attack.summary()
    if record_steps:
        summary["step_losses"] = curves.result()
    return summary


def _scalar(eps):
    """A budget for the first-order metrics: the float, or the mean of per-sample budgets."""
    return float(eps) if isinstance(eps, (int, float)) else float(torch.as_tensor(eps).double().mean())


def make_loader(data, model, split="val", size=None, limit=None, batch_size=16, workers=0):
    """A fixed-order loader over ``split`` of the dataset at ``data`` that fits ``model`` (its tasks, input size)."""
    try:
        dataset = open_dataset(data, model, split=split, size=size)
    except (FileNotFoundError, ValueError) as error:
        raise SettingError("data", str(error)) from error
    if limit:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    return DataLoader(dataset, batch_size, shuffle=False, num_workers=workers)


def load_surrogate(path, model, attacked, device):
    """The model of the surrogate checkpoint ``path``, checked against the target ``model``: it has every attacked
    task and takes the same input channels."""
    path = Path(path)
    if not path.is_file():
        raise SettingError("surrogate", f"checkpoint not found: {path}")
    try:
        surrogate, _ = load_checkpoint(path, map_location=device)
    except ValueError as error:
        raise SettingError("surrogate", str(error)) from error
    missing = [name for name in attacked if name not in surrogate.task_names]
    if missing:
        raise SettingError("surrogate", f"the model in {path} has tasks {task_letters(surrogate.task_names)}; it "
                                        f"cannot craft attacks on {task_letters(missing)}")
    channels = (model.config.get("input_channels", 3), surrogate.config.get("input_channels", 3))
    if channels[0] != channels[1]:
        raise SettingError("surrogate", f"the model in {path} takes {channels[1]}-channel images, the target "
                                        f"{channels[0]}-channel ones")
    return surrogate


def _warn_if_objective_unused(atk, attack, sets):
    """A dense objective (SegPGD's, CosPGD's, SEA's) replaces only segmentation losses (CosPGD: Taskonomy regression
    losses too); an attacked set without such a task is attacked on its tasks' own losses. Say so, rather than let
    a "segpgd" row on depth pass for SegPGD."""
    if atk.dense_loss == "task":
        return
    changed = {s.name for s in atk.specs if dense.loss_for(s.loss, atk.dense_loss, 0.0) is not s.loss}
    plain = [metrics.set_label(s) for s in sets if not changed.intersection(s)]
    if plain:
        replaced = "segmentation and regression" if atk.dense_loss in dense.REGRESSION else "segmentation"
        warnings.warn(f"--attack {attack}: the {atk.dense_loss} objective changes no loss of the attacked set(s) "
                      f"{', '.join(plain)} (it replaces {replaced} losses only), so those sets are attacked on their "
                      f"tasks' own losses", stacklevel=2)


def recorded_options(atk, given):
    """Each optional setting ``atk`` declares besides alpha and steps: the value given, else the attack's own."""
    return {s.name: given[s.name] if given.get(s.name) is not None else getattr(atk, s.name, None)
            for s in type(atk).option_settings()}


def options_label(atk, given):
    """The declared options besides alpha and steps given away from their defaults, as "name=value ..." ("" when
    none): what tells two runs of one attack apart in a results table."""
    return " ".join(f"{s.name}={format_value(given[s.name])}" for s in type(atk).option_settings()
                    if not s.is_default(given.get(s.name)))


def format_value(value):
    """A setting's value as a short text: lists comma-separated, floats to 4 significant digits."""
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def evaluate_checkpoint(checkpoint, data, *, attack="pgd", norm="linf", eps=8 / 255, alpha=None, steps=None,
                        restarts=1, normalize_task_grads=False, sets=("all",), split="val", size=None,
                        batch_size=16, limit=None, seed=0, deterministic=False, gradients=True, adv_gradients=False,
                        workers=0, on_batch=None, surrogate=None,
                        device="auto", progress=False, record_steps=False, dense_loss=None, options=None,
                        intervals=False, per_sample=False):
    """Attack a checkpoint's model over one split of ``data`` and return ``(config, summary)``.

    ``sets``: attacked sets, each "all", task letters or a sequence of task names; all are attacked in one batch
    of rows. ``dense_loss``: the objective dense heads are attacked on (see :mod:`mtrobust_fast.attacks.dense`;
    None: the attack's own). ``options``: any other optional setting the attack declares, e.g. ``{"grid_weights":
    [...], "grid_task": "d"}`` (None values mean the attack's default). ``summary`` is :func:`evaluate`'s;
    ``config`` records every setting (each declared option of the attack as given, else the attack's own value;
    ``attack_options``: the options given that differ from their defaults, as one label), the checkpoint's epoch
    and the wall time. ``intervals``, ``per_sample``: see :func:`evaluate`. Errors are :class:`SettingError`
    naming the argument.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise SettingError("checkpoint", f"checkpoint not found: {checkpoint}")
    device = resolve_device(device)
    try:
        model, meta = load_checkpoint(checkpoint, map_location=device)
    except ValueError as error:
        raise SettingError("checkpoint", str(error)) from error
    stride = model.config.get("input_stride", STRIDE)
    if size is not None and size % stride:
        raise SettingError("size", f"the model in {checkpoint} takes images whose side is a multiple of {stride}, "
                                   f"got {size}")
    names = model.evaluated_task_names
    sets = resolve_sets(sets, names, f"the model in {checkpoint}")
    attacked = [name for name in names if any(name in s for s in sets)]
    crafter, attack_tasks = model, names
    if surrogate is not None:
        crafter, attack_tasks = load_surrogate(surrogate, model, attacked, device), attacked
    given = {"alpha": alpha, "steps": steps, "normalize_task_grads": normalize_task_grads, "dense_loss": dense_loss,
             **(options or {})}
    try:
        atk = build_attack(attack, crafter, attack_tasks, eps=eps, norm=norm, restarts=restarts, seed=seed,
                           deterministic=deterministic, record_steps=record_steps, target_tasks=attacked, **given)
    except SettingValueError as error:  # a refused or bad optional setting: named as such
        raise SettingError(error.setting, error.reason, error.value) from error
    except ValueError as error:
        raise SettingError("attack", str(error), attack) from error
    _warn_if_objective_unused(atk, attack, sets)
    loader = make_loader(data, model, split, size, limit, batch_size, workers)
    start = time.perf_counter()
    summary = evaluate(model, loader, atk, sets=sets, gradients=gradients, adv_gradients=adv_gradients, progress=progress,
                       record_steps=record_steps, device=device, on_batch=on_batch, intervals=intervals,
                       per_sample=per_sample)
    config = {
        "checkpoint": str(checkpoint), "checkpoint_epoch": meta.get("epoch"),
        "surrogate": None if surrogate is None else str(surrogate),
        "model": model.config["tasks"], "encoder": model.config["encoder"], "attack": attack,
        "norm": norm, "eps": eps, "alpha": atk.alpha if type(atk).takes("alpha") else None,
        "steps": atk.steps, "restarts": restarts, "normalize_task_grads": normalize_task_grads,
        "dense_loss": atk.dense_loss, **recorded_options(atk, given), "attack_options": options_label(atk, given),
        "target": [metrics.set_label(s) for s in sets], "split": split, "limit": limit,
        "seed": seed, "deterministic": deterministic, "device": str(device),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return config, summary
