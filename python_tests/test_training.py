"""Clean multi-task training: schedule/config checks, loss goes down, exact resume, DDP on gloo."""
import json
import os
from pathlib import Path

import pytest
import torch

from mtrobust_fast.cli import main as cli_main
from mtrobust_fast.data.synth.taskonomy import synthesize
from mtrobust_fast.models import load_checkpoint
from mtrobust_fast.training import CleanObjective, ObjectiveOutput, TaskLosses, TrainConfig, Trainer
from mtrobust_fast.weighting import StaticWeighting
from mtrobust_fast.training.schedules import lr_at, parse_schedule
from mtrobust_fast.training.runner import make_datasets, make_loaders
from mtrobust_fast.training.distributed import DistContext




@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """40 synthetic 64-px images: 14 train, 13 val, 13 test (three buildings)."""
    root = tmp_path_factory.mktemp("synth")
    synthesize(root, 40, size=64, seed=0, workers=1, progress=False)
    return root


def _train_cli(data, out, *extra, size=64):
    args = ["train", "--data", str(data), "--out", str(out), *(["--size", str(size)] if size else []),
            "--encoder", "resnet18", "--workers", "0", "--no-progress", *extra]
    return cli_main(args)


def _log(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# ---- configuration ----

def test_schedule_parsing_and_lookup():
    schedule = parse_schedule("0:1e-3,120:1e-4,140:1e-5")
    assert schedule == [(0, 1e-3), (120, 1e-4), (140, 1e-5)]
    assert [lr_at(schedule, e) for e in (0, 119, 120, 139, 140, 500)] == [1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5]
    for bad in ("1:1e-3", "0:1e-3,0:1e-4", "0:1e-3,x", "0-1e-3", "0:-1"):
        with pytest.raises(ValueError, match="schedule"):
            parse_schedule(bad)


def test_config_defaults_and_checks(tmp_path):
    config = TrainConfig(data="d", out="o", tasks="ds", encoder="xception")
    assert (config.tasks, config.encoder) == ("sd", "xception_small")
    assert config.lr_schedule == "0:1e-3,120:1e-4,140:1e-5" and config.decay == 0.0
    assert TrainConfig(data="d", out="o", optim="sgd").decay == 1e-4
    assert TrainConfig(data="d", out="o", lr=0.5).lr_schedule == "0:0.5"
    zamir = TrainConfig(data="d", out="o", tasks="sdE", weights="zamir", main="s").task_weights()
    assert zamir == {"segment_semantic": 1.0, "depth_zbuffer": 0.01, "edge_occlusion": 0.1}
    with pytest.raises(ValueError, match="main"):
        TrainConfig(data="d", out="o", tasks="sd", weights="zamir")
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(data="d", out="o", lr=0.1, schedule="0:0.1")
    with pytest.raises(ValueError, match="optim"):
        TrainConfig(data="d", out="o", optim="rmsprop")
    with pytest.raises(ValueError, match="unknown encoder"):
        TrainConfig(data="d", out="o", encoder="vgg")


def test_task_losses_and_static_weighting_combine_per_sample_losses():
    losses = TaskLosses(["d", "segment_semantic"])
    assert losses.names == ["depth_zbuffer", "segment_semantic"]
    logits = torch.randn(2, 18, 4, 4, requires_grad=True)
    outputs = {"segment_semantic": logits, "depth_zbuffer": torch.zeros(2, 1, 4, 4)}
    targets = {"segment_semantic": torch.randint(1, 18, (2, 4, 4)), "depth_zbuffer": torch.ones(2, 1, 4, 4)}
    masks = {"depth_zbuffer": torch.ones(2, 1, 4, 4, dtype=torch.bool)}
    means = losses.means(outputs, targets, masks)
    ce = torch.nn.functional.cross_entropy(logits, targets["segment_semantic"])
    assert torch.allclose(means["segment_semantic"], ce) and means["depth_zbuffer"] == 1.0
    weighting = StaticWeighting({"segment_semantic": 1.0, "depth_zbuffer": -0.25})  # negative weights allowed
    total = weighting.backward(means)
    assert torch.allclose(total, ce - 0.25) and not total.requires_grad
    expected = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, targets["segment_semantic"]), logits)[0]
    assert torch.allclose(logits.grad, expected)
    with pytest.raises(KeyError, match="missing"):
        weighting.backward({"segment_semantic": means["segment_semantic"]})
    with pytest.raises(ValueError, match="non-zero"):
        StaticWeighting({"segment_semantic": 0.0})


def test_amp_needs_cuda(data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert _train_cli(data, tmp_path / "run", "--tasks", "s", "--epochs", "1", "--amp") == 2


# ---- training runs ----

def test_loss_goes_down_and_run_dir_is_complete(data, tmp_path, capsys):
    run = tmp_path / "run"
    code = _train_cli(data, run, "--tasks", "sd", "--epochs", "4", "--batch-size", "4", "--lr", "1e-3",
                      "--limit-train", "8", "--limit-val", "4", "--save-every", "2", "--val-before")
    assert code == 0
    printed = capsys.readouterr().out
    assert "trivial predictors on the validation set" in printed and "all-background" in printed
    closing = printed[printed.index("finished epoch 4"):]
    assert "segment_semantic: miou" in closing and " vs " in closing and "[training mean]" in closing
    assert f"checkpoints in {run}: last.pt, best.pt" in closing
    trivial = json.loads((run / "trivial.json").read_text())
    assert trivial["segment_semantic"]["predictor"] == "all-background"
    assert set(trivial["depth_zbuffer"]) == {"predictor", "error", "l1", "mse"}
    log = _log(run)
    assert [r["epoch"] for r in log] == list(range(5))
    first, last = log[1]["train"], log[-1]["train"]
    assert last["loss"] < 0.6 * first["loss"], (first["loss"], last["loss"])
    assert first["samples"] == 8
    seg = log[-1]["val"]["tasks"]["segment_semantic"]
    assert set(seg) == {"loss", "miou", "pixel_acc"} and 0 <= seg["miou"] <= 1
    assert set(log[-1]["val"]["tasks"]["depth_zbuffer"]) == {"loss", "l1", "mse"}
    assert sorted(os.listdir(run)) == ["best.pt", "config.json", "epoch_0002.pt", "epoch_0004.pt", "last.pt",
                                       "metrics.jsonl", "trivial.json"]
    model, meta = load_checkpoint(run / "last.pt")
    assert meta["epoch"] == 4 and model.config["tasks"] == "sd" and model.config["input_size"] == 64
    assert meta["train_config"]["lr"] == 1e-3
    best_epoch = min(log[1:], key=lambda r: r["val"]["loss"])["epoch"]
    assert load_checkpoint(run / "best.pt")[1]["epoch"] == best_epoch


@pytest.mark.parametrize("augment", ["none", "crop+flip"])
def test_resume_matches_an_uninterrupted_run(data, tmp_path, augment):
    common = ("--tasks", "sd", "--batch-size", "2", "--limit-train", "4", "--limit-val", "2", "--seed", "3",
              "--schedule", "0:1e-3,1:1e-4", "--augment", augment)
    assert _train_cli(data, tmp_path / "straight", "--epochs", "2", *common, size=32) == 0
    assert _train_cli(data, tmp_path / "split", "--epochs", "1", *common, size=32) == 0
    assert _train_cli(data, tmp_path / "split", "--epochs", "2", "--resume", *common, size=32) == 0
    assert [r["epoch"] for r in _log(tmp_path / "split")] == [1, 2]
    assert _log(tmp_path / "split")[-1]["train"]["lr"] == 1e-4
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert split["meta"]["epoch"] == 2
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, split["state_dict"][key]), key


def test_resume_and_overwrite_guards(data, tmp_path, capsys):
    run = tmp_path / "run"
    common = ("--batch-size", "2", "--limit-train", "2", "--limit-val", "1", "--epochs", "1")
    assert _train_cli(data, run, "--tasks", "s", *common, size=32) == 0
    assert _train_cli(data, run, "--tasks", "s", *common, size=32) == 2
    assert "--resume" in capsys.readouterr().err
    assert _train_cli(data, run, "--tasks", "sd", "--resume", *common, size=32) == 2
    assert "tasks: 's' in the checkpoint, 'sd' now" in capsys.readouterr().err


def test_trainer_accepts_a_custom_objective(data, tmp_path):
    """The per-batch objective is the plug point for adversarial training and GAT."""
    config = TrainConfig(data=str(data), out=str(tmp_path), tasks="d", size=32, epochs=1, batch_size=2,
                         limit_train=4, limit_val=2, workers=0, progress=False)
    train_set, val_set, model = make_datasets(config)
    losses = TaskLosses(model.task_records.values())
    calls = []

    class NoisyObjective(CleanObjective):
        def __call__(self, model, images, targets, masks):
            calls.append(images.shape[0])
            return super().__call__(model, (images + 0.01 * torch.randn_like(images)).clamp(0, 1), targets, masks)

    train_loader, val_loader = make_loaders(config, DistContext(), train_set, val_set)
    trainer = Trainer(model, NoisyObjective(losses), StaticWeighting(model.config["task_weights"]),
                      torch.optim.SGD(model.parameters(), lr=1e-3), [(0, 1e-3)],
                      train_loader, val_loader, losses, run_dir=tmp_path, progress=False)
    record = trainer.fit(1)
    assert calls == [2, 2] and record["train"]["samples"] == 4
    assert isinstance(NoisyObjective(losses)(model, *next(iter(train_loader))), ObjectiveOutput)


def test_ddp_two_processes_on_gloo(data, tmp_path, torchrun):
    run = tmp_path / "ddp"
    result = torchrun("train", "--data", data, "--out", run, "--tasks", "sd", "--size", "32", "--epochs", "2",
                      "--batch-size", "2", "--limit-train", "4", "--limit-val", "5")
    assert result.returncode == 0, result.stdout + result.stderr
    log = _log(run)
    assert [r["epoch"] for r in log] == [1, 2]
    # Each process trained on its own 2 of the 4 samples; validation saw each of the 5 samples once.
    assert all(r["train"]["samples"] == 4 and r["val"]["samples"] == 5 for r in log)
    model, meta = load_checkpoint(run / "last.pt")
    assert meta["epoch"] == 2 and not any(k.startswith("module.") for k in model.state_dict())


class _Killed(Exception):
    """Stands for a kill -9 at a chosen point of an epoch's outputs."""


@pytest.mark.parametrize("kill_after", ["log line", "first checkpoint"])
def test_a_kill_between_an_epochs_outputs_loses_and_doubles_nothing(data, tmp_path, monkeypatch, kill_after):
    common = ("--tasks", "d", "--batch-size", "2", "--limit-train", "4", "--limit-val", "2", "--seed", "3",
              "--epochs", "3", "--lr", "1e-3", "--save-every", "0")
    assert _train_cli(data, tmp_path / "straight", *common, size=32) == 0
    log, save = Trainer.log, Trainer.save

    def dying_log(self, record):
        log(self, record)
        if kill_after == "log line" and record["epoch"] == 2:
            raise _Killed

    def dying_save(self, name, epoch, metrics, training_state=True):
        if kill_after == "first checkpoint" and epoch == 2 and not getattr(self, "_saved_once", False):
            self._saved_once = True
            save(self, name, epoch, metrics, training_state)
            raise _Killed
        save(self, name, epoch, metrics, training_state)

    monkeypatch.setattr(Trainer, "log", dying_log)
    monkeypatch.setattr(Trainer, "save", dying_save)
    with pytest.raises(_Killed):
        _train_cli(data, tmp_path / "split", *common, size=32)
    monkeypatch.undo()
    stale = tmp_path / "split" / ".last.pt.999999999.tmp"  # what a writer killed mid-save leaves behind
    stale.write_bytes(b"partial")
    assert _train_cli(data, tmp_path / "split", *common, "--resume", size=32) == 0
    assert not stale.exists()
    straight, split = _log(tmp_path / "straight"), _log(tmp_path / "split")
    assert [r["epoch"] for r in split] == [1, 2, 3]
    assert [r["train"]["loss"] for r in split] == [r["train"]["loss"] for r in straight]
    for name in ("best.pt", "last.pt"):
        a = torch.load(tmp_path / "straight" / name, weights_only=True)
        b = torch.load(tmp_path / "split" / name, weights_only=True)
        assert a["meta"]["epoch"] == b["meta"]["epoch"]
        assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items()), name
    best = torch.load(tmp_path / "split" / "best.pt", weights_only=True)["meta"]
    assert "optimizer" not in best and best["epoch"] == min(split, key=lambda r: r["val"]["loss"])["epoch"]


def test_a_kill_before_the_first_checkpoint_leaves_no_doubled_log_lines(data, tmp_path, monkeypatch):
    """Killed after epoch 1's log line but before any last.pt: the resumed run starts afresh, and its log holds
    each epoch once (not the dead run's lines followed by the new run's)."""
    common = ("--tasks", "d", "--batch-size", "2", "--limit-train", "4", "--limit-val", "2", "--seed", "3",
              "--epochs", "2", "--lr", "1e-3", "--save-every", "0", "--val-before")
    log = Trainer.log

    def dying_log(self, record):
        log(self, record)
        if record["epoch"] == 1:
            raise _Killed

    monkeypatch.setattr(Trainer, "log", dying_log)
    with pytest.raises(_Killed):
        _train_cli(data, tmp_path / "run", *common, size=32)
    monkeypatch.undo()
    assert [r["epoch"] for r in _log(tmp_path / "run")] == [0, 1] and not (tmp_path / "run" / "last.pt").exists()
    assert _train_cli(data, tmp_path / "run", *common, "--resume", size=32) == 0
    assert [r["epoch"] for r in _log(tmp_path / "run")] == [0, 1, 2]


def test_size_defaults_to_the_images_own(data, tmp_path):
    assert _train_cli(data, tmp_path / "run", "--tasks", "d", "--epochs", "1", "--batch-size", "2",
                      "--limit-train", "2", "--limit-val", "1", size=None) == 0
    assert load_checkpoint(tmp_path / "run" / "last.pt")[0].config["input_size"] == 64


def test_balanced_segment_loss_is_what_is_trained_and_validated(data, tmp_path, capsys):
    common = ("--tasks", "s", "--epochs", "1", "--batch-size", "2", "--limit-train", "2", "--limit-val", "2",
              "--seed", "1", "--val-before")
    assert _train_cli(data, tmp_path / "ce", *common, size=32) == 0
    assert _train_cli(data, tmp_path / "bal", *common, "--segment-loss", "balanced", size=32) == 0
    ce, bal = _log(tmp_path / "ce"), _log(tmp_path / "bal")
    # same seed, same initial model: the epoch-0 validation differs only by the loss that scores it
    assert ce[0]["val"]["tasks"]["segment_semantic"]["miou"] == bal[0]["val"]["tasks"]["segment_semantic"]["miou"]
    assert ce[0]["val"]["loss"] != bal[0]["val"]["loss"]
    assert load_checkpoint(tmp_path / "bal" / "last.pt")[1]["train_config"]["segment_loss"] == "balanced"
    with pytest.raises(ValueError, match="segment_loss must be one of"):
        TrainConfig(data="d", out="o", segment_loss="focal")
    assert _train_cli(data, tmp_path / "d", "--tasks", "d", "--segment-loss", "balanced", size=32) == 2
    assert "has no segmentation" in capsys.readouterr().err


def test_a_classification_loss_on_taskonomy_data_is_refused_not_ignored(data, tmp_path, capsys):
    code = _train_cli(data, tmp_path / "run", "--tasks", "s", "--epochs", "1", "--class-loss", "bce")
    err = capsys.readouterr().err
    assert code == 2 and "class_loss: " in err and "has no classification head" in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_the_closing_summary_says_when_a_task_got_worse(tmp_path):
    from mtrobust_fast.training.runner import _worsened
    log = tmp_path / "metrics.jsonl"
    lines = [{"epoch": 0, "val": {"tasks": {"s": {"loss": 1.0}, "e": {"loss": 1.03}}}},
             {"epoch": 5, "val": {"tasks": {"s": {"loss": 0.5}, "e": {"loss": 23.4}}}}]
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    (warning,) = _worsened(log)
    assert "e got worse during training: validation loss 1.03 at epoch 0 -> 23.4 at epoch 5" in warning


def test_keep_weights_leaves_a_finished_run_with_weights_only(data, tmp_path, capsys):
    common = ("--tasks", "d", "--batch-size", "2", "--limit-train", "2", "--limit-val", "1", "--optim", "adam")
    assert _train_cli(data, tmp_path / "all", "--epochs", "1", *common, size=32) == 0
    assert _train_cli(data, tmp_path / "weights", "--epochs", "1", "--keep", "weights", *common, size=32) == 0
    full = torch.load(tmp_path / "all" / "last.pt", weights_only=True)
    slim = torch.load(tmp_path / "weights" / "last.pt", weights_only=True)
    assert "optimizer" in full["meta"] and "optimizer" not in slim["meta"] and slim["meta"]["epoch"] == 1
    for key, value in full["state_dict"].items():
        assert torch.equal(value, slim["state_dict"][key])
    assert (tmp_path / "weights" / "last.pt").stat().st_size < 0.5 * (tmp_path / "all" / "last.pt").stat().st_size
    capsys.readouterr()
    assert _train_cli(data, tmp_path / "weights", "--epochs", "1", "--resume", *common, size=32) == 0
    assert "already trained" in capsys.readouterr().out
    assert _train_cli(data, tmp_path / "weights", "--epochs", "2", "--resume", *common, size=32) == 2
    assert "no training state" in capsys.readouterr().err
