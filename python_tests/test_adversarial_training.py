"""Adversarial training: objectives against clean training, what the inner attack must achieve, robustness gained
on a separable set, resume, DDP, bad settings."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from mtrobust_fast.attacks import PGD
from mtrobust_fast.tasks.classification import ClassificationTask
from mtrobust_fast.cli import main as cli_main
from mtrobust_fast.data.synth.objects import synthesize_objects
from mtrobust_fast.models import build_classifier, load_checkpoint, save_checkpoint
from mtrobust_fast.training import AttackSettings, CleanObjective, TaskLosses, Trainer, make_objective
from mtrobust_fast.weighting import StaticWeighting

HEAD = ClassificationTask("class", 2)


# ---- a tiny separable problem (Tsipras et al.'s construction) ----

def separable(n, generator):
    """Class ±1: pixel 0 carries it robustly (0.5 ± 0.3, noisy), the 47 others weakly (0.5 ± 0.04, little
    noise): together the weak ones separate the classes perfectly, but an L∞ attack of 0.1 flips every one."""
    y = torch.randint(0, 2, (n,), generator=generator)
    sign = (2 * y - 1).float()
    x = 0.5 + 0.04 * sign[:, None] * torch.ones(n, 48) + 0.01 * torch.randn(n, 48, generator=generator)
    x[:, 0] = 0.5 + 0.3 * sign + 0.2 * torch.randn(n, generator=generator)
    return x.clamp(0, 1).view(n, 3, 4, 4), y


class Linear(nn.Module):
    """A linear classifier on centred pixels, returning ``{"class": logits}``, with a config so it checkpoints."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(48, 2)
        self.config = {"kind": "test-linear"}

    def forward(self, x):
        return {"class": self.fc((x - 0.5).flatten(1) * 10)}


def _batches(x, y):
    return [(x[i], {"class": y[i]}, {}) for i in range(len(y))]


def _fit(objective, tmp_path, seed=0, epochs=30):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(1)
    x, y = separable(512, generator)
    model = Linear()
    losses = TaskLosses([HEAD])
    train = DataLoader(_batches(x, y), 64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    val = DataLoader(_batches(*separable(64, generator)), 64)
    objective = objective(losses)
    trainer = Trainer(model, objective, StaticWeighting({"class": 1.0}), torch.optim.SGD(model.parameters(), lr=0.5),
                      [(0, 0.5)], train, val, losses, run_dir=tmp_path, progress=False, seed=seed)
    trainer.fit(epochs)
    return model, losses


def _accuracies(model, losses, eps):
    x, y = separable(512, torch.Generator().manual_seed(7))
    x_adv = PGD(model, losses.tasks, eps=eps, alpha=eps / 4, steps=10, seed=0)(x, {"class": y})
    with torch.no_grad():
        return [float((model(v)["class"].argmax(1) == y).float().mean()) for v in (x, x_adv)]


def test_madry_gains_pgd_accuracy_over_clean_training_on_a_separable_set(tmp_path):
    eps = 0.1
    clean_model, losses = _fit(CleanObjective, tmp_path / "clean")
    madry_model, _ = _fit(lambda l: make_objective("madry", l, AttackSettings("pgd", "linf", eps, None, 5), ["class"]),
                          tmp_path / "madry")
    clean, madry = _accuracies(clean_model, losses, eps), _accuracies(madry_model, losses, eps)
    assert clean[0] > 0.95 and madry[0] > 0.9, (clean, madry)  # both fit the clean data
    assert madry[1] > clean[1] + 0.4, (clean, madry)  # clean training relies on the weak, attackable pixels


# ---- equivalences with clean training ----

def _classifier_steps(objective_factory, steps=3, seed=0):
    """Parameters of a small classifier after ``steps`` SGD steps of the objective on fixed random batches."""
    torch.manual_seed(seed)
    model = build_classifier("resnet18", classes=4, input_size=16)
    losses = TaskLosses(model.task_records.values())
    objective = objective_factory(losses)
    weighting = StaticWeighting({"class": 1.0})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(3)
    model.train()
    for _ in range(steps):
        x = torch.rand(6, 3, 16, 16, generator=generator)
        y = torch.randint(0, 4, (6,), generator=generator)
        for out in objective.updates(model, x, {"class": y}, {}):
            optimizer.zero_grad()
            weighting.backward(out.task_losses)
            optimizer.step()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_madry_with_zero_eps_equals_clean_training_step_for_step():
    clean = _classifier_steps(CleanObjective)
    madry = _classifier_steps(lambda l: make_objective("madry", l, AttackSettings(eps=0.0, steps=3), ["class"]))
    assert _same(clean, madry)
    moved = _classifier_steps(lambda l: make_objective("madry", l, AttackSettings(eps=8 / 255, steps=3), ["class"]))
    assert not _same(clean, moved)  # the comparison can fail: a real budget changes the steps


def test_trades_with_zero_beta_equals_clean_training():
    """Parameters are equal; BatchNorm running statistics also see the adversarial batch, so they are not."""
    clean = _classifier_steps(CleanObjective)
    trades = _classifier_steps(lambda l: make_objective("trades", l, AttackSettings(steps=2), ["class"], beta=0.0))
    assert _same(clean, trades)
    weighted = _classifier_steps(lambda l: make_objective("trades", l, AttackSettings(steps=2), ["class"], beta=6.0))
    assert not _same(clean, weighted)


def test_free_with_one_replay_and_zero_eps_equals_clean_training():
    clean = _classifier_steps(CleanObjective)
    free = _classifier_steps(lambda l: make_objective("free", l, AttackSettings("free", eps=0.0), ["class"],
                                                      replays=1))
    assert _same(clean, free)


def test_inner_attacks_raise_the_batch_loss():
    torch.manual_seed(0)
    model = build_classifier("resnet18", classes=4, input_size=16).eval()
    losses = TaskLosses(model.task_records.values())
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 4, (8,))
    with torch.no_grad():
        clean = losses.means(model(x), {"class": y}, {})["class"]
    for name, settings in [("madry", AttackSettings(steps=5)), ("fgsm_rs", AttackSettings("fgsm"))]:
        objective = make_objective(name, losses, settings, ["class"])
        x_adv = objective.adversarial(model, x, {"class": y}, {})
        assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
        with torch.no_grad():
            assert losses.means(model(x_adv), {"class": y}, {})["class"] > clean, name
    assert not model.training  # the attack restores the model's mode


@pytest.mark.parametrize("name", ["madry", "trades"])
def test_a_training_attack_runs_one_forward_pass_per_step(name):
    """The inner attack spends its k steps and nothing more: no early-exit determinism probe per batch (it cost
    about 1.5 forward passes of every training batch), while attacks outside training keep the exit."""
    torch.manual_seed(0)
    model = build_classifier("resnet18_cpu", classes=4, input_size=16).eval()
    losses = TaskLosses(model.task_records.values())
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 4, (8,))
    calls = []
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))  # runs once per forward pass
    first_conv.register_forward_hook(lambda *_: calls.append(1))
    objective = make_objective(name, losses, AttackSettings(steps=3), ["class"])
    objective.adversarial(model, x, {"class": y}, {})
    reference = 1 if name == "trades" else 0  # TRADES attacks the divergence from the clean outputs
    assert len(calls) == 3 + reference
    calls.clear()
    PGD(model, ["class"], eps=8 / 255, steps=3)(x, y)
    assert len(calls) > 3  # the probe: the exit stays on for evaluation

def test_free_replays_step_the_perturbation_inside_the_ball():
    torch.manual_seed(0)
    model = build_classifier("resnet18", classes=4, input_size=16)
    losses = TaskLosses(model.task_records.values())
    free = make_objective("free", losses, AttackSettings("free", eps=4 / 255), ["class"], replays=3)
    x, y = torch.rand(4, 3, 16, 16), torch.randint(0, 4, (4,))
    outputs = 0
    for out in free.updates(model, x, {"class": y}, {}):
        StaticWeighting({"class": 1.0}).backward(out.task_losses)
        outputs += 1
    assert outputs == 3
    assert free.delta.abs().max() == pytest.approx(4 / 255) and (x + free.delta).min() >= 0
    free.start_epoch(1)
    assert free.delta is None


# ---- the CLI: synthetic object set, resume, DDP, errors ----

@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    return synthesize_objects(tmp_path_factory.mktemp("objects") / "data", 100, size=16, seed=0, workers=1,
                              progress=False)


def _train(objects, out, *extra):
    return cli_main(["train", "--data", str(objects), "--out", str(out), "--encoder", "resnet18", "--workers", "0",
                     "--no-progress", "--batch-size", "10", "--lr", "1e-3", *extra])


def _log(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_madry_training_on_objects_records_settings_and_robust_validation(objects, tmp_path):
    run = tmp_path / "run"
    assert _train(objects, run, "--epochs", "2", "--adversarial", "madry", "--steps", "2", "--eps", "4/255",
                  "--robust-val", "10", "--robust-val-steps", "2", "--select", "robust") == 0
    log = _log(run)
    robust = log[-1]["robust_val"]
    assert robust["samples"] == 10 and robust["attack"].startswith("PGD-2 linf")
    assert 0 <= robust["tasks"]["class"]["adv_error"] <= 1
    model, meta = load_checkpoint(run / "last.pt")
    assert model.config["kind"] == "classifier" and model.config["input_size"] == 16
    saved = meta["train_config"]
    assert saved["adversarial"] == "madry" and saved["eps"] == pytest.approx(4 / 255)
    assert saved["objective_settings"]["attacked"] == ["class"] and meta["select"] == "robust"
    best_epoch = min(log, key=lambda r: r["robust_val"]["error"])["epoch"]
    assert load_checkpoint(run / "best.pt")[1]["epoch"] == best_epoch


@pytest.mark.parametrize("objective", ["madry", "free"])
def test_adversarial_resume_equals_an_uninterrupted_run(objects, tmp_path, objective):
    steps = ("--steps", "2") if objective == "madry" else ()  # free takes replays, not steps
    common = ("--adversarial", objective, *steps, "--robust-val", "0", "--seed", "5", "--limit-train", "40")
    assert _train(objects, tmp_path / "straight", "--epochs", "2", *common) == 0
    assert _train(objects, tmp_path / "split", "--epochs", "1", *common) == 0
    assert _train(objects, tmp_path / "split", "--epochs", "2", "--resume", *common) == 0
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["state_dict"]
    split = torch.load(tmp_path / "split" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(value, split[key]) for key, value in straight.items())


def test_resume_refuses_changed_adversarial_settings(objects, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(objects, run, "--epochs", "1", "--adversarial", "madry", "--steps", "1", "--robust-val", "0",
                  "--limit-train", "20") == 0
    assert _train(objects, run, "--epochs", "2", "--resume", "--adversarial", "trades", "--steps", "1",
                  "--robust-val", "0", "--limit-train", "20") == 2
    assert "adversarial: 'madry' in the checkpoint, 'trades' now" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--adversarial", "pgd"], "argument --adversarial"),
    (["--eps", "8"], "--eps: 8 is above 1, but images are in [0, 1]"),
    (["--adversarial", "madry", "--attack-tasks", "s"], "attack_tasks: 's' is not one of the model's tasks"),
    (["--select", "robust"], "select: 'robust' needs robust validation"),
    (["--tasks", "sd"], "tasks:"),
    (["--weights", "class=0"], "weights: at least one task weight must be non-zero"),
    (["--weights", "s=1"], "weights: 's' is not one of the model's tasks"),
    (["--adversarial", "madry", "--steps", "0"], "steps must be at least 1"),
    (["--adversarial", "fgsm_rs", "--steps", "5"], "steps: fgsm_rs takes no steps"),
    (["--adversarial", "free", "--steps", "3"], "steps: free takes no steps"),
    (["--steps", "3"], "steps: clean training has no inner attack"),
])
def test_bad_settings_are_named(objects, tmp_path, capsys, argv, message):
    try:
        code = _train(objects, tmp_path / "bad", "--epochs", "1", *argv)
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_ddp_two_processes_train_adversarially(objects, tmp_path, torchrun):
    run = tmp_path / "ddp"
    result = torchrun("train", "--data", objects, "--out", run, "--epochs", "1", "--batch-size", "5",
                      "--limit-train", "20", "--adversarial", "madry_mix", "--steps", "2", "--robust-val", "6",
                      "--robust-val-steps", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    (record,) = _log(run)
    assert record["train"]["samples"] == 20 and record["robust_val"]["samples"] == 6
    model, meta = load_checkpoint(run / "last.pt")
    assert meta["train_config"]["adversarial"] == "madry_mix"


def test_attack_cli_evaluates_a_trained_classifier(objects, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(objects, run, "--epochs", "1", "--adversarial", "fgsm_rs", "--robust-val", "0") == 0
    assert cli_main(["attack", "--checkpoint", str(run / "best.pt"), "--data", str(objects), "--steps", "3",
                     "--target", "class", "--no-progress", "--out", str(tmp_path / "res")]) == 0
    printed = capsys.readouterr().out
    assert "attacked set class:" in printed
    # a classifier's headline is its robust accuracy and drop; the per-image relative change of a 0/1 error
    # (which only wrong images enter) is not printed as a number
    assert "n/a (0/1 error)" in printed and "(drop " in printed and "class accuracy" in printed
    summary = json.loads((tmp_path / "res" / "results.json").read_text())["summary"]
    assert summary["samples"] == 20 and summary["attacks"]["class"]["tasks"]["class"]["adv_accuracy"] <= \
        summary["clean"]["class"]["accuracy"]


def test_a_collapse_of_robust_validation_is_warned_about(tmp_path, capsys):
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(_batches(*separable(8, generator)), 4)
    losses = TaskLosses([HEAD])
    model = Linear()
    trainer = Trainer(model, CleanObjective(losses), StaticWeighting({"class": 1.0}),
                      torch.optim.SGD(model.parameters(), lr=0.1), [(0, 0.1)], loader, loader, losses,
                      run_dir=tmp_path, progress=False)
    records = [{"epoch": e, "robust_val": {"error": err}} for e, err in ((1, 0.5), (2, 0.45), (3, 0.9))]
    for record in records:
        trainer._warn_if_collapsed(record)
    assert "warning" not in records[0] and "warning" not in records[1]
    assert "catastrophic overfitting" in records[2]["warning"] and "0.450 to 0.900" in capsys.readouterr().out


def test_data_subset_keeps_a_fraction_of_the_training_set(objects, tmp_path, capsys):
    run = tmp_path / "subset"
    assert _train(objects, run, "--epochs", "1", "--data-subset", "0.25", "--batch-size", "5") == 0
    (record,) = _log(run)
    assert record["train"]["samples"] == 15  # ceil(0.25 * 70 training images) = 18, in full batches of 5
    assert _train(objects, tmp_path / "bad", "--epochs", "1", "--data-subset", "1.5") == 2
    assert "data_subset must be a fraction" in capsys.readouterr().err


def test_attack_warns_about_a_collapsed_classifier(objects, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(objects, run, "--epochs", "1", "--robust-val", "0") == 0
    model, meta = load_checkpoint(run / "last.pt")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("weight") and parameter.dim() == 2:  # the head ignores its features: one output
                parameter.zero_()
    save_checkpoint(tmp_path / "collapsed.pt", model, **meta)
    assert cli_main(["attack", "--checkpoint", str(tmp_path / "collapsed.pt"), "--data", str(objects), "--steps",
                     "2", "--no-progress", "--no-gradients", "--out", str(tmp_path / "res")]) == 0
    assert "class looks collapsed (the same output for every image)" in capsys.readouterr().out
    row = json.loads((tmp_path / "res" / "results.json").read_text())["summary"]["collapsed"]
    assert row == {"class": "the same output for every image"}
