"""Outputs are checked before work: a blank --out, a folder that cannot be written, and a run folder another live
process is writing are refused at once with one line; a killed run's lock does not block the next."""
import subprocess
import sys

import pytest

from mtrobust_fast.cli import main as cli_main
from mtrobust_fast.files import FolderLock, writable_folder
from mtrobust_fast.training import TrainConfig, train


@pytest.mark.parametrize("command", [["train", "--data", "d"], ["attack", "--checkpoint", "c.pt", "--data", "d"],
                                     ["sweep"], ["report", "--results", "r.parquet"],
                                     ["data", "synth", "--images", "1"]])
def test_a_blank_out_is_refused_at_parsing(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*command, "--out", ""])
    assert exit_info.value.code == 2
    assert "argument --out: an empty path would write into the current folder" in capsys.readouterr().err


def test_an_unwritable_out_is_refused_before_the_attack_runs(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    code = cli_main(["attack", "--checkpoint", str(tmp_path / "missing.pt"), "--data", str(tmp_path), "--out",
                     str(tmp_path / "file.txt" / "sub")])
    err = capsys.readouterr().err
    assert code != 0 and "--out: cannot write into" in err and "missing.pt" not in err  # before the checkpoint


def test_earlier_attack_results_are_kept_unless_overwrite_is_given(tmp_path, capsys):
    """A second attack into the same --out is refused before it runs (it silently replaced the first one's
    results); --overwrite replaces them."""
    out = tmp_path / "res"
    out.mkdir()
    (out / "results.csv").write_text("earlier\n")
    argv = ["attack", "--checkpoint", str(tmp_path / "missing.pt"), "--data", str(tmp_path), "--out", str(out)]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "already holds the results" in err and "--overwrite" in err and "missing.pt" not in err
    assert (out / "results.csv").read_text() == "earlier\n"
    assert cli_main([*argv, "--overwrite"]) == 2  # gets past the check, to the missing checkpoint
    assert "missing.pt" in capsys.readouterr().err


def test_writable_folder_names_the_problem(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="out: .* is a file"):
        writable_folder(tmp_path / "file.txt")
    with pytest.raises(ValueError, match="out: an empty path"):
        writable_folder("")
    assert writable_folder(tmp_path / "a" / "b").is_dir()
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the write probe is gone


def test_a_run_folder_held_by_a_live_process_is_refused_and_a_dead_holders_lock_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(str(holder.pid))
        config = TrainConfig(data=str(tmp_path / "no-data"), out=str(run), epochs=1, workers=0, progress=False)
        with pytest.raises(ValueError, match=rf"out: .*run is being written by another process \(pid {holder.pid}\)"):
            train(config)
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead now: its lock is taken over, and released when the run ends (here: on missing data)
    with pytest.raises((FileNotFoundError, ValueError)) as error:
        train(config)
    assert "being written by another process" not in str(error.value)
    assert not (run / ".lock").exists()


def test_the_lock_is_exclusive_within_its_holder_and_released(tmp_path):
    with FolderLock(tmp_path):
        assert (tmp_path / ".lock").read_text().strip().isdigit()
    assert not (tmp_path / ".lock").exists()


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")])
def test_a_failed_write_is_one_named_error_and_leaves_the_previous_file(tmp_path, failure):
    from mtrobust_fast.files import WriteError, atomic_write
    target = tmp_path / "last.pt"
    target.write_text("previous")

    def write(tmp):
        tmp.write_text("half")
        raise failure

    with pytest.raises(WriteError, match="cannot write .*last.pt: .*disk full"):
        atomic_write(target, write)
    assert target.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_train_on_a_disk_that_fills_up_stops_with_one_line_and_resumes(tmp_path, capsys, monkeypatch):
    """The second epoch's checkpoint fails as torch.save fails on a full disk: one line, exit 2, the first
    epoch's last.pt intact and no temporary left; --resume then finishes the run."""
    import torch
    from mtrobust_fast.data.synth.objects import synthesize_objects
    from mtrobust_fast.models import checkpoint

    data = synthesize_objects(tmp_path / "data", 40, size=16, seed=0, workers=1, progress=False)
    saves = []
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) >= 3:  # epoch 1: best.pt, last.pt; epoch 2: best.pt fails
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 0")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--encoder", "resnet18_cpu", "--epochs",
            "2", "--batch-size", "10", "--lr", "1e-3", "--workers", "0", "--no-progress", "--save-every", "0"]
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write" in err and "disk full" in err and "Traceback" not in err
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["meta"]["epoch"] == 1
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert cli_main(argv + ["--resume"]) == 0
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["meta"]["epoch"] == 2
