"""The table and figure of ``scripts/reproduce_icml23.sh``: clean and PGD accuracy of every variant on the test
split, from the ``attack`` results in ``OUT/eval/*/results.json`` (Markdown + CSV + PNG in ``OUT``).

    python scripts/summarize_icml23.py OUT
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def rows(out):
    for path in sorted((out / "eval").glob("*/results.json")):
        saved = json.loads(path.read_text())
        config, summary = saved["config"], saved["summary"]
        (attacked,) = summary["attacks"].values()
        yield {"variant": path.parent.name, "clean_accuracy": summary["clean"]["class"]["accuracy"],
               "robust_accuracy": attacked["tasks"]["class"]["adv_accuracy"], "images": summary["samples"],
               "attack": f"PGD-{config['steps']} {config['norm']} eps={config['eps']:.4g}"}


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "icml23-repro")
    table = pd.DataFrame(list(rows(out)))
    if table.empty:
        raise SystemExit(f"no evaluations in {out / 'eval'}")
    baseline = table.loc[table["variant"] == "madry", "robust_accuracy"]
    if len(baseline):
        table["robust_vs_madry"] = table["robust_accuracy"] - float(baseline.iloc[0])
    table.to_csv(out / "icml23_table.csv", index=False)
    lines = [f"# GAT in miniature: test split, {table['attack'].iloc[0]}, {table['images'].iloc[0]} images", "",
             "| variant | clean accuracy | robust accuracy | robust − madry |", "|---|---|---|---|"]
    for _, row in table.iterrows():
        delta = f"{row['robust_vs_madry']:+.3f}" if "robust_vs_madry" in row else ""
        lines.append(f"| {row['variant']} | {row['clean_accuracy']:.3f} | {row['robust_accuracy']:.3f} | {delta} |")
    (out / "icml23_table.md").write_text("\n".join(lines) + "\n")
    figure, axes = plt.subplots(figsize=(6, 4.5))
    axes.scatter(table["clean_accuracy"], table["robust_accuracy"])
    for _, row in table.iterrows():
        axes.annotate(row["variant"], (row["clean_accuracy"], row["robust_accuracy"]), fontsize=7,
                      xytext=(3, 3), textcoords="offset points")
    axes.set_xlabel("clean accuracy (test)")
    axes.set_ylabel(f"robust accuracy ({table['attack'].iloc[0]})")
    axes.set_title("Madry AT vs GAT variants (synthetic objects)")
    figure.tight_layout()
    figure.savefig(out / "icml23_accuracy.png", dpi=120)
    print("\n".join(lines))
    print(f"wrote {out / 'icml23_table.md'}, {out / 'icml23_table.csv'} and {out / 'icml23_accuracy.png'}")


if __name__ == "__main__":
    main()
