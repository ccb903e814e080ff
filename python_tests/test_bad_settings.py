"""Settings that cannot be right are refused when read, with one line naming them: sweep seeds outside the one
seed rule, a sweep file that gives a key twice or is not UTF-8, a landscape radius above the whole range, a report
metric the table does not have; claims left by killed sweeps are cleaned up."""
import subprocess
import sys

import pandas as pd
import pytest

from mtrobust_fast.analysis import report, results_table
from mtrobust_fast.cli import main as cli_main
from mtrobust_fast.sweep import plan
from mtrobust_fast.sweep.store import Store


@pytest.mark.parametrize("seed", [-1, 2 ** 70, "3", True])
def test_sweep_seeds_follow_the_one_seed_rule(tmp_path, seed):
    with pytest.raises(plan.PlanError, match=r"seeds: must be an integer in \[0, 2\*\*63 - 1\]"):
        plan._value("seeds", "seed", seed)
    assert plan._value("seeds", "seed", 2 ** 63 - 1) == 2 ** 63 - 1


def test_a_sweep_file_that_gives_a_key_twice_or_is_not_utf8_is_refused(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("eps: [4/255]\nsteps: [3]\neps: [8/255]\n")
    with pytest.raises(plan.PlanError, match="the key 'eps' is given twice"):
        plan.load_file(twice)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(plan.PlanError, match="is not UTF-8 text"):
        plan.load_file(latin)
    nested = tmp_path / "nested.yaml"
    nested.write_text("models:\n  - {name: a, checkpoint: a.pt}\n  - {name: b, checkpoint: b.pt}\n")
    assert len(plan.load_file(nested)["models"]) == 2  # the same key in two mappings is fine


def test_claims_of_killed_sweeps_are_removed_and_live_ones_kept(tmp_path):
    store = Store(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (store.cells / "a.claim").write_text(str(dead.pid))
        (store.cells / "b.claim").write_text(str(live.pid))
        (store.cells / "c.claim").write_text("garbage")
        Store(tmp_path)
        assert sorted(p.name for p in store.cells.glob("*.claim")) == ["b.claim"]
    finally:
        live.kill()
        live.wait()


def test_a_landscape_radius_above_the_range_is_refused(tmp_path, capsys):
    code = cli_main(["analyze", "landscape", "--checkpoint", str(tmp_path / "m.pt"), "--data", str(tmp_path),
                     "--out", str(tmp_path / "out"), "--radius", "5"])
    assert code == 2 and "--radius: 5 is above 1" in capsys.readouterr().err


def test_a_report_metric_the_table_lacks_is_refused(tmp_path):
    table = pd.DataFrame([dict(model="m", model_tasks="s", attacked="s", task="segment_semantic", attack="pgd",
                               norm="linf", eps=0.03, rel_vuln=0.5, joint_adv_vuln=0.1)])
    path = tmp_path / "results.parquet"
    table.to_parquet(path)
    with pytest.raises(results_table.TableError, match="metric: 'bogus' is not a numeric column .* rel_vuln"):
        report.build(path, tmp_path / "out", metric="bogus")


def test_a_huge_grid_is_refused_before_it_is_built(tmp_path):
    settings = {"data": str(tmp_path), "models": [str(tmp_path / "m.pt")], "eps": [k / 255 for k in range(1, 101)],
                "seeds": list(range(100)), "steps": list(range(1, 101))}  # 10^6 cells
    with pytest.raises(plan.PlanError, match=r"max_cells: the grid has up to 1000000 cells .* max_cells = 10000"):
        plan.expand(settings, tmp_path)


@pytest.mark.parametrize("command", ["synth", "synth-objects"])
def test_a_huge_synthetic_dataset_is_refused_unless_asked_for(tmp_path, command):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["data", command, "--out", str(tmp_path / "d"), "--images", "1000000000", "--no-progress"])
    assert "--images 1,000,000,000 is more than --max-images 1,000,000" in str(exit_info.value.code)
    assert not (tmp_path / "d").exists()
