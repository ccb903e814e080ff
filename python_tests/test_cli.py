"""The command table: every sub-command builds its parser and answers --help; unknown commands fail clearly."""
import os
import subprocess
import sys

import pytest
import torch

from mtrobust_fast import cli


@pytest.mark.parametrize("words", [words for words, _, _ in cli.COMMANDS], ids=" ".join)
def test_every_command_has_help(words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*words, "--help"])
    assert exit_info.value.code == 0
    assert "usage: mtrobust-fast " + " ".join(words) in capsys.readouterr().out


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(words[0] in out for words, _, _ in cli.COMMANDS)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("mtrobust-fast 0.")


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["attak"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["select", "report"])
def test_table_commands_start_without_torch(command):
    """Commands that only read results tables import neither torch nor the other commands' modules."""
    code = ("import sys\nfrom mtrobust_fast.cli import main\ntry:\n    main([%r, '--help'])\nexcept SystemExit:\n"
            "    pass\nprint('torch' in sys.modules)" % command)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from mtrobust_fast.data.synth.taskonomy import synthesize
    from mtrobust_fast.models import build_model, save_checkpoint

    root = tmp_path_factory.mktemp("cli")
    synthesize(root / "d", 12, size=32, seed=0, workers=1, progress=False)
    save_checkpoint(root / "m.pt", build_model("sd", "resnet18", input_size=32))
    (root / "afile").write_text("x")
    return root


TRAIN = "train --data {r}/d --size 32 --tasks d --epochs 1 --batch-size 2 --workers 0 --no-progress"
ATTACK = "attack --checkpoint {r}/m.pt --data {r}/d --limit 1 --no-progress"


@pytest.mark.parametrize("line, message", [
    (ATTACK + " --size 100", "--size: the model in"),
    (ATTACK + " --seed 99999999999999999999999", "argument --seed: must be in [0, 2**63 - 1]"),
    (ATTACK + " --workers -1", "argument --workers: must be >= 0"),
    (TRAIN + " --out {r}/r1 --schedule 0:inf", "schedule learning rates must be positive and finite"),
    (TRAIN + " --out {r}/r2 --lr 1e308", "training loss became nan in epoch 1"),
    (TRAIN + " --out {r}/r3 --optim sgd --momentum nan", "momentum must be in [0, 1]"),
    (TRAIN + " --out {r}/afile", "afile is a file; --out names the run folder"),
    (TRAIN + " --out {r}/r4 --seed 99999999999999999999999", "argument --seed: must be in [0, 2**63 - 1]"),
    (TRAIN + " --out {r}/r5 --weight-decay inf", "weight_decay must be finite"),
    ("report {r}/none.parquet --dpi -5 --out {r}/rep", "argument --dpi: must be an integer >= 1"),
    ("quickstart --images -1", "argument --images: must be an integer >= 1"),
    ("quickstart --size 33 --workdir {r}/qs33", "--size: 33 px is not a multiple of 32"),
])
def test_bad_command_lines_get_one_clear_error(workspace, capsys, line, message):
    try:
        code = cli.main(line.format(r=workspace).split())
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_resuming_a_checkpoint_of_another_model_is_refused(workspace, capsys):
    run = workspace / "resume"
    assert cli.main((TRAIN + " --out {r}/resume").format(r=workspace).split()) == 0
    payload = torch.load(run / "last.pt", weights_only=True)
    payload["state_dict"]["encoder.stem.0.0.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(payload, run / "last.pt")
    assert cli.main((TRAIN + " --out {r}/resume --epochs 2 --resume").format(r=workspace).split()) == 2
    assert "does not fit this run" in capsys.readouterr().err


def test_a_corrupt_file_read_by_a_worker_process_is_one_clear_line(workspace, tmp_path, capsys):
    import shutil

    data = tmp_path / "d"
    shutil.copytree(workspace / "d", data)
    broken = sorted(data.rglob("*domain_depth_zbuffer.png"))[0]
    broken.write_text("garbage")
    argv = (f"train --data {data} --out {tmp_path / 'run'} --size 32 --tasks d --epochs 1 --batch-size 2 "
            f"--workers 1 --no-progress")
    assert cli.main(argv.split()) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{broken.name}: not a PNG file") and "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("command", ["quickstart", "train", "attack"])
@pytest.mark.parametrize("preset, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_every_command_waits_passively_unless_told_otherwise(command, preset, expected):
    code = (f"import os\nfrom mtrobust_fast.cli import main\ntry:\n    main(['{command}', '--help'])\n"
            "except SystemExit:\n    pass\nprint(os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.stdout.strip().splitlines()[-1] == expected


@pytest.mark.parametrize("attack", ["fab", "apgdt", "square", "autoattack"])
def test_quickstart_refuses_classifier_attacks_before_any_work(attack, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["quickstart", "--attack", attack, "--out", str(tmp_path / "q")])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_running_out_of_memory_is_one_line_in_any_command(capsys):
    assert cli.main(["complexity", "--encoders", "resnet18", "--tasks", "s", "--size", "100000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mtrobust-fast complexity: error: out of memory (111.8 GiB at once)")
    assert len(err.splitlines()) == 1
