"""AutoAttack's members for classification heads: the targeted DLR loss against a hand value, APGD-T on a
small trained classifier (ball, box, lower accuracy, never undoing a success)."""
import json

import pytest
import torch

from mtrobust_fast.attacks import APGD, APGDT, FAB, PGD, AutoAttack, Square, build_attack, classification
from mtrobust_fast.attacks.fab import project_onto_hyperplane
from mtrobust_fast.attacks.square import l2_proposal, margin, pattern, square_fraction
from mtrobust_fast.tasks.classification import targeted_dlr
from mtrobust_fast.cli import main as cli_main
from mtrobust_fast.data.synth.objects import synthesize_objects


def test_targeted_dlr_equals_the_hand_value():
    logits = torch.tensor([[4.0, 3.0, 1.0, 0.5, -1.0]], dtype=torch.float64)
    value = targeted_dlr(logits, torch.tensor([0]), torch.tensor([2]))
    assert value.item() == pytest.approx(-(4.0 - 1.0) / (4.0 - 0.5 * (1.0 + 0.5)))
    with pytest.raises(ValueError, match="at least 4 classes"):
        targeted_dlr(torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([1, 2]))


def prototype_classifier(shape):
    """A linear classifier of 6 classes on inputs of ``shape`` in [0, 1], trained on noisy class prototypes; 60
    of its training points."""
    gen = torch.Generator().manual_seed(0)
    prototypes = torch.rand(6, *shape, generator=gen)
    labels = torch.arange(6).repeat(40)
    x = (prototypes[labels] + 0.15 * torch.randn(240, *shape, generator=gen)).clamp(0, 1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].numel(), 6))
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(x), labels).backward()
        optimiser.step()
    return model.eval(), x[:60], labels[:60]


@pytest.fixture(scope="module")
def trained():
    """The prototype classifier on 2x4x4 inputs."""
    return prototype_classifier((2, 4, 4))


@pytest.fixture(scope="module")
def trained_rgb():
    """The prototype classifier on 3x10x10 inputs (torchattacks' L2 Square needs a side of at least 5)."""
    return prototype_classifier((3, 10, 10))


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


def test_zero_gradients_and_probabilities_are_flagged_and_bad_versions_refused(trained):
    model, x, labels = trained
    with pytest.warns(UserWarning, match="input gradient of exactly zero"):
        AutoAttack(Quantised(model).eval(), [classification("label")], eps=0.2, steps=3, queries=20)(x, labels)
    probabilities = torch.nn.Sequential(model, torch.nn.Softmax(dim=1)).eval()
    with pytest.warns(UserWarning, match="look like probabilities"):
        AutoAttack(probabilities, [classification("label")], eps=0.2, steps=3, queries=20)(x, labels)
    with pytest.raises(ValueError, match="version must be"):
        AutoAttack(model, [classification("label")], version="strong")
    with pytest.raises(ValueError, match="'plus' runs apgd-ce, apgd-dlr, fab, square, apgd-t, fab-t"):
        AutoAttack(model, [classification("label")], version="plus", attacks=["square"])
    with pytest.raises(ValueError, match="chooses the members of version='custom'"):
        AutoAttack(model, [classification("label")], version="standard", attacks=["square"])
    assert AutoAttack(model, [classification("label")]).attacks == ("apgd-ce", "apgd-t", "fab-t", "square")


def test_attacks_work_when_called_under_no_grad(trained):
    model, x, labels = trained
    with torch.no_grad():
        adv = PGD(model, [classification("label")], eps=0.2, steps=3)(x, labels)
    assert (adv - x).abs().max() > 0


@pytest.mark.parametrize("norm,eps,fixture", [("linf", 0.2, "trained"), ("l2", 3.0, "trained_rgb")])
def test_our_standard_autoattack_is_at_least_as_strong_as_torchattacks(request, norm, eps, fixture):
    torchattacks = pytest.importorskip("torchattacks")  # installed with --no-deps by the README's test command
    model, x, labels = request.getfixturevalue(fixture)
    theirs = torchattacks.AutoAttack(model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, version="standard",
                                     n_classes=6, seed=0)
    their_accuracy = _accuracy(model, theirs(x, labels), labels)
    ours = AutoAttack(model, [classification("label")], eps=eps, norm=norm, steps=100, queries=5000, seed=0)
    adv = ours(x, labels)
    assert _distance(adv - x, norm).max() <= eps * (1 + 1e-5) and adv.min() >= 0 and adv.max() <= 1
    assert _accuracy(model, adv, labels) <= their_accuracy + 0.01
    assert list(ours.summary()) == ["apgd-ce", "apgd-t", "fab-t", "square"]


def _distance(delta, norm):
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def test_fab_projection_is_the_smallest_step_onto_the_hyperplane_in_the_box():
    np = pytest.importorskip("numpy")
    optimize = pytest.importorskip("scipy.optimize")
    gen = torch.Generator().manual_seed(0)
    rows, size = 6, 30
    w = torch.randn(rows, size, generator=gen, dtype=torch.float64)
    w[0, :10] = 0  # coordinates that cannot help
    c = 3 * torch.randn(rows, generator=gen, dtype=torch.float64)
    x = torch.rand(rows, size, generator=gen, dtype=torch.float64)
    low, high = -x, 1 - x
    for norm in ("linf", "l2"):
        d = project_onto_hyperplane(w, c, low, high, norm)
        torch.testing.assert_close((w * d).sum(1), c, rtol=0, atol=1e-12)
        assert (d >= low - 1e-15).all() and (d <= high + 1e-15).all()
    for r in range(rows):
        bounds = list(zip(low[r].tolist(), high[r].tolist()))
        # L∞: minimise t with -t <= d_i <= t, w·d = c (a linear programme)
        lp = optimize.linprog(np.r_[np.zeros(size), 1.0],
                              A_ub=np.block([[np.eye(size), -np.ones((size, 1))], [-np.eye(size), -np.ones((size, 1))]]),
                              b_ub=np.zeros(2 * size), A_eq=np.r_[w[r].numpy(), 0.0][None], b_eq=[c[r].item()],
                              bounds=bounds + [(0, None)])
        d = project_onto_hyperplane(w[r:r + 1], c[r:r + 1], low[r:r + 1], high[r:r + 1], "linf")[0]
        assert d.abs().max().item() == pytest.approx(lp.x[-1], rel=1e-9, abs=1e-12)
        qp = optimize.minimize(lambda z: 0.5 * z @ z, np.zeros(size), jac=lambda z: z, method="SLSQP", bounds=bounds,
                               constraints=[optimize.LinearConstraint(w[r].numpy()[None], c[r].item(), c[r].item())],
                               options=dict(ftol=1e-15, maxiter=1000))
        d = project_onto_hyperplane(w[r:r + 1], c[r:r + 1], low[r:r + 1], high[r:r + 1], "l2")[0]
        assert np.abs(d.numpy() - qp.x).max() < 1e-7
    # out of reach: the box point that gets closest along w
    far = project_onto_hyperplane(w[1:2], torch.tensor([1e6], dtype=torch.float64), low[1:2], high[1:2], "linf")
    torch.testing.assert_close(far, torch.where(w[1:2] > 0, high[1:2], low[1:2]))


@pytest.mark.parametrize("norm,eps", [("linf", 0.2), ("l2", 1.0)])
def test_fab_finds_points_inside_the_budget_as_often_as_torchattacks(trained, norm, eps):
    model, x, labels = trained
    adv = FAB(model, [classification("label")], eps=eps, norm=norm, steps=100, target_classes=5)(x, labels)
    assert _distance(adv - x, norm).max() <= eps * (1 + 1e-5) and adv.min() >= 0 and adv.max() <= 1
    fooled = _accuracy(model, adv, labels)
    assert fooled < _accuracy(model, x, labels) - 0.3
    torchattacks = pytest.importorskip("torchattacks")
    theirs = torchattacks.FAB(model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, steps=100, n_classes=6,
                              multi_targeted=True, n_restarts=1, seed=0)(x, labels)
    assert fooled <= _accuracy(model, theirs, labels) + 0.01


def test_fab_restarts_only_the_points_not_yet_fooled(trained, monkeypatch):
    model, x, labels = trained
    fab = FAB(model, [classification("label")], eps=1.0, norm="l2", steps=20, targeted=False, restarts=3)
    walked = []
    original = FAB._walk

    def counting(self, start, x0, labels_, targets):
        found, norm = original(self, start, x0, labels_, targets)
        walked.append((start.shape[0], int((norm <= 1.0).sum())))
        return found, norm

    monkeypatch.setattr(FAB, "_walk", counting)
    fab(x, labels)
    # every start after the first runs only on the points that earlier starts left outside the budget
    for (before, fooled), (after, _) in zip(walked, walked[1:]):
        assert after <= before - fooled
    assert walked[0][1] > 0 and len(walked) >= 2


@pytest.mark.parametrize("norm,eps", [("linf", 0.2), ("l2", 1.0)])
def test_untargeted_fab_takes_the_nearest_boundary_and_matches_torchattacks(trained, norm, eps):
    model, x, labels = trained
    fab = FAB(model, [classification("label")], eps=eps, norm=norm, steps=100, targeted=False)
    # the first linearisation of a linear model: the class with the smallest |z_y - z_k| / ||w_y - w_k||_*
    f, w = fab._linearise(x, labels, None)
    weight = model[1].weight.detach()
    with torch.no_grad():
        logits = model(x)
    gaps = logits.gather(1, labels[:, None]) - logits
    normals = weight[labels][:, None, :] - weight[None]
    dual = normals.abs().sum(2) if norm == "linf" else normals.norm(dim=2)
    distance = (gaps.abs() / dual).scatter(1, labels[:, None], float("inf"))
    nearest = distance.argmin(1)
    torch.testing.assert_close(f, gaps.gather(1, nearest[:, None])[:, 0])
    torch.testing.assert_close(w.flatten(1), normals[torch.arange(len(x)), nearest])
    adv = fab(x, labels)
    assert _distance(adv - x, norm).max() <= eps * (1 + 1e-5) and adv.min() >= 0 and adv.max() <= 1
    fooled = _accuracy(model, adv, labels)
    assert fooled < _accuracy(model, x, labels) - 0.3
    torchattacks = pytest.importorskip("torchattacks")
    theirs = torchattacks.FAB(model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, steps=100, n_classes=6,
                              multi_targeted=False, n_restarts=1, seed=0)(x, labels)
    assert fooled <= _accuracy(model, theirs, labels) + 0.01


def test_plus_runs_every_member_with_its_restarts_on_the_points_still_robust(trained, monkeypatch):
    model, x, labels = trained
    runs = []
    original = AutoAttack._member

    def counted(self, name, eps, restarts=1, restart=0):
        member = original(self, name, eps, restarts, restart)
        runs.append((name, restart, len(eps), getattr(member, "fab_restarts", None)))
        return member

    monkeypatch.setattr(AutoAttack, "_member", counted)
    plus = AutoAttack(model, [classification("label")], version="plus", eps=0.05, steps=5, queries=30)
    adv = plus(x, labels)
    assert plus.attacks == ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
    assert _distance(adv - x, "linf").max() <= 0.05 * (1 + 1e-6)
    apgd_ce = [run for run in runs if run[0] == "apgd-ce"]
    assert [run[1] for run in apgd_ce] == list(range(len(apgd_ce))) and 1 <= len(apgd_ce) <= 5
    sizes = [run[2] for run in runs]
    assert sizes == sorted(sizes, reverse=True)  # each run only on the points every earlier one left robust
    assert [run[3] for run in runs if run[0] == "fab"] in ([], [5])  # FAB restarts inside its one run
    assert [run[3] for run in runs if run[0] == "fab-t"] in ([], [1])
    report = plus.summary()
    assert list(report) == list(plus.attacks)
    assert report["fab-t"]["robust_accuracy"] == pytest.approx(_accuracy(model, adv, labels))


class Noisy(torch.nn.Module):
    """A randomised model: Gaussian noise on the input at every pass."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x + 0.05 * torch.randn_like(x))


def test_rand_averages_gradients_over_passes_and_warns_on_a_deterministic_model(trained):
    model, x, labels = trained
    calls = []
    hook = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        APGD(model, [classification("label")], eps=0.05, steps=3, eot=4)(x, labels)
        assert len(calls) == 4 * 3 + 4  # 3 gradient steps x 4 passes, and the last iterate scored x 4
    finally:
        hook.remove()
    # a deterministic model: averaging 4 identical gradients gives the same walk
    one = APGD(model, [classification("label")], eps=0.05, steps=4, seed=3)(x, labels)
    four = APGD(model, [classification("label")], eps=0.05, steps=4, seed=3, eot=4)(x, labels)
    torch.testing.assert_close(four, one, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="eot must be"):
        APGD(model, [classification("label")], eot=0)
    with pytest.warns(UserWarning, match="version='rand' is for models with randomness"):
        AutoAttack(model, [classification("label")], version="rand", eps=0.05, steps=2)(x, labels)
    noisy = Noisy(model).eval()
    with pytest.warns(UserWarning, match="version='rand' averages"):
        AutoAttack(noisy, [classification("label")], eps=0.05, steps=2, queries=5)(x, labels)
    torch.manual_seed(0)
    rand = AutoAttack(noisy, [classification("label")], version="rand", eps=0.2, steps=10)
    adv = rand(x, labels)
    assert list(rand.summary()) == ["apgd-ce", "apgd-dlr"]
    assert _distance(adv - x, "linf").max() <= 0.2 * (1 + 1e-6)
    assert _accuracy(model, adv, labels) < _accuracy(model, x, labels) - 0.3


def test_l2_square_stays_on_budget_and_fools_a_zero_gradient_model(trained):
    model, x, labels = trained
    quantised = Quantised(model).eval()
    adv = Square(quantised, [classification("label")], eps=1.5, norm="l2", steps=300)(x, labels)
    assert _distance(adv - x, "l2").max() <= 1.5 * (1 + 1e-5) and adv.min() >= 0 and adv.max() <= 1
    assert _accuracy(quantised, adv, labels) < _accuracy(quantised, x, labels) - 0.3
    pgd = PGD(quantised, [classification("label")], eps=1.5, norm="l2", steps=10)(x, labels)
    assert _accuracy(quantised, pgd, labels) > _accuracy(quantised, adv, labels)


def test_the_l2_pattern_is_unit_norm_with_opposite_halves():
    values = pattern(5)
    assert values.norm().item() == pytest.approx(1.0)
    assert (values[:2] > 0).all() and (values[2:] < 0).all()
    assert values[1, 2] == values[:2].max() and values[3, 2] == values[2:].min()  # the centres weigh most


def test_an_l2_query_keeps_each_channels_energy():
    torch.manual_seed(0)
    current = torch.randn(2, 3, 8, 8) * torch.tensor([0.1, 1.0, 3.0]).view(1, 3, 1, 1)  # unequal channels
    first = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    second = torch.zeros_like(first)
    first[:, :, 1:4, 1:4] = True
    second[:, :, 4:7, 3:6] = True
    placed = torch.randn(2, 3, 8, 8) * first
    eps = torch.full((2, 1, 1, 1), 40.0)  # above the current norm: an unused budget to share
    proposal = l2_proposal(current, first, second, placed, eps)
    unused = (eps ** 2 - current.flatten(1).pow(2).sum(1).view(-1, 1, 1, 1)).clamp_min(0)
    before = (current * (first | second)).pow(2).sum((2, 3), keepdim=True)
    after = (proposal * first).pow(2).sum((2, 3), keepdim=True)
    assert torch.allclose(after, before + unused / 3, rtol=1e-5)
    assert (proposal[second.expand_as(proposal) & ~first.expand_as(proposal)] == 0).all()
    outside = ~(first | second).expand_as(current)
    assert torch.equal(proposal[outside], current[outside])


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
    assert list(members) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    with pytest.warns(UserWarning, match="version='rand' is for models with randomness"):
        assert cli_main(["attack", "--checkpoint", str(run / "last.pt"), "--data", str(data), "--attack",
                         "autoattack", "--aa-version", "rand", "--steps", "2", "--target", "class", "--no-gradients",
                         "--no-progress", "--out", str(out), "--overwrite"]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["summary"]["members"]) == ["apgd-ce", "apgd-dlr"] and saved["config"]["version"] == "rand"
    assert cli_main(["attack", "--checkpoint", str(run / "last.pt"), "--data", str(data), "--attack", "autoattack",
                     "--alpha", "0.01", "--no-progress"]) == 2
    assert "set their own step sizes" in capsys.readouterr().err
    assert cli_main(["attack", "--checkpoint", str(run / "last.pt"), "--data", str(data), "--attack", "pgd",
                     "--aa-version", "plus", "--no-progress"]) == 2
    assert "version" in capsys.readouterr().err
    # the dense version on a classifier names its set ("class"), and Square's header gives queries, not a step size
    assert cli_main(["attack", "--checkpoint", str(run / "last.pt"), "--data", str(data), "--attack", "autoattack",
                     "--aa-version", "dense", "--steps", "2", "--limit", "4", "--no-gradients", "--no-progress",
                     "--out", str(tmp_path / "dense")]) == 0
    assert "\nensemble on class (apgd):" in capsys.readouterr().out
    assert cli_main(["attack", "--checkpoint", str(run / "last.pt"), "--data", str(data), "--attack", "square",
                     "--steps", "20", "--limit", "4", "--no-gradients", "--no-progress",
                     "--out", str(tmp_path / "square")]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith("SQUARE linf eps=0.031373 queries=20 ") and "alpha" not in header


@pytest.mark.parametrize("name", ["square", "fab"])
def test_classifier_attacks_skip_auxiliary_heads_and_land_where_the_whole_model_would(name, monkeypatch):
    """On a GAT classifier (auxiliary heads beside the class head) the attack runs the encoder and the class head
    only, and lands on exactly the point a run through the whole model gives."""
    from mtrobust_fast.attacks.base import Attack
    from mtrobust_fast.tasks.auxiliary import make_task
    from mtrobust_fast.models.registry import build_classifier

    torch.manual_seed(0)
    model = build_classifier("resnet18", classes=4, input_size=16, aux=[make_task("rotation"),
                                                                        make_task("autoencoder")]).eval()
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        labels = model(x)["class"].argmax(1)
    calls = []
    for head in ("rotation", "autoencoder"):
        model.decoders[head].register_forward_hook(lambda *args: calls.append(1))
    settings = dict(eps=8 / 255, steps=20 if name == "square" else 3, seed=0)
    heads_only = build_attack(name, model, ["class"], **settings)(x, {"class": labels})
    assert calls == []
    monkeypatch.setattr(Attack, "_splits_heads", lambda self, names: False)
    whole = build_attack(name, model, ["class"], **settings)(x, {"class": labels})
    assert calls and torch.equal(heads_only, whole)


def test_the_cascade_announces_each_member_with_the_points_left_and_its_work(trained):
    """Progress: each member's name, the points still robust, and a total the rows it evaluates stay within."""
    model, x, labels = trained
    cascade = AutoAttack(model, [classification("label")], eps=0.2, steps=5, queries=7, target_classes=2, seed=0)
    stages, counted = [], []
    cascade.on_stage = lambda description, total: (stages.append((description, total)), counted.append(0))
    cascade.on_gradient = lambda rows: counted.__setitem__(-1, counted[-1] + rows) if counted else None
    cascade(x, labels)
    names = [description.split(":")[0] for description, _ in stages]
    assert names == [n for n in ("apgd-ce", "apgd-t", "fab-t", "square") if n in names] and names[0] == "apgd-ce"
    robust = int((model(x).argmax(1) == labels).sum())
    assert stages[0][0] == f"apgd-ce: {robust} of {len(labels)} points robust" and stages[0][1] == robust * 5
    for (description, total), done in zip(stages, counted):
        assert done <= total, description
        if description.startswith("square"):
            assert total == int(description.split(": ")[1].split()[0]) * 7  # --queries sets Square's budget
