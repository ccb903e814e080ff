"""`mtrobust-fast report`: figures and summary from a small hand-made results table; partial tables skip figures
with a note; missing or unusable tables give clear errors."""
import warnings

import numpy as np
import pandas as pd
import pytest

from mtrobust_fast.analysis import report, results_table
from mtrobust_fast.cli import main as cli_main

NAMES = {"s": "segment_semantic", "d": "depth_zbuffer", "n": "normal"}


def results(weights=("uniform", "zamir"), attacks=("pgd", "wgd")):
    """Every one- and two-task model of s, d, n attacked on its main task and on all of its tasks, plus a
    three-task model attacked on every subset; rel_vuln encodes (main, aux) so cells can be checked."""
    rows = []
    base = dict(encoder="resnet18", norm="linf", eps=8 / 255, steps=25, samples=4, clean_error=0.5)
    for weight in weights:
        for attack in attacks:
            for model in ("s", "d", "n", "sd", "sn", "dn"):
                for attacked in dict.fromkeys(list(model) + [model]):
                    for task in model:
                        aux = model.replace(task, "") or task
                        value = "sdn".index(task) * 10 + "sdn".index(aux) + (0.5 if len(attacked) > 1 else 0)
                        rows.append(dict(base, model=f"runs/{model}_{weight}", model_tasks=model,
                                         task_weights=weight, attack=attack, attacked=attacked, task=NAMES[task],
                                         rel_vuln=value, joint_adv_vuln=0.1 * len(attacked)))
    for attacked in ("s", "d", "n", "sd", "sn", "dn", "sdn"):
        for task in "sdn":
            rows.append(dict(base, model="runs/sdn", model_tasks="sdn", task_weights="uniform", attack="pgd",
                             attacked=attacked, task=NAMES[task], rel_vuln=1.0, joint_adv_vuln=len(attacked) ** 2))
    return pd.DataFrame(rows)


def test_pair_values_follow_the_table1_layout():
    table = results()
    table["task"] = table["task"].map(results_table.letters)
    single = results_table.pair_values(table, "rel_vuln", "single")
    multi = results_table.pair_values(table, "rel_vuln", "multi")
    pick = lambda pairs, main, aux: pairs[(pairs.main == main) & (pairs.aux == aux) & (pairs.attack == "pgd")
                                          & (pairs.task_weights == "uniform")]["value"].item()
    assert pick(single, "d", "n") == 12 and pick(multi, "d", "n") == 12.5
    assert pick(single, "n", "s") == 20 and pick(multi, "s", "s") == 0  # diagonal: the one-task model
    assert len(single) == 2 * 2 * 9  # weights × attacks × (main, aux)


def test_report_writes_figures_and_summary(tmp_path):
    path = tmp_path / "results.parquet"
    results().to_parquet(path)
    written = report.build(path, tmp_path / "out")
    summary = (tmp_path / "out" / "summary.md").read_text()
    pngs = [p for p in written if p.suffix == ".png"]
    assert len([p for p in pngs if p.name.startswith("heatmap_")]) == 2  # one per attack, weights as panels
    assert any(p.name.startswith("vuln_vs_tasks_") for p in pngs)
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
        assert f"({png.name})" in summary
    assert "| d | 10 | 11 | 12 |" in summary  # main d, auxiliaries s d n (single-task attack)
    assert "Skipped: no `--selection`" in summary


def test_partial_table_skips_figures_with_notes(tmp_path):
    table = results(weights=("uniform",), attacks=("pgd",))
    table = table[table["model_tasks"] == "sdn"].drop(columns=["joint_adv_vuln"])
    table.to_csv(tmp_path / "partial.csv", index=False)
    written = report.build(tmp_path / "partial.csv", tmp_path / "out")
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert written == [tmp_path / "out" / "summary.md"]
    assert "Skipped: no rows of one- or two-task models" in summary
    assert "Skipped: the table has no `joint_adv_vuln` column" in summary


def test_missing_columns_and_files_are_named(tmp_path, capsys):
    results().drop(columns=["attacked", "task"]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(results_table.TableError, match="lacks column\\(s\\) attacked, task"):
        report.build(tmp_path / "bad.csv", tmp_path / "out")
    assert cli_main(["report", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "out")]) == 2
    assert "nope.csv does not exist" in capsys.readouterr().err
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(results_table.TableError, match="cannot read"):
        report.build(tmp_path / "junk.parquet", tmp_path / "out")


def test_cli_with_selection_draws_the_scatter(tmp_path):
    results().to_csv(tmp_path / "full.csv", index=False)
    pd.DataFrame({"main": list("sssd"), "aux": list("sdnn"), "full": [1.0, 2.0, 4.0, 3.0],
                  "few": [1.5, 2.0, 3.0, 3.5], "full_rank": [1, 2, 4, 3], "few_rank": [1, 2, 3, 4]}).to_csv(
        tmp_path / "pairs.csv", index=False)
    assert cli_main(["report", str(tmp_path / "full.csv"), "--out", str(tmp_path / "out"),
                     "--selection", str(tmp_path / "pairs.csv")]) == 0
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert (tmp_path / "out" / "surrogate_scatter.png").stat().st_size > 1000
    assert "| few | 4 |" in summary and "(surrogate_scatter.png)" in summary


def test_report_logs_its_figures_to_the_local_tracker(tmp_path):
    import json

    results().to_csv(tmp_path / "full.csv", index=False)
    assert cli_main(["report", str(tmp_path / "full.csv"), "--out", str(tmp_path / "out"), "--tracker", "local"]) == 0
    logged = [json.loads(line)["path"] for line in
              (tmp_path / "out" / "tracking" / "figures.jsonl").read_text().splitlines()]
    pngs = sorted(str(p.resolve()) for p in (tmp_path / "out").glob("*.png"))
    assert pngs and sorted(p for p in logged if p.endswith(".png")) == pngs


def test_weighted_models_count_only_for_their_main_task():
    rows = []
    for main, value in (("s", 1.0), ("d", 2.0)):  # two zamir {s, d} models, one per main task
        for task in "sd":
            rows.append(dict(model=f"sd_for_{main}", model_tasks="ds", main=main, task_weights="zamir",
                             attacked=task, task=NAMES[task], rel_vuln=value + (0.5 if task != main else 0)))
    rows.append(dict(model="s", model_tasks="s", main="s", task_weights="", attacked="s", task=NAMES["s"],
                     rel_vuln=3.0))
    table = pd.DataFrame(rows)
    for column in ("model_tasks", "task", "main"):
        table[column] = table[column].map(results_table.letters)
    pairs = results_table.pair_values(table, "rel_vuln").set_index(["main", "aux"])["value"]
    assert pairs.to_dict() == {("d", "s"): 2.0, ("s", "d"): 1.0, ("s", "s"): 3.0}


def test_heatmap_with_missing_cells_and_rows(tmp_path):
    table = results(weights=("uniform",), attacks=("pgd",))
    single_only = table["model_tasks"].isin(["sn", "dn"]) & (table["attacked"] != table["model_tasks"])
    table[~single_only & ~table["model_tasks"].isin(["n", "sdn"])].to_csv(tmp_path / "holes.csv", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = report.build(tmp_path / "holes.csv", tmp_path / "out")
    assert any(p.name.startswith("heatmap_") for p in written)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| d | 10 | 11 | - |" in summary and "| n | - | - | - |" in summary  # single-task attack panel


def test_figure_helpers_mark_lone_rows_spread_labels_and_name_columns():
    from mtrobust_fast.analysis import report

    scaled = report._row_scaled(np.array([[1.0, 2.0, 3.0], [5.0, np.nan, np.nan], [4.0, 4.0, np.nan]]))
    assert np.allclose(scaled[0], [0, 0.5, 1]) and np.isnan(scaled[1]).all() and np.isnan(scaled[2]).all()
    offsets = report.spread([1, 1, 1, 2], [0.50, 0.51, 0.90, 0.505])
    assert offsets[0] != offsets[1] and offsets[2] == offsets[3] == 2.0  # only the close pair at x=1 is spread
    # points at nearby (not equal) x overlap just as well: spread too; far ones are not
    offsets = report.spread([1.0, 1.01, 1.02, 3.0], [0.50, 0.505, 0.51, 0.90])
    assert len({offsets[0], offsets[1], offsets[2]}) == 3 and offsets[3] == 2.0
    assert report.label("rel_vuln") == "relative vulnerability" and report.label("few_epochs") == "few epochs"


def test_small_or_tied_correlations_carry_a_caution():
    from mtrobust_fast.analysis import selection

    result = selection.correlate([1.0, 2.0, 2.0, 4.0], [0.1, 0.3, 0.2, 0.5])
    assert result["note"].startswith("caution: only 4 points") and "1 tied value(s)" in result["note"]
    assert selection.correlate(list(range(6)), [0, 2, 1, 3, 5, 4])["note"] == ""


def test_config_labels_leave_out_settings_the_attack_does_not_have():
    assert results_table.config_label(["attack", "alpha", "eps"], ["ensemble", float("nan"), 4 / 255]) == \
        "attack=ensemble eps=0.01569"
    assert results_table.config_label(["attack", "alpha"], ["pgd", 0.0078431]) == "attack=pgd alpha=0.007843"
    assert results_table.config_label(["attack", "alpha"], ["apgd", None]) == "attack=apgd"


def test_table_cells_carry_the_interval_of_one_row_or_the_spread_of_several(tmp_path):
    """A cell from one results row shows its 95 % interval over images; a cell averaging rows (seeds) shows their
    range and count; the vulnerability figure draws the joint intervals."""
    table = results(weights=("uniform",), attacks=("pgd",))
    table["rel_vuln_low"], table["rel_vuln_high"] = table["rel_vuln"] - 1, table["rel_vuln"] + 2
    table["joint_adv_vuln_low"], table["joint_adv_vuln_high"] = 0.5 * table["joint_adv_vuln"], 2 * table["joint_adv_vuln"]
    pairs = results_table.pair_values(table.assign(task=table["task"].map(results_table.letters)), "rel_vuln")
    row = pairs[(pairs.main == "d") & (pairs.aux == "n")].iloc[0]
    assert (row["value"], row["low"], row["high"], row["rows"]) == (12, 11, 14, 1)
    path = tmp_path / "one.parquet"
    table.to_parquet(path)
    report.build(path, tmp_path / "one")
    assert "| d | 10 [9, 12] | 11 [10, 13] | 12 [11, 14] |" in (tmp_path / "one" / "summary.md").read_text()
    seeds = pd.concat([table, table.assign(rel_vuln=table["rel_vuln"] + 1, model=table["model"] + "_seed1")])
    seeds.to_parquet(path)
    report.build(path, tmp_path / "two")
    assert "| d | 10.5 (10–11, mean of 2 rows) |" in (tmp_path / "two" / "summary.md").read_text()
    assert any(p.name.startswith("vuln_vs_tasks_") for p in (tmp_path / "two").iterdir())


def test_the_report_says_what_each_configuration_spent(tmp_path):
    table = results()
    table["cell_id"] = table["model"] + table["attack"] + table["task_weights"]
    table["cost_forward_per_row"] = np.where(table["attack"] == "pgd", 26.0, 27.0)
    table["cost_backward_per_row"] = np.where(table["attack"] == "pgd", 10.0, 25.0)
    table["cost_rows_exited"] = np.where(table["attack"] == "pgd", 3, 0)
    table["cost_steps_saved"] = np.where(table["attack"] == "pgd", 40, 0)
    table["cost_seconds"] = 1.5
    path = tmp_path / "results.parquet"
    table.to_parquet(path)
    report.build(path, tmp_path / "out")
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "## What the attacks spent" in summary
    runs = table.drop_duplicates("cell_id")
    for weights in ("uniform", "zamir"):  # configurations: the settings that vary (weights, attack)
        for attack, forward, backward, exited, saved in (("pgd", 26.0, 10.0, 3, 40), ("wgd", 27.0, 25.0, 0, 0)):
            count = int(((runs["attack"] == attack) & (runs["task_weights"] == weights)).sum())
            assert f"| task_weights={weights} attack={attack} | {count} | {forward:.1f} | {backward:.1f} | " \
                   f"{exited * count} | {saved * count} | {1.5 * count:.1f} |" in summary, (weights, attack)
    results().to_parquet(path)  # a table from before the cost columns: no section
    report.build(path, tmp_path / "old")
    assert "What the attacks spent" not in (tmp_path / "old" / "summary.md").read_text()


def test_models_of_different_recipes_are_never_averaged(tmp_path):
    """Two models with the same task set, one clean and one adversarially trained (examples/sweep.yaml's point),
    and two seeds of the clean one: the seeds are averaged, the recipes are not."""
    rows = []
    for model, recipe, value in (("sd", "adversarial=none epochs=2 seed_free=1", 0.18),
                                 ("sd_seed1", "adversarial=none epochs=2 seed_free=1", 0.20),
                                 ("sd-madry", "adversarial=madry epochs=2 seed_free=1", 0.00002)):
        for task in ("segment_semantic", "depth_zbuffer"):
            rows.append(dict(model=model, recipe=recipe, model_tasks="sd", attacked=task, task=task,
                             attack="pgd", norm="linf", eps=8 / 255, rel_vuln=value, joint_adv_vuln=value))
    path = tmp_path / "results.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    table = results_table.read(path)
    assert set(table["recipe"]) == {"adversarial=none", "adversarial=madry"}  # only what differs is kept
    pairs = results_table.pair_values(table, "rel_vuln", "single")
    clean = pairs[(pairs.recipe == "adversarial=none") & (pairs.main == "s")]
    madry = pairs[(pairs.recipe == "adversarial=madry") & (pairs.main == "s")]
    assert clean["value"].item() == pytest.approx(0.19) and clean["rows"].item() == 2
    assert madry["value"].item() == pytest.approx(0.00002) and madry["rows"].item() == 1
    assert cli_main(["report", str(path), "--out", str(tmp_path / "report")]) == 0
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "3 models of 2 kinds" in summary and "average the 2 models of a kind (seeds)" in summary
    assert "adversarial=madry" in summary and "adversarial=none" in summary
    assert "Definitions: `rel_vuln` is the mean over images" in summary  # which definition each column uses


def test_a_sweep_row_carries_its_models_recipe(tmp_path):
    from mtrobust_fast.sweep.plan import recipe_label
    label = recipe_label({"tasks": "sd", "seed": 3, "adversarial": "madry", "eps": 0.0157, "out": "x",
                          "schedule": "0:1e-3, 5:1e-4"})
    assert label == "adversarial=madry eps=0.0157 schedule=0:1e-3,5:1e-4"


def test_the_report_names_collapsed_heads(tmp_path):
    table = results()
    table["collapsed"] = ""
    table.loc[table["model"] == "runs/sd_uniform", "collapsed"] = "the same output for every image"
    path = tmp_path / "results.parquet"
    table.to_parquet(path)
    assert cli_main(["report", str(path), "--out", str(tmp_path / "report")]) == 0
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "collapsed heads" in summary and "runs/sd_uniform" in summary.split("collapsed heads")[1].split("\n")[0]


def test_heatmaps_leave_out_rows_that_have_no_colour_scale(tmp_path, monkeypatch):
    """A task that is only ever an auxiliary (here d: its one-task model, no {d, a} pair) has one value in its
    row: drawn, it was a grey band; it stays in the Markdown table."""
    rows = []
    for model, value in (("s", 1.0), ("d", 2.0), ("sd", 1.5), ("sn", 1.2), ("n", 3.0)):
        task = model[0]
        rows.append(dict(model=model, model_tasks=model, attacked=task, task=NAMES[task], attack="pgd",
                         norm="linf", eps=8 / 255, rel_vuln=value))
    drawn = []
    monkeypatch.setattr(report, "_draw_matrix", lambda ax, matrix, title: drawn.append(matrix))
    table = pd.DataFrame(rows)
    table["task"] = table["task"].map(results_table.letters)
    lines, _ = report.heatmaps(table, tmp_path, "rel_vuln", 50)
    assert list(drawn[0].index) == ["s"]  # the single-task attack panel (the multi-task one has no pairs here)
    assert any(line.startswith("| d |") for line in lines)


def test_cka_figures_name_their_checkpoints():
    from mtrobust_fast.cli.analyze import short_names
    assert short_names(["runs/sd/last.pt", "runs/sd_madry/best.pt"]) == ["sd", "sd_madry"]
    assert short_names(["a/sd/last.pt", "b/sd/last.pt"]) == ["a/sd/last.pt", "b/sd/last.pt"]
