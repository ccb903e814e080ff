"""The table and figure of ``scripts/reproduce_icml23.sh``: clean, PGD and APGD accuracy of every variant on the
test split, from the ``attack`` results in ``OUT/eval/<variant>/<attack>/results.json`` (Markdown + CSV + PNG in
``OUT``).

    python scripts/summarize_icml23.py OUT
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


ATTACKS = ("pgd", "apgd")


def rows(out):
    for folder in sorted(p for p in (out / "eval").iterdir() if p.is_dir()):
        row = {"variant": folder.name}
        for attack in ATTACKS:
            path = folder / attack / "results.json"
            if not path.is_file():
                continue
            saved = json.loads(path.read_text())
            config, summary = saved["config"], saved["summary"]
            (attacked,) = summary["attacks"].values()
            row.update({"clean_accuracy": summary["clean"]["class"]["accuracy"], "images": summary["samples"],
                        f"{attack}_accuracy": attacked["tasks"]["class"]["adv_accuracy"],
                        f"{attack}_setting": f"{attack.upper()}-{config['steps']} {config['norm']} "
                                             f"eps={config['eps']:.4g}"})
        if "clean_accuracy" in row:
            yield row


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "icml23-repro")
    table = pd.DataFrame(list(rows(out)) if (out / "eval").is_dir() else [])
    if table.empty:
        raise SystemExit(f"no evaluations in {out / 'eval'}")
    table["robust_accuracy"] = table[[f"{a}_accuracy" for a in ATTACKS if f"{a}_accuracy" in table]].min(axis=1)
    baseline = table.loc[table["variant"] == "madry", "robust_accuracy"]
    table["robust_vs_madry"] = table["robust_accuracy"] - float(baseline.iloc[0]) if len(baseline) else float("nan")
    table.to_csv(out / "icml23_table.csv", index=False)
    settings = ", ".join(str(table[f"{a}_setting"].dropna().iloc[0]) for a in ATTACKS if f"{a}_setting" in table)
    lines = [f"# GAT in miniature: test split ({int(table['images'].iloc[0])} images), {settings}", "",
             "robust = the lower of the PGD and APGD accuracies (per variant)", "",
             "| variant | clean | PGD | APGD | robust − madry |", "|---|---|---|---|---|"]

    def cell(value):
        return "" if pd.isna(value) else f"{value:.3f}"

    for _, row in table.iterrows():
        delta = "" if pd.isna(row["robust_vs_madry"]) else f"{row['robust_vs_madry']:+.3f}"
        lines.append(f"| {row['variant']} | {cell(row['clean_accuracy'])} | {cell(row.get('pgd_accuracy'))} | "
                     f"{cell(row.get('apgd_accuracy'))} | {delta} |")
    (out / "icml23_table.md").write_text("\n".join(lines) + "\n")
    figure, axes = plt.subplots(figsize=(6, 4.5))
    axes.scatter(table["clean_accuracy"], table["robust_accuracy"])
    for i, (_, row) in enumerate(table.iterrows()):
        axes.annotate(row["variant"], (row["clean_accuracy"], row["robust_accuracy"]), fontsize=7,
                      xytext=(3, 3 + 6 * (i % 3)), textcoords="offset points")  # staggered against overlaps
    axes.set_xlabel("clean accuracy (test)")
    axes.set_ylabel("robust accuracy (min of PGD, APGD)")
    axes.set_title("Madry AT vs GAT variants (synthetic objects)")
    figure.tight_layout()
    figure.savefig(out / "icml23_accuracy.png", dpi=120)
    print("\n".join(lines))
    print(f"wrote {out / 'icml23_table.md'}, {out / 'icml23_table.csv'} and {out / 'icml23_accuracy.png'}")

if __name__ == "__main__":
    main()
