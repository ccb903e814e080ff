"""AutoAttack's fast screen: MALT's target ranking against its hand value on a linear model, and the screen's
robust accuracy next to the standard cascade's on the trained test classifiers."""
import pytest
import torch

from mtrobust_fast.attacks import APGDT, AutoAttack, classification
from mtrobust_fast.attacks.apgd import malt_scores

from test_autoattack import prototype_classifier


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_malt_scores_are_the_linear_distances_to_each_boundary(norm):
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 5).double()
    x = torch.rand(4, 12, dtype=torch.float64)
    labels = torch.tensor([0, 3, 4, 1])
    scores = malt_scores(linear, x, labels, norm)
    weight, bias = linear.weight.detach(), linear.bias.detach()
    for i in range(4):
        y = labels[i]
        for k in range(5):
            if k == y:
                assert scores[i, k] == float("inf")
                continue
            margin = (weight[y] - weight[k]) @ x[i] + bias[y] - bias[k]
            dual = (weight[y] - weight[k]).abs().sum() if norm == "linf" else (weight[y] - weight[k]).norm()
            assert scores[i, k].item() == pytest.approx((margin / dual).item(), rel=1e-12)


def test_malt_ranking_picks_the_nearest_boundary_where_the_logits_do_not():
    # Class 1 has the larger logit but a steep boundary; class 2 a smaller logit and a flat (far-reaching) one.
    linear = torch.nn.Linear(2, 4, bias=False).double()
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[10.0, 0.0], [9.9, 0.0], [0.0, 0.0], [0.0, -50.0]]))
    x = torch.tensor([[1.0, 0.01]], dtype=torch.float64)
    labels = torch.tensor([0])
    logits = linear(x)
    assert logits[0].argsort(descending=True)[1] == 1
    assert malt_scores(linear, x, labels, "linf")[0].argsort()[0] == 3


@pytest.fixture(scope="module")
def classifiers():
    return {"linf": (prototype_classifier((2, 4, 4)), 0.2), "l2": (prototype_classifier((3, 10, 10)), 3.0)}


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_the_fast_screen_is_within_one_point_of_standard_at_a_fraction_of_its_passes(classifiers, norm):
    (model, x, labels), eps = classifiers[norm]
    accuracy, passes = {}, {}
    for version in ("standard", "fast"):
        atk = AutoAttack(model, [classification("label")], version=version, eps=eps, norm=norm, steps=20,
                         queries=300, seed=0)
        adv = atk(x, labels)
        with torch.no_grad():
            accuracy[version] = (model(adv).argmax(1) == labels).float().mean().item()
        passes[version] = atk.cost.forward_rows + atk.cost.backward_rows
    with torch.no_grad():
        assert accuracy["fast"] < (model(x).argmax(1) == labels).float().mean().item() - 0.2
    assert accuracy["fast"] <= accuracy["standard"] + 0.01
    assert passes["fast"] < passes["standard"] / 2


def test_apgdt_with_malt_ranking_breaks_points_and_refuses_unknown_rankings(classifiers):
    (model, x, labels), eps = classifiers["linf"]
    atk = APGDT(model, [classification("label")], eps=eps, steps=20, target_classes=2, ranking="malt")
    with torch.no_grad():
        assert (model(atk(x, labels)).argmax(1) == labels).float().mean() < (model(x).argmax(1) == labels).float().mean()
    with pytest.raises(ValueError, match="ranking must be one of"):
        APGDT(model, [classification("label")], ranking="top")
