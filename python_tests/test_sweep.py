"""``mtrobust-fast sweep``: plan expansion, resuming after a kill -9, the Ray executor, train specs, bad settings."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from mtrobust_fast.cli import main as cli_main
from mtrobust_fast.data.synth.taskonomy import synthesize
from mtrobust_fast.models import build_model, save_checkpoint
from mtrobust_fast.sweep import plan
from mtrobust_fast.sweep.store import Store

SIZE = 32
TIMING = ["seconds", "cost_seconds"]  # wall times differ between runs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """8 synthetic 32-px images and untrained ResNet-18s for sdn and sd."""
    root = tmp_path_factory.mktemp("sweep")
    data = synthesize(root / "data", 8, size=SIZE, seed=0, workers=1, progress=False)
    torch.manual_seed(0)
    sdn = save_checkpoint(root / "sdn.pt", build_model("sdn", "resnet18", input_size=SIZE), epoch=0)
    sd = save_checkpoint(root / "sd.pt", build_model("sd", "resnet18", input_size=SIZE), epoch=0)
    return root, data, sdn, sd


def _settings(setup, **extra):
    root, data, sdn, sd = setup
    return {"data": str(data), "models": [str(sdn)], **extra}


def test_subsets_of_three_tasks_are_seven_sets_in_one_cell(setup, tmp_path):
    cells = plan.expand(_settings(setup, sets="subsets"), tmp_path)
    assert len(cells) == 1
    assert cells[0].sets == ("s", "d", "n", "sd", "sn", "dn", "sdn")
    cells = plan.expand(_settings(setup, sets=["main", "all", "ds"], main="d"), tmp_path)
    assert cells[0].sets == ("d", "sdn", "sd")


def test_grid_is_eps_times_steps_per_model_with_stable_ids(setup, tmp_path):
    root, data, sdn, sd = setup
    settings = _settings(setup, eps=["4/255", 8 / 255], steps=[1, 2, 3])
    settings["models"] = [str(sdn), {"checkpoint": str(sd), "name": "two"}]
    cells = plan.expand(settings, tmp_path)
    assert len(cells) == 2 * 2 * 3 and len({c.cell_id for c in cells}) == 12
    assert {(c.eps, c.steps) for c in cells} == {(e, s) for e in (4 / 255, 8 / 255) for s in (1, 2, 3)}
    assert {c.model.name for c in cells} == {"sdn", "two"}
    assert [c.cell_id for c in plan.expand(settings, tmp_path)] == [c.cell_id for c in cells]
    # fgsm takes no steps and apgd no alpha: their grid values collapse instead of failing
    mixed = plan.expand(_settings(setup, attacks=["fgsm", "apgd"], steps=[1, 2], alpha=["1/255"]), tmp_path)
    assert sorted((c.attack, c.steps, c.alpha) for c in mixed) == [
        ("apgd", 1, None), ("apgd", 2, None), ("fgsm", None, 1 / 255)]


def test_yaml_and_toml_give_the_same_cells(setup, tmp_path):
    root, data, sdn, sd = setup
    (tmp_path / "s.yaml").write_text(f"data: {data}\nmodels:\n  - {sdn}\n  - checkpoint: {sd}\n    main: d\n"
                                     "eps: [4/255, 0.5]\nsteps: [1, 2]\nsets: [main, subsets]\nlimit: 2\n")
    (tmp_path / "s.toml").write_text(f'data = "{data}"\nmodels = ["{sdn}", {{checkpoint = "{sd}", main = "d"}}]\n'
                                     'eps = ["4/255", 0.5]\nsteps = [1, 2]\nsets = ["main", "subsets"]\nlimit = 2\n')
    from_yaml = plan.expand(plan.load_file(tmp_path / "s.yaml"), tmp_path)
    from_toml = plan.expand(plan.load_file(tmp_path / "s.toml"), tmp_path)
    assert len(from_yaml) == 8 and from_yaml == from_toml


@pytest.mark.parametrize("extra, key", [
    ({"epss": [0.1]}, "epss: unknown key"),
    ({"eps": ["eight"]}, "eps[0]:"),
    ({"steps": [0]}, "steps[0]:"),
    ({"attacks": ["pgd", "cw"]}, "attacks[1]: expected one of"),
    ({"attacks": ["ensemble", "autoattack"]}, "attacks[1]: autoattack attacks one classification head"),
    ({"attacks": ["square"]}, "attacks[0]: square attacks one classification head"),
    ({"sets": ["sx"]}, "sets[0]:"),
    ({"sets": ["sE"]}, "sets: model sdn has tasks sdn; it has no E"),
    ({"models": [{"checkpoint": "missing.pt"}]}, "models[0].checkpoint: checkpoint not found"),
    ({"models": [{"train": {"tasks": "sd", "epochz": 1}}]}, "models[0].train:"),
    ({"models": [{"train": {"tasks": "sd", "adversarial": "pgd"}}]}, "models[0].train: adversarial must be one of"),
    ({"models": [{"path": "x.pt"}]}, "models[0].path: unknown key"),
    ({"size": 33}, "size: must be a multiple of 32"),
    ({"eps": [4, 8]}, "eps[0]: 4 is above 1, but images are in [0, 1]"),
    ({"eps_units": 100}, "eps_units: expected one of 1, 255"),
    ({"data": "no/such/folder"}, "data: no/such/folder is not a directory"),
])
def test_bad_settings_name_the_key(setup, tmp_path, extra, key):
    with pytest.raises(plan.PlanError) as error:
        plan.expand(_settings(setup, **extra), tmp_path)
    assert str(error.value).startswith(key)


def test_grey_level_budgets_with_eps_units(setup, tmp_path):
    cells = plan.expand(_settings(setup, eps=[4, 8], alpha=[1], eps_units=255), tmp_path)
    assert {(round(c.eps * 255, 9), round(c.alpha * 255, 9)) for c in cells} == {(4.0, 1.0), (8.0, 1.0)}


def test_bad_flag_is_reported_by_the_command(setup, tmp_path, capsys):
    root, data, sdn, sd = setup
    assert cli_main(["sweep", "--out", str(tmp_path), "--data", str(data), "--checkpoint", str(sdn),
                     "--norm", "l3"]) == 2
    assert "norms[0]: expected one of linf, l2" in capsys.readouterr().err


def test_dry_run_shows_the_step_size_each_cell_will_use(setup, tmp_path, capsys):
    root, data, sdn, sd = setup
    assert cli_main(["sweep", "--out", str(tmp_path), "--data", str(data), "--checkpoint", str(sdn), "--attack",
                     "pgd,apgd", "--eps", "8/255", "--steps", "10", "--alpha", "none,1/255", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(" pgd " in line and "alpha=0.0078431 (default)" in line for line in lines)
    assert any(" pgd " in line and "alpha=0.0039216 " in line for line in lines)
    assert any(" apgd " in line and "alpha=adaptive steps=10 " in line for line in lines)


def _argv(setup, out, *extra):
    root, data, sdn, sd = setup
    return ["sweep", "--out", str(out), "--data", str(data), "--checkpoint", f"{sdn},{sd}", "--steps", "1,2",
            "--eps", "4/255,8/255", "--sets", "main,subsets", "--limit", "2", "--batch-size", "2",
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """The uninterrupted sweep's table (8 cells)."""
    out = tmp_path_factory.mktemp("reference")
    assert cli_main(_argv(setup, out)) == 0
    return pd.read_parquet(out / "results.parquet")


def _same(a, b):
    pd.testing.assert_frame_equal(a.drop(columns=TIMING), b.drop(columns=TIMING))


def test_table_has_one_row_per_model_set_task_and_config(reference):
    assert len(reference) == 4 * (7 * 3 + 3 * 2)  # (eps × steps) × (sdn: 7 sets × 3 tasks + sd: 3 sets × 2)
    assert not reference.duplicated(["cell_id", "attacked", "task"]).any()
    for column in ("model", "model_tasks", "encoder", "attack", "norm", "eps", "alpha", "steps", "restarts",
                   "attacked", "task", "split", "samples", "seed", "version", "seconds", "cell_id", "rel_vuln",
                   "rel_vuln_ratio_of_means", "adv_vuln", "joint_adv_vuln", "clean_error", "marginal_vuln",
                   "first_order", "theorem2_factor", "clean_miou"):
        assert column in reference.columns, column
    assert set(reference["samples"]) == {2} and set(reference["model_tasks"]) == {"sdn", "sd"}
    sd = reference[(reference["attacked"] == "sd") & (reference["task"] == "depth_zbuffer")]
    assert sd["marginal_vuln"].notna().all()
    for metric in ("clean_error", "adv_error", "adv_loss", "adv_vuln"):  # 95 % bootstrap bounds over the images
        assert (reference[f"{metric}_low"] <= reference[metric] + 1e-12).all(), metric
        assert (reference[metric] <= reference[f"{metric}_high"] + 1e-12).all(), metric


def test_resume_after_kill_equals_uninterrupted_run(setup, reference, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = "import sys, torch; torch.set_num_threads(1); from mtrobust_fast.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", script, *_argv(setup, out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if len(list((out / "cells").glob("*.parquet"))) >= 2:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list((out / "cells").glob("*.parquet")))
    assert 2 <= finished < 8, "the sweep was not killed mid-way"
    assert cli_main(_argv(setup, out)) == 0
    _same(pd.read_parquet(out / "results.parquet"), reference)
    assert len(pd.read_csv(out / "results.csv")) == len(reference)
    assert len(Store(out).done()) == 8
    again = Store(out).table()
    assert cli_main(_argv(setup, out)) == 0  # everything finished: nothing runs, nothing is added
    _same(pd.read_parquet(out / "results.parquet"), again)


def test_ray_executor_gives_the_same_table(setup, reference, tmp_path):
    pytest.importorskip("ray", reason="ray is not installed (pip install ray) — the Ray executor is not tested")
    out = tmp_path / "ray"
    assert cli_main(_argv(setup, out, "--executor", "ray", "--ray-cpus", "2")) == 0
    _same(pd.read_parquet(out / "results.parquet"), reference)


def test_train_spec_and_tracker(setup, tmp_path):
    root, data, sdn, sd = setup
    (tmp_path / "s.yaml").write_text(
        f"data: {data}\nmodels:\n  - train: {{tasks: sd, size: 32, epochs: 1, batch_size: 2, lr: 0.001,"
        " limit_train: 2, limit_val: 1, save_every: 0, adversarial: madry, steps: 1, robust_val: 1}\n"
        "    name: tiny\nsteps: 2\nsets: subsets\nlimit: 2\n")
    argv = ["sweep", "--config", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out"), "--no-progress",
            "--tracker", "local", "--no-gradients"]
    assert cli_main(argv) == 0
    table = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert len(table) == 3 * 2 and set(table["model"]) == {"tiny"} and set(table["task_weights"]) == {"uniform"}
    runs = list((tmp_path / "out" / "runs").iterdir())
    assert len(runs) == 1
    curves = (runs[0] / "tracking" / "curves.jsonl").read_text()
    assert curves.count("step_loss") == 4 and '"values": [' in curves  # s, d, and sd's two tasks
    assert cli_main(argv) == 0  # trained and finished: nothing reruns
    checkpoint = next((tmp_path / "out" / "models").rglob("last.pt"))
    assert torch.load(checkpoint, weights_only=True)["meta"]["train_config"]["adversarial"] == "madry"


def test_store_removes_only_temporaries_of_dead_writers(tmp_path):
    cells = tmp_path / "cells"
    cells.mkdir()
    alive = cells / f".abc.parquet.{os.getppid()}.tmp"  # a concurrent sweep's part in flight
    dead = cells / ".abc.parquet.999999999.tmp"
    export = tmp_path / ".results.csv.999999999.tmp"
    for path in (alive, dead, export):
        path.write_bytes(b"partial")
    Store(tmp_path)
    assert alive.exists() and not dead.exists() and not export.exists()


def test_cells_claimed_by_a_live_sweep_are_left_to_it(setup, tmp_path, capsys):
    """Two sweeps on one folder share the pending cells: a cell another live process claimed is not run twice,
    a dead process's claim is taken over."""
    out = tmp_path / "shared"
    cells = plan.expand(_settings(setup, steps=[1, 2], limit=1, gradients=False), out)
    store = Store(out)
    (store.cells / f"{cells[0].cell_id}.claim").write_text(str(os.getppid()))  # a live concurrent sweep
    (store.cells / f"{cells[1].cell_id}.claim").write_text("999999999")  # a sweep that was killed
    assert not store.claim(cells[0].cell_id)
    root, data, sdn, sd = setup
    argv = ["sweep", "--out", str(out), "--data", str(data), "--checkpoint", str(sdn), "--steps", "1,2",
            "--limit", "1", "--no-gradients", "--no-progress"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "ran 1 cells" in printed and "1 cells are being run by another sweep" in printed
    assert store.done() == {cells[1].cell_id}
    assert not (store.cells / f"{cells[1].cell_id}.claim").exists()


def test_truncated_or_misnamed_parts_are_named_and_recomputed(setup, tmp_path):
    root, data, sdn, sd = setup
    out = tmp_path / "parts"
    argv = ["sweep", "--out", str(out), "--data", str(data), "--checkpoint", str(sdn), "--steps", "1,2",
            "--limit", "1", "--no-gradients", "--no-progress"]
    assert cli_main(argv) == 0
    reference = pd.read_parquet(out / "results.parquet")
    first, second = sorted((out / "cells").glob("*.parquet"))
    first.write_bytes(first.read_bytes()[:100])  # truncated by a crash of the disk, say
    second.rename(out / "cells" / "0000misnamed.parquet")
    with pytest.warns(UserWarning) as caught:
        assert len(Store(out).done()) == 0
    messages = [str(w.message) for w in caught]
    assert any("not a readable results part" in m for m in messages)
    assert any("0000misnamed.parquet: its rows belong to cell(s)" in m for m in messages)
    assert cli_main(argv) == 0
    _same(pd.read_parquet(out / "results.parquet"), reference)
    assert sorted(p.name for p in (out / "cells" / "bad").iterdir()) == sorted(["0000misnamed.parquet", first.name])


def test_a_cell_tracked_then_killed_before_its_part_is_tracked_once(setup, tmp_path, monkeypatch, capsys):
    root, data, sdn, sd = setup
    out = tmp_path / "tracked"
    argv = ["sweep", "--out", str(out), "--data", str(data), "--checkpoint", str(sdn), "--steps", "1",
            "--limit", "1", "--sets", "s", "--no-gradients", "--no-progress", "--tracker", "local"]

    def killed(self, cell_id, rows, per_sample=None):
        raise KeyboardInterrupt  # the kill lands after tracking, before the part is written

    monkeypatch.setattr(Store, "write", killed)
    assert cli_main(argv) == 130
    monkeypatch.undo()
    assert cli_main(argv) == 0
    (run,) = (out / "runs").iterdir()
    assert (run / "tracking" / "curves.jsonl").read_text().count("step_loss") == 1
    other = ["sweep", "--out", str(out), "--data", str(data), "--checkpoint", str(sdn), "--steps", "2",
             "--limit", "1", "--sets", "s", "--no-gradients", "--no-progress"]
    assert cli_main(other) == 0
    assert "1 finished cells of earlier sweeps" in capsys.readouterr().out


def test_a_checkpoint_retrained_in_place_is_not_exported_under_one_key(setup, tmp_path, capsys):
    root, data, sdn, sd = setup
    out, checkpoint = tmp_path / "retrained", tmp_path / "model.pt"
    argv = ["sweep", "--out", str(out), "--data", str(data), "--checkpoint", str(checkpoint), "--steps", "1",
            "--limit", "1", "--sets", "s", "--no-gradients", "--no-progress"]
    torch.manual_seed(1)
    save_checkpoint(checkpoint, build_model("sd", "resnet18", input_size=32))
    assert cli_main(argv) == 0
    torch.manual_seed(2)
    save_checkpoint(checkpoint, build_model("sd", "resnet18", input_size=32))  # retrained at the same path
    capsys.readouterr()
    assert cli_main(argv + ["--dry-run"]) == 2  # seen at planning, dry run included: nothing is computed
    assert "retrained in place" in capsys.readouterr().err
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "retrained in place" in err and len(err.strip().splitlines()) == 1
    assert len(list((out / "cells").glob("*.parquet"))) == 1


def test_an_api_key_inside_a_model_name_reaches_no_file(setup, tmp_path, monkeypatch):
    root, data, sdn, sd = setup
    secret = "sk-TESTSECRET-0123456789"
    monkeypatch.setenv("COMET_API_KEY", secret)
    (tmp_path / "s.yaml").write_text(f"data: {data}\nmodels:\n  - {{checkpoint: {sd}, name: run-{secret}}}\n"
                                     "steps: 1\nsets: [main]\nlimit: 1\ngradients: false\n")
    out = tmp_path / "out"
    assert cli_main(["sweep", "--config", str(tmp_path / "s.yaml"), "--out", str(out), "--no-progress",
                     "--tracker", "local"]) == 0
    assert set(pd.read_parquet(out / "results.parquet")["model"]) == {"run-<redacted>"}
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_the_worked_example_expands(setup, tmp_path):
    root, data, sdn, sd = setup
    settings = plan.load_file(Path(__file__).resolve().parents[1] / "examples" / "sweep.yaml")
    cells = plan.expand({**settings, "data": str(data)}, tmp_path)
    assert len(cells) == 2 * 2 * 2 and {c.model.name for c in cells} == {"sd", "sd-madry"}
    assert json.loads(next(c for c in cells if c.model.name == "sd-madry").model.train)["adversarial"] == "madry"


def test_a_classifier_checkpoint_is_refused_with_the_reason(setup, tmp_path):
    from mtrobust_fast.models import build_classifier

    path = save_checkpoint(tmp_path / "clf.pt", build_classifier("resnet18", classes=10, input_size=32))
    with pytest.raises(plan.PlanError, match=r"models\[0\].checkpoint: .* is a classifier"):
        plan.expand(_settings(setup, models=[str(path)]), tmp_path)


def test_a_transfer_cell_with_the_target_as_surrogate_equals_the_white_box_cell(setup, tmp_path):
    root, data, sdn, sd = setup
    models = [{"checkpoint": str(sd), "name": "white"}, {"checkpoint": str(sd), "surrogate": str(sd), "name": "transfer"},
              {"checkpoint": str(sd), "surrogate": str(sdn), "name": "from-sdn"}]
    settings = {"data": str(data), "models": models, "steps": 2, "limit": 2, "batch_size": 2, "deterministic": True}
    cells = plan.expand(settings, tmp_path)
    assert len({c.cell_id for c in cells}) == 3 and cells[1].model.surrogate == str(sd)
    config = tmp_path / "sweep.yaml"
    config.write_text(json.dumps(settings))  # JSON is YAML
    assert cli_main(["sweep", "--config", str(config), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    table = pd.read_parquet(tmp_path / "out" / "results.parquet")
    columns = ["attacked", "task", "adv_error", "rel_vuln", "adv_loss"]
    white = table[table["model"] == "white"][columns].reset_index(drop=True)
    transfer = table[table["model"] == "transfer"]
    assert set(transfer["surrogate"]) == {str(sd)} and set(table[table["model"] == "white"]["surrogate"]) == {""}
    pd.testing.assert_frame_equal(white, transfer[columns].reset_index(drop=True))
    assert not table[table["model"] == "from-sdn"]["adv_loss"].isna().any()
    bad = dict(settings, models=[{"checkpoint": str(sd), "surrogate": str(tmp_path / "none.pt")}])
    with pytest.raises(plan.PlanError, match=r"models\[0\].surrogate: checkpoint not found"):
        plan.expand(bad, tmp_path)


def test_an_ensemble_cell_attacks_every_set_and_records_its_worst_case(setup, tmp_path):
    root, data, sdn, sd = setup
    argv = ["sweep", "--out", str(tmp_path), "--data", str(data), "--checkpoint", str(sd), "--attack", "ensemble",
            "--steps", "1", "--sets", "d,sd", "--limit", "1", "--no-progress"]
    assert cli_main(argv) == 0
    table = pd.read_parquet(tmp_path / "results.parquet")
    assert sorted(set(table["attacked"])) == ["d", "sd"] and len(table) == 4
    assert table["ensemble_worst_error"].notna().all()
    assert (table["ensemble_worst_error"] >= table["adv_error"] - 1e-9).all()
    assert set(table[table["attacked"] == "d"]["ensemble_winner"]) <= {"apgd", "cospgd"}


def test_grid_settings_reach_grid_cells_only(setup, tmp_path):
    settings = _settings(setup, attacks=["pgd", "grid"], steps=1, limit=1, sets=["sd"])
    plain = {c.attack: c for c in plan.expand(settings, tmp_path)}
    chosen = {c.attack: c for c in plan.expand(dict(settings, grid_weights="0,1", grid_task="d"), tmp_path)}
    assert chosen["pgd"].cell_id == plain["pgd"].cell_id and "grid_weights" not in chosen["pgd"].options
    assert chosen["grid"].cell_id != plain["grid"].cell_id
    assert chosen["grid"].options["grid_weights"] == (0.0, 1.0) and chosen["grid"].options["grid_task"] == "d"
    with pytest.raises(plan.PlanError, match="grid_weights"):
        plan.expand(dict(settings, grid_weights=[0, 0]), tmp_path)
    root, data, sdn, sd = setup
    argv = ["sweep", "--out", str(tmp_path / "out"), "--data", str(data), "--checkpoint", str(sd), "--attack", "grid",
            "--steps", "1", "--sets", "sd", "--limit", "1", "--grid-weights", "0,1", "--grid-task", "d",
            "--no-gradients", "--no-progress"]
    assert cli_main(argv) == 0
    table = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert set(table["grid_weights"]) == {"0,1"} and set(table["grid_task"]) == {"d"}


def test_per_sample_cells_keep_each_images_values_and_finished_cells_gain_them(setup, reference, tmp_path, capsys):
    """per_sample keeps each image's values per cell (their means are the cell's rows), leaves the cell ids and
    rows as they were, and a finished cell without them runs again to get them."""
    out = tmp_path / "sweep"
    argv = _argv(setup, out)
    assert cli_main(argv) == 0 and not (out / "per_sample").exists()
    ids = set(Store(out).done())
    assert cli_main(argv + ["--per-sample"]) == 0
    assert "8 cells, 0 already finished, 8 to run" in capsys.readouterr().out
    assert set(Store(out).done()) == ids
    _same(pd.read_parquet(out / "results.parquet"), reference)
    table = pd.read_parquet(out / "results.parquet")
    for cell_id in ids:
        images = pd.read_parquet(out / "per_sample" / f"{cell_id}.parquet")
        rows = table[table.cell_id == cell_id]
        means = images.groupby(["attacked", "task"])["adv_error"].mean()
        for _, row in rows.iterrows():
            assert means[(row["attacked"], row["task"])] == pytest.approx(row["adv_error"])
        assert set(images["image"]) == {0, 1}
    assert cli_main(argv + ["--per-sample"]) == 0
    assert "8 already finished, 0 to run" in capsys.readouterr().out


def test_a_comet_tracker_without_its_key_is_refused_before_any_model_is_trained(setup, tmp_path, monkeypatch, capsys):
    root, data, sdn, sd = setup
    monkeypatch.delenv("COMET_API_KEY", raising=False)
    (tmp_path / "s.yaml").write_text(
        f"data: {data}\nmodels:\n  - train: {{tasks: sd, size: 32, epochs: 1, batch_size: 2, lr: 0.001,"
        " limit_train: 2, limit_val: 1, save_every: 0}\n    name: tiny\nsteps: 1\nlimit: 2\n")
    argv = ["sweep", "--config", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out"), "--no-progress",
            "--tracker", "comet", "--no-gradients"]
    assert cli_main(argv) == 2
    assert "needs the API key in the COMET_API_KEY environment variable" in capsys.readouterr().err
    assert not (tmp_path / "out" / "models").exists() and not list((tmp_path / "out").glob("cells/*.parquet"))


def test_the_ray_executor_without_ray_is_one_line_before_anything_runs(setup, tmp_path, monkeypatch, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    assert cli_main(_argv(setup, tmp_path / "out", "--executor", "ray")) == 2
    assert "--executor ray needs the ray package" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("cells/*.parquet"))


def test_a_model_name_holding_the_api_key_is_redacted_on_stdout(setup, tmp_path, monkeypatch, capsys):
    root, data, sdn, sd = setup
    key = "k" * 24
    monkeypatch.setenv("COMET_API_KEY", key)
    (tmp_path / "s.yaml").write_text(f"data: {data}\nmodels:\n  - {{checkpoint: {sdn}, name: model-{key}}}\n")
    assert cli_main(["sweep", "--config", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert key not in out and "model-<redacted>" in out


def test_a_sweep_ends_with_what_it_found(reference, capsys):
    from mtrobust_fast.cli.sweep import result_lines
    table = reference.copy()
    lines = result_lines(table)
    assert lines[0].startswith("main task attacked alone")
    assert len(lines) == 1 + 8  # 2 models x 2 eps x 2 steps, their main task attacked alone
    assert all("->" in line and "rel vuln" in line for line in lines[1:])
    table.loc[table["model"] == table["model"].iloc[0], "collapsed"] = "the same output for every image"
    assert any("looks collapsed" in line for line in result_lines(table))
