"""The AAAI'22 study's other attack strategies: cyclic per step and per batch equal hand-written loops, and the
grid search over task weights is never worse for its chosen task than PGD with uniform weights."""
import pytest
import torch
import torch.nn as nn

from mtrobust_fast import tasks
from mtrobust_fast.attacks import PGD, CyclicBatch, CyclicStep, GridPGD, build_attack

SEG, DEPTH, NORMAL = (tasks.BY_LETTER[letter] for letter in "sdn")
NAMES = [SEG.name, DEPTH.name, NORMAL.name]


class ThreeHeads(nn.Module):
    task_names = NAMES

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 6, 3, padding=1), nn.Tanh())
        self.heads = nn.ModuleDict({SEG.name: nn.Conv2d(6, 4, 1), DEPTH.name: nn.Conv2d(6, 1, 1),
                                    NORMAL.name: nn.Conv2d(6, 3, 1)})

    def forward(self, x):
        h = self.trunk(x * 2 - 1)
        return {name: head(h) for name, head in self.heads.items()}


def setup(n=3, size=6, seed=0):
    torch.manual_seed(seed)
    model = ThreeHeads().double()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(n, 3, size, size, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (n, size, size), generator=gen)
    targets = {SEG.name: labels, DEPTH.name: torch.rand(n, 1, size, size, generator=gen, dtype=torch.float64),
               NORMAL.name: torch.rand(n, 3, size, size, generator=gen, dtype=torch.float64) * 2 - 1}
    return model, x, targets


def hand_step(x, x0, grad, norm, eps, alpha):
    """One projected step written out: sign step (L∞) or unit-direction step then radial shrink (L2), then [0, 1]."""
    if norm == "linf":
        y = x + alpha * grad.sign()
        return torch.min(torch.max(y, x0 - eps), x0 + eps).clamp(0, 1)
    direction = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    delta = x + alpha * direction - x0
    scale = (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1).view(-1, 1, 1, 1)
    return (x0 + delta * scale).clamp(0, 1)


def task_loss(model, x, targets, name):
    task = tasks.BY_NAME[name]
    return task.loss(model(x)[name], targets[name], None)


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.4)])
def test_cyclic_step_equals_a_hand_loop_over_the_tasks_in_turn(norm, eps):
    model, x0, targets = setup()
    alpha, steps, order = eps / 3, 5, [SEG.name, NORMAL.name]
    x = x0.clone()
    for i in range(steps):
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(task_loss(model, xg, targets, order[i % 2]).sum(), xg)
        x = hand_step(x, x0, grad, norm, eps, alpha)
    atk = CyclicStep(model, eps=eps, alpha=alpha, steps=steps, norm=norm, random_start=False, target_tasks="sn")
    torch.testing.assert_close(atk(x0, targets), x, rtol=0, atol=1e-12)


def test_cyclic_step_runs_each_attacked_set_on_its_own_cycle_in_one_batch():
    model, x0, targets = setup()
    atk = CyclicStep(model, eps=0.05, steps=4, random_start=False)
    both = atk.run_subsets(x0, targets, subsets=["d", "sdn"])
    alone = [CyclicStep(model, eps=0.05, steps=4, random_start=False, target_tasks=s)(x0, targets) for s in ("d", "sdn")]
    torch.testing.assert_close(both[0], alone[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(both[1], alone[1], rtol=0, atol=1e-12)
    # With one attacked task the cycle is plain PGD.
    pgd = PGD(model, eps=0.05, steps=4, random_start=False, target_tasks="d")(x0, targets)
    torch.testing.assert_close(both[0], pgd, rtol=0, atol=1e-12)


def test_cyclic_batch_attacks_one_task_per_call_in_turn():
    model, x0, targets = setup()
    atk = CyclicBatch(model, eps=0.05, steps=3, random_start=False, target_tasks="sdn")
    for call, letter in enumerate("sdns"):
        expected = PGD(model, eps=0.05, steps=3, random_start=False, target_tasks=letter)(x0, targets)
        torch.testing.assert_close(atk(x0, targets), expected, rtol=0, atol=1e-12, msg=f"call {call}")
    assert atk.batch_index == 4
    with pytest.raises(ValueError, match="batch_index"):
        CyclicBatch(model, batch_index=-1)


def test_grid_vectors_drop_zero_and_proportional_weights_and_start_uniform():
    model, _, _ = setup()
    atk = GridPGD(model, grid_weights=[0, 1, 10])
    vectors = atk.vectors(["a", "b"])
    assert vectors[0] == {"a": 1.0, "b": 1.0}
    assert {tuple(sorted(v.items())) for v in vectors} == {
        (("a", 1.0), ("b", 1.0)), (("b", 1.0),), (("a", 1.0),), (("a", 1.0), ("b", 10.0)), (("a", 10.0), ("b", 1.0))}
    assert len(vectors) == 5
    for bad in ([], [0, 0], [1, -1], [float("nan")], "01"):
        with pytest.raises(ValueError, match="grid_weights"):
            GridPGD(model, grid_weights=bad)


@pytest.mark.parametrize("chosen", ["d", "n", "s"])
def test_grid_search_is_never_worse_than_uniform_pgd_for_its_task(chosen):
    model, x0, targets = setup(n=4)
    kwargs = dict(eps=0.06, steps=4, deterministic=True, seed=3, target_tasks="sdn")
    grid = GridPGD(model, grid_weights=[0, 1, 10], grid_task=chosen, **kwargs)
    adv_grid = grid(x0, targets)
    adv_pgd = PGD(model, **kwargs)(x0, targets)
    task = tasks.BY_LETTER[chosen]
    with torch.no_grad():
        error_grid = task.error(model(adv_grid)[task.name], targets[task.name], None)
        error_pgd = task.error(model(adv_pgd)[task.name], targets[task.name], None)
    assert adv_grid.shape == x0.shape
    assert ((adv_grid - x0).abs() <= 0.06 + 1e-12).all() and adv_grid.min() >= 0 and adv_grid.max() <= 1
    assert (error_grid >= error_pgd - 1e-12).all(), (error_grid, error_pgd)
    # The search finds something PGD did not for at least one sample (many vectors, a continuous error).
    assert (error_grid > error_pgd + 1e-9).any()


def test_grid_search_batches_attacked_sets_like_separate_calls():
    model, x0, targets = setup()
    kwargs = dict(eps=0.05, steps=3, deterministic=True, grid_weights=[0, 1, 5])
    both = GridPGD(model, **kwargs).run_subsets(x0, targets, subsets=["sd", "dn"])
    for k, letters in enumerate(("sd", "dn")):
        alone = GridPGD(model, target_tasks=letters, **kwargs)(x0, targets)
        torch.testing.assert_close(both[k], alone, rtol=0, atol=1e-10)


def test_strategies_are_built_by_name_and_other_attacks_refuse_grid_settings():
    model, _, _ = setup()
    assert isinstance(build_attack("cyclic_step", model, steps=2), CyclicStep)
    assert isinstance(build_attack("cyclic_batch", model, steps=2), CyclicBatch)
    grid = build_attack("grid", model, grid_weights=[1, 2], grid_task="d")
    assert grid.grid_task == DEPTH.name and grid.grid_weights == (1.0, 2.0)
    with pytest.raises(ValueError, match="grid_task"):
        build_attack("pgd", model, grid_task="d")
