"""AutoAttack's members for classification heads: the targeted DLR loss against a hand value, APGD-T on a
small trained classifier (ball, box, lower accuracy, never undoing a success)."""
import pytest
import torch

from mtrobust_fast.attacks import APGDT, build_attack, classification
from mtrobust_fast.classification import targeted_dlr


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
