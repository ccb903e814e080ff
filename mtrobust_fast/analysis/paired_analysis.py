"""The AAAI'22 study's analyses of a results table: how one factor (architecture, training epochs, ε, norm, steps,
attack strategy, task weighting of the models) changes the relative vulnerability, as boxplots with a paired
Wilcoxon signed-rank test, and difference heatmaps of the attack strategies.

Pairing: a *unit* is one (model task set, task weights, attacked set, evaluated task) under every setting but
the factor (the step size ``alpha`` is left out of the key, since it follows ε and the steps by default); a unit
measured at two levels of the factor is one pair. Rows of one unit and level (several seeds or models) are
averaged first. Each level is compared with the first (reference) level by ``scipy.stats.wilcoxon`` on the
paired differences (two-sided; zero differences dropped, scipy's default). The effect size is the matched-pairs
rank-biserial correlation r = (W+ − W−)/(W+ + W−) from the signed ranks of the non-zero differences: +1 when every
unit is more vulnerable at the level than at the reference, −1 when every unit is less.
"""
import math
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

from mtrobust_fast.analysis import results_table  # noqa: E402

# Factor column -> its name in figures. "model_weights" is derived from task_weights (uniform vs weighted).
FACTORS = {"encoder": "architecture", "checkpoint_epoch": "training epochs", "eps": "ε", "norm": "norm",
           "steps": "attack steps", "attack": "attack strategy", "task_weights": "task weighting of the model"}
UNIT_COLUMNS = ("model_tasks", "task_weights", "attacked", "task")
REFERENCE = {"attack": "pgd", "task_weights": "uniform", "norm": "linf"}  # compared with, when present
MIN_PAIRS = 6  # with 5 pairs or fewer, no two-sided exact p-value can fall below 0.0625
# The AAAI'22 names of the attack strategies, for the difference heatmaps (reference: vanilla PGD).
STRATEGIES = {"pgd": "Vanilla", "wgd": "Weighted", "cyclic_step": "Cyclic (step)", "cyclic_batch": "Cyclic (batch)"}


def wilcoxon(reference, other):
    """The paired test of ``other`` against ``reference`` (equal-length sequences): a dict with ``n`` (pairs),
    ``nonzero``, ``statistic`` and ``p`` (scipy's two-sided Wilcoxon signed-rank test), ``effect`` (matched-pairs
    rank-biserial correlation), ``median_difference`` (other − reference) and ``note`` (a caution for few pairs,
    ties or zero differences; the p-value is then NaN when it cannot mean anything)."""
    a, b = np.asarray(reference, dtype=float), np.asarray(other, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"reference and other must be equal-length 1-D sequences, got {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    difference = b[keep] - a[keep]
    nonzero = difference[difference != 0]
    result = {"n": int(keep.sum()), "nonzero": int(nonzero.size), "statistic": math.nan, "p": math.nan,
              "effect": math.nan, "median_difference": float(np.median(difference)) if difference.size else math.nan,
              "note": ""}
    if nonzero.size:
        ranks = stats.rankdata(np.abs(nonzero))
        plus, minus = ranks[nonzero > 0].sum(), ranks[nonzero < 0].sum()
        result["effect"] = float((plus - minus) / (plus + minus))
    if nonzero.size < MIN_PAIRS:
        result["note"] = (f"caution: {nonzero.size} non-zero paired difference(s); a signed-rank test needs at least "
                          f"{MIN_PAIRS} to reach p < 0.05, so no p-value is given")
        return result
    test = stats.wilcoxon(difference)
    result.update(statistic=float(test.statistic), p=float(test.pvalue))
    cautions = []
    if nonzero.size < difference.size:
        cautions.append(f"{difference.size - nonzero.size} zero difference(s) dropped")
    if np.unique(np.abs(nonzero)).size < nonzero.size:
        cautions.append("tied differences: p from the normal approximation")
    if cautions:
        result["note"] = "caution: " + "; ".join(cautions)
    return result


def paired_units(table, factor, metric="rel_vuln"):
    """``metric`` per unit (rows) and level of ``factor`` (columns), units averaged over repeated rows; only
    units seen at two or more levels. Levels are sorted (numbers numerically), the factor's usual reference
    (vanilla PGD, uniform weights, L∞) first."""
    keys = [c for c in dict.fromkeys(UNIT_COLUMNS + results_table.CONFIG_COLUMNS)
            if c in table.columns and c not in (factor, "alpha")]
    rows = table.dropna(subset=[metric, factor])
    if factor == "task_weights" and "main" in rows.columns:
        # a weighted model favours its main task: only that task is compared with the uniform model's
        weighted = ~rows["task_weights"].astype(str).isin(("", "uniform"))
        rows = rows[~weighted | (rows["main"].astype(str) == rows["task"].astype(str))]
    if rows.empty:
        return pd.DataFrame()
    filled = rows.assign(**{k: rows[k].astype(str) for k in keys})  # NaN settings pair with NaN settings
    matrix = filled.pivot_table(index=keys, columns=factor, values=metric, aggfunc="mean")
    matrix = matrix[matrix.notna().sum(axis=1) >= 2]
    reference = REFERENCE.get(factor)
    return matrix.reindex(columns=sorted(matrix.columns, key=lambda v: (v != reference, _level_key(v))))


def _level_key(value):
    return (0, float(value), "") if isinstance(value, (int, float, np.number)) else (1, 0.0, str(value))


def _level_label(factor, value):
    if factor == "eps" and isinstance(value, (float, np.floating)):
        return f"{value * 255:.3g}/255"
    return str(value)


def factor_figure(table, factor, metric, out, dpi):
    """Boxplot of ``metric`` per level of ``factor`` over the paired units, with each level's Wilcoxon test against
    the first level: (markdown lines, paths)."""
    name = FACTORS.get(factor, factor)
    if factor not in table.columns or table[factor].nunique() < 2:
        return [f"_Skipped: the table has fewer than two values of `{factor}`._"], []
    units = paired_units(table, factor, metric)
    if units.empty:
        return [f"_Skipped: no unit (model tasks, attacked set, task, other settings) is measured at two values "
                f"of `{factor}`._"], []
    levels = list(units.columns)
    reference = levels[0]
    lines = [f"Units: {len(units)} (each a model task set × attacked set × evaluated task under one setting of "
             f"everything else); reference: {_level_label(factor, reference)}.", "",
             f"| {name} | units | median | median diff. vs ref. | Wilcoxon W | p | effect r | note |",
             "|---|---|---|---|---|---|---|---|"]
    for level in levels:
        column = units[level].dropna()
        if level == reference:
            lines.append(f"| {_level_label(factor, level)} | {len(column)} | {_fmt(column.median())} | "
                         f"(reference) | | | | |")
            continue
        both = units[[reference, level]].dropna()
        test = wilcoxon(both[reference], both[level])
        lines.append(f"| {_level_label(factor, level)} | {len(column)} | {_fmt(column.median())} | "
                     f"{_fmt(test['median_difference'])} | {_fmt(test['statistic'])} | {_fmt(test['p'])} | "
                     f"{_fmt(test['effect'])} | {test['note']} |")
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(levels), 3.8))
    data = [units[level].dropna().to_numpy() for level in levels]
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(levels) + 1), [_level_label(factor, level) for level in levels])
    for i, values in enumerate(data, start=1):
        jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(1)
        ax.scatter(i + jitter, values, s=8, alpha=0.5, color="tab:blue")
    ax.set_xlabel(name)
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(textwrap.fill(f"{metric.replace('_', ' ')} by {name} ({len(units)} paired units)", 50), fontsize=9)
    fig.tight_layout()
    path = out / f"factor_{factor}.png"
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return lines + ["", f"![{metric} by {name}]({path.name})", ""], [path]


def strategy_differences(table, metric, out, dpi):
    """Main × auxiliary heatmaps of ``metric`` under each attack strategy minus vanilla PGD, multi-task attack
    (every task of the model attacked), one shared symmetric colour scale: (markdown lines, paths)."""
    if "attack" not in table.columns or "pgd" not in set(table["attack"]):
        return ["_Skipped: the table has no `pgd` (vanilla) rows to compare the strategies with._"], []
    others = [a for a in STRATEGIES if a != "pgd" and a in set(table["attack"])]
    if not others:
        return ["_Skipped: the table has no wgd, cyclic_step or cyclic_batch rows._"], []
    keys = [c for c in results_table.config_columns(table, varying=False) if c not in ("attack", "alpha")]
    pairs = results_table.pair_values(table, metric, "multi")
    if pairs.empty:
        return ["_Skipped: no one- or two-task model attacked on all its tasks._"], []
    pairs = pairs.assign(**{k: pairs[k].astype(str) for k in keys})
    def values(attack):
        return pairs[pairs["attack"] == attack].groupby(keys + ["main", "aux"])["value"].mean()

    base = values("pgd")
    differences = {}
    for attack in others:
        mine = values(attack)
        joined = (mine - base).dropna()
        if not joined.empty:
            differences[attack] = joined.groupby(["main", "aux"]).mean().unstack("aux")
    if not differences:
        return ["_Skipped: no model is attacked by both pgd and another strategy under the same settings._"], []
    mains = sorted({m for d in differences.values() for m in d.index}, key=_task_order)
    auxes = sorted({a for d in differences.values() for a in d.columns}, key=_task_order)
    limit = max(float(np.nanmax(np.abs(d.to_numpy(dtype=float)))) for d in differences.values()) or 1.0
    fig, axes = plt.subplots(1, len(differences), squeeze=False, layout="constrained",
                             figsize=(1.5 + (0.6 * len(auxes) + 1.2) * len(differences), 1.6 + 0.5 * len(mains)))
    lines = [f"Cell: main task m on the model {{m, a}} (diagonal: {{m}}), every task attacked; value = "
             f"{metric} under the strategy minus under vanilla PGD (red: the strategy hurts more). One colour scale "
             f"for all panels (±{limit:.3g}).", ""]
    image = None
    for ax, (attack, matrix) in zip(axes[0], differences.items()):
        matrix = matrix.reindex(index=mains, columns=auxes)
        values = matrix.to_numpy(dtype=float)
        image = ax.imshow(np.ma.masked_invalid(values), cmap=matplotlib.colormaps["RdBu_r"].with_extremes(
            bad="lightgrey"), vmin=-limit, vmax=limit, aspect="auto")
        ax.set_xticks(range(len(auxes)), auxes)
        ax.set_yticks(range(len(mains)), mains)
        ax.set_xlabel("auxiliary task")
        ax.set_ylabel("main task")
        ax.set_title(f"{STRATEGIES[attack]} − Vanilla", fontsize=9)
        for (i, j), value in np.ndenumerate(values):
            if np.isfinite(value):
                ax.text(j, i, f"{value:+.3g}", ha="center", va="center", fontsize=7,
                        color="white" if abs(value) > 0.6 * limit else "black")
        lines += [f"{STRATEGIES[attack]} ({attack}) − Vanilla (pgd):", "",
                  "| main \\ aux | " + " | ".join(auxes) + " |", "|---" * (len(auxes) + 1) + "|"]
        lines += [f"| {m} | " + " | ".join(_fmt(v, signed=True) for v in row) + " |"
                  for m, row in zip(mains, values)] + [""]
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    path = out / "strategy_differences.png"
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return lines + [f"![strategy differences]({path.name})", ""], [path]


def attacks_side_by_side(table, out, metric="adv_error", shown=60):
    """One column per attack of ``metric`` (default the adversarial per-image error: higher = stronger attack)
    per model task set × attacked set × task, the ensemble's per-sample worst case where the table has it, and
    the worst value over the columns; one table per setting of everything but the attack (step sizes and step
    counts may differ between attacks). Markdown (first ``shown`` rows) and ``attacks_side_by_side.csv``."""
    if "attack" not in table.columns or metric not in table.columns:
        return [f"_Skipped: the table has no `attack` or `{metric}` column._"], []
    has_worst = "ensemble_worst_error" in table.columns and table["ensemble_worst_error"].notna().any()
    if table["attack"].nunique() < 2 and not has_worst:
        return ["_Skipped: one attack only (and no ensemble worst case)._"], []
    keys = [c for c in results_table.config_columns(table) if c not in ("attack", "alpha", "steps", "restarts")]
    units = [c for c in ("model_tasks", "attacked", "task") if c in table.columns]
    filled = table.assign(**{k: table[k].astype(str) for k in keys})
    wide = filled.pivot_table(index=keys + units, columns="attack", values=metric, aggfunc="mean")
    wide.columns = [str(c) for c in wide.columns]
    if has_worst:
        worst = filled.dropna(subset=["ensemble_worst_error"]).groupby(keys + units)["ensemble_worst_error"].mean()
        wide["ensemble (worst case)"] = worst
    wide["worst over columns"] = wide.max(axis=1)
    wide = wide.reset_index()
    path = out / "attacks_side_by_side.csv"
    wide.to_csv(path, index=False)
    columns = [c for c in wide.columns if c not in keys]
    lines = [f"{metric.replace('_', ' ')} under each attack (higher: the attack hurts more); the ensemble's worst "
             f"case takes, per image, the worst of its members. All rows in `{path.name}`.", ""]
    for config, group in (wide.groupby(keys, sort=True) if keys else [("all", wide)]):
        label = " ".join(f"{k}={_short(v)}" for k, v in zip(keys, config if isinstance(config, tuple) else (config,)))
        if label:
            lines += [f"{label}:", ""]
        lines += ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
        lines += ["| " + " | ".join(_fmt(v) if isinstance(v, float) else str(v) for v in row) + " |"
                  for row in group[columns].head(shown).itertuples(index=False)]
        if len(group) > shown:
            lines.append(f"_({len(group) - shown} more rows in the CSV)_")
        lines.append("")
    return lines, [path]


def _short(text):
    """A setting read back as text, numbers shortened ("0.01568627..." -> "0.01569")."""
    try:
        return f"{float(text):.4g}"
    except ValueError:
        return text


def _task_order(letter):
    from mtrobust_fast.task_names import CANONICAL_ORDER
    return (CANONICAL_ORDER.index(letter) if letter in CANONICAL_ORDER else len(CANONICAL_ORDER), letter)


def _fmt(value, signed=False):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:+.3g}" if signed else f"{value:.3g}"


def analyses(table, metric, out, dpi):
    """Every factor boxplot, the strategy differences and the attacks side by side: (markdown lines, paths)."""
    lines, paths = [], []
    for factor, name in FACTORS.items():
        lines += [f"### By {name} (`{factor}`)", ""]
        section, written = factor_figure(table, factor, metric, out, dpi)
        lines += section + [""]
        paths += written
    lines += ["### Attack strategies: Weighted and Cyclic minus Vanilla", ""]
    section, written = strategy_differences(table, metric, out, dpi)
    lines += section
    paths += written
    lines += ["### Attacks side by side", ""]
    section, written = attacks_side_by_side(table, out)
    return lines + section, paths + written
