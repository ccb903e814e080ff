"""What PGD, FGSM and the attack base must achieve: exactness against a hand-written PGD, budgets,
loss increase on a trained model, batched subsets, restarts, determinism, any output type, clear errors."""
import pytest
import torch
import torch.nn as nn

from mtrobust_fast import tasks
from mtrobust_fast.models import build_model
from mtrobust_fast.attacks import FGSM, PGD, SettingRefused, TaskSpec, build_attack, classification

SEG, DEPTH = tasks.BY_LETTER["s"], tasks.BY_LETTER["d"]


class TinyTaskNet(nn.Module):
    """Two dense heads (segmentation logits, depth) on a small shared conv trunk; no BatchNorm."""

    task_names = [SEG.name, DEPTH.name]

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1), nn.Tanh())
        self.heads = nn.ModuleDict({SEG.name: nn.Conv2d(8, SEG.channels, 1), DEPTH.name: nn.Conv2d(8, 1, 1)})

    def forward(self, x):
        h = self.trunk(x * 2 - 1)
        return {name: head(h) for name, head in self.heads.items()}


def batch(n=4, size=8, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=gen, dtype=dtype)
    labels = torch.randint(0, 4, (n, size, size), generator=gen)
    targets = {SEG.name: labels, DEPTH.name: torch.rand(n, 1, size, size, generator=gen, dtype=dtype)}
    masks = {SEG.name: (labels > 0)[:, None], DEPTH.name: torch.rand(n, 1, size, size, generator=gen) > 0.1}
    return x, targets, masks


def model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return TinyTaskNet().to(dtype)


@pytest.fixture(scope="module")
def trained():
    """A TinyTaskNet fitted for a few steps to one batch, so that attacks have a real loss to raise."""
    net = model()
    x, targets, masks = batch(n=8, seed=1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-2)
    for _ in range(60):
        out = net(x)
        loss = (SEG.loss(out[SEG.name], targets[SEG.name], masks[SEG.name])
                + DEPTH.loss(out[DEPTH.name], targets[DEPTH.name], masks[DEPTH.name])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net, (x, targets, masks)


def eager_pgd(net, task, x0, target, mask, eps, alpha, steps):
    """Textbook PGD-Linf on one task's summed per-sample loss, no random start."""
    x = x0.clone()
    for _ in range(steps):
        x.requires_grad_(True)
        loss = task.loss(net(x)[task.name], target, mask).sum()
        (g,) = torch.autograd.grad(loss, x)
        x = torch.clamp(x.detach() + alpha * g.sign(), torch.clamp(x0 - eps, min=0), torch.clamp(x0 + eps, max=1))
    return x


@pytest.mark.parametrize("task", [SEG, DEPTH])
def test_pgd_equals_textbook_pgd_bit_for_bit_in_float64(task):
    net = model(torch.float64)
    x, targets, masks = batch(dtype=torch.float64)
    atk = PGD(net, eps=8 / 255, alpha=2 / 255, steps=5, random_start=False, target_tasks=[task.letter])
    ours = atk(x, targets, masks)
    ref = eager_pgd(net, task, x, targets[task.name], masks[task.name], 8 / 255, 2 / 255, 5)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
@pytest.mark.parametrize("target", ["s", "d", "sd"])
def test_adversarial_points_lie_in_the_ball_and_in_the_box(norm, eps, target):
    net = model()
    x, targets, masks = batch()
    adv = PGD(net, eps=eps, alpha=eps / 3, steps=4, norm=norm, target_tasks=target, restarts=2)(x, targets, masks)
    delta = (adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert bool((size <= eps * (1 + 1e-5)).all())
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0


@pytest.mark.parametrize("norm,eps,alpha", [("linf", 8 / 255, 2 / 255), ("l2", 0.5, 0.125)])
@pytest.mark.parametrize("target", ["s", "d", "sd"])
def test_pgd_raises_the_attacked_loss_of_a_trained_model(trained, norm, eps, alpha, target):
    net, (x, targets, masks) = trained
    atk = PGD(net, eps=eps, alpha=alpha, steps=10, norm=norm, target_tasks=target)
    attacked = atk.target_tasks
    clean = atk.losses(x, targets, masks)
    adv = atk.losses(atk(x, targets, masks), targets, masks)
    before = sum(clean[n] for n in attacked)
    after = sum(adv[n] for n in attacked)
    # Every sample's attacked loss rises, and the batch's by at least 10 %.
    assert bool((after > before).all())
    assert float(after.mean()) > 1.1 * float(before.mean())


def test_fgsm_is_one_signed_step_of_size_eps_from_the_clean_input(trained):
    net, (x, targets, masks) = trained
    adv = FGSM(net, eps=4 / 255, target_tasks="s")(x, targets, masks)
    ref = eager_pgd(net, SEG, x, targets[SEG.name], masks[SEG.name], 4 / 255, 4 / 255, 1)
    assert torch.equal(adv, ref)
    with pytest.raises(ValueError, match="one step"):
        FGSM(net, steps=3)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_run_subsets_rows_equal_separate_runs(norm):
    net = model(torch.float64)
    x, targets, masks = batch(dtype=torch.float64)
    eps = 8 / 255 if norm == "linf" else 0.5
    subsets = ["s", "d", "sd"]
    atk = PGD(net, eps=eps, alpha=eps / 4, steps=3, norm=norm, deterministic=True, seed=3)
    together = atk.run_subsets(x, targets, masks, subsets=subsets)
    assert together.shape == (3,) + x.shape
    for k, subset in enumerate(subsets):
        alone = PGD(net, eps=eps, alpha=eps / 4, steps=3, norm=norm, deterministic=True, seed=3,
                    target_tasks=subset)(x, targets, masks)
        torch.testing.assert_close(together[k], alone, rtol=0, atol=1e-12)


def test_run_subsets_defaults_to_every_subset_of_the_target_tasks():
    net = model()
    x, targets, masks = batch(n=2)
    out = PGD(net, steps=1, target_tasks="sd").run_subsets(x, targets, masks)
    assert out.shape == (3,) + x.shape


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_restarts_never_lower_the_per_sample_loss(trained, norm):
    net, (x, targets, masks) = trained
    eps = 4 / 255 if norm == "linf" else 0.25
    kwargs = dict(eps=eps, alpha=eps / 4, steps=3, norm=norm, target_tasks="sd", deterministic=True, seed=7)
    one = PGD(net, restarts=1, **kwargs)
    four = PGD(net, restarts=4, **kwargs)
    loss_one = sum(one.losses(one(x, targets, masks), targets, masks).values())
    loss_four = sum(four.losses(four(x, targets, masks), targets, masks).values())
    assert bool((loss_four >= loss_one - 1e-6).all())
    assert bool((loss_four > loss_one + 1e-6).any())  # four starts find something better somewhere


def test_deterministic_mode_reproduces_exactly_and_ignores_batch_composition():
    net = model()
    x, targets, masks = batch(n=6)
    atk = PGD(net, steps=2, deterministic=True, seed=11)
    full = atk(x, targets, masks)
    assert torch.equal(full, atk(x, targets, masks))
    # The same samples, in another order and another batch, get the same adversarial examples.
    order = torch.tensor([4, 1, 5])
    part = atk(x[order], {k: v[order] for k, v in targets.items()},
               {k: v[order] for k, v in masks.items()}, sample_ids=order)
    torch.testing.assert_close(part, full[order], rtol=0, atol=1e-6)
    other_seed = PGD(net, steps=2, deterministic=True, seed=12)(x, targets, masks)
    assert not torch.equal(other_seed, full)


def test_random_start_is_uniform_in_the_linf_ball_not_the_corner():
    net = model()
    x = torch.full((64, 3, 8, 8), 0.5)
    _, targets, masks = batch(n=64)
    eps = 8 / 255
    atk = PGD(net, eps=eps, alpha=0.0, steps=1, target_tasks="d", seed=0)
    delta = (atk(x, targets, masks) - x) / eps  # alpha = 0: the start point itself
    assert float(delta.abs().max()) <= 1 + 1e-5
    assert abs(float(delta.mean())) < 0.02 and abs(float(delta.var()) - 1 / 3) < 0.02


def test_attacks_work_on_tensor_and_tuple_models_with_classification_specs():
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    x = torch.rand(16, 3, 8, 8)
    y = torch.randint(0, 5, (16,))
    atk = PGD(clf, [classification()], eps=8 / 255, alpha=2 / 255, steps=5)
    clean, adv = atk.losses(x, y)["label"], atk.losses(atk(x, y), y)["label"]
    assert bool((adv > clean).all())

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3 * 8 * 8, 5), nn.Linear(3 * 8 * 8, 3)

        def forward(self, x):
            return self.a(x.flatten(1)), self.b(x.flatten(1))

    specs = [classification("a", key=0), classification("b", key=1, loss="dlr")]
    targets = {"a": y, "b": torch.randint(0, 3, (16,))}
    atk = PGD(TwoHeads(), specs, steps=3, target_tasks=["b"])
    assert atk(x, targets).shape == x.shape


def test_attack_computes_no_parameter_gradients_and_restores_training_mode():
    net = model()
    net.train()
    x, targets, masks = batch()
    PGD(net, steps=2)(x, targets, masks)
    assert all(p.grad is None for p in net.parameters())
    assert net.training


@pytest.mark.parametrize("kwargs,match", [
    (dict(eps=-0.1), "eps"), (dict(eps=float("nan")), "eps"), (dict(alpha=-1.0), "alpha"), (dict(steps=0), "steps"),
    (dict(restarts=0), "restarts"), (dict(norm="l1"), "norm"), (dict(target_tasks="sx"), "unknown task 'x'"),
    (dict(target_tasks="n"), "unknown task 'n'"), (dict(autocast="bf16"), "autocast"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PGD(model(), **kwargs)


def test_bad_batches_raise_clear_errors():
    net = model()
    x, targets, masks = batch()
    atk = PGD(net, steps=1)
    with pytest.raises(ValueError, match="no entry for task"):
        atk(x, {SEG.name: targets[SEG.name]}, masks)
    with pytest.raises(ValueError, match="rows"):
        atk(x[:2], targets, masks)
    with pytest.raises(ValueError, match="sample_ids"):
        atk(x, targets, masks, sample_ids=[1, 2])
    with pytest.raises(ValueError, match="tasks is required"):
        PGD(nn.Linear(2, 2))
    spec = TaskSpec("y", lambda out, y, m=None: out.sum(1), key="missing")
    with pytest.raises(ValueError, match="no entry 'missing'"):
        PGD(net, [spec], steps=1)(x, torch.zeros(4))


class FullForward(nn.Module):
    """A MultiTaskModel seen as a plain module: attacks must run its whole forward."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.task_names = model.task_names

    def forward(self, x):
        return self.inner(x)


@pytest.fixture(scope="module")
def taskonomy_net():
    from mtrobust_fast.models import build_model

    torch.manual_seed(0)
    return build_model("sdn", "resnet18", input_size=32).double().eval()


def taskonomy_batch(n=3):
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(n, 3, 32, 32, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 5, (n, 32, 32), generator=gen)
    targets = {SEG.name: labels, DEPTH.name: torch.rand(n, 1, 32, 32, generator=gen, dtype=torch.float64),
               tasks.BY_LETTER["n"].name: torch.rand(n, 3, 32, 32, generator=gen, dtype=torch.float64)}
    return x, targets, {SEG.name: (labels > 0)[:, None]}


@pytest.mark.parametrize("target", ["s", "dn"])
def test_multitask_model_runs_only_attacked_heads_with_the_same_result(taskonomy_net, target):
    x, targets, masks = taskonomy_batch()
    rows_seen = {name: 0 for name in taskonomy_net.task_names}
    hooks = [taskonomy_net.decoders[name].register_forward_hook(
        lambda module, args, out, name=name: rows_seen.__setitem__(name, rows_seen[name] + out.shape[0]))
        for name in taskonomy_net.task_names]
    try:
        split = PGD(taskonomy_net, steps=2, target_tasks=target, deterministic=True)(x, targets, masks)
    finally:
        for hook in hooks:
            hook.remove()
    attacked = {tasks.BY_LETTER[letter].name for letter in target}
    assert all((rows_seen[name] > 0) == (name in attacked) for name in rows_seen)
    full = PGD(FullForward(taskonomy_net), steps=2, target_tasks=target, deterministic=True)(x, targets, masks)
    torch.testing.assert_close(split, full, rtol=0, atol=1e-12)


def test_multitask_model_subsets_run_heads_on_their_rows_only(taskonomy_net):
    x, targets, masks = taskonomy_batch()
    subsets = ["s", "d", "sd", "n"]
    # Without early exit: its determinism probe also runs the heads on smaller groups of their rows.
    atk = PGD(taskonomy_net, steps=2, deterministic=True, seed=1, early_exit=False)
    rows_seen = {}
    hooks = [taskonomy_net.decoders[name].register_forward_hook(
        lambda module, args, out, name=name: rows_seen.setdefault(name, set()).add(out.shape[0]))
        for name in taskonomy_net.task_names]
    try:
        together = atk.run_subsets(x, targets, masks, subsets=subsets)
    finally:
        for hook in hooks:
            hook.remove()
    # s is attacked by 2 of the 4 row blocks, d by 2, n by 1 (3 images per block).
    assert rows_seen == {SEG.name: {6}, DEPTH.name: {6}, tasks.BY_LETTER["n"].name: {3}}
    for k, subset in enumerate(subsets):
        alone = PGD(taskonomy_net, steps=2, deterministic=True, seed=1, target_tasks=subset)(x, targets, masks)
        torch.testing.assert_close(together[k], alone, rtol=0, atol=1e-12)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_per_sample_budgets_equal_separate_runs_with_each_budget(norm):
    net = model(torch.float64)
    x, targets, masks = batch(dtype=torch.float64)
    scale = 1 / 255 if norm == "linf" else 0.1
    eps = torch.tensor([2.0, 4.0, 0.0, 8.0], dtype=torch.float64) * scale
    atk = PGD(net, eps=eps, alpha=eps / 4, steps=3, norm=norm, deterministic=True, seed=2)
    together = atk(x, targets, masks)
    delta = (together - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert bool((size <= eps * (1 + 1e-9)).all())
    for b in range(4):
        one = slice(b, b + 1)
        alone = PGD(net, eps=float(eps[b]), alpha=float(eps[b]) / 4, steps=3, norm=norm, deterministic=True,
                    seed=2)(x[one], {k: v[one] for k, v in targets.items()}, {k: v[one] for k, v in masks.items()},
                            sample_ids=[b])
        torch.testing.assert_close(together[b:b + 1], alone, rtol=0, atol=1e-12)
    subsets = atk.run_subsets(x, targets, masks, subsets=["s", "sd"])
    assert torch.equal(subsets[1], together)


def test_per_sample_budgets_are_checked():
    net = model()
    x, targets, masks = batch()
    with pytest.raises(ValueError, match="eps"):
        PGD(net, eps=torch.tensor([0.1, -0.1]))
    with pytest.raises(ValueError, match="alpha"):
        PGD(net, alpha=[0.1, float("inf")])
    with pytest.raises(ValueError, match="eps has 2 values but the batch has 4"):
        PGD(net, eps=[0.1, 0.2], steps=1)(x, targets, masks)


@pytest.mark.parametrize("attack", ["pgd", "wgd", "apgd"])
def test_record_steps_keeps_per_step_losses_of_the_attacked_tasks(trained, attack):
    from mtrobust_fast.attacks import APGD, WGD

    net, (x, targets, masks) = trained
    cls = {"pgd": PGD, "wgd": WGD, "apgd": APGD}[attack]
    atk = cls(net, steps=4, target_tasks="sd", record_steps=True)
    atk(x, targets, masks)
    assert set(atk.step_losses) == {SEG.name, DEPTH.name}
    curve = atk.step_losses[SEG.name]
    assert curve.shape[1] == x.shape[0] and curve.shape[0] >= 4
    clean = atk.losses(x, targets, masks)[SEG.name]
    assert float(curve[-1].mean()) > float(clean.mean())  # the attack climbs
    assert PGD(net, steps=2).step_losses is None


# ---- precision, model mode, wrappers, settings ----

def test_float64_models_are_attacked_on_float64_losses():
    """A confident sample (logit margin 120) has a cross-entropy gradient of exactly 0 in float32 (softmax
    saturates) but not in float64: PGD must move it."""
    model = torch.nn.Linear(4, 2).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[100.0, 0, 0, 0], [-100.0, 0, 0, 0]], dtype=torch.float64))
        model.bias.zero_()
    x = torch.full((1, 4), 0.6, dtype=torch.float64)
    y = torch.zeros(1, dtype=torch.int64)
    atk = PGD(model, [classification()], eps=0.05, alpha=0.01, steps=1, random_start=False)
    assert atk.losses(x, y)["label"].dtype == torch.float64
    x_adv = atk(x, y)
    assert x_adv.dtype == torch.float64 and x_adv[0, 0] == pytest.approx(0.59)


def test_train_mode_attack_leaves_batchnorm_statistics_and_the_mode_alone():
    torch.manual_seed(0)
    model = build_model("d", "resnet18", input_size=32)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, 32, 32)
    targets = {"depth_zbuffer": torch.rand(2, 1, 32, 32)}
    eval_adv = PGD(model, eps=4 / 255, alpha=1 / 255, steps=2, seed=1)(x, targets)
    train_adv = PGD(model, eps=4 / 255, alpha=1 / 255, steps=2, seed=1, model_mode="train")(x, targets)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(eval_adv, train_adv)  # batch statistics change the gradients
    with pytest.raises(ValueError, match="model_mode"):
        PGD(model, model_mode="test")


def test_attacks_unwrap_data_parallel_wrappers():
    model = build_model("d", "resnet18", input_size=32)
    atk = PGD(torch.nn.DataParallel(model), eps=4 / 255, steps=1)
    assert atk.model is model


def test_build_attack_refuses_settings_with_the_attacks_reason():
    model = build_model("d", "resnet18", input_size=32)
    assert isinstance(build_attack("pgd", model, eps=0.1, alpha=None, steps=3), PGD)
    with pytest.raises(SettingRefused, match="alpha: apgd sets its own step size") as info:
        build_attack("apgd", model, alpha=0.01)
    assert info.value.setting == "alpha"
    with pytest.raises(SettingRefused, match="steps: fgsm takes exactly one step"):
        build_attack("fgsm", model, steps=3)
    with pytest.raises(SettingRefused, match="normalize_task_grads"):
        build_attack("pgd", model, normalize_task_grads=True)
    with pytest.raises(ValueError, match="unknown attack"):
        build_attack("cw", model)


def test_every_step_is_reported_to_on_gradient():
    from mtrobust_fast.attacks import APGD, WGD

    net, (x, targets, masks) = model(), batch()
    for cls, steps in ((PGD, 3), (WGD, 2), (APGD, 4)):
        calls = []
        atk = cls(net, steps=steps, restarts=2)
        atk.on_gradient = calls.append
        atk(x, targets, masks)
        assert calls == [x.shape[0]] * (2 * steps), cls.__name__


def test_the_attack_progress_bar_has_a_total(capsys):
    """A long batch shows its gradient work against a total (rows x steps), not an open-ended count."""
    import time
    from mtrobust_fast.evaluation import evaluate
    from mtrobust_fast.tasks.classification import ClassificationTask

    class Slow(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 3)

        def forward(self, x):
            time.sleep(0.4)
            return {"class": self.fc(x.flatten(1))}

    torch.manual_seed(0)
    model, head = Slow(), ClassificationTask("class", 3)
    x, y = torch.rand(4, 3, 2, 2), torch.randint(0, 3, (4,))
    attack = PGD(model, [head], eps=0.03, steps=8, early_exit=False)
    evaluate(model, [(x, {"class": y}, {})], attack, [head], gradients=False, progress=True)
    assert "/32" in capsys.readouterr().err  # 4 rows x 8 steps
