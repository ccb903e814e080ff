"""AutoAttack's members for classification heads: the targeted DLR loss against a hand value, APGD-T on a
small trained classifier (ball, box, lower accuracy, never undoing a success)."""
import json

import pytest
import torch

from mtrobust_fast.attacks import APGDT, PGD, AutoAttack, Square, build_attack, classification
from mtrobust_fast.attacks.square import margin, square_fraction
from mtrobust_fast.classification import targeted_dlr
from mtrobust_fast.cli import main as cli_main
from mtrobust_fast.data.objects import synthesize_objects


def test_targeted_dlr_equals_the_hand_value():
    logits = torch.tensor([[4.0, 3.0, 1.0, 0.5, -1.0]], dtype=torch.float64)
    value = targeted_dlr(logits, torch.tensor([0]), torch.tensor([2]))
    assert value.item() == pytest.approx(-(4.0 - 1.0) / (4.0 - 0.5 * (1.0 + 0.5)))
    with pytest.raises(ValueError, match="at least 4 classes"):
        targeted_dlr(torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([1, 2]))


@pytest.fixture(scope="module")
def trained():
    """A linear classifier of 6 classes on 2x4x4 inputs in [0, 1], trained on noisy class prototypes."""
    gen = torch.Generator().manual_seed(0)
    prototypes = torch.rand(6, 2, 4, 4, generator=gen)
    labels = torch.arange(6).repeat(40)
    x = (prototypes[labels] + 0.15 * torch.randn(240, 2, 4, 4, generator=gen)).clamp(0, 1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32, 6))
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(x), labels).backward()
        optimiser.step()
    return model.eval(), x[:60], labels[:60]


def _accuracy(model, x, labels):
    with torch.no_grad():
        return (model(x).argmax(1) == labels).float().mean().item()


def test_apgdt_stays_in_the_ball_and_lowers_accuracy(trained):
    model, x, labels = trained
    clean = _accuracy(model, x, labels)
    assert clean > 0.9
    atk = APGDT(model, [classification("label")], eps=0.2, steps=20, target_classes=3)
    adv = atk(x, labels)
    assert (adv - x).abs().max() <= 0.2 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    robust = _accuracy(model, adv, labels)
    assert robust < clean - 0.4
    with torch.no_grad():
        clean_right = model(x).argmax(1) == labels
    assert torch.equal(adv[~clean_right], x[~clean_right])  # already-wrong points are left alone
    assert isinstance(build_attack("apgdt", model, [classification("label")], eps=0.08, steps=5), APGDT)


def test_apgdt_refuses_dense_or_multi_head_targets(trained):
    model, x, labels = trained
    with pytest.raises(ValueError, match="one classification head"):
        APGDT(model, [classification("a", key=None), classification("b", key=None)], eps=0.1)


class Quantised(torch.nn.Module):
    """Rounds its input to quarters first: a piecewise-constant model whose input gradient is exactly zero."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 4) / 4)


def test_square_fools_a_zero_gradient_model_where_pgd_cannot(trained):
    model, x, labels = trained
    quantised = Quantised(model).eval()
    clean = _accuracy(quantised, x, labels)
    pgd = PGD(quantised, [classification("label")], eps=0.2, steps=10, random_start=False)(x, labels)
    assert torch.equal(pgd, x) and _accuracy(quantised, pgd, labels) == clean  # zero gradients: PGD cannot move
    square = Square(quantised, [classification("label")], eps=0.2, steps=300, seed=1)
    adv = square(x, labels)
    assert (adv - x).abs().max() <= 0.2 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert _accuracy(quantised, adv, labels) < clean - 0.3
    with pytest.raises(ValueError, match="only the L∞ version"):
        Square(quantised, [classification("label")], eps=0.5, norm="l2")


def test_square_margin_schedule_and_determinism(trained):
    model, x, labels = trained
    assert square_fraction(0.8, 0, 5000) == 0.8 and square_fraction(0.8, 25, 5000) == 0.4 and square_fraction(0.8, 30, 5000) == 0.2
    assert square_fraction(0.8, 4999, 5000) == 0.8 / 2 ** 9
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    assert margin(logits, torch.tensor([1])).item() == 1.0 and margin(logits, torch.tensor([0])).item() == -2.0
    first = Square(model, [classification("label")], eps=0.2, steps=50, seed=3)(x, labels)
    again = Square(model, [classification("label")], eps=0.2, steps=50, seed=3)(x, labels)
    assert torch.equal(first, again)


def test_the_cascade_equals_every_member_on_every_point(trained):
    model, x, labels = trained
    spec = [classification("label")]
    cascade = AutoAttack(model, spec, eps=0.2, steps=15, attacks=["apgd-ce", "apgd-t"], target_classes=3,
                         deterministic=True)
    adv = cascade(x, labels)
    assert (adv - x).abs().max() <= 0.2 + 1e-6
    survive = torch.ones_like(labels, dtype=torch.bool)
    with torch.no_grad():
        survive &= model(x).argmax(1) == labels
    for member in (build_attack("apgd", model, [classification("label")], eps=0.2, steps=15, deterministic=True),
                   APGDT(model, spec, eps=0.2, steps=15, target_classes=3, deterministic=True)):
        member_adv = member(x, labels)
        with torch.no_grad():
            survive &= model(member_adv).argmax(1) == labels
    assert _accuracy(model, adv, labels) == pytest.approx(survive.float().mean().item())
    report = cascade.summary()
    assert list(report) == ["apgd-ce", "apgd-t"]
    assert report["apgd-t"]["robust_accuracy"] == pytest.approx(survive.float().mean().item())
    assert report["apgd-ce"]["robust_accuracy"] >= report["apgd-t"]["robust_accuracy"]


def test_zero_gradients_and_probabilities_are_flagged_and_versions_without_fab_refused(trained):
    model, x, labels = trained
    with pytest.warns(UserWarning, match="input gradient of exactly zero"):
        AutoAttack(Quantised(model).eval(), [classification("label")], eps=0.2, steps=3, queries=20)(x, labels)
    probabilities = torch.nn.Sequential(model, torch.nn.Softmax(dim=1)).eval()
    with pytest.warns(UserWarning, match="look like probabilities"):
        AutoAttack(probabilities, [classification("label")], eps=0.2, steps=3, queries=20)(x, labels)
    with pytest.raises(ValueError, match="need FAB"):
        AutoAttack(model, [classification("label")], version="standard")
    with pytest.raises(ValueError, match="square is L∞ only"):
        AutoAttack(model, [classification("label")], norm="l2")


def test_attacks_work_when_called_under_no_grad(trained):
    model, x, labels = trained
    with torch.no_grad():
        adv = PGD(model, [classification("label")], eps=0.2, steps=3)(x, labels)
    assert (adv - x).abs().max() > 0


def test_our_cascade_is_at_least_as_strong_as_torchattacks_autoattack(trained):
    torchattacks = pytest.importorskip("torchattacks")  # installed with --no-deps by the README's test command
    model, x, labels = trained
    theirs = torchattacks.AutoAttack(model, norm="Linf", eps=0.2, version="standard", n_classes=6, seed=0)
    their_accuracy = _accuracy(model, theirs(x, labels), labels)
    ours = AutoAttack(model, [classification("label")], eps=0.2, steps=100, queries=5000, seed=0)
    adv = ours(x, labels)
    assert (adv - x).abs().max() <= 0.2 + 1e-6
    assert _accuracy(model, adv, labels) <= their_accuracy + 0.01


def test_attack_cli_runs_the_cascade_on_a_trained_classifier_and_reports_each_member(tmp_path, capsys):
    data = synthesize_objects(tmp_path / "objects", 40, size=16, seed=0, workers=1, progress=False)
    run = tmp_path / "run"
    assert cli_main(["train", "--data", str(data), "--out", str(run), "--epochs", "1", "--batch-size", "8",
                     "--workers", "0", "--no-progress"]) == 0
    out = tmp_path / "eval"
    assert cli_main(["attack", "--checkpoint", str(run / "last.pt"), "--data", str(data), "--attack", "autoattack",
                     "--steps", "3", "--target", "class", "--no-gradients", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cascade (robust accuracy after each member" in printed and "apgd-t" in printed
    members = json.loads((out / "results.json").read_text())["summary"]["members"]
    assert list(members) == ["apgd-ce", "apgd-t", "square"]
    assert cli_main(["attack", "--checkpoint", str(run / "last.pt"), "--data", str(data), "--attack", "autoattack",
                     "--alpha", "0.01", "--no-progress"]) == 2
    assert "set their own step sizes" in capsys.readouterr().err
