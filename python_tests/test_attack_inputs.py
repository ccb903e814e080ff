"""Bad input to an attack is one clear error naming the argument, never a silently clamped or broadcast answer or
a raw torch error: inputs outside the box or not finite, a budget wider than the box, a model whose outputs are
not finite, a loss that is not per sample, subsets given as a string, a dtype or seed that cannot work."""
import pytest
import torch
import torch.nn as nn

from mtrobust_fast.attacks import PGD, WGD, TaskSpec, classification

from test_autoattack import prototype_classifier


@pytest.fixture(scope="module")
def trained():
    return prototype_classifier((2, 4, 4))


@pytest.mark.parametrize("scale, shift", [(255.0, 0.0), (2.0, -1.0)])
def test_inputs_outside_the_box_are_refused_not_clamped(trained, scale, shift):
    model, x, labels = trained
    with pytest.raises(ValueError, match=r"x has values in .* outside the attack's input box \[lo, hi\] = \[0, 1\]"):
        PGD(model, [classification("label")], eps=8 / 255, steps=2)(x * scale + shift, labels)
    # the same images given with their own box are attacked
    adv = PGD(model, [classification("label")], eps=8 / 255 * scale, steps=2, lo=shift, hi=scale + shift)(
        x * scale + shift, labels)
    assert (adv - (x * scale + shift)).abs().max() <= 8 / 255 * scale + 1e-4


def test_non_finite_inputs_are_refused(trained):
    model, x, labels = trained
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN or infinite values"):
        PGD(model, [classification("label")], steps=2)(bad, labels)


def test_a_budget_wider_than_the_box_is_refused():
    with pytest.raises(ValueError, match=r"eps: 5 is wider than the input box \[0, 1\]"):
        PGD(nn.Linear(2, 2), [classification("label")], eps=5)
    PGD(nn.Linear(2, 2), [classification("label")], eps=5, norm="l2")  # an L2 ball of radius 5 is a budget


class NaNModel(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) * float("nan")


@pytest.mark.parametrize("attack", [PGD, WGD])
def test_a_model_with_non_finite_outputs_is_named(trained, attack):
    model, x, labels = trained
    with pytest.raises(ValueError, match="model: its outputs give non-finite losses"):
        attack(NaNModel(model), [classification("label")], steps=2)(x, labels)


def test_a_loss_that_is_not_per_sample_is_named(trained):
    model, x, labels = trained
    spec = TaskSpec("label", lambda out, y, mask=None: nn.functional.cross_entropy(out, y, reduction="none")[:, None])
    with pytest.raises(ValueError, match=r"task 'label': its loss must return one value per sample, shape \[60\], "
                                         r"got \[60, 1\]"):
        PGD(model, [spec], steps=2)(x, labels)


def test_subsets_given_as_a_string_are_refused():
    model = nn.Conv2d(3, 2, 1)
    specs = [TaskSpec("a", lambda o, t, m=None: o[:, 0].flatten(1).mean(1)),
             TaskSpec("b", lambda o, t, m=None: o[:, 1].flatten(1).mean(1))]
    x = torch.rand(2, 3, 4, 4)
    targets = {"a": torch.zeros(2), "b": torch.zeros(2)}
    with pytest.raises(ValueError, match="subsets must be a list of attacked sets"):
        PGD(model, specs, steps=1).run_subsets(x, targets, subsets="ab")
    assert PGD(model, specs, steps=1).run_subsets(x, targets, subsets=[["a", "b"]]).shape == (1, *x.shape)


def test_dtype_and_seed_mistakes_are_named(trained):
    model, x, labels = trained
    with pytest.raises(ValueError, match="x is torch.float64 but the model's parameters are torch.float32"):
        PGD(model, [classification("label")], steps=1)(x.double(), labels)
    with pytest.raises(ValueError, match="seed: must be an integer"):
        PGD(model, [classification("label")], seed="abc")


@pytest.mark.parametrize("damage, message", [
    ("out_of_range", r"task 'label': its loss cannot use the targets given .*targets \[60\] torch.int64"),
    ("float_labels", r"task 'label': its loss cannot use the targets given .*torch.float32"),
])
def test_targets_a_loss_cannot_use_are_named(trained, damage, message):
    model, x, labels = trained
    bad = labels + 100 if damage == "out_of_range" else labels.float() + 0.5
    with pytest.raises(ValueError, match=message):
        PGD(model, [classification("label")], steps=1)(x, bad)


def test_a_mask_of_another_size_is_named():
    from mtrobust_fast import tasks
    from mtrobust_fast.models import build_model
    torch.manual_seed(0)
    model = build_model("s", "resnet18", input_size=32).eval()
    x = torch.rand(2, 3, 32, 32)
    labels = torch.randint(0, 5, (2, 32, 32))
    name = tasks.BY_LETTER["s"].name
    with pytest.raises(ValueError, match=rf"task '{name}': its loss cannot use the targets given .*mask \[2, 1, 16, 16\]"):
        PGD(model, steps=1)(x, {name: labels}, {name: torch.ones(2, 1, 16, 16, dtype=torch.bool)})
