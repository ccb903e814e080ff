"""What WGD and APGD must achieve: WGD is PGD for one task and weights tasks by r_i(t) exactly as
Definition 5 says; APGD follows Algorithm 1 of Croce & Hein and is at least as strong as PGD; both stay in the
budget, are deterministic and batch attacked subsets exactly."""
import math

import pytest
import torch
import torch.nn as nn

from mtrobust_fast import tasks
from mtrobust_fast.attacks import APGD, PGD, WGD, TaskSpec, classification
from mtrobust_fast.attacks.apgd import checkpoints
from mtrobust_fast.attacks.wgd import relative_rates
from mtrobust_fast.ops import reference

SEG, DEPTH, NORMAL = (tasks.BY_LETTER[letter] for letter in "sdn")
BUDGETS = [("linf", 8 / 255), ("l2", 0.5)]


class ThreeHeads(nn.Module):
    """Segmentation, depth and normal heads on a two-layer conv trunk (no BatchNorm)."""

    task_names = [SEG.name, DEPTH.name, NORMAL.name]

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1), nn.Tanh())
        self.heads = nn.ModuleDict({SEG.name: nn.Conv2d(8, 4, 1), DEPTH.name: nn.Conv2d(8, 1, 1),
                                    NORMAL.name: nn.Conv2d(8, 3, 1)})

    def forward(self, x):
        h = self.trunk(x * 2 - 1)
        return {name: head(h) for name, head in self.heads.items()}



def net(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return ThreeHeads().to(dtype)


def batch(n=4, size=8, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=gen, dtype=dtype)
    labels = torch.randint(0, 4, (n, size, size), generator=gen)
    targets = {SEG.name: labels, DEPTH.name: torch.rand(n, 1, size, size, generator=gen, dtype=dtype),
               NORMAL.name: torch.rand(n, 3, size, size, generator=gen, dtype=dtype) * 2 - 1}
    masks = {SEG.name: (labels > 0)[:, None], DEPTH.name: torch.rand(n, 1, size, size, generator=gen) > 0.1}
    return x, targets, masks


@pytest.fixture(scope="module")
def trained():
    """ThreeHeads fitted to one batch for a few Adam steps, so the attacks start from low losses."""
    model = net()
    x, targets, masks = batch(n=8, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(60):
        out = model(x)
        loss = sum(t.loss(out[t.name], targets[t.name], masks.get(t.name)).mean() for t in (SEG, DEPTH, NORMAL))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, (x, targets, masks)


def attacked_loss(atk, x, targets, masks):
    losses = atk.losses(x, targets, masks)
    return sum(losses[name] for name in atk.target_tasks)


# ---- WGD ----

@pytest.mark.parametrize("norm,eps", BUDGETS)
@pytest.mark.parametrize("target", ["s", "d"])
def test_wgd_with_one_attacked_task_is_pgd_bit_for_bit(norm, eps, target):
    # One task: r = L̃/L̃ = 1 exactly, so the weighted objective and its gradient are PGD's, bit for bit.
    model = net()
    x, targets, masks = batch()
    kwargs = dict(eps=eps, alpha=eps / 4, steps=4, norm=norm, target_tasks=target, seed=5)
    assert torch.equal(WGD(model, **kwargs)(x, targets, masks), PGD(model, **kwargs)(x, targets, masks))


def test_wgd_one_task_with_normalised_gradient_is_pgd():
    # Normalising one gradient by a positive number keeps its signs: the Linf step is PGD's exactly.
    model = net()
    x, targets, masks = batch()
    kwargs = dict(eps=8 / 255, alpha=2 / 255, steps=4, target_tasks="n", seed=5)
    assert torch.equal(WGD(model, normalize_task_grads=True, **kwargs)(x, targets, masks),
                       PGD(model, **kwargs)(x, targets, masks))


def test_relative_rates_by_hand():
    losses = torch.tensor([[2.0, 3.0, 5.0], [4.0, 1.0, 7.0], [6.0, 0.0, 1.0]])
    start = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0], [2.0, 0.0, 1.0]])
    weights = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    # Row 0: L̃ = (2, 3, 5); the mean is over its attacked tasks 0 and 1: 2.5.
    # Row 1: task 2 starts at zero loss, so its L̃ is 1: L̃ = (2, 0.5, 1), mean 3.5 / 3.
    # Row 2: one attacked task whose start loss is zero: L̃ = 1, r = 1.
    expected = torch.tensor([[0.8, 1.2, 2.0], [6 / 3.5, 1.5 / 3.5, 3 / 3.5], [3.0, 1.0, 1.0]])
    torch.testing.assert_close(relative_rates(losses, start, weights), expected)


class Identity(nn.Module):
    def forward(self, x):
        return {"a": x, "b": x}


def linear_spec(name):
    """L(x) = 10 + Σ target·x: known losses (positive on [0, 1] for |target| < 0.1), constant gradient."""
    return TaskSpec(name, lambda out, coef, mask=None: 10 + (out * coef).flatten(1).sum(1), key=name)


@pytest.mark.parametrize("norm,eps", BUDGETS)
def test_wgd_steps_follow_definition_5_on_known_losses(norm, eps):
    torch.manual_seed(0)
    x0 = torch.rand(3, 2, 4, 4, dtype=torch.float64)
    coef = {name: (torch.rand_like(x0) - 0.5) / 10 for name in "ab"}
    alpha, steps = eps / 3, 3
    atk = WGD(Identity(), [linear_spec("a"), linear_spec("b")], eps=eps, alpha=alpha, steps=steps, norm=norm,
              random_start=False)

    def losses(x):
        return torch.stack([10 + (x * coef[n]).flatten(1).sum(1) for n in "ab"], dim=1)

    x, start = x0.clone(), losses(x0)
    for _ in range(steps):
        inverse_rate = losses(x) / start
        r = inverse_rate / inverse_rate.mean(dim=1, keepdim=True)
        direction = r[:, 0, None, None, None] * coef["a"] + r[:, 1, None, None, None] * coef["b"]
        x = reference.attack_step(x, x0, direction, eps=eps, alpha=alpha, norm=norm)
    assert not torch.allclose(r, torch.ones_like(r))  # the weights moved away from 1 (r = 1 at step 0)
    torch.testing.assert_close(atk(x0, coef), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("norm,eps", BUDGETS)
def test_wgd_normalised_task_gradients_match_explicit_per_task_gradients(norm, eps):
    model = net(torch.float64)
    x0, targets, masks = batch(dtype=torch.float64)
    alpha, steps, specs = eps / 4, 3, (SEG, DEPTH, NORMAL)

    x, start = x0.clone(), None
    for _ in range(steps):
        xg = x.clone().requires_grad_(True)
        out = model(xg)
        per_task = [t.loss(out[t.name], targets[t.name], masks.get(t.name)) for t in specs]
        grads = torch.stack([torch.autograd.grad(loss.sum(), xg, retain_graph=True)[0] for loss in per_task])
        current = torch.stack([loss.detach() for loss in per_task], dim=1)
        start = current if start is None else start
        inverse_rate = current / start
        r = inverse_rate / inverse_rate.mean(dim=1, keepdim=True)
        x = reference.attack_step(x, x0, grads, r, eps=eps, alpha=alpha, norm=norm, normalize_task_grads=True)

    kwargs = dict(eps=eps, alpha=alpha, steps=steps, norm=norm, random_start=False, normalize_task_grads=True)
    atk = WGD(model, batched_vjp=True, **kwargs)
    torch.testing.assert_close(atk(x0, targets, masks), x, rtol=0, atol=1e-12)
    assert atk._batched_vjp  # the batched vector-Jacobian product worked on this model
    looped = WGD(model, **kwargs)  # the default: one backward per task, the same points
    torch.testing.assert_close(looped(x0, targets, masks), x, rtol=0, atol=1e-12)
    assert looped._batched_vjp is False


# ---- APGD ----

def test_checkpoints_follow_the_paper_schedule():
    # p = 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (steps shrink by 0.03 down to 0.06).
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(25) == [6, 11, 15, 18, 20, 22, 24]
    assert checkpoints(5) == [2, 3, 4]  # ceil(2.05) and ceil(2.85) coincide: one checkpoint
    assert checkpoints(1) == []


def eager_apgd_linf(loss_and_grad, x0, eps, steps, rho=0.75):
    """Algorithm 1 of Croce & Hein for one sample, written out with Python scalars (Linf, start at x0)."""
    def project(v):
        return torch.clamp(torch.minimum(torch.maximum(v, x0 - eps), x0 + eps), 0, 1)

    marks = set()
    p_prev, p = 0.0, 0.22
    while math.ceil(round(p * steps, 9)) < steps:
        marks.add(math.ceil(round(p * steps, 9)))
        p_prev, p = p, p + max(p - p_prev - 0.03, 0.06)
    eta, x = 2 * eps, x0.clone()
    f, g = loss_and_grad(x)
    x_prev, f_prev, count, last, reduced, halvings = x, f, 0, 0, False, 0
    x_best, f_best, g_best, f_best_last = x, f, g, f
    for k in range(steps):
        z = project(x + eta * g.sign())
        x_prev, x = x, z if k == 0 else project(x + 0.75 * (z - x) + 0.25 * (x - x_prev))
        f, g = loss_and_grad(x)
        count, f_prev = count + (f > f_prev), f
        if f > f_best:
            x_best, f_best, g_best = x, f, g
        if k + 1 in marks:
            halve = count < rho * (k + 1 - last) or (not reduced and f_best == f_best_last)
            if halve:
                eta, x, g, f_prev, halvings = eta / 2, x_best, g_best, f_best, halvings + 1
            reduced, f_best_last, last, count = halve, f_best, k + 1, 0
    return x_best, halvings


def test_apgd_follows_algorithm_1_per_sample():
    # A concave loss with its peak inside the ball makes iterates overshoot and oscillate: step sizes get
    # halved at different checkpoints for different samples, which the batched version must reproduce.
    torch.manual_seed(1)
    x0 = torch.rand(4, 1, 3, 3, dtype=torch.float64) * 0.8 + 0.1
    peak = x0 + (torch.rand_like(x0) - 0.5) * 0.05
    eps, steps = 0.03, 30
    spec = TaskSpec("q", lambda out, c, mask=None: 1 - ((out - c) ** 2).flatten(1).sum(1), key=None)
    model = nn.Identity()
    atk = APGD(model, [spec], eps=eps, steps=steps, random_start=False)
    got = atk(x0, peak)

    def loss_and_grad(x, b):
        xg = x.clone().requires_grad_(True)
        loss = spec.loss(xg, peak[b:b + 1]).sum()
        return loss.item(), torch.autograd.grad(loss, xg)[0]

    total_halvings = 0
    for b in range(x0.shape[0]):
        want, halvings = eager_apgd_linf(lambda x: loss_and_grad(x, b), x0[b:b + 1], eps, steps)
        total_halvings += halvings
        torch.testing.assert_close(got[b:b + 1], want, rtol=0, atol=1e-12)
    assert total_halvings > 0


def test_apgd_first_update_is_a_signed_step_of_twice_eps():
    torch.manual_seed(0)
    x0 = torch.rand(3, 2, 4, 4, dtype=torch.float64)
    coef = (torch.rand_like(x0) - 0.5) / 10
    specs = [linear_spec("a")]
    apgd = APGD(Identity(), specs, eps=4 / 255, steps=1, random_start=False)
    pgd = PGD(Identity(), specs, eps=4 / 255, alpha=8 / 255, steps=1, random_start=False)
    assert torch.equal(apgd(x0, {"a": coef}), pgd(x0, {"a": coef}))


@pytest.mark.parametrize("norm,eps", BUDGETS)
@pytest.mark.parametrize("target", ["sd", "sdn"])
def test_apgd_is_at_least_as_strong_as_pgd_on_a_trained_model(trained, norm, eps, target):
    # Same budget (20 gradients, PGD at the usual alpha = eps/4). APGD returns its best iterate and adapts
    # its step; on this model it ends higher on average. The 1 % margin absorbs single unlucky samples.
    model, (x, targets, masks) = trained
    kwargs = dict(eps=eps, steps=20, norm=norm, target_tasks=target, seed=2)
    pgd, apgd = PGD(model, alpha=eps / 4, **kwargs), APGD(model, **kwargs)
    clean = attacked_loss(pgd, x, targets, masks)
    by_pgd = attacked_loss(pgd, pgd(x, targets, masks), targets, masks)
    by_apgd = attacked_loss(apgd, apgd(x, targets, masks), targets, masks)
    assert float(by_pgd.mean()) > 1.1 * float(clean.mean())
    assert float(by_apgd.mean()) >= 0.99 * float(by_pgd.mean())


@pytest.fixture(scope="module")
def classifier():
    """A small MLP fitted to random labels (5 classes: DLR needs at least 3) until it classifies them all."""
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 5))
    x, y = torch.rand(32, 3, 8, 8), torch.randint(0, 5, (32,))
    opt = torch.optim.Adam(clf.parameters(), lr=1e-2)
    for _ in range(20):
        loss = nn.functional.cross_entropy(clf(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return clf, x, y


@pytest.mark.parametrize("loss", ["ce", "dlr"])
@pytest.mark.parametrize("norm,eps", BUDGETS)
def test_apgd_raises_ce_and_dlr_losses_of_a_classifier(classifier, loss, norm, eps):
    clf, x, y = classifier
    atk = APGD(clf, [classification(loss=loss)], eps=eps, steps=10, norm=norm, random_start=False)
    clean, adv = atk.losses(x, y)["label"], atk.losses(atk(x, y), y)["label"]
    # Every sample's loss rises (here from mean CE 0.11 and DLR -0.77, by 0.17 to 0.4 on average).
    assert bool((adv > clean).all())
    assert float((adv - clean).mean()) > 0.1


# ---- both ----

ATTACKS = [(WGD, {}), (WGD, {"normalize_task_grads": True}), (APGD, {})]


def make(cls, options, model, eps, norm, **kwargs):
    step = {} if cls is APGD else {"alpha": eps / 4}
    return cls(model, eps=eps, norm=norm, **step, **options, **kwargs)


@pytest.mark.parametrize("cls,options", ATTACKS)
@pytest.mark.parametrize("norm,eps", BUDGETS)
def test_adversarial_points_lie_in_the_ball_and_in_the_box(cls, options, norm, eps):
    x, targets, masks = batch()
    adv = make(cls, options, net(), eps, norm, steps=4, restarts=2)(x, targets, masks)
    delta = (adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert bool((size <= eps * (1 + 1e-5)).all())
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0


@pytest.mark.parametrize("cls,options", ATTACKS)
def test_deterministic_mode_reproduces_exactly(cls, options):
    model = net()
    x, targets, masks = batch(n=6)
    adv = make(cls, options, model, 8 / 255, "linf", steps=5, deterministic=True, seed=4)(x, targets, masks)
    again = make(cls, options, model, 8 / 255, "linf", steps=5, deterministic=True, seed=4)(x, targets, masks)
    assert torch.equal(adv, again)
    order = torch.tensor([4, 1, 5])  # the same samples in another batch
    part = make(cls, options, model, 8 / 255, "linf", steps=5, deterministic=True, seed=4)(
        x[order], {k: v[order] for k, v in targets.items()}, {k: v[order] for k, v in masks.items()},
        sample_ids=order)
    torch.testing.assert_close(part, adv[order], rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls,options", ATTACKS)
@pytest.mark.parametrize("norm,eps", BUDGETS)
def test_run_subsets_rows_equal_separate_runs(cls, options, norm, eps):
    # Rows of other subsets only add exact zeros (weight 0) to a row's gradient and rates, in float64.
    model = net(torch.float64)
    x, targets, masks = batch(dtype=torch.float64)
    subsets = ["s", "dn", "sdn"]
    atk = make(cls, options, model, eps, norm, steps=4, deterministic=True, seed=3)
    together = atk.run_subsets(x, targets, masks, subsets=subsets)
    for k, subset in enumerate(subsets):
        alone = make(cls, options, model, eps, norm, steps=4, deterministic=True, seed=3, target_tasks=subset)
        torch.testing.assert_close(together[k], alone(x, targets, masks), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs,match", [(dict(alpha=0.1), "alpha"), (dict(rho=1.5), "rho"), (dict(rho="a"), "rho"),
                                          (dict(steps=0), "steps"), (dict(eps=-1.0), "eps")])
def test_apgd_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        APGD(net(), **kwargs)
