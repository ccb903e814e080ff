"""Today's robust-training recipe parts: weight averaging, per-update schedules and the ε warm-up, label smoothing,
N-FGSM, MART, AWP; each against its formula, and resume of an averaged run against the uninterrupted run."""
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mtrobust_fast.attacks import NFGSM, classification
from mtrobust_fast.cli import main as cli_main
from mtrobust_fast.data.synth.objects import synthesize_objects
from mtrobust_fast.data.synth.taskonomy import synthesize
from mtrobust_fast.tasks.classification import ClassificationTask
from mtrobust_fast.training import AttackSettings, TaskLosses, make_objective
from mtrobust_fast.training.adversarial import Madry, mart_loss
from mtrobust_fast.training.averaging import WeightAverage
from mtrobust_fast.training.awp import AWP
from mtrobust_fast.training.config import TrainConfig
from mtrobust_fast.training.schedules import Schedule

HEAD = ClassificationTask("class", 3)


class Net(nn.Module):
    """A small classifier with BatchNorm (averaged buffers) returning ``{"class": logits}``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.fc = nn.Linear(64, 3)
        self.config = {"kind": "test-net"}

    def forward(self, x):
        return {"class": self.fc(torch.relu(self.norm(self.conv(x))).flatten(1))}


def _batch(n=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 4, 4, generator=generator), torch.randint(0, 3, (n,), generator=generator)


# ---- weight averaging ----

def test_weight_average_equals_the_hand_computed_average():
    torch.manual_seed(0)
    model = Net()
    average = WeightAverage(model, decay=0.9, warmup=2)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for n in range(4):
        x, y = _batch(seed=n)
        optimizer.zero_grad()
        F.cross_entropy(model(x)["class"], y).backward()
        optimizer.step()
        d = min(0.9, (1 + n) / (2 + n))
        for key, value in model.state_dict().items():
            expected[key] = d * expected[key] + (1 - d) * value if value.is_floating_point() else value.clone()
        average.update(model)
    assert average.updates == 4
    for key, value in average.model.state_dict().items():
        assert torch.allclose(value, expected[key].to(value.dtype), atol=1e-6), key
    assert average.model.norm.running_var.ne(1).any()  # BatchNorm statistics are averaged, not left at init


def test_weight_average_with_decay_0_is_the_raw_model():
    model = Net()
    average = WeightAverage(model, decay=0.0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    average.update(model)
    for key, value in model.state_dict().items():
        assert torch.equal(average.model.state_dict()[key], value), key
    with pytest.raises(ValueError, match="ema"):
        WeightAverage(model, decay=1.0)


# ---- schedules ----

def test_schedules_equal_their_formulas():
    steps = [(0, 0.1)]
    cosine = Schedule(steps, epochs=4, updates_per_epoch=10, kind="cosine", warmup_epochs=1)
    assert cosine.lr(0, 0) == pytest.approx(0.1 * 1 / 10)
    assert cosine.lr(0, 9) == pytest.approx(0.1)
    assert cosine.lr(1, 0) == pytest.approx(0.1)
    assert cosine.lr(2, 5) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 15 / 30)))
    assert 0 < cosine.lr(3, 9) < 0.1 * 0.01
    onecycle = Schedule(steps, epochs=5, updates_per_epoch=10, kind="onecycle")  # warm-up: 2/5 of 50 updates
    assert onecycle.lr(0, 0) == pytest.approx(0.1 / 20)
    assert onecycle.lr(1, 9) == pytest.approx(0.1)
    assert onecycle.lr(3, 0) == pytest.approx(0.1 * (50 - 30) / 30)
    assert onecycle.lr(4, 9) == pytest.approx(0.1 / 30)
    stepped = Schedule([(0, 0.1), (2, 0.01)], epochs=4, updates_per_epoch=10, eps_warmup_epochs=0.5)
    assert [stepped.lr(e, 3) for e in range(4)] == [0.1, 0.1, 0.01, 0.01]
    assert [stepped.eps_factor(0, b) for b in (0, 2, 4, 5)] == [pytest.approx(0.2), pytest.approx(0.6), 1.0, 1.0]
    assert stepped.eps_factor(3, 0) == 1.0
    with pytest.raises(ValueError, match="peak"):
        Schedule([(0, 0.1), (2, 0.01)], 4, 10, kind="cosine")


def test_eps_warm_up_scales_the_inner_attack():
    objective = make_objective("fgsm_rs", TaskLosses([HEAD]), AttackSettings("fgsm", eps=8 / 255), ["class"])
    objective.scale_budget(0.25)
    assert objective.attack.eps == pytest.approx(2 / 255) and objective.attack.step_size == pytest.approx(2.5 / 255)
    objective.scale_budget(1.0)
    assert objective.attack.eps == 8 / 255


# ---- label smoothing ----

def test_label_smoothing_equals_pytorch_and_stays_out_of_attacks_and_validation():
    logits = torch.randn(6, 3)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    losses = TaskLosses([HEAD], label_smoothing=0.2)
    trained = losses.means({"class": logits}, {"class": labels}, {})["class"]
    assert torch.allclose(trained, F.cross_entropy(logits, labels, label_smoothing=0.2))
    validated = losses.per_sample({"class": logits}, {"class": labels}, {})["class"]
    assert torch.allclose(validated, F.cross_entropy(logits, labels, reduction="none"))
    # the inner attack is built from the plain records: its loss is plain cross-entropy
    objective = make_objective("madry", losses, AttackSettings("pgd", steps=1), ["class"])
    attack = objective.attack.build(Net(), objective.losses.tasks, objective.attacked, seed=0)
    (spec,) = attack.specs
    assert torch.allclose(spec.loss(logits, labels, None), F.cross_entropy(logits, labels, reduction="none"))
    with pytest.raises(ValueError, match="label_smoothing"):
        TaskLosses(["d"], label_smoothing=0.1)


# ---- N-FGSM ----

def test_nfgsm_noise_range_and_no_projection():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    x = torch.rand(512, 3, 4, 4) * 0.5 + 0.25  # far enough from the box that it never clips
    y = torch.randint(0, 3, (512,))
    eps = 8 / 255
    noise = NFGSM(model, [classification()], eps=eps, alpha=0.0, seed=1)(x, y) - x  # the noise alone
    assert noise.abs().max() <= 2 * eps + 1e-6
    assert noise.max() > 1.9 * eps and noise.min() < -1.9 * eps
    assert noise.mean().abs() < 0.05 * eps and noise.std() == pytest.approx(2 * eps / math.sqrt(3), rel=0.05)
    delta = NFGSM(model, [classification()], eps=eps, seed=1)(x, y) - x  # noise plus one step of eps
    assert delta.abs().max() <= 3 * eps + 1e-6
    assert (delta.abs() > eps + 1e-6).float().mean() == pytest.approx(0.5, abs=0.05)  # not projected to the ball
    assert torch.allclose((delta - noise).abs(), torch.full_like(x, eps), atol=1e-6)  # a full signed step


# ---- MART ----

def test_mart_loss_equals_its_formula_on_a_hand_case():
    clean = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.2]])
    adv = torch.tensor([[0.5, 1.5, -0.5], [0.3, 0.1, 0.9]])
    labels = torch.tensor([0, 1])
    got = mart_loss(clean, adv, labels, beta=6.0)
    pc = np.exp(clean.numpy()) / np.exp(clean.numpy()).sum(1, keepdims=True)
    pa = np.exp(adv.numpy()) / np.exp(adv.numpy()).sum(1, keepdims=True)
    expected = []
    for i, y in enumerate(labels.tolist()):
        other = max(p for k, p in enumerate(pa[i]) if k != y)
        boosted = -math.log(pa[i, y]) - math.log(1 - other)
        kl = float((pc[i] * np.log(pc[i] / pa[i])).sum())
        expected.append(boosted + 6.0 * kl * (1 - pc[i, y]))
    assert torch.allclose(got, torch.tensor(expected), atol=1e-5)


def test_mart_is_refused_for_dense_tasks():
    with pytest.raises(ValueError, match="mart"):
        make_objective("mart", TaskLosses(["s", "d"]), AttackSettings("pgd", steps=1), ["segment_semantic"])


# ---- AWP ----

def test_awp_perturbation_bound_and_restore():
    torch.manual_seed(0)
    model = Net()
    losses = TaskLosses([HEAD])
    inner = make_objective("madry", losses, AttackSettings("pgd", steps=1), ["class"])
    awp = AWP(inner, {"class": 1.0}, gamma=0.01)
    awp.start_epoch(0)
    x, y = _batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    out = awp(model, x, {"class": y}, {})
    for parameter, v in awp._applied:  # the bound: per layer, gamma times the layer's own norm
        assert float(v.norm()) == pytest.approx(0.01 * float((parameter.detach() - v).norm()), rel=1e-4)
    assert {id(p) for p, _ in awp._applied} == {id(model.conv.weight), id(model.fc.weight)}
    perturbed = {k: v.clone() for k, v in model.state_dict().items()}
    assert not torch.equal(perturbed["conv.weight"], before["conv.weight"])
    assert torch.equal(perturbed["conv.bias"], before["conv.bias"])  # biases are not perturbed
    lr = 0.1
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    optimizer.zero_grad()
    out.task_losses["class"].backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()
    awp.after_step()
    for name, parameter in model.named_parameters():  # the step lands at w - lr * grad(w + v)
        assert torch.allclose(parameter, before[name] - lr * grads[name], atol=1e-6), name
    # BatchNorm statistics counted the batch once (the pass that found v does not count)
    assert model.norm.num_batches_tracked.item() == 1


def test_awp_waits_for_its_warmup():
    inner = make_objective("madry", TaskLosses([HEAD]), AttackSettings("pgd", steps=1), ["class"])
    awp = AWP(inner, {"class": 1.0}, gamma=0.01, warmup=2)
    awp.start_epoch(1)
    model = Net()
    x, y = _batch()
    awp(model, x, {"class": y}, {})
    assert awp._applied == []
    with pytest.raises(ValueError, match="free"):
        AWP(make_objective("free", TaskLosses([HEAD]), AttackSettings("free"), ["class"]), {"class": 1.0}, 0.01)


# ---- end to end: the CLI, resume of an averaged run ----

@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    return synthesize_objects(tmp_path_factory.mktemp("objects") / "data", 60, size=16, seed=0, workers=1,
                              progress=False)


def _train(objects, out, *extra):
    return cli_main(["train", "--data", str(objects), "--out", str(out), "--encoder", "resnet18_cpu", "--workers",
                     "0", "--no-progress", "--batch-size", "10", "--optim", "sgd", "--lr", "0.05", "--robust-val",
                     "8", "--robust-val-steps", "2", "--save-every", "0", *extra])


def test_resume_of_an_averaged_run_equals_the_uninterrupted_run(objects, tmp_path):
    recipe = ("--adversarial", "nfgsm", "--ema", "0.9", "--schedule-kind", "onecycle", "--awp-gamma", "0.005",
              "--label-smoothing", "0.1", "--eps-warmup-epochs", "1")
    assert _train(objects, tmp_path / "straight", "--epochs", "2", "--save-every", "1", *recipe) == 0
    # a run stopped after its first epoch (its per-update schedule spans the same 2 epochs), then resumed
    (tmp_path / "split").mkdir()
    shutil.copy(tmp_path / "straight" / "epoch_0001.pt", tmp_path / "split" / "last.pt")
    assert _train(objects, tmp_path / "split", "--epochs", "2", "--resume", *recipe) == 0
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert straight["meta"]["weights"] == "ema" and straight["meta"]["ema_updates"] == split["meta"]["ema_updates"]
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, split["state_dict"][key]), key
    for key, value in straight["meta"]["raw_state_dict"].items():
        assert torch.equal(value, split["meta"]["raw_state_dict"][key]), key
    # the averaged weights are not the raw ones, and best.pt (averaged too) says so
    assert any(not torch.equal(v, straight["meta"]["raw_state_dict"][k]) for k, v in straight["state_dict"].items())
    assert torch.load(tmp_path / "straight" / "best.pt", weights_only=True)["meta"]["weights"] == "ema"
    # resuming without --ema is refused, naming the setting
    assert _train(objects, tmp_path / "split", "--epochs", "3", "--resume", "--adversarial", "nfgsm") == 2


def test_recipe_settings_are_checked_and_reach_sweep_train_specs(tmp_path):
    with pytest.raises(ValueError, match="ema"):
        TrainConfig(data="d", out="o", ema=1.5)
    with pytest.raises(ValueError, match="peak"):
        TrainConfig(data="d", out="o", schedule="0:0.1,5:0.01", schedule_kind="cosine")
    with pytest.raises(ValueError, match="awp_gamma"):
        TrainConfig(data="d", out="o", adversarial="free", awp_gamma=0.01)
    with pytest.raises(ValueError, match="schedule_kind"):
        TrainConfig(data="d", out="o", schedule_kind="linear")
    from mtrobust_fast.sweep.plan import train_config
    config = train_config({"adversarial": "mart", "ema": 0.999, "schedule_kind": "cosine", "lr": 0.1,
                           "awp_gamma": 0.005, "nfgsm_noise": 1.5, "gradalign": 0.2}, "data",
                          str(tmp_path / "m" / "last.pt"))
    assert (config.adversarial, config.ema, config.schedule_kind, config.awp_gamma, config.gradalign) == \
        ("mart", 0.999, "cosine", 0.005, 0.2)


def test_gat_trains_with_mart_awp_and_averaging(objects, tmp_path):
    assert _train(objects, tmp_path / "gat", "--epochs", "1", "--aux", "rotation", "--weighting", "ew",
                  "--adversarial", "mart", "--steps", "1", "--awp-gamma", "0.01", "--ema", "0.9") == 0
    payload = torch.load(tmp_path / "gat" / "last.pt", weights_only=True)
    settings = payload["meta"]["train_config"]["objective_settings"]
    assert settings["objective"] == "mart" and settings["awp"]["gamma"] == 0.01 and settings["gat"]["aux"]
    assert payload["meta"]["weights"] == "ema"


def test_a_taskonomy_model_trains_with_nfgsm_awp_and_averaging(tmp_path):
    data = synthesize(tmp_path / "synth", 12, size=32, seed=0, workers=1, progress=False)
    code = cli_main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--tasks", "sd", "--size", "32",
                     "--epochs", "1", "--batch-size", "2", "--workers", "0", "--no-progress", "--lr", "1e-3",
                     "--adversarial", "nfgsm", "--attack-tasks", "s", "--awp-gamma", "0.005", "--ema", "0.5",
                     "--schedule-kind", "cosine", "--robust-val", "2", "--robust-val-steps", "1"])
    assert code == 0
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["meta"]["weights"] == "ema"


# ---- precision and memory layout ----

def test_bf16_and_channels_last_training_from_the_cli(objects, tmp_path, capsys):
    """bf16 autocast and channels-last run on the CPU, reach the inner attack, are recorded, and the checkpoint
    loads as an ordinary model; fp16 on the CPU is one line naming the setting."""
    assert _train(objects, tmp_path / "run", "--epochs", "1", "--adversarial", "madry", "--steps", "2",
                  "--amp", "bf16", "--channels-last", "--ema", "0.9") == 0
    payload = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    config = payload["meta"]["train_config"]
    assert (config["amp"], config["channels_last"]) == ("bf16", True)
    assert all(math.isfinite(v) for v in payload["meta"]["metrics"]["train"]["task_losses"].values())
    from mtrobust_fast.models import load_checkpoint
    model, _ = load_checkpoint(tmp_path / "run" / "best.pt")
    with torch.no_grad():
        assert model(torch.rand(2, 3, 16, 16))["class"].isfinite().all()
    capsys.readouterr()
    assert _train(objects, tmp_path / "fp16", "--epochs", "1", "--amp", "--device", "cpu") == 2
    assert "fp16" in capsys.readouterr().err
    assert TrainConfig(data="d", out="o", amp=True).amp == "fp16"  # records of runs from before the choice
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(data="d", out="o", amp="fp8")


def test_the_trainer_keeps_the_layout_and_runs_the_attack_under_its_autocast(tmp_path):
    from mtrobust_fast.models import build_classifier
    from mtrobust_fast.training import Trainer
    from mtrobust_fast.weighting import StaticWeighting
    torch.manual_seed(0)
    model = build_classifier("resnet18_cpu", classes=3, input_size=16)
    losses = TaskLosses([HEAD])
    seen = []

    class Watching(Madry):
        def attack_points(self, model, images, targets, masks):
            seen.append((images.is_contiguous(memory_format=torch.channels_last), torch.get_autocast_dtype("cpu"),
                         torch.is_autocast_enabled("cpu"), self.attack.autocast))
            return super().attack_points(model, images, targets, masks)

    objective = Watching(losses, AttackSettings(steps=1, autocast=torch.bfloat16), ["class"])
    x, y = torch.rand(4, 3, 16, 16), torch.randint(0, 3, (4,))
    loader = [(x, {"class": y}, {})]
    average = WeightAverage(model, 0.9)
    trainer = Trainer(model, objective, StaticWeighting({"class": 1.0}), torch.optim.SGD(model.parameters(), lr=0.01),
                      [(0, 0.01)], loader, loader, losses, run_dir=tmp_path, progress=False, amp=torch.bfloat16,
                      channels_last=True, average=average)
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    averaged_conv = next(m for m in average.model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert averaged_conv.weight.is_contiguous(memory_format=torch.channels_last)
    trainer.train_epoch(0, 1)
    assert seen == [(True, torch.bfloat16, True, torch.bfloat16)]
    with pytest.raises(ValueError, match="float16"):
        Trainer(Net(), objective, StaticWeighting({"class": 1.0}), torch.optim.SGD(Net().parameters(), lr=0.01),
                [(0, 0.01)], loader, loader, losses, run_dir=tmp_path, progress=False, amp=torch.float16)


# ---- GradAlign ----

def test_gradient_misalignment_on_hand_cases():
    from mtrobust_fast.training.gradalign import gradient_misalignment
    g1 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    g2 = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    # parallel 0, opposite 2, orthogonal 1; the zero gradient has no direction and is left out
    assert torch.allclose(gradient_misalignment(g1, g2), torch.tensor(1.0))
    assert gradient_misalignment(torch.zeros(2, 3), torch.ones(2, 3)) == 0


def test_gradalign_term_equals_its_formula_reaches_the_weights_and_keeps_batchnorm_statistics():
    from mtrobust_fast.training.gradalign import GradAlign
    torch.manual_seed(0)
    model = Net()
    losses = TaskLosses([HEAD])
    x, y = _batch()
    wrapped = GradAlign(make_objective("fgsm_rs", losses, AttackSettings("fgsm", eps=0.1), ["class"]), losses,
                        ["class"])
    statistics = model.norm.running_mean.clone()
    torch.manual_seed(5)
    term = wrapped.term(model, x, {"class": y}, {})

    torch.manual_seed(5)
    noise = (torch.rand_like(x) * 2 - 1) * 0.1
    gradients = []
    for point in (x, (x + noise).clamp(0, 1)):
        point = point.clone().requires_grad_(True)
        loss = F.cross_entropy(model(point)["class"], y, reduction="sum")
        gradients.append(torch.autograd.grad(loss, point)[0].flatten(1))
    expected = (1 - F.cosine_similarity(*gradients, dim=1)).mean()
    assert torch.allclose(term, expected, atol=1e-5)
    term.backward()  # double backprop: the term trains the weights
    assert model.conv.weight.grad is not None and model.conv.weight.grad.abs().sum() > 0
    wrapped.after_step()
    assert torch.equal(model.norm.running_mean, statistics)  # the term's passes do not count in the statistics


def test_gradalign_trains_from_the_cli_and_is_refused_without_an_adversarial_objective(objects, tmp_path, capsys):
    assert _train(objects, tmp_path / "ga", "--epochs", "1", "--adversarial", "fgsm_rs", "--gradalign", "0.2") == 0
    payload = torch.load(tmp_path / "ga" / "last.pt", weights_only=True)
    assert payload["meta"]["train_config"]["objective_settings"]["gradalign"]
    assert 0 <= payload["meta"]["metrics"]["train"]["task_losses"]["gradalign"] <= 2
    capsys.readouterr()
    assert _train(objects, tmp_path / "clean", "--epochs", "1", "--gradalign", "0.2") == 2
    assert "gradalign" in capsys.readouterr().err
