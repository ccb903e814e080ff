"""Δp, the multi-task summary number of LibMTL-style papers: how much better a model is than a baseline (usually
the single-task models), in percent, averaged first over each task's metrics and then over tasks.

For every metric m of task t with baseline value B and new value N, the relative change (N − B) / B counts as an
improvement when the metric is higher-is-better and (B − N) / B when it is lower-is-better; Δp is 100 times the
mean over tasks of the mean over that task's metrics. Positive: better than the baseline.
"""
import math


def defined(new, base):
    """Whether a relative change from ``base`` to ``new`` exists (finite values, non-zero baseline)."""
    return base != 0 and math.isfinite(base) and math.isfinite(new)


def delta_p(scores, baseline, higher_is_better, skip_undefined=False):
    """Δp in percent. ``scores`` and ``baseline``: ``{task: {metric: value}}``; ``higher_is_better``: ``{task:
    {metric: bool}}``. Every metric of ``higher_is_better`` must be in both results, with a non-zero baseline;
    with ``skip_undefined``, a metric whose relative change does not exist (a baseline of 0, e.g. no pixel within
    11.25°) is left out of its task's mean instead, and a task with none left out of the mean over tasks."""
    if not higher_is_better:
        raise ValueError("higher_is_better: no task given")
    per_task = []
    for task, directions in higher_is_better.items():
        if not directions:
            raise ValueError(f"higher_is_better: task {task!r} has no metric")
        changes = []
        for metric, higher in directions.items():
            try:
                new, base = float(scores[task][metric]), float(baseline[task][metric])
            except KeyError:
                raise ValueError(f"{task} {metric}: missing from the scores or the baseline") from None
            if not defined(new, base):
                if skip_undefined:
                    continue
                raise ValueError(f"{task} {metric}: needs finite values and a non-zero baseline, got {new} vs {base}")
            changes.append((new - base) / base if higher else (base - new) / base)
        if changes:
            per_task.append(sum(changes) / len(changes))
    if not per_task:
        raise ValueError("no metric has a relative change (every baseline is 0 or not finite)")
    return 100.0 * sum(per_task) / len(per_task)


def checkpoint_scores(payload):
    """``({task: {metric: value}}, {task: {metric: higher is better}})``: the validation scores a training
    checkpoint (its ``meta["metrics"]``) was saved with, and their directions from its task records."""
    from mtrobust_fast import tasks as task_registry
    from mtrobust_fast.tasks.classification import task_from_config

    config, metrics = payload["config"], (payload.get("meta") or {}).get("metrics")
    if not isinstance(metrics, dict) or not isinstance(metrics.get("val", {}).get("tasks"), dict):
        raise ValueError("the checkpoint holds no validation scores (meta metrics); use one written by `train`")
    heads = config.get("heads", {})
    directions = {}
    for name in metrics["val"]["tasks"]:
        record = task_from_config(name, heads[name]) if name in heads else task_registry.get_task(name)
        directions[name] = dict(record.higher_is_better)
    scores = {name: {m: v for m, v in values.items() if m in directions[name]}
              for name, values in metrics["val"]["tasks"].items()}
    return scores, directions
