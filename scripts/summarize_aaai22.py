"""The tables and verdicts of ``scripts/reproduce_aaai22.sh``, from its sweeps' results and each image's values
(``per_sample: true``): Markdown in ``OUT/aaai22_tables.md``, printed too.

- Table 1 A / B: relative vulnerability of the main task (rows) with each auxiliary task (columns; the diagonal is
  the one-task model) under single-task PGD (only the main task attacked) and multi-task PGD (both), for the
  uniformly weighted models (A) and the models trained with Zamir et al.'s weights for that main task (B).
- Table 2: the same under the adaptive attacks, APGD and WGD.
- Table 3: Pearson correlation between the full models' vulnerability and two cheap proxies over (main,
  auxiliary) pairs: the same models trained for fewer epochs, and the full models' clean error.

Every vulnerability is the mean over validation images of the per-image relative change of the error (images with
zero clean error left out) with its 95 % bootstrap interval; every comparison in the verdicts pairs the same
images (paired permutation test); correlations carry Fisher's 95 % interval.

    python scripts/summarize_aaai22.py OUT
"""
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from mtrobust_fast import tasks as task_registry
from mtrobust_fast.analysis import statistics

ALPHA = 0.05


class Sweep:
    """One sweep folder: its table and each cell's per-image values, by (attack, model tasks, weighting)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.table = pd.read_parquet(self.folder / "results.parquet")
        self.cells = {}
        for cell_id, rows in self.table.groupby("cell_id"):
            row = rows.iloc[0]
            weighted = str(row["task_weights"]) not in ("", "uniform", "None", "nan")
            self.cells[(row["attack"], row["model_tasks"], row["main"] if weighted else "")] = cell_id

    def change(self, attack, tasks, weighted_for, attacked, main):
        """Per-image relative change of ``main``'s error when ``attacked`` is attacked (NaN: clean error 0)."""
        cell = self.cells.get((attack, tasks, weighted_for))
        if cell is None:
            return None
        frame = pd.read_parquet(self.folder / "per_sample" / f"{cell}.parquet")
        name = task_registry.get_task(main).name
        rows = frame[(frame.attacked == attacked) & (frame.task == name)].sort_values("image")
        clean, adv = rows["clean_error"].to_numpy(np.float64), rows["adv_error"].to_numpy(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(clean != 0, (adv - clean) / clean, np.nan)

    def clean_error(self, tasks, weighted_for, main):
        """The mean clean error of ``main`` of that model (read off its PGD cell)."""
        cell = self.cells.get(("pgd", tasks, weighted_for))
        rows = self.table[(self.table.cell_id == cell) & (self.table.task == task_registry.get_task(main).name)]
        return float(rows["clean_error"].iloc[0]) if len(rows) else float("nan")


def model_of(letters, main, aux):
    """The model's task letters in the sweep's order (``letters``: every task of the study)."""
    return "".join(t for t in letters if t in {main, aux})


def single_and_multi(sweep, attack, letters, main, aux, weighted):
    tasks = model_of(letters, main, aux)
    weighted_for = main if weighted and aux != main else ""
    single = sweep.change(attack, tasks, weighted_for, main, main)
    multi = None if aux == main else sweep.change(attack, tasks, weighted_for, tasks, main)
    return single, multi


def cell_text(values):
    return "-" if values is None else statistics.format_interval(*statistics.mean_interval(values))


def table(sweep, attack, letters, weighted, kind):
    """Markdown lines of one Table-1 panel: main task rows, auxiliary task columns."""
    lines = [f"| main \\ aux | " + " | ".join(letters) + " |", "|---" * (len(letters) + 1) + "|"]
    for main in letters:
        cells = []
        for aux in letters:
            single, multi = single_and_multi(sweep, attack, letters, main, aux, weighted and aux != main)
            cells.append(cell_text(single if kind == "single" or aux == main else multi))
        lines.append(f"| {main} | " + " | ".join(cells) + " |")
    return lines


def verdict(test, lower="lower", higher="higher"):
    if not test["p"] < ALPHA or not np.isfinite(test["difference"]):
        return "no significant change"
    return lower if test["difference"] < 0 else higher


def line(claim, label_a, label_b, test):
    return (f"- {claim}: {test['mean_a']:.3f} {label_a} vs {test['mean_b']:.3f} {label_b}, difference "
            f"{statistics.format_interval(test['difference'], test['low'], test['high'])} — {verdict(test)} "
            f"(paired permutation test over {test['pairs']} images, p = {test['p']:.3g})")


def verdicts(sweep, letters):
    lines = ["", "## Verdicts (relative vulnerability of the main task, lower is more robust; level 0.05)", ""]
    counts = {"RQ1": {"lower": 0, "higher": 0, "no significant change": 0},
              "RQ3-PGD": {"lower": 0, "higher": 0, "no significant change": 0}}
    for main in letters:
        alone = sweep.change("pgd", main, "", main, main)
        for aux in letters:
            if aux == main or alone is None:
                continue
            single, multi = single_and_multi(sweep, "pgd", letters, main, aux, weighted=False)
            for kind, values in (("single-task PGD", single), ("multi-task PGD", multi)):
                if values is not None:
                    test = statistics.paired_difference(values, alone)
                    counts["RQ1"][verdict(test)] += 1
                    lines.append(line(f"RQ1, adding {aux} to {main} ({kind})", f"with {aux}", "alone", test))
    for attack in ("pgd", "apgd", "wgd"):
        for main in letters:
            for aux in letters:
                if aux == main:
                    continue
                base, _ = single_and_multi(sweep, attack, letters, main, aux, weighted=False)
                weighted, _ = single_and_multi(sweep, attack, letters, main, aux, weighted=True)
                if base is None or weighted is None:
                    continue
                test = statistics.paired_difference(weighted, base)
                if attack == "pgd":
                    counts["RQ3-PGD"][verdict(test)] += 1
                lines.append(line(f"RQ3, Zamir weights for {main} in {{{main}, {aux}}} under {attack.upper()} "
                                  f"(single-task)", "weighted", "uniform", test))
    for attack in ("apgd", "wgd"):
        for main in letters:
            for aux in letters:
                for weighted in (False, True):
                    if weighted and aux == main:
                        continue
                    adaptive, _ = single_and_multi(sweep, attack, letters, main, aux, weighted)
                    pgd, _ = single_and_multi(sweep, "pgd", letters, main, aux, weighted)
                    if adaptive is None or pgd is None:
                        continue
                    model = model_of(letters, main, aux) + (f" weighted for {main}" if weighted else "")
                    test = statistics.paired_difference(adaptive, pgd)
                    lines.append(line(f"Table 2, {attack.upper()} vs PGD on {main} of {model}", attack.upper(),
                                      "PGD", test))
    summary = ["", "Summary: RQ1 (adding an auxiliary task, uniform weights, PGD): "
               + ", ".join(f"{n} {k}" for k, n in counts["RQ1"].items())
               + "; RQ3 (Zamir weights vs uniform, PGD): "
               + ", ".join(f"{n} {k}" for k, n in counts["RQ3-PGD"].items())]
    return lines + summary


def correlations(full, few, letters):
    """Table 3 over (main, auxiliary) pairs of the uniform models under single-task PGD."""
    truth, proxies = [], {"few epochs": [], "clean error": []}
    for main in letters:
        for aux in letters:
            values, _ = single_and_multi(full, "pgd", letters, main, aux, weighted=False)
            cheap, _ = single_and_multi(few, "pgd", letters, main, aux, weighted=False) if few else (None, None)
            if values is None:
                continue
            truth.append(np.nanmean(values))
            proxies["few epochs"].append(np.nanmean(cheap) if cheap is not None else np.nan)
            proxies["clean error"].append(full.clean_error(model_of(letters, main, aux), "", main))
    lines = ["", "## Table 3: proxies of the full models' vulnerability (Pearson over (main, aux) pairs, "
                 "the one-task models included)", "", "| proxy | pairs | Pearson r [95 % interval] | p |",
             "|---|---|---|---|"]
    for name, values in proxies.items():
        keep = np.isfinite(values) & np.isfinite(truth)
        if keep.sum() < 3:
            lines.append(f"| {name} | {int(keep.sum())} | - | - |")
            continue
        result = stats.pearsonr(np.asarray(values)[keep], np.asarray(truth)[keep])
        ci = result.confidence_interval()
        lines.append(f"| {name} | {int(keep.sum())} | {result.statistic:.2f} [{ci.low:.2f}, {ci.high:.2f}] | "
                     f"{result.pvalue:.3g} |")
    return lines


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "aaai22-repro")
    letters = sys.argv[2] if len(sys.argv) > 2 else "sdn"
    full = Sweep(out / "full")
    few = Sweep(out / "few_epochs") if (out / "few_epochs" / "results.parquet").is_file() else None
    images = int(full.table["samples"].iloc[0])
    lines = [f"# The AAAI'22 study in miniature: tasks {letters}, {images} validation images per cell", "",
             "Each cell: mean over images of the main task's per-image relative error change [95 % bootstrap "
             "interval]; rows: main task, columns: auxiliary task (diagonal: the one-task model)."]
    for attack, title in (("pgd", "Table 1"), ("apgd", "Table 2, APGD"), ("wgd", "Table 2, WGD")):
        for weighted, name in ((False, "A: uniform weights"), (True, "B: Zamir weights for the main task")):
            for kind in ("single", "multi"):
                lines += ["", f"## {title} {name}, {kind}-task {attack.upper()}", ""]
                lines += table(full, attack, letters, weighted, kind)
    lines += verdicts(full, letters)
    lines += correlations(full, few, letters)
    (out / "aaai22_tables.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'aaai22_tables.md'}")


if __name__ == "__main__":
    main()
