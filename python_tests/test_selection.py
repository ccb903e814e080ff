"""`mtrobust-fast select`: correlations equal scipy's on known data, ranking order, fewer than three candidates,
and the command end to end on hand-made full and surrogate tables."""
import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mtrobust_fast.analysis import selection
from mtrobust_fast.cli import main as cli_main

FULL = {"s": 0.8, "d": 1.2, "D": 0.5, "n": 2.0, "E": 1.6}  # main s: rel_vuln of s on {s, aux}
FEW = {"s": 0.3, "d": 0.5, "D": 0.4, "n": 0.9, "E": 0.6}


def table(values, clean=None, eps=8 / 255):
    """Rows of the models {s} and {s, aux}: the main task s attacked alone and with its auxiliary."""
    rows = []
    for aux, value in values.items():
        model = "".join(t for t in "sdDnkKeEprA" if t in {"s", aux})
        for attacked in dict.fromkeys(["s", model]):
            for task in model:
                rows.append(dict(model=f"runs/{model}", model_tasks=model, attack="pgd", norm="linf", eps=eps,
                                 attacked=attacked, task="segment_semantic" if task == "s" else task,
                                 rel_vuln=value if task == "s" else 9.0,
                                 clean_error=(clean or {}).get(aux, 0.1), clean_miou=1 - (clean or {}).get(aux, 0.1)))
    return pd.DataFrame(rows)


def test_correlate_matches_scipy():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=7), rng.normal(size=7)
    result = selection.correlate(x, y)
    pearson, spearman = stats.pearsonr(x, y), stats.spearmanr(x, y)
    assert result["n"] == 7 and result["note"] == ""
    assert result["pearson_r"] == pytest.approx(pearson.statistic)
    assert result["pearson_p"] == pytest.approx(pearson.pvalue)
    assert result["spearman_rho"] == pytest.approx(spearman.statistic)
    assert result["spearman_p"] == pytest.approx(spearman.pvalue)


def test_fewer_than_three_points_or_constant_values_are_undefined():
    result = selection.correlate([1.0, 2.0], [2.0, 3.0])
    assert math.isnan(result["pearson_r"]) and "needs at least 3" in result["note"]
    assert "constant" in selection.correlate([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])["note"]


def test_ranking_and_correlations_on_known_data(tmp_path, capsys):
    table(FULL, clean={"s": 0.2, "d": 0.3, "D": 0.1, "n": 0.5, "E": 0.4}).to_csv(tmp_path / "full.csv", index=False)
    table(FEW).to_parquet(tmp_path / "few.parquet")
    out = tmp_path / "sel"
    code = cli_main(["select", "--main", "s", "--candidates", "dDnE", "--full", str(tmp_path / "full.csv"),
                     "--surrogate", f"few={tmp_path / 'few.parquet'}", "--clean", "clean_miou", "--out", str(out)])
    assert code == 0
    pairs = pd.read_csv(out / "pairs.csv")
    assert list(pairs["aux"]) == list("dDnE")  # canonical order
    assert dict(zip(pairs["aux"], pairs["full_rank"])) == {"D": 1, "d": 2, "E": 3, "n": 4}
    assert dict(zip(pairs["aux"], pairs["few_rank"])) == {"D": 1, "d": 2, "E": 3, "n": 4}
    assert dict(zip(pairs["aux"], pairs["clean_miou_rank"])) == {"D": 1, "d": 2, "E": 3, "n": 4}  # high mIoU first
    records = {r["surrogate"]: r for r in json.loads((out / "selection.json").read_text())["correlations"]}
    full, few = [FULL[a] for a in "dDnE"], [FEW[a] for a in "dDnE"]
    assert records["few"]["pearson_r"] == pytest.approx(stats.pearsonr(few, full).statistic)
    assert records["few"]["pearson_p"] == pytest.approx(stats.pearsonr(few, full).pvalue)
    assert records["few"]["spearman_rho"] == pytest.approx(1.0)
    assert records["clean_miou"]["pearson_r"] < 0  # better clean mIoU, lower vulnerability
    assert "pearson_r" in capsys.readouterr().out


def test_two_candidates_are_reported_as_undefined(tmp_path, capsys):
    table(FULL).to_csv(tmp_path / "full.csv", index=False)
    table(FEW).to_csv(tmp_path / "few.csv", index=False)
    code = cli_main(["select", "--main", "s", "--candidates", "dDK", "--full", str(tmp_path / "full.csv"),
                     "--surrogate", f"few={tmp_path / 'few.csv'}"])
    captured = capsys.readouterr()
    assert code == 0 and "correlation needs at least 3" in captured.out
    assert "no model pair for s+K" in captured.err


def test_ambiguous_configs_and_missing_columns_are_clear_errors(tmp_path, capsys):
    pd.concat([table(FULL), table(FULL, eps=4 / 255)]).to_csv(tmp_path / "two.csv", index=False)
    args = ["select", "--main", "s", "--full", str(tmp_path / "two.csv"), "--clean", "clean_error"]
    assert cli_main(args) == 2
    assert "several attack configurations" in capsys.readouterr().err
    assert cli_main(args + ["--eps", "4/255"]) == 0
    capsys.readouterr()
    assert cli_main(args[:-1] + ["clean_nothing"]) == 2
    assert "lacks column(s) clean_nothing" in capsys.readouterr().err


def test_encoder_filter_applies_to_the_full_table_only(tmp_path):
    full = pd.concat([table(FULL).assign(encoder="resnet50"), table(FEW).assign(encoder="resnet18")])
    full.to_csv(tmp_path / "full.csv", index=False)
    table(FEW).assign(encoder="resnet18").to_csv(tmp_path / "r18.csv", index=False)
    out = tmp_path / "sel"
    assert cli_main(["select", "--main", "s", "--full", str(tmp_path / "full.csv"), "--encoder", "resnet50",
                     "--surrogate", f"resnet18={tmp_path / 'r18.csv'}", "--out", str(out)]) == 0
    pairs = pd.read_csv(out / "pairs.csv").set_index("aux")
    assert pairs["full"].to_dict() == FULL and pairs["resnet18"].to_dict() == FEW


def test_where_filters_every_table_and_names_unknown_columns(tmp_path, capsys):
    pd.concat([table(FULL).assign(limit=256), table(FEW).assign(limit=8)]).to_csv(tmp_path / "full.csv", index=False)
    args = ["select", "--main", "s", "--full", str(tmp_path / "full.csv"), "--clean", "clean_error"]
    assert cli_main(args) == 2 and "--where COLUMN=VALUE" in capsys.readouterr().err
    assert cli_main(args + ["--where", "limit=256", "--out", str(tmp_path / "sel")]) == 0
    assert pd.read_csv(tmp_path / "sel" / "pairs.csv").set_index("aux")["full"].to_dict() == FULL
    assert cli_main(args + ["--where", "nothing=1"]) == 2
    assert "no column nothing" in capsys.readouterr().err
