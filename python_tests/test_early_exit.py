"""Exact early exit: rows whose iterate repeats leave the batch, and the adversarial batch is bit for bit the one
the full run gives; where it cannot be exact (train mode, chance in the model, L2 steps, SegPGD's schedule) no row
leaves early."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from mtrobust_fast.attacks import TaskSpec, build_attack, classification
from mtrobust_fast.attacks.early_exit import CycleTracker
from mtrobust_fast.models.multitask import MultiTaskModel

from test_autoattack import prototype_classifier

SUBSETS = [["seg"], ["depth"], ["seg", "depth"]]


class Encoder(nn.Module):
    out_channels = 32

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.norm = nn.BatchNorm2d(32)

    def forward(self, x):
        return torch.relu(self.norm(self.conv(x)))


def _seg_loss(output, target, mask=None):
    return nn.functional.cross_entropy(output, target, reduction="none").flatten(1).mean(1)


def _depth_loss(output, target, mask=None):
    return (output - target).abs().flatten(1).mean(1)


SPECS = [TaskSpec("seg", _seg_loss, key="seg"), TaskSpec("depth", _depth_loss, key="depth")]


@pytest.fixture(scope="module")
def dense():
    """A two-task dense model (segmentation + depth) in eval mode and a batch of 8 images with targets."""
    torch.manual_seed(0)
    model = MultiTaskModel(Encoder(), {"seg": nn.Conv2d(32, 4, 1), "depth": nn.Conv2d(32, 1, 1)},
                           config={"input_stride": 1}).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 8, 8, generator=gen)
    return model, x, {"seg": torch.randint(0, 4, (8, 8, 8), generator=gen), "depth": torch.rand(8, 1, 8, 8, generator=gen)}


@pytest.fixture(scope="module")
def madry():
    """A small CNN trained with PGD adversarial training (eps 0.1) on noisy class prototypes (3x8x8), and 40 of
    its training points."""
    gen = torch.Generator().manual_seed(0)
    prototypes = torch.rand(5, 3, 8, 8, generator=gen)
    labels = torch.arange(5).repeat(40)
    x = (prototypes[labels] + 0.1 * torch.randn(200, 3, 8, 8, generator=gen)).clamp(0, 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(128, 5))
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    inner = build_attack("pgd", model, [classification("label")], eps=0.1, steps=3, early_exit=False)
    for _ in range(30):
        adv = inner(x, labels)
        model.train()
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(adv), labels).backward()
        optimiser.step()
    return model.eval(), x[:40], labels[:40]


def _both(make, run):
    """(adversarial batch with early exit, its cost, the batch without)."""
    on, off = make(True), make(False)
    return run(on), on.cost, run(off)


@pytest.mark.parametrize("name", ["pgd", "wgd", "cospgd", "relative", "cyclic_step", "cyclic_batch"])
def test_batched_subsets_with_restarts_are_bit_identical_and_rows_leave_early(dense, name):
    model, x, targets = dense
    adv, cost, full = _both(lambda on: build_attack(name, model, SPECS, eps=8 / 255, alpha=2 / 255, steps=30,
                                                    restarts=2, early_exit=on),
                            lambda atk: atk.run_subsets(x, targets, subsets=SUBSETS))
    assert torch.equal(adv, full)
    assert cost.rows_exited > 0 and cost.steps_saved > 0
    assert cost.row_steps + cost.steps_saved >= 30 * 2 * len(SUBSETS) * x.shape[0]  # padding rows may add steps
    assert cost.backward_rows < 30 * 2 * len(SUBSETS) * x.shape[0]


def test_normalised_wgd_is_bit_identical(dense):
    model, x, targets = dense
    adv, cost, full = _both(lambda on: build_attack("wgd", model, SPECS, eps=8 / 255, alpha=2 / 255, steps=30,
                                                    normalize_task_grads=True, early_exit=on),
                            lambda atk: atk(x, targets))
    assert torch.equal(adv, full) and cost.rows_exited > 0


@pytest.mark.parametrize("fixture", ["madry", "robust_linear"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_pgd_on_robust_classifiers_is_bit_identical_with_fewer_gradients(request, fixture, deterministic):
    model, x, labels = request.getfixturevalue(fixture)
    adv, cost, full = _both(lambda on: build_attack("pgd", model, [classification("label")], eps=0.1, alpha=0.025,
                                                    steps=50, deterministic=deterministic, early_exit=on),
                            lambda atk: atk(x, labels))
    assert torch.equal(adv, full)
    assert cost.rows_exited > 0 and cost.backward_rows < 50 * x.shape[0]


@pytest.fixture(scope="module")
def robust_linear():
    return prototype_classifier((2, 4, 4))


def test_rows_that_never_repeat_run_every_step(dense):
    model, x, targets = dense
    # Steps of eps/100: within 20 steps no pixel reaches the ball's edge, so no iterate can come back.
    atk = build_attack("pgd", model, SPECS, eps=8 / 255, alpha=0.08 / 255, steps=20)
    adv = atk(x, targets)
    assert atk.cost.rows_exited == 0 and atk.cost.row_steps == 20 * x.shape[0]
    assert torch.equal(adv, build_attack("pgd", model, SPECS, eps=8 / 255, alpha=0.08 / 255, steps=20,
                                         early_exit=False)(x, targets))


class Noisy(nn.Module):
    """A model with chance in eval mode: input noise on every forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x + 1e-3 * torch.randn_like(x))


@pytest.mark.parametrize("case", ["train_mode", "noise", "l2", "segpgd", "off"])
def test_no_row_leaves_early_where_it_would_not_be_exact(dense, case):
    model, x, targets = dense
    options = {"eps": 8 / 255, "alpha": 2 / 255, "steps": 30}
    name, attacked = "pgd", model
    if case == "train_mode":
        options["model_mode"] = "train"
    elif case == "noise":
        attacked = Noisy(model)
    elif case == "l2":
        options.update(norm="l2", eps=0.5, alpha=0.1)
    elif case == "segpgd":
        name = "segpgd"
    else:
        options["early_exit"] = False
    atk = build_attack(name, attacked, SPECS, **options)
    atk(x, targets)
    assert not atk.exits_early
    assert atk.cost.rows_exited == 0 and atk.cost.row_steps == 30 * x.shape[0]
    assert atk.cost.backward_rows == 30 * x.shape[0]


def test_the_tracker_finds_every_period_and_the_step_the_full_run_would_end_on():
    steps = 10
    tracker = CycleTracker(steps, np.array([1, 1, 1, 2]))
    walks = [list("abcdcdcdcd"),  # period 2 from step 3: step 10 stands where step 4 stood
             list("abcdefghij"),  # never repeats
             list("abbbbbbbbb"),  # a fixed point from step 2
             list("abababab" "ab")]  # period 2 in the iterate, but a schedule of period 2 too: phases differ
    finished = {}
    for number in range(1, steps + 1):
        active = np.array([r for r in range(4) if r not in finished])
        prints = np.array([[ord(walks[r][number - 1]), 0] for r in active])
        tracker.update(active, prints, number)
        for r in active:
            if tracker.finish[r] <= number:
                finished[r] = number
    # Row 0: c at 3 and 5 -> period 2 seen at step 5; (10 - 5) % 2 = 1 more step. Row 2: b at 2 and 3 -> done at 3.
    # Row 3: fingerprints count from step 2 (the schedule's period) at phase number % 2: b at steps 2 and 4, both
    # phase 0 -> period 2 seen at step 4, (10 - 4) % 2 = 0 more steps.
    assert finished == {0: 6, 1: 10, 2: 3, 3: 4}
    assert list(tracker.finish) == [6, 10, 3, 4] and list(tracker.cycle) == [2, 0, 1, 2]


@pytest.mark.parametrize("restarts", [1, 3])
@pytest.mark.parametrize("fixture", ["madry", "robust_linear"])
def test_success_stops_never_give_a_higher_robust_accuracy(request, fixture, restarts):
    model, x, labels = request.getfixturevalue(fixture)
    results = {}
    for stop in (False, True):
        atk = build_attack("pgd", model, [classification("label")], eps=0.15, alpha=0.02, steps=40, restarts=restarts,
                           stop_on_success=stop)
        adv = atk(x, labels)
        assert (adv - x).abs().max() <= 0.15 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        with torch.no_grad():
            results[stop] = (model(adv).argmax(1) == labels, atk.cost)
    (full, _), (stopped, cost) = results[False], results[True]
    assert not (stopped & ~full).any()  # every point the full run broke is broken with the stop too
    assert stopped.float().mean() < 1 and cost.rows_exited > 0 and cost.steps_saved > 0


def test_success_stops_refuse_heads_without_a_top1_error(dense):
    model, x, targets = dense
    with pytest.raises(ValueError, match="stop_on_success needs classification heads"):
        build_attack("pgd", model, SPECS, stop_on_success=True)
    from mtrobust_fast.attacks import SettingRefused
    for name in ("fgsm", "cyclic_step", "wgd"):
        with pytest.raises(SettingRefused):
            build_attack(name, model, SPECS, stop_on_success=True)
