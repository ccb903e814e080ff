"""The table, verdicts and figure of ``scripts/reproduce_icml23.sh``, from each variant's per-image results in
``OUT/eval/<variant>/<attack>/per_sample.csv`` (``attack --per-sample``): Markdown + CSV + PNG in ``OUT``.

An image counts as robust when it is classified right under both PGD and APGD (the per-image worst case of the two
attacks). Every accuracy carries its 95 % percentile-bootstrap interval over test images; each variant is compared
with Madry AT on the same images by the exact McNemar test (images only one of the two gets right), and the run
ends with one verdict per claim of the study that the variants can test.

    python scripts/summarize_icml23.py OUT
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from mtrobust_fast.analysis import per_sample, statistics  # noqa: E402

ATTACKS = ("pgd", "apgd")
BASELINE = "madry"
# (treatment, reference, what the comparison tests)
CLAIMS = [(name, BASELINE, f"GAT with {name.split('_')[0]} (EW) vs Madry AT")
          for name in ("rotation_ew", "jigsaw_ew", "autoencoder_ew", "hog_ew", "depth_ew")] + [
    ("rotation_mgda", "rotation_ew", "MGDA vs EW weighting (rotation)"),
    ("rotation_mgda_houdini", "rotation_mgda", "curvature regulariser (Houdini, outputs) on vs off"),
    ("rotation_mgda_xi", "rotation_mgda", "curvature regulariser (exact gradient) on vs off")]


def correctness(out):
    """{variant: {"clean": bool array, "pgd": ..., "apgd": ..., "robust": ...}} per test image, and the settings."""
    found, settings = {}, {}
    for folder in sorted(p for p in (out / "eval").iterdir() if p.is_dir()):
        runs = {a: folder / a for a in ATTACKS if (folder / a / per_sample.FILE).is_file()}
        if len(runs) < len(ATTACKS):
            continue
        right = {}
        for attack, path in runs.items():
            table = per_sample.read(path).sort_values("image")
            right["clean"] = table["clean_error"].to_numpy() == 0
            right[attack] = table["adv_error"].to_numpy() == 0
            config = json.loads((path / "results.json").read_text())["config"]
            settings[attack] = f"{attack.upper()}-{config['steps']} {config['norm']} eps={config['eps']:.4g}"
        right["robust"] = right["pgd"] & right["apgd"]
        found[folder.name] = right
    return found, settings


def interval(values):
    return statistics.format_interval(*statistics.mean_interval(values.astype(float)))


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "icml23-repro")
    found, settings = correctness(out) if (out / "eval").is_dir() else ({}, {})
    if not found:
        raise SystemExit(f"no finished evaluations (per_sample.csv of {', '.join(ATTACKS)}) in {out / 'eval'}")
    images = len(next(iter(found.values()))["clean"])
    rows = []
    for name, right in found.items():
        row = {"variant": name, "images": len(right["clean"])}
        for key in ("clean", *ATTACKS, "robust"):
            mean, low, high = statistics.mean_interval(right[key].astype(float))
            row.update({f"{key}_accuracy": mean, f"{key}_low": low, f"{key}_high": high})
        if BASELINE in found and name != BASELINE:
            for key in ("clean", "robust"):
                test = statistics.mcnemar(right[key], found[BASELINE][key])
                row.update({f"{key}_only_variant": test["only_a"], f"{key}_only_madry": test["only_b"],
                            f"{key}_mcnemar_p": test["p"]})
        rows.append(row)
    table = pd.DataFrame(rows)
    table.to_csv(out / "icml23_table.csv", index=False)

    lines = [f"# GAT in miniature: test split ({images} images), {', '.join(settings.values())}", "",
             "accuracy [95 % bootstrap interval over test images]; robust = right under both PGD and APGD; "
             "vs Madry: McNemar test on the same images (images only the variant / only Madry gets right)", "",
             "| variant | clean | PGD | APGD | robust | robust vs Madry |", "|---|---|---|---|---|---|"]
    for name, right in found.items():
        row = table.loc[table.variant == name].iloc[0]
        versus = "" if name == BASELINE or BASELINE not in found else (
            f"{row['robust_accuracy'] - table.loc[table.variant == BASELINE, 'robust_accuracy'].iloc[0]:+.3f} "
            f"({int(row['robust_only_variant'])} vs {int(row['robust_only_madry'])}, p = {row['robust_mcnemar_p']:.3g})")
        lines.append(f"| {name} | " + " | ".join(interval(right[k]) for k in ("clean", *ATTACKS, "robust"))
                     + f" | {versus} |")
    lines += ["", "Verdicts (exact McNemar test, level 0.05):"]
    for treatment, reference, claim in CLAIMS:
        if treatment not in found or reference not in found:
            continue
        for key in ("robust", "clean"):
            a, b = found[treatment][key], found[reference][key]
            test = statistics.mcnemar(a, b)
            change = "no significant change" if not test["p"] < 0.05 else (
                "higher" if test["only_a"] > test["only_b"] else "lower")
            lines.append(f"- {claim}: {key} accuracy {interval(a)} vs {interval(b)} — {change} "
                         f"({test['only_a']} vs {test['only_b']} discordant images, p = {test['p']:.3g})")
    (out / "icml23_table.md").write_text("\n".join(lines) + "\n")

    figure, axes = plt.subplots(figsize=(6.5, 4.8))
    for i, row in table.iterrows():
        axes.errorbar(row["clean_accuracy"], row["robust_accuracy"], fmt="o", capsize=2,
                      xerr=[[row["clean_accuracy"] - row["clean_low"]], [row["clean_high"] - row["clean_accuracy"]]],
                      yerr=[[row["robust_accuracy"] - row["robust_low"]], [row["robust_high"] - row["robust_accuracy"]]])
        axes.annotate(row["variant"], (row["clean_accuracy"], row["robust_accuracy"]), fontsize=7,
                      xytext=(4, 3 + 6 * (i % 3)), textcoords="offset points")  # staggered against overlaps
    axes.set_xlabel("clean accuracy (test, 95 % interval)")
    axes.set_ylabel("robust accuracy: right under PGD and APGD")
    axes.set_title(f"Madry AT vs GAT variants (synthetic objects, {images} test images)")
    figure.tight_layout()
    figure.savefig(out / "icml23_accuracy.png", dpi=120)
    print("\n".join(lines))
    print(f"wrote {out / 'icml23_table.md'}, {out / 'icml23_table.csv'} and {out / 'icml23_accuracy.png'}")


if __name__ == "__main__":
    main()
