"""Run one cell and turn its summary into table rows (see :mod:`mtrobust_fast.sweep` for the columns)."""
import math
import time

import mtrobust_fast
from mtrobust_fast.analysis import per_sample
from mtrobust_fast.evaluation import metrics
from mtrobust_fast import tasks as task_registry
from mtrobust_fast.evaluation import SettingError, evaluate_checkpoint, format_value
from mtrobust_fast.sweep.plan import cell_from_settings


def _letter(name):
    return task_registry.get_task(name).letter


def rows(cell, config, summary, seconds):
    """One dict per (attacked set, evaluated task): the cell's settings, every vulnerability metric, version and timing."""
    names = summary["tasks"]
    marginal = {}
    for item in summary["marginal"]:
        grown = [n for n in names if n in item["base"] or n == item["added"]]
        marginal[(metrics.set_label(grown), item["added"])] = item
    gradients = summary.get("gradients", {})
    table = []
    for row in metrics.summary_rows(summary):
        task = row["task"]
        extra = marginal.get((row["attacked"], task), {})
        out = {
            "cell_id": cell.cell_id, "model": cell.model.name, "checkpoint": cell.model.checkpoint,
            "model_identity": cell.model.identity,
            "model_tasks": cell.model.tasks, "main": cell.model.main, "encoder": cell.model.encoder,
            "task_weights": cell.model.weights, "checkpoint_epoch": config["checkpoint_epoch"],
            "surrogate": cell.model.surrogate, "recipe": cell.model.recipe,
            "attack": cell.attack, "norm": cell.norm, "eps": cell.eps, "alpha": config["alpha"],
            "steps": config["steps"], "restarts": cell.restarts, "seed": cell.seed, "data": cell.data,
            "split": cell.split, "limit": cell.limit, "task_letter": _letter(task), **row,
            "marginal_vuln": extra.get("delta", math.nan), "theorem4_bound": extra.get("theorem4_bound", math.nan),
        }
        if gradients:
            out["grad_variance"] = gradients["variance"][task]
            for other in names:
                if other != task:
                    i, j = sorted((names.index(task), names.index(other)))
                    pair = f"{_letter(names[i])}|{_letter(names[j])}"
                    out[f"grad_cosine_{_letter(other)}"] = gradients["cosine"][pair]
                    out[f"grad_covariance_{_letter(other)}"] = gradients["covariance"][pair]
            out["theorem2_factor"] = gradients["theorem2_factor"]
        # the attack's declared sweep settings: the value it used, as text; and the ones set away from their
        # defaults, as one label that tells two configurations of one attack apart
        out.update({name: "" if config.get(name) is None else format_value(config[name]) for name in cell.options})
        out["attack_options"] = config["attack_options"]
        ensemble = (summary.get("ensemble") or {}).get(row["attacked"])
        if ensemble is not None:  # the dense ensemble: per-sample worst case over its members, and who won most
            wins = ensemble["wins"][task]
            out.update(ensemble_worst_error=ensemble["worst_error"][task], ensemble_winner=max(wins, key=wins.get))
        out.update(version=mtrobust_fast.__version__, seconds=seconds, device=config["device"])
        table.append(out)
    return table


def run_cell(settings, device="auto", record_steps=False):
    """Attack one cell (given as :meth:`Cell.settings`, so a Ray task can take it) and return ``{"rows",
    "curves", "per_sample"}``; curves are the per-step mean losses ``{set: {task: [...]}}`` when
    ``record_steps``; per_sample is each image's values (a DataFrame, :mod:`mtrobust_fast.analysis.per_sample`)
    when the cell asks for them, else None."""
    cell = cell_from_settings(settings)
    start = time.perf_counter()
    try:
        config, summary = evaluate_checkpoint(
            cell.model.checkpoint, cell.data, attack=cell.attack, norm=cell.norm, eps=cell.eps, alpha=cell.alpha,
            steps=cell.steps, restarts=cell.restarts, sets=list(cell.sets), split=cell.split, size=cell.size,
            batch_size=cell.batch_size, limit=cell.limit, seed=cell.seed, deterministic=cell.deterministic,
            gradients=cell.gradients, device=device, record_steps=record_steps,
            surrogate=cell.model.surrogate or None, options=cell.options, intervals=True,
            per_sample=cell.per_sample)
    except SettingError as error:
        raise SettingError(error.setting, f"{error.reason} (cell {cell.cell_id}: model {cell.model.name}, "
                                          f"{cell.attack} {cell.norm} eps={cell.eps:.4g} steps={cell.steps})",
                           error.value) from error
    seconds = round(time.perf_counter() - start, 3)
    images = per_sample.table(summary).assign(cell_id=cell.cell_id) if cell.per_sample else None
    return {"rows": rows(cell, config, summary, seconds), "curves": summary.get("step_losses", {}),
            "per_sample": images}
