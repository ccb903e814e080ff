"""The AAAI'22 factor analyses: the paired Wilcoxon test equals scipy's and its effect size a hand count, units
pair across one factor only, and the report draws the boxplots and strategy differences (skipping with a note
what a partial table lacks)."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mtrobust_fast.analysis import paired_analysis, report

KNOWN_A = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
KNOWN_D = np.array([0.5, -0.2, 1.3, 0.7, 2.1, -0.4, 0.9, 1.1, 0.3, 1.6])


def test_wilcoxon_equals_scipy_and_the_effect_size_counts_signed_ranks():
    got = paired_analysis.wilcoxon(KNOWN_A, KNOWN_A + KNOWN_D)
    expected = stats.wilcoxon(KNOWN_D)
    assert got["statistic"] == pytest.approx(expected.statistic) and got["p"] == pytest.approx(expected.pvalue)
    # |d| ranks: 0.2→1, 0.3→2, 0.4→3, 0.5→4, 0.7→5, 0.9→6, 1.1→7, 1.3→8, 1.6→9, 2.1→10; negatives hold 1 + 3
    assert got["effect"] == pytest.approx((51 - 4) / 55)
    assert got["statistic"] == 4 and got["n"] == 10 and got["note"] == ""
    assert got["median_difference"] == pytest.approx(np.median(KNOWN_D))


def test_wilcoxon_gives_a_caution_not_a_bare_p_value_for_few_pairs_and_ties():
    few = paired_analysis.wilcoxon([1, 2, 3], [2, 3, 5])
    assert math.isnan(few["p"]) and "caution: 3 non-zero" in few["note"] and few["effect"] == 1.0
    tied = paired_analysis.wilcoxon(np.arange(8.0), np.arange(8.0) + [1, 1, 1, -1, 2, 0, 3, 1])
    assert "zero difference(s) dropped" in tied["note"] and "tied differences" in tied["note"]
    assert tied["p"] == pytest.approx(stats.wilcoxon(np.array([1, 1, 1, -1, 2, 0, 3, 1.0])).pvalue)
    with pytest.raises(ValueError, match="equal-length"):
        paired_analysis.wilcoxon([1, 2], [1])


def table(factor_values=(2 / 255, 8 / 255), attacks=("pgd",), encoders=("resnet18",), seeds=(0,)):
    """Models s, d, sd, sn, dn attacked on all their tasks; rel_vuln = 10·eps·255/8 + a per-unit offset (+1 for
    resnet50, +0.5 for wgd, +0.25 for cyclic_step), the same for every seed."""
    rows = []
    for encoder in encoders:
        for attack in attacks:
            for eps in factor_values:
                for model in ("s", "d", "sd", "sn", "dn"):
                    for task in model:
                        for seed in seeds:
                            offset = "sdn".index(task) + 0.1 * len(model)
                            value = (10 * eps * 255 / 8 + offset + (encoder == "resnet50")
                                     + {"pgd": 0, "wgd": 0.5, "cyclic_step": 0.25}[attack])
                            rows.append(dict(model=f"runs/{model}_{encoder}_{seed}", model_tasks=model, encoder=encoder,
                                             task_weights="uniform", attack=attack, norm="linf", eps=eps, steps=10,
                                             alpha=eps / 4, attacked=model, task=task, rel_vuln=value,
                                             joint_adv_vuln=0.1, seed=seed))
    return pd.DataFrame(rows)


def test_units_pair_across_the_factor_only_and_average_repeated_rows():
    units = paired_analysis.paired_units(table(seeds=(0, 1)), "eps")
    assert len(units) == 8 and list(units.columns) == [2 / 255, 8 / 255]  # 8 (model, task) units, alpha ignored
    assert np.allclose(units[8 / 255] - units[2 / 255], 7.5)


def test_report_draws_factor_boxplots_and_strategy_differences(tmp_path):
    data = table(factor_values=(2 / 255, 4 / 255, 8 / 255), attacks=("pgd", "wgd", "cyclic_step"),
                 encoders=("resnet18", "resnet50"))
    path = tmp_path / "results.csv"
    data.to_csv(path, index=False)
    written = report.build(path, tmp_path / "out")
    names = {p.name for p in written}
    assert {"factor_eps.png", "factor_encoder.png", "factor_attack.png", "strategy_differences.png"} <= names
    for png in (p for p in written if p.suffix == ".png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| resnet50 | 72 | 7.28 | 1 | 0 |" in summary  # 8 (model, task) × 3 eps × 3 attacks units, all +1
    assert "reference: pgd" in summary and "| wgd | 48 | 6.7 | 0.5 | 0 |" in summary
    assert "| +0.5 | +0.5 |" in summary  # wgd − pgd = 0.5 in every cell
    assert "_Skipped: the table has fewer than two values of `norm`._" in summary
    assert "_Skipped: the table has fewer than two values of `checkpoint_epoch`._" in summary


def test_partial_tables_skip_with_a_note(tmp_path):
    path = tmp_path / "results.csv"
    table(factor_values=(8 / 255,)).to_csv(path, index=False)
    written = report.build(path, tmp_path / "out")
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert not any(p.name.startswith("factor_") for p in written)
    assert "_Skipped: the table has fewer than two values of `eps`._" in summary
    assert "_Skipped: the table has no wgd, cyclic_step or cyclic_batch rows._" in summary


def test_attacks_side_by_side_give_one_column_per_attack_and_the_ensemble_worst_case(tmp_path):
    data = table(attacks=("pgd", "wgd"))
    data["adv_error"] = data["rel_vuln"]
    ensemble = data[data["attack"] == "pgd"].assign(attack="ensemble", adv_error=lambda t: t["rel_vuln"] + 1,
                                                    ensemble_worst_error=lambda t: t["rel_vuln"] + 2)
    lines, paths = paired_analysis.attacks_side_by_side(pd.concat([data, ensemble]), tmp_path)
    wide = pd.read_csv(paths[0])
    assert {"pgd", "wgd", "ensemble", "ensemble (worst case)", "worst over columns"} <= set(wide.columns)
    assert np.allclose(wide["wgd"] - wide["pgd"], 0.5) and np.allclose(wide["ensemble (worst case)"] - wide["pgd"], 2)
    assert np.allclose(wide["worst over columns"], wide["ensemble (worst case)"])
    assert any(line.startswith("| model_tasks | attacked | task | ensemble | pgd | wgd |") for line in lines)
    lines, paths = paired_analysis.attacks_side_by_side(data[data["attack"] == "pgd"], tmp_path)
    assert paths == [] and "one attack only" in lines[0]
