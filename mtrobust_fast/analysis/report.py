"""The AAAI'22 figures of a sweep's results table as PNGs, and a
``summary.md`` that shows them with their numbers.

- Main × auxiliary heatmaps of the main task's relative vulnerability (Tables 1–2 layout: row = main task m,
  column = auxiliary a, cell = m on the model {m, a}, diagonal = the one-task model {m}); one figure per
  attack configuration, with panels single-task attack (only m attacked) / multi-task attack (m and a attacked)
  × the task weights of the models (uniform, zamir).
- Adversarial vulnerability of the joint loss vs the number of attacked tasks (Figure 1), for models attacked
  on sets of several sizes: one line per model through the mean over the sets of each size, every set a dot.
- Boxplots of the metric by architecture, training epochs, ε, norm, steps, attack strategy and model task
  weighting, each with paired Wilcoxon signed-rank tests and effect sizes, and difference heatmaps of the
  Weighted and Cyclic attack strategies against vanilla PGD (:mod:`mtrobust_fast.analysis.paired_analysis`).
- Surrogate vs full-cost scatter with Pearson/Spearman (Table 3), from ``mtrobust-fast select --out``.

A figure whose data the table lacks is skipped with a note in the summary, so partial sweeps still report.
"""
import math
import re
import textwrap
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mtrobust_fast import task_names  # noqa: E402
from mtrobust_fast.analysis import paired_analysis, results_table, selection  # noqa: E402

REQUIRED = ("model_tasks", "attacked", "task")
# Axis and title names of the table's columns (a column without one is shown as it is).
LABELS = {"rel_vuln": "relative vulnerability", "rel_vuln_ratio_of_means": "relative vulnerability (ratio of means)",
          "adv_vuln": "adversarial vulnerability", "joint_adv_vuln": "joint adversarial vulnerability",
          "clean_error": "clean per-image error", "adv_error": "adversarial per-image error",
          "clean_loss": "clean loss", "adv_loss": "adversarial loss", "full": "full-cost relative vulnerability"}


def label(column):
    """The human name of a results-table column."""
    return LABELS.get(column, column.replace("_", " "))


def spread(xs, ys, step=8):
    """Vertical text offsets in points for labels at (xs, ys): a label closer than 4 % of both axes' ranges to
    labels placed before it (in order of x, then y) is pushed up by ``step`` points per such neighbour, so
    labels of nearby points do not print over one another."""
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)

    def closeness(values):
        finite = values[np.isfinite(values)]
        return max((finite.max() - finite.min()) * 0.04 if finite.size else 0.0, 1e-12)

    near_x, near_y = closeness(xs), closeness(ys)
    offsets = np.full(len(xs), 2.0)
    order = np.lexsort((ys, xs))
    for k, current in enumerate(order):
        earlier = order[:k]
        crowd = (np.abs(xs[earlier] - xs[current]) < near_x) & (np.abs(ys[earlier] - ys[current]) < near_y)
        offsets[current] = 2.0 + step * int(crowd.sum())
    return offsets


def _ordered(values):
    order = task_names.CANONICAL_ORDER
    return sorted(set(values), key=lambda v: (order.index(v) if v in order else len(order), v))


def _slug(text):
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_") or "all"


def _groups(table, keys):
    """(label, sub-table) per distinct value of ``keys``; with no keys, the whole table, labelled by its attack."""
    if not keys:
        fixed = {k: v for k, v in results_table.fixed_settings(table).items() if k in ("attack", "norm", "eps")}
        return [(results_table.config_label(list(fixed), list(fixed.values())) or "all", table)]
    return [(results_table.config_label(keys, values if isinstance(values, tuple) else (values,)), group)
            for values, group in table.groupby(keys if len(keys) > 1 else keys[0], dropna=False, sort=True)]


DEFINITIONS = ("Definitions: `rel_vuln` is the mean over images of each image's relative change of error, (adv − "
               "clean) / clean, images with clean error 0 left out (for a 0/1 classification error only wrong images "
               "remain and it is always 0: read accuracy); `rel_vuln_ratio_of_means` is (mean adv − mean clean "
               "error) / mean clean error over the dataset; `adv_vuln` the mean over images of |adv − clean loss|; "
               "`joint_adv_vuln` the same for the attacked set's weighted joint loss.")


def _collapsed_lines(table):
    """A warning naming the models whose heads look collapsed (their outputs do not depend on the input, so they
    look robust without being so); nothing when none does or the table predates the check."""
    if "collapsed" not in table.columns:
        return []
    found = table[table["collapsed"].fillna("").astype(str) != ""]
    if found.empty:
        return []
    model = "model" if "model" in found.columns else "model_tasks"
    pairs = found.drop_duplicates(subset=[model, "task"])
    return ["**Warning: collapsed heads** (outputs that do not depend on the input: their adversarial error equals "
            "the clean one, which is no robustness): " + "; ".join(
                f"{row[model]} {row['task']} ({row['collapsed']})" for _, row in pairs.iterrows()) + ".", ""]


def _model_count(table):
    """How many models the table holds, and over what a cell averages when several share one (the seeds of one
    recipe; models of different recipes are kept apart by the ``recipe`` column)."""
    if "model" not in table.columns:
        return f"{table['model_tasks'].nunique()} task sets of models"
    keys = [c for c in ("recipe", "task_weights", "model_tasks") if c in table.columns]
    per_kind = table.groupby(keys, dropna=False)["model"].nunique()
    text = f"{table['model'].nunique()} models of {len(per_kind)} kinds (task set" + \
        (", recipe" if "recipe" in keys else "") + ")"
    if per_kind.max() > 1:
        text += f"; cells average the {int(per_kind.max())} models of a kind (seeds) where there are several"
    return text


def _fmt(value):
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"


def _cell_text(pair):
    """A Table-1 cell: the value with its 95 % interval over images ("0.42 [0.35, 0.5]") when it comes from one
    row, with the spread of its rows ("0.42 (0.4–0.45, 3 rows)") when it is their mean (e.g. seeds)."""
    if pair is None:
        return "-"
    value = _fmt(pair["value"])
    if pair["rows"] > 1:
        return f"{value} ({_fmt(pair['min'])}–{_fmt(pair['max'])}, mean of {int(pair['rows'])} rows)"
    if np.isfinite(pair["low"]) and np.isfinite(pair["high"]):
        return f"{value} [{_fmt(pair['low'])}, {_fmt(pair['high'])}]"
    return value


def _markdown_matrix(cell, mains, auxes):
    """The Markdown table of one panel: a row per main task, a column per auxiliary task."""
    by_pair = {(row["main"], row["aux"]): row for _, row in cell.iterrows()}
    lines = ["| main \\ aux | " + " | ".join(auxes) + " |", "|---" * (len(auxes) + 1) + "|"]
    lines += [f"| {main} | " + " | ".join(_cell_text(by_pair.get((main, aux))) for aux in auxes) + " |"
              for main in mains]
    return lines


def _row_scaled(values):
    """Each row min–max scaled to [0, 1]: main tasks' errors have unrelated scales, so colour compares
    auxiliaries of one main task, as the paper's tables are read. A row with fewer than two distinct values has
    no scale: it is NaN (drawn grey, with its values printed), never a colour that looks like a comparison."""
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN row (a main task missing from this panel)
        low, high = np.nanmin(values, axis=1, keepdims=True), np.nanmax(values, axis=1, keepdims=True)
        span = high - low
        return np.where(span > 0, (values - low) / np.where(span > 0, span, 1), np.nan)


def _draw_matrix(ax, matrix, title):
    values = matrix.to_numpy(dtype=float)
    scaled = _row_scaled(values) if np.isfinite(values).any() else values
    colours = matplotlib.colormaps["viridis_r"].with_extremes(bad="lightgrey")
    ax.imshow(np.ma.masked_invalid(scaled), cmap=colours, vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(matrix.columns)), matrix.columns)
    ax.set_yticks(range(len(matrix.index)), matrix.index)
    ax.set_xlabel("auxiliary task")
    ax.set_ylabel("main task")
    ax.set_title(title, fontsize=9)
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=7,
                    color="white" if np.isfinite(scaled[i, j]) and scaled[i, j] > 0.5 else "black")


def heatmaps(table, out, metric, dpi):
    """Tables 1–2: (markdown lines, figure paths)."""
    if metric not in table.columns:
        return [f"_Skipped: the table has no `{metric}` column._"], []
    pairs = {kind: results_table.pair_values(table, metric, kind) for kind in ("single", "multi")}
    if pairs["single"].empty and pairs["multi"].empty:
        return ["_Skipped: no rows of one- or two-task models evaluated on an attacked main task._"], []
    keys = [k for k in results_table.config_columns(table) if k != "task_weights"]
    lines, paths = [], []
    both = pd.concat([pairs["single"].assign(kind="single"), pairs["multi"].assign(kind="multi")])
    both["weights"] = (both["task_weights"].fillna("").astype(str).replace("", "unknown")
                       if "task_weights" in both.columns else "unrecorded")
    label_of_metric = label(metric)
    for config, group in _groups(both, keys):
        weights = list(dict.fromkeys(group["weights"]))
        kinds = [k for k in ("single", "multi") if (group["kind"] == k).any()]
        mains, auxes = _ordered(group["main"]), _ordered(group["aux"])
        fig, axes = plt.subplots(len(kinds), len(weights), squeeze=False,
                                 figsize=(1.2 + 0.55 * len(auxes) * len(weights) + 1.2 * len(weights),
                                          0.8 + (0.5 * len(mains) + 1.0) * len(kinds)))
        lines += [f"### {config}", ""]
        for r, kind in enumerate(kinds):
            for c, weight in enumerate(weights):
                cell = group[(group["kind"] == kind) & (group["weights"] == weight)]
                matrix = (cell.pivot_table(index="main", columns="aux", values="value", aggfunc="mean")
                          .reindex(index=mains, columns=auxes))
                paired = matrix.notna().sum(axis=1) > 1  # a row with one value (a task that is only ever an
                if paired.any():                          # auxiliary here) has no colour scale: not drawn
                    matrix = matrix[paired]
                title = f"{kind}-task attack, {weight} weights"
                _draw_matrix(axes[r][c], matrix, title)
                lines += [f"{title}:", ""] + _markdown_matrix(cell, mains, auxes) + [""]
        width = fig.get_size_inches()[0]
        fig.suptitle(textwrap.fill(f"{label_of_metric} of the main task — {config} (colour: per-row min–max, "
                                   f"darker = more vulnerable; grey: no value or one value in its row; rows "
                                   f"with a single value are in the table below, not drawn)",
                                   max(30, int(width * 10))), fontsize=9)
        fig.tight_layout()
        path = out / f"heatmap_{_slug(config)}.png"
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        paths.append(path)
        lines += [f"![{label_of_metric} heatmap, {config}]({path.name})", ""]
    return lines, paths


def vulnerability_vs_tasks(table, out, dpi):
    """Figure 1: (markdown lines, figure paths)."""
    if "joint_adv_vuln" not in table.columns:
        return ["_Skipped: the table has no `joint_adv_vuln` column._"], []
    model = "model" if "model" in table.columns else "model_tasks"
    sets = table.dropna(subset=["joint_adv_vuln"]).drop_duplicates(
        subset=results_table.config_columns(table) + [model, "attacked"])
    sets = sets.assign(size=sets["attacked"].map(_set_size))
    sizes = sets.groupby(results_table.config_columns(table) + [model], dropna=False)["size"].transform("nunique")
    sets = sets[sizes > 1]
    if sets.empty:
        return ["_Skipped: no model is attacked on sets of more than one size._"], []
    lines, paths = [], []
    for config, group in _groups(sets, results_table.config_columns(sets)):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, runs in group.groupby(model, sort=True):
            mean = runs.groupby("size")["joint_adv_vuln"].mean()
            line, = ax.plot(mean.index, mean.to_numpy(), marker="o", label=f"{name}")
            ax.scatter(runs["size"], runs["joint_adv_vuln"], color=line.get_color(), alpha=0.4, s=12)
            if {"joint_adv_vuln_low", "joint_adv_vuln_high"} <= set(runs.columns):  # 95 % intervals over images
                ax.errorbar(runs["size"], runs["joint_adv_vuln"], fmt="none", ecolor=line.get_color(), alpha=0.4,
                            capsize=2, yerr=[runs["joint_adv_vuln"] - runs["joint_adv_vuln_low"],
                                             runs["joint_adv_vuln_high"] - runs["joint_adv_vuln"]])
            if len(runs) <= 32:
                for (_, row), dy in zip(runs.iterrows(), spread(runs["size"], runs["joint_adv_vuln"])):
                    ax.annotate(row["attacked"], (row["size"], row["joint_adv_vuln"]), fontsize=6,
                                xytext=(3, dy), textcoords="offset points")
        ax.set_xlabel("number of attacked tasks")
        ax.set_ylabel(f"{label('joint_adv_vuln')} E|ΔL|")
        ax.set_xticks(sorted(group["size"].unique()))
        ax.set_title(textwrap.fill(config, 70), fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"vuln_vs_tasks_{_slug(config)}.png"
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        paths.append(path)
        lines += [f"### {config}", "", f"![vulnerability vs number of attacked tasks, {config}]({path.name})", ""]
    return lines, paths


def _set_size(label):
    """Number of tasks in an attacked-set label: letters ("sd") or names joined with "+"."""
    return len(label.split("+")) if "+" in label else len(label)


def _selection_pairs(path):
    path = path / "pairs.csv" if path.is_dir() else path
    if not path.is_file():
        raise results_table.TableError(f"selection results {path} do not exist (run `mtrobust-fast select --out`)")
    pairs = pd.read_csv(path)
    missing = [c for c in ("main", "aux", "full") if c not in pairs.columns]
    if missing:
        raise results_table.TableError(f"selection results {path} lack column(s) {', '.join(missing)}")
    return pairs


def surrogate_scatter(pairs, out, dpi):
    """Table 3: (markdown lines, figure paths)."""
    surrogates = [c for c in pairs.columns if c not in ("main", "aux", "full") and not c.endswith("_rank")]
    if not surrogates:
        return ["_Skipped: the selection results hold no surrogate column._"], []
    fig, axes = plt.subplots(1, len(surrogates), squeeze=False, figsize=(4.2 * len(surrogates), 3.8))
    lines = ["| surrogate | n | Pearson r | p | Spearman ρ | p | note |", "|---|---|---|---|---|---|---|"]
    for ax, name in zip(axes[0], surrogates):
        data = pairs.dropna(subset=[name, "full"])
        result = selection.correlate(data[name], data["full"])
        for main, points in data.groupby("main", sort=False):
            ax.scatter(points[name], points["full"], label=f"main {main}")
        for (_, row), dy in zip(data.iterrows(), spread(data[name].round(12), data["full"])):
            model = row["main"] if row["aux"] == row["main"] else f"{row['main']}+{row['aux']}"
            ax.annotate(model, (row[name], row["full"]), fontsize=7, xytext=(3, dy), textcoords="offset points")
        ax.legend(fontsize=7)
        ax.set_xlabel(f"surrogate: {label(name)}")
        ax.set_ylabel(label("full"))
        ax.set_title(f"r={_fmt(result['pearson_r'])} (p={_fmt(result['pearson_p'])}), "
                     f"ρ={_fmt(result['spearman_rho'])}", fontsize=9)
        lines.append(f"| {name} | {result['n']} | {_fmt(result['pearson_r'])} | {_fmt(result['pearson_p'])} | "
                     f"{_fmt(result['spearman_rho'])} | {_fmt(result['spearman_p'])} | {result['note']} |")
    fig.tight_layout()
    path = out / "surrogate_scatter.png"
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return lines + ["", f"![surrogate vs full cost]({path.name})", ""], [path]


def cost_table(table):
    """Markdown lines: per attack configuration, what its runs spent (the ``cost_*`` columns every row of a run
    carries): forward and backward passes per attacked row (mean over runs), rows that left early and steps saved
    by early exit, and the seconds spent attacking (summed over runs). One run = one sweep cell (``cell_id``), or
    the whole table when it has no cells. Empty when the table has no cost columns (results from before they
    existed)."""
    if "cost_backward_per_row" not in table.columns:
        return []
    keys = results_table.config_columns(table)
    runs = table.drop_duplicates("cell_id") if "cell_id" in table.columns else table.iloc[:1]
    lines = ["| configuration | runs | forward / row | backward / row | rows left early | steps saved | seconds |",
             "|---|---|---|---|---|---|---|"]
    for name, group in _groups(runs, keys):
        lines.append(f"| {name} | {len(group)} | "
                     f"{group['cost_forward_per_row'].mean():.1f} | {group['cost_backward_per_row'].mean():.1f} | "
                     f"{int(group['cost_rows_exited'].sum())} | {int(group['cost_steps_saved'].sum())} | "
                     f"{group['cost_seconds'].sum():.1f} |")
    return lines + [""]


def build(results, out, metric="rel_vuln", selection_path=None, dpi=120):
    """Write the figures and ``summary.md`` into ``out``; returns the paths written (summary last)."""
    table = results_table.read(results, REQUIRED)
    if metric not in table.columns or not pd.api.types.is_numeric_dtype(table[metric]):
        numeric = [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c]) and "vuln" in c]
        raise results_table.TableError(f"metric: {metric!r} is not a numeric column of {results}; vulnerability "
                                       f"columns there: {', '.join(numeric) or 'none'}")
    pairs = _selection_pairs(selection_path) if selection_path is not None else None
    out.mkdir(parents=True, exist_ok=True)
    configs = results_table.config_columns(table)
    fixed = results_table.fixed_settings(table)
    lines = [f"# Robustness report: `{results.name}`", "",
             f"{len(table)} rows, {_model_count(table)}"
             + (f", configurations by {', '.join(configs)}" if configs else "") + ".", ""]
    if fixed:
        lines += ["Fixed settings: " + results_table.config_label(list(fixed), list(fixed.values())) + ".", ""]
    lines += _collapsed_lines(table)
    written = []
    lines += [f"## Relative vulnerability of the main task (`{metric}`), main × auxiliary (Tables 1–2)", "",
              "Row = main task m (evaluated), column = auxiliary a: m on the model {m, a}; diagonal: the one-task "
              "model {m}. Single-task attack: only m attacked; multi-task: every task of the model. "
              "Lower is more robust; cell colours are scaled per row (per main task).", "",
              DEFINITIONS, ""]
    section, paths = heatmaps(table, out, metric, dpi)
    lines += section + [""]
    written += paths
    lines += ["## Adversarial vulnerability vs number of attacked tasks (Figure 1)", ""]
    section, paths = vulnerability_vs_tasks(table, out, dpi)
    lines += section + [""]
    written += paths
    lines += [f"## What changes the relative vulnerability (`{metric}`): paired comparisons", "",
              paired_analysis.__doc__.split("\n\n")[1].replace("\n", " "), ""]
    section, paths = paired_analysis.analyses(table, metric, out, dpi)
    lines += section + [""]
    written += paths
    section = cost_table(table)
    if section:
        lines += ["## What the attacks spent", "", "Passes through the model per attacked row (an image once per "
                  "attacked set); rows that left early and the steps they saved (exact early exit, success "
                  "stops); wall time spent attacking.", ""] + section
    lines += ["## Surrogates vs full cost (Table 3)", ""]
    if pairs is None:
        lines += ["_Skipped: no `--selection` results given (see `mtrobust-fast select`)._", ""]
    else:
        section, paths = surrogate_scatter(pairs, out, dpi)
        lines += section
        written += paths
    summary = out / "summary.md"
    summary.write_text("\n".join(lines).rstrip() + "\n")
    return written + [summary]
