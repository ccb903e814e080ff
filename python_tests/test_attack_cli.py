"""``mtrobust-fast attack`` end to end on a tiny synthetic dataset, its outputs, and its argument errors."""
import csv
import json
import warnings

import pytest
import torch

from mtrobust_fast.attacks import TaskSpec, build_attack
from mtrobust_fast.cli import attack as attack_cli
from mtrobust_fast.cli import args as cli_args
from mtrobust_fast.cli import quickstart
from mtrobust_fast.cli import main as cli_main
from mtrobust_fast.data.synth.taskonomy import synthesize
from mtrobust_fast.models import build_model, save_checkpoint

SIZE = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """12 synthetic 32-px images (4 in val) and an untrained ResNet-18 for s and d."""
    root = tmp_path_factory.mktemp("attack")
    data = synthesize(root / "data", 12, size=SIZE, seed=0, workers=1, progress=False)
    torch.manual_seed(0)
    checkpoint = save_checkpoint(root / "sd.pt", build_model("sd", "resnet18", input_size=SIZE), epoch=0)
    return root, data, checkpoint


def _attack(setup, *extra):
    root, data, checkpoint = setup
    return cli_main(["attack", "--checkpoint", str(checkpoint), "--data", str(data), "--no-progress",
                     "--steps", "2", *extra])


def test_budget_parsing():
    assert cli_args.budget("8/255") == 8 / 255 and cli_args.budget("0.5") == 0.5
    assert cli_args.budget("0") == 0.0
    assert attack_cli.target_sets("s, ds ,all") == ["s", "sd", "all"]


def test_attack_writes_table_csv_and_json(setup, capsys):
    root = setup[0]
    assert _attack(setup, "--target", "s,sd", "--batch-size", "2", "--limit", "3", "--eps", "8/255",
                   "--alpha", "2/255", "--out", str(root / "res")) == 0
    printed = capsys.readouterr().out
    assert "attacked set s:" in printed and "attacked set sd:" in printed and "rel vuln" in printed
    assert "marginal vulnerability s + d" in printed and "95 % bootstrap interval over images" in printed
    with open(root / "res" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(float(r["adv_error_low"]) <= float(r["adv_error"]) <= float(r["adv_error_high"]) for r in rows)
    assert [(r["attacked"], r["task"]) for r in rows] == [
        ("s", "segment_semantic"), ("s", "depth_zbuffer"), ("sd", "segment_semantic"), ("sd", "depth_zbuffer")]
    assert all(r["samples"] == "3" and r["attack"] == "pgd" for r in rows)
    assert float(rows[0]["eps"]) == pytest.approx(8 / 255) and float(rows[0]["alpha"]) == pytest.approx(2 / 255)
    saved = json.loads((root / "res" / "results.json").read_text())
    assert saved["config"]["target"] == ["s", "sd"] and saved["config"]["steps"] == 2
    summary = saved["summary"]
    assert summary["samples"] == 3 and summary["dual_norm"] == "l1"
    assert set(summary["attacks"]) == {"s", "sd"} and len(summary["marginal"]) == 1
    assert "theorem4_bound" in summary["marginal"][0] and "theorem2_factor" in summary["gradients"]
    assert summary["attacks"]["s"]["tasks"]["segment_semantic"]["adv_vuln"] >= 0


@pytest.mark.parametrize("attack", ["fgsm", "wgd", "apgd", "segpgd", "cospgd", "relative", "cyclic_step",
                                    "cyclic_batch", "grid"])
def test_other_attacks_run(setup, capsys, attack):
    extra = [] if attack == "fgsm" else ["--steps", "2"]
    root, data, checkpoint = setup
    argv = ["attack", "--checkpoint", str(checkpoint), "--data", str(data), "--no-progress", "--attack", attack,
            "--limit", "1", "--no-gradients", "--norm", "l2", "--eps", "0.5", *extra]
    assert cli_main(argv) == 0
    assert f"{attack.upper()} l2 eps=0.5" in capsys.readouterr().out


def test_same_seed_same_results(setup, tmp_path):
    outs = []
    for name in ("a", "b"):
        assert _attack(setup, "--target", "d", "--limit", "1", "--no-gradients", "--seed", "3",
                       "--out", str(tmp_path / name)) == 0
        outs.append(json.loads((tmp_path / name / "results.json").read_text())["summary"])
        assert outs[-1]["cost"].pop("seconds") > 0  # wall time: the one value that differs between runs
    assert outs[0] == outs[1]


@pytest.mark.parametrize("argv, name", [
    (["--target", "ss"], "--target"),
    (["--eps=-1/255"], "--eps"),
    (["--eps", "eight"], "--eps"),
    (["--steps", "0"], "--steps"),
    (["--grid-weights", "0,0"], "--grid-weights"),
    (["--grid-weights", "1,x"], "--grid-weights"),
])
def test_bad_values_fail_at_parsing(setup, capsys, argv, name):
    with pytest.raises(SystemExit) as exit_info:
        _attack(setup, *argv)
    assert exit_info.value.code != 0
    assert f"argument {name}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--target", "n"], "--target: the model in"),
    (["--target", "sx"], "--target: unknown task letter 'x'"),
    (["--attack", "apgd", "--alpha", "2/255"], "--alpha"),
    (["--attack", "fgsm"], "--steps: fgsm"),
    (["--attack", "pgd", "--normalize-task-grads"], "--normalize-task-grads"),
    (["--attack", "pgd", "--grid-task", "d"], "--grid-task: pgd does not take it"),
    (["--attack", "grid", "--grid-task", "n"], "--attack grid: unknown task 'n'"),
])
def test_bad_combinations_are_named(setup, capsys, argv, message):
    assert _attack(setup, *argv) == 2
    assert message in capsys.readouterr().err


def test_missing_checkpoint_and_data(setup, tmp_path, capsys):
    root, data, checkpoint = setup
    assert cli_main(["attack", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(data)]) == 2
    assert "--checkpoint: checkpoint not found" in capsys.readouterr().err
    assert cli_main(["attack", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "nothing")]) == 2
    assert "--data:" in capsys.readouterr().err


# ---- quickstart (Table 1 in miniature) ----

def test_quickstart_model_sets_and_table_rows():
    assert quickstart.main_tasks("s, n") == ["s", "n"]
    assert quickstart.model_sets(["s", "n"], quickstart.MODELS) == ["s", "sd", "sn", "n"]
    assert quickstart.model_sets(["d"], "d, ds") == ["d", "sd"]
    with pytest.raises(ValueError, match="--models: every task set must hold a main task"):
        quickstart.model_sets(["s"], "s,dn")
    assert quickstart.attacked_sets(["s", "n"], "sn") == ["s", "n", "all"]
    assert quickstart.attacked_sets(["s", "n"], "s") == ["s"]

    def summary(clean, single, multi=None):
        errors = {"segment_semantic": {"error": clean}}
        attacks = {"s": {"segment_semantic": {"error": single}}}
        if multi is not None:
            attacks["sd"] = {"segment_semantic": {"error": multi}}
        return {"clean": {"segment_semantic": {"error": sum(clean) / len(clean)}},
                "per_sample": {"clean": errors, "attacks": attacks}}

    clean = [0.5, 0.25, 0.5, 1.0]
    results = {"sd": [summary(clean, [1.0, 0.5, 0.5, 1.0], [0.5, 0.25, 0.5, 1.0])],
               "s": [summary(clean, [0.75, 0.25, 1.0, 1.0])]}
    rows = quickstart.table1("s", results)
    assert [r[0] for r in rows] == ["∅", "d"]  # the main task alone first
    assert rows[0][1] == "0.562" and rows[0][2].startswith("0.375 [") and rows[0][3] == "-"
    assert rows[1][2].startswith("0.500 [") and rows[1][3] == "0.000 [0.000, 0.000]"
    two = quickstart.table1("s", {"s": [summary(clean, [0.75, 0.25, 1.0, 1.0]), summary(clean, clean)]})
    assert two[0][2].startswith("0.188 [") and two[0][2].endswith("(seeds 0.188 ± 0.188)")
    lines = quickstart.verdicts("s", results)
    assert lines[0].startswith("claim 1, adding d to s: relative vulnerability 0.500 with d vs 0.375 alone")
    assert lines[1].startswith("claim 2, model sd: relative vulnerability 0.000 attacking sd vs 0.500")
    assert all("paired permutation test over 4 images, p = " in line for line in lines)


@pytest.mark.slow
def test_quickstart_end_to_end_and_reuse(tmp_path, capsys):
    argv = ["quickstart", "--workdir", str(tmp_path), "--models", "s,sd", "--main", "s", "--images", "12",
            "--size", "32", "--epochs", "1", "--batch-size", "4", "--steps", "1", "--workers", "0", "--no-progress"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    models = out[out.index("Models:"):out.index("Table 1")]
    assert models.count("[all-background]") == 4 and models.count("[training mean]") == 2 and " vs " in models
    table = out[out.index("Table 1"):]
    assert "rel vuln single-task attack" in table and "\n∅ " in table and "\nd " in table
    assert "95 % bootstrap interval over images" in table and " [" in table and "(seeds " in table
    assert "claim 1, adding d to s" in table and "claim 2, model sd" in table
    assert (tmp_path / "table1.md").read_text().count("| ∅ |") == 1 and (tmp_path / "table1_s.csv").exists()
    assert (tmp_path / "resnet18_cpu_sd" / "attack_pgd_linf" / "results.json").exists()
    assert (tmp_path / "resnet18_cpu_sd_seed1" / "attack_pgd_linf" / "results.json").exists()
    # only what the quickstart reads stays on disk: the first seed's weights without optimiser state, no best.pt;
    # the second seed's models keep their log and attack results only
    assert sorted(p.name for p in (tmp_path / "resnet18_cpu_sd").glob("*.pt")) == ["last.pt"]
    assert "optimizer" not in torch.load(tmp_path / "resnet18_cpu_sd" / "last.pt", weights_only=True)["meta"]
    assert not list((tmp_path / "resnet18_cpu_sd_seed1").glob("*.pt"))
    assert cli_main(argv) == 0
    again = capsys.readouterr().out
    assert again.count("reusing") == 4 and "starting a new run" not in again
    assert again[again.index("Table 1"):].split("\ntables written")[0] == table.split("\ntables written")[0]
    # new attack settings: the second seed's models are trained again (the same models: same seed), then attacked
    assert cli_main(argv[:-5] + ["--steps", "2", "--workers", "0", "--no-progress"]) == 0
    third = capsys.readouterr().out
    assert third.count("starting a new run") == 2 and "reusing" not in third
    assert [r["epoch"] for r in quickstart._records(tmp_path / "resnet18_cpu_sd_seed1")] == [0, 1]
    # a dataset made with other settings is refused, not silently reused
    assert cli_main(argv[:7] + ["--images", "13"] + argv[9:]) == 2
    assert "--workdir:" in capsys.readouterr().err


def test_budgets_above_one_are_refused_unless_in_grey_levels(setup, tmp_path, capsys):
    assert _attack(setup, "--eps", "8", "--limit", "1") == 2
    assert "--eps: 8 is above 1, but images are in [0, 1]: give 8/255, or add --eps-units 255" in \
        capsys.readouterr().err
    assert _attack(setup, "--alpha", "2", "--limit", "1") == 2
    assert "--alpha: 2 is above 1" in capsys.readouterr().err
    assert _attack(setup, "--eps", "8", "--alpha", "2", "--eps-units", "255", "--limit", "1", "--no-gradients",
                   "--out", str(tmp_path / "grey")) == 0
    config = json.loads((tmp_path / "grey" / "results.json").read_text())["config"]
    assert config["eps"] == pytest.approx(8 / 255) and config["alpha"] == pytest.approx(2 / 255)


def test_default_step_sizes_follow_the_budget():
    model = torch.nn.Conv2d(3, 2, 1)
    spec = [TaskSpec("t", lambda output, target, mask: output.flatten(1).sum(1))]
    assert build_attack("pgd", model, spec, eps=0.5, norm="l2", steps=10).alpha == pytest.approx(0.125)
    assert build_attack("fgsm", model, spec, eps=0.3).alpha == pytest.approx(0.3)
    per_sample = build_attack("pgd", model, spec, eps=[0.1, 0.2], steps=5).alpha
    assert torch.allclose(per_sample, torch.tensor([0.05, 0.1], dtype=torch.float64))


def test_the_report_names_the_per_image_error_for_what_it_is(setup, capsys):
    assert _attack(setup, "--target", "s", "--limit", "1", "--no-gradients") == 0
    out = capsys.readouterr().out
    assert "clean err/img" in out and "1 - the image's own mIoU for segmentation" in out


def test_out_names_a_folder_and_a_file_is_refused_before_the_work(setup, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert _attack(setup, "--limit", "1", "--out", str(tmp_path / "afile")) == 2
    assert "--out:" in capsys.readouterr().err and (tmp_path / "afile").read_text() == "x"


def test_the_dense_ensemble_reports_worst_cases_and_winners(setup, capsys, tmp_path):
    assert _attack(setup, "--attack", "ensemble", "--target", "sd", "--limit", "2", "--no-gradients",
                   "--out", str(tmp_path / "ens")) == 0
    printed = capsys.readouterr().out
    assert "ensemble on sd (apgd, segpgd, cospgd, wgd, relative): worst-case err/img per task" in printed
    ensemble = json.loads((tmp_path / "ens" / "results.json").read_text())["summary"]["ensemble"]
    assert set(ensemble["sd"]["worst_error"]) == {"segment_semantic", "depth_zbuffer"}
    assert _attack(setup, "--attack", "ensemble", "--target", "s,sd", "--limit", "1", "--no-gradients") == 0
    assert "ensemble on s (apgd, segpgd, cospgd)" in capsys.readouterr().out


def test_dense_loss_is_recorded_and_refused_where_it_does_not_apply(setup, capsys, tmp_path):
    assert _attack(setup, "--dense-loss", "js", "--target", "s", "--limit", "1", "--no-gradients",
                   "--out", str(tmp_path / "js")) == 0
    assert json.loads((tmp_path / "js" / "results.json").read_text())["config"]["dense_loss"] == "js"
    assert _attack(setup, "--attack", "ensemble", "--dense-loss", "js", "--limit", "1") == 2
    assert "runs its own objectives" in capsys.readouterr().err


def test_grid_records_its_settings(setup, tmp_path):
    assert _attack(setup, "--attack", "grid", "--grid-weights", "0,1", "--grid-task", "d", "--target", "sd",
                   "--limit", "1", "--no-gradients", "--out", str(tmp_path)) == 0
    config = json.loads((tmp_path / "results.json").read_text())["config"]
    assert config["grid_weights"] == [0.0, 1.0] and config["grid_task"] == "d"


def test_the_report_gives_the_perturbation_and_adversarial_gradient_norms(setup, capsys, tmp_path):
    assert _attack(setup, "--target", "d", "--limit", "2", "--adv-gradients", "--out", str(tmp_path)) == 0
    printed = capsys.readouterr().out
    assert "perturbation per image: L1" in printed and "L2 SNR" in printed
    assert "input-gradient L2 norm clean -> adversarial: s" in printed
    with open(tmp_path / "results.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["pert_linf"]) <= 8 / 255 + 1e-6 and float(row["pert_snr_db"]) > 0
    assert float(row["adv_grad_l2"]) > 0 and float(row["clean_grad_linf"]) > 0


def test_a_transfer_attack_from_the_model_itself_is_the_white_box_attack(setup, tmp_path, capsys):
    root, data, checkpoint = setup
    for name, extra in (("white", []), ("transfer", ["--surrogate", str(checkpoint)])):
        assert _attack(setup, "--limit", "2", "--deterministic", "--no-gradients", "--out", str(tmp_path / name),
                       *extra) == 0
    assert "transferred from" in capsys.readouterr().out
    white, transfer = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("white", "transfer"))
    assert white["summary"]["attacks"] == transfer["summary"]["attacks"]
    assert transfer["config"]["surrogate"] == str(checkpoint) and white["config"]["surrogate"] is None
    torch.manual_seed(1)
    only_d = save_checkpoint(tmp_path / "d.pt", build_model("d", "resnet18", input_size=SIZE), epoch=0)
    assert _attack(setup, "--surrogate", str(only_d), "--target", "sd") == 2
    error = capsys.readouterr().err
    assert "--surrogate: the model in" in error and "cannot craft attacks on s" in error
    assert _attack(setup, "--surrogate", str(only_d), "--target", "d", "--limit", "1", "--no-gradients") == 0


@pytest.mark.parametrize("attack,target,warned", [("segpgd", "d,sd", "d"), ("segpgd", "s", None),
                                                  ("cospgd", "d", None)])
def test_a_dense_objective_that_changes_no_loss_of_a_set_is_named(setup, tmp_path, attack, target, warned):
    """SegPGD's objective replaces segmentation losses only: on a depth-only set it is plain PGD, and the user is
    told so (CosPGD also replaces regression losses, so depth alone is fine)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _attack(setup, "--attack", attack, "--target", target, "--limit", "1", "--no-gradients",
                       "--out", str(tmp_path / "out")) == 0
    ours = [str(w.message) for w in caught if "objective changes no loss" in str(w.message)]
    expected = [] if warned is None else [
        f"--attack {attack}: the {attack} objective changes no loss of the attacked set(s) {warned} (it replaces "
        f"segmentation losses only), so those sets are attacked on their tasks' own losses"]
    assert ours == expected


def test_our_warnings_print_as_one_line_and_others_keep_pythons_format():
    import mtrobust_fast.cli as cli
    from mtrobust_fast import evaluation
    assert cli._format_warning("it is so", UserWarning, evaluation.__file__, 3) == "warning: it is so\n"
    assert cli._format_warning("it is so", UserWarning, "/elsewhere/x.py", 3).startswith("/elsewhere/x.py:3: ")


def test_per_sample_output_and_paired_tests_between_two_attacks(setup, tmp_path, capsys):
    """--per-sample writes each image's clean and adversarial values, which agree with the run's means; `analyze
    paired` compares two runs image by image, and a run against itself differs by exactly 0."""
    for attack in ("pgd", "fgsm"):
        steps = ["--steps", "3"] if attack == "pgd" else []
        assert cli_main(["attack", "--checkpoint", str(setup[2]), "--data", str(setup[1]), "--no-progress",
                         "--attack", attack, *steps, "--target", "s,sd", "--limit", "4", "--per-sample",
                         "--out", str(tmp_path / attack)]) == 0
    capsys.readouterr()
    with open(tmp_path / "pgd" / "per_sample.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 2 * 2 and {r["image"] for r in rows} == {"0", "1", "2", "3"}
    summary = json.loads((tmp_path / "pgd" / "results.json").read_text())["summary"]
    assert "per_sample" not in summary
    for attacked in ("s", "sd"):
        for task, values in summary["attacks"][attacked]["tasks"].items():
            mine = [float(r["adv_error"]) for r in rows if r["attacked"] == attacked and r["task"] == task]
            assert sum(mine) / 4 == pytest.approx(values["adv_error"])
    assert cli_main(["analyze", "paired", "--a", str(tmp_path / "pgd"), "--b", str(tmp_path / "fgsm"),
                     "--out", str(tmp_path / "paired.csv")]) == 0
    printed = capsys.readouterr().out
    assert "attacked s, task segment_semantic (4 images)" in printed and "attacked sd, task depth_zbuffer" in printed
    assert cli_main(["analyze", "paired", "--a", str(tmp_path / "pgd"), "--b",
                     str(tmp_path / "pgd" / "per_sample.csv"), "--value", "adv_loss"]) == 0
    assert "difference +0.0000 [+0.0000, +0.0000], p = 1" in capsys.readouterr().out
    assert cli_main(["analyze", "paired", "--a", str(tmp_path / "pgd"), "--b", str(tmp_path / "none")]) == 2
    assert "no per-image results at" in capsys.readouterr().err
    assert _attack(setup, "--per-sample", "--limit", "1") == 2
    assert "--per-sample needs --out" in capsys.readouterr().err
