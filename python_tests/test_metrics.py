"""Vulnerability metrics against hand-computed values, and the meter's aggregation over batches."""
import math

import numpy as np
import pytest
import torch

from mtrobust_fast.evaluation import metrics
from mtrobust_fast.evaluation.metrics import Evaluation, VulnerabilityMeter
from mtrobust_fast.tasks import TaskMeter

D, N = "depth_zbuffer", "normal"


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# ---- relative, adversarial and marginal vulnerability ----

def test_relative_vulnerability_per_sample_mean_skips_zero_clean_error():
    clean, adv = t(0.5, 0.25, 0.0, 1.0), t(1.0, 0.5, 0.3, 1.0)
    change = metrics.relative_change(clean, adv)
    assert change[[0, 1, 3]].tolist() == [1.0, 1.0, 0.0] and math.isnan(change[2])
    assert metrics.relative_vulnerability(clean, adv) == pytest.approx(2 / 3)
    # the source's ratio of means: (0.7 - 0.4375) / 0.4375
    assert metrics.relative_vulnerability_of_means(clean, adv) == pytest.approx(0.6)
    assert math.isnan(metrics.relative_vulnerability(t(0.0, 0.0), t(0.1, 0.0)))
    assert math.isnan(metrics.relative_vulnerability_of_means(t(0.0, 0.0), t(0.1, 0.0)))


def test_per_sample_mean_differs_from_ratio_of_means():
    clean, adv = t(0.1, 1.0), t(0.2, 1.0)
    assert metrics.relative_vulnerability(clean, adv) == pytest.approx(0.5)
    assert metrics.relative_vulnerability_of_means(clean, adv) == pytest.approx(0.1 / 1.1)


def test_adversarial_vulnerability_and_joint_loss():
    assert metrics.adversarial_vulnerability(t(1.0, 2.0), t(1.5, 1.0)).tolist() == [0.5, 1.0]
    losses = {"a": t(1.0, 2.0), "b": t(3.0, 6.0)}
    assert metrics.joint_loss(losses, ["a", "b"]).tolist() == [2.0, 4.0]
    assert metrics.joint_loss(losses, ["b"]).tolist() == [3.0, 6.0]
    assert metrics.joint_loss(losses, ["a", "b"], {"a": 1.0, "b": 0.1}).tolist() == pytest.approx([1.3, 2.6])
    with pytest.raises(ValueError, match="weights has no entry"):
        metrics.joint_loss(losses, ["a", "b"], {"a": 1.0})


def test_marginal_vulnerabilities_pairs_sets_differing_by_one_task():
    pairs = metrics.marginal_vulnerabilities({("a",): 1.0, ("a", "b"): 1.5, ("a", "b", "c"): 1.2, ("c",): 0.4})
    assert [(p["base"], p["added"]) for p in pairs] == [(("a",), "b"), (("a", "b"), "c")]
    assert [p["delta"] for p in pairs] == pytest.approx([0.5, -0.3])


# ---- gradient statistics ----

GRADS = torch.tensor([[[1.0, -2.0, 0.0, 2.0]], [[0.0, 1.0, 0.0, 0.0]]])  # [T=2, B=1, 4]


def test_gradient_norms():
    norms = metrics.gradient_norms(GRADS)
    assert norms["l1"][:, 0].tolist() == [5.0, 1.0]
    assert norms["l2"][:, 0].tolist() == [3.0, 1.0]
    assert norms["linf"][:, 0].tolist() == [2.0, 1.0]
    assert metrics.dual_norm("linf") == "l1" and metrics.dual_norm("l2") == "l2"
    with pytest.raises(ValueError, match="norm"):
        metrics.dual_norm("l1")
    with pytest.raises(ValueError, match=r"\[T, B, \.\.\.\]"):
        metrics.gradient_norms(torch.zeros(2, 3))


def test_gradient_similarity_matches_hand_values_and_numpy_cov():
    sim = metrics.gradient_similarity(GRADS)
    assert sim["dot"][0, 1, 0] == -2.0 and sim["dot"][0, 0, 0] == 9.0
    assert sim["cosine"][0, 1, 0] == pytest.approx(-2 / 3) and sim["cosine"][1, 1, 0] == pytest.approx(1.0)
    assert sim["covariance"][0, 1, 0] == pytest.approx(-0.75)
    expected = np.cov(GRADS[:, 0].numpy())
    assert np.allclose(sim["covariance"][..., 0].numpy(), expected)
    zero = metrics.gradient_similarity(torch.stack([GRADS[0], torch.zeros_like(GRADS[0])]))
    assert zero["cosine"][0, 1, 0] == 0.0


def test_theorem2_factor():
    # (1 + (2/2) * Cov(r1, r0) / Cov(r1, r1)) / 2 = (1 + 1/4) / 2
    assert metrics.theorem2_factor(torch.tensor([[2.0, 1.0], [1.0, 4.0]])) == pytest.approx(math.sqrt(0.625))
    assert metrics.theorem2_factor([[3.0]]) == 1.0
    assert math.isnan(metrics.theorem2_factor([[0.0, 0.0], [0.0, 1.0]]))
    assert math.isnan(metrics.theorem2_factor([[1.0, -3.0], [-3.0, 1.0]]))  # negative radicand


def test_theorem4_bound_equal_and_given_weights():
    norms = {"a": 2.0, "b": 3.0, "c": 1.0}
    # equal weights: eps * (E|r_c| + max(E|r_a|, E|r_b|)) = 0.1 * (1 + 3)
    assert metrics.theorem4_bound(norms, ["a", "b"], "c", 0.1) == pytest.approx(0.4)
    # 0.1 * (3 * 0.5 * 1 + 2 * max(1 * 2, 0.1 * 3))
    weights = {"a": 1.0, "b": 0.1, "c": 0.5}
    assert metrics.theorem4_bound(norms, ["a", "b"], "c", 0.1, weights) == pytest.approx(0.55)
    with pytest.raises(ValueError, match="already in base"):
        metrics.theorem4_bound(norms, ["a"], "a", 0.1)


class _Tiny(torch.nn.Module):
    """A per-pixel model with a depth and a normal head (samples independent, as in eval mode)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.depth = torch.nn.Conv2d(3, 1, 3, padding=1)
        self.normal = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return {D: torch.tanh(self.depth(x)), N: torch.tanh(self.normal(x))}


def _batch(b=3, size=4):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(b, 3, size, size, generator=gen)
    targets = {D: torch.rand(b, 1, size, size, generator=gen), N: torch.rand(b, 3, size, size, generator=gen)}
    masks = {D: torch.rand(b, 1, size, size, generator=gen) > 0.3, N: torch.ones(b, 1, size, size, dtype=torch.bool)}
    return x, targets, masks


def test_input_gradients_are_per_sample_per_task():
    model, (x, targets, masks) = _Tiny(), _batch()
    grads = metrics.input_gradients(model, x, targets, masks, [D, N])
    assert grads.shape == (2, 3, 3, 4, 4)
    for b in range(3):
        xb = x[b:b + 1].clone().requires_grad_(True)
        out = model(xb)
        loss = torch.nn.functional.l1_loss(out[N], targets[N][b:b + 1])
        (expected,) = torch.autograd.grad(loss, xb)
        assert torch.allclose(grads[1, b], expected[0], atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_evaluate_uses_the_task_helpers():
    model, (x, targets, masks) = _Tiny(), _batch()
    outputs = model(x)
    ev = metrics.evaluate(outputs, targets, masks, [D, N])
    diff = (outputs[D] - targets[D]).detach()
    m = masks[D]
    expected = torch.stack([diff[b][m[b]].square().mean() for b in range(3)])
    assert torch.allclose(ev.errors[D], expected, atol=1e-6)
    assert ev.losses[N].shape == (3,) and ev.stats[D].shape == (3,)


# ---- the meter ----

def _ev(d_loss, n_loss, d_err, n_err):
    return Evaluation({D: t(*d_loss), N: t(*n_loss)}, {D: t(*d_err), N: t(*n_err)})


def _meter_with_two_batches(grads=False):
    """Batches of 1 and 3 samples, attacked sets (d) and (d, n)."""
    meter = VulnerabilityMeter([D, N], eps=0.5, norm="linf")
    g1 = torch.tensor([[[1.0, -1.0]], [[2.0, 0.0]]]) if grads else None  # [T=2, B=1, 2]
    g2 = torch.ones(2, 3, 2) if grads else None
    meter.update(_ev([1.0], [1.0], [0.1], [0.5]),
                 {(D,): _ev([2.0], [1.5], [0.2], [0.5]), (D, N): _ev([1.5], [3.0], [0.15], [1.0])}, g1)
    meter.update(_ev([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.5, 0.5, 0.5]),
                 {D: _ev([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.5, 0.5, 0.5]),
                  (N, D): _ev([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.5, 0.5, 0.5])}, g2)
    return meter


def test_meter_aggregates_per_sample_over_batches():
    summary = _meter_with_two_batches().compute()
    assert summary["samples"] == 4 and set(summary["attacks"]) == {"d", "dn"}
    d_attack = summary["attacks"]["d"]["tasks"]
    # per-sample changes of d's error: 1.0, 0, 0, undefined -> mean 1/3 (a mean of batch means would differ)
    assert d_attack[D]["rel_vuln"] == pytest.approx(1 / 3)
    assert d_attack[D]["rel_vuln_undefined"] == 1
    assert d_attack[D]["rel_vuln_ratio_of_means"] == pytest.approx((2.2 / 4 - 2.1 / 4) / (2.1 / 4))
    assert d_attack[D]["adv_vuln"] == pytest.approx(1.0 / 4)
    assert d_attack[N]["adv_vuln"] == pytest.approx(0.5 / 4)
    assert summary["clean"][D]["error"] == pytest.approx(2.1 / 4)
    both = summary["attacks"]["dn"]
    assert both["tasks"][N]["rel_vuln"] == pytest.approx(1 / 4)
    # joint loss with equal weights: |mean(1.5, 3) - mean(1, 1)| = 1.25 on sample 0, 0 elsewhere
    assert both["joint_adv_vuln"] == pytest.approx(1.25 / 4)
    assert summary["attacks"]["d"]["joint_adv_vuln"] == pytest.approx(1.0 / 4)
    (marginal,) = summary["marginal"]
    assert marginal["base"] == [D] and marginal["added"] == N
    assert marginal["delta"] == pytest.approx(0.25 / 4)
    assert "gradients" not in summary


def test_meter_gradient_summary():
    summary = _meter_with_two_batches(grads=True).compute()
    grads = summary["gradients"]
    # L1 norms (dual of linf): d: 2, 2, 2, 2 -> 2; n: 2, 2, 2, 2 -> 2
    assert grads["mean_norm_l1"] == pytest.approx({D: 2.0, N: 2.0})
    assert grads["first_order"] == pytest.approx({D: 1.0, N: 1.0})
    # cosine d|n: sample 0 (1,-1).(2,0)/(sqrt2*2) = 1/sqrt2, others 1
    assert grads["cosine"]["d|n"] == pytest.approx((1 / math.sqrt(2) + 3) / 4)
    # joint gradient of (d, n) with weights 1/2: sample 0 (1.5, -0.5) -> L1 2; others (1, 1) -> 2
    assert summary["attacks"]["dn"]["first_order_joint"] == pytest.approx(0.5 * 2.0)
    assert summary["marginal"][0]["theorem4_bound"] == pytest.approx(0.5 * (2.0 + 2.0))
    assert "theorem2_factor" in grads


def test_meter_clean_metrics_reuse_task_meter():
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(2, 18, 8, 8, generator=gen)
    target = torch.randint(0, 18, (2, 8, 8), generator=gen)
    name = "segment_semantic"
    ev = metrics.evaluate({name: out}, {name: target}, {}, [name])
    meter = VulnerabilityMeter([name], eps=0.1)
    meter.update(ev, {name: ev})
    reference = TaskMeter(name)
    reference.update(out, target)
    clean = meter.compute()["clean"][name]
    assert clean["miou"] == reference.compute()["miou"] and clean["pixel_acc"] == reference.compute()["pixel_acc"]
    assert meter.compute()["attacks"]["s"]["tasks"][name]["rel_vuln"] == 0.0
    rows = metrics.summary_rows(meter.compute())
    assert len(rows) == 1 and rows[0]["attacked"] == "s" and "clean_miou" in rows[0] and "adv_miou" in rows[0]


def test_meter_errors():
    meter = VulnerabilityMeter([D, N], eps=0.1)
    with pytest.raises(RuntimeError, match="no batch"):
        meter.compute()
    with pytest.raises(ValueError, match="attacked set"):
        meter.update(_ev([1.0], [1.0], [1.0], [1.0]), {"edge_occlusion": _ev([1.0], [1.0], [1.0], [1.0])})
    with pytest.raises(ValueError, match="batch sizes"):
        meter.update(_ev([1.0], [1.0], [1.0], [1.0]), {D: _ev([1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [1.0, 2.0])})
    meter.update(_ev([1.0], [1.0], [1.0], [1.0]), {D: _ev([1.0], [1.0], [1.0], [1.0])})
    with pytest.raises(ValueError, match="same attacked sets"):
        meter.update(_ev([1.0], [1.0], [1.0], [1.0]), {N: _ev([1.0], [1.0], [1.0], [1.0])})
    with pytest.raises(ValueError, match="every batch or for none"):
        meter.update(_ev([1.0], [1.0], [1.0], [1.0]), {D: _ev([1.0], [1.0], [1.0], [1.0])}, torch.ones(2, 1, 3))
    assert meter.samples == 1  # failed updates stored nothing
    with pytest.raises(ValueError, match="weights"):
        VulnerabilityMeter([D, N], eps=0.1, weights={D: 1.0})


def test_perturbation_norms_and_snr_against_numpy():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 5, 5, generator=gen)
    adv = (x + (torch.rand(x.shape, generator=gen) - 0.5) * 0.1).clamp(0, 1)
    adv[2] = x[2]  # one unperturbed image
    got = metrics.perturbation_norms(x, adv)
    xs, ds = x.double().numpy().reshape(4, -1), (adv.double() - x.double()).numpy().reshape(4, -1)
    np.testing.assert_allclose(got["l1"].numpy(), np.abs(ds).sum(1), rtol=1e-12)
    np.testing.assert_allclose(got["l2"].numpy(), np.linalg.norm(ds, axis=1), rtol=1e-12)
    np.testing.assert_allclose(got["linf"].numpy(), np.abs(ds).max(1), rtol=1e-12)
    keep = [0, 1, 3]
    expected = 20 * np.log10(np.linalg.norm(xs[keep], axis=1) / np.linalg.norm(ds[keep], axis=1))
    np.testing.assert_allclose(got["snr_db"].numpy()[keep], expected, rtol=1e-12)
    assert got["snr_db"][2] == float("inf")
    with pytest.raises(ValueError, match="same shape"):
        metrics.perturbation_norms(x, adv[:2])


def test_meter_reports_perturbation_and_gradient_norms_in_every_norm():
    names = ["depth_zbuffer", "normal"]
    gen = torch.Generator().manual_seed(1)

    def evaluation():
        return metrics.Evaluation({n: torch.rand(3, generator=gen) for n in names},
                                  {n: torch.rand(3, generator=gen) + 0.1 for n in names})

    meter = metrics.VulnerabilityMeter(names, eps=0.1)
    batches = []
    for _ in range(2):
        x = torch.rand(3, 2, 4, 4, generator=gen)
        adv = x + 0.01 * torch.randn(x.shape, generator=gen)
        grads, adv_grads = torch.randn(2, 3, 2, 4, 4, generator=gen), torch.randn(2, 3, 2, 4, 4, generator=gen)
        key = tuple(names)
        meter.update(evaluation(), {key: evaluation()}, grads, perturbations={key: (x, adv)}, adv_grads={key: adv_grads})
        batches.append((x, adv, grads, adv_grads))
    summary = meter.compute()
    entry = summary["attacks"]["dn"]
    deltas = np.concatenate([(a - x).double().numpy().reshape(3, -1) for x, a, _, _ in batches])
    assert entry["perturbation"]["l2"] == pytest.approx(np.linalg.norm(deltas, axis=1).mean(), rel=1e-12)
    assert entry["perturbation"]["linf_max"] == pytest.approx(np.abs(deltas).max(), rel=1e-12)
    clean = np.concatenate([g.double().numpy().reshape(2, 3, -1) for _, _, g, _ in batches], axis=1)
    adv = np.concatenate([g.double().numpy().reshape(2, 3, -1) for _, _, _, g in batches], axis=1)
    for i, name in enumerate(names):
        assert summary["gradients"]["norms"][name]["linf"] == pytest.approx(np.abs(clean[i]).max(1).mean(), rel=1e-12)
        assert entry["adv_grad_norms"][name]["l1"] == pytest.approx(np.abs(adv[i]).sum(1).mean(), rel=1e-12)
    joint = (adv[0] + adv[1]) / 2  # equal weights 1/|T'|
    assert entry["adv_joint_grad_norms"]["l2"] == pytest.approx(np.linalg.norm(joint, axis=1).mean(), rel=1e-12)
    clean_joint = (clean[0] + clean[1]) / 2
    assert entry["first_order_joint"] == pytest.approx(0.1 * np.abs(clean_joint).sum(1).mean(), rel=1e-12)
    rows = metrics.summary_rows(summary)
    assert {"pert_l2", "pert_snr_db", "adv_grad_linf", "clean_grad_l1", "adv_joint_grad_l2"} <= set(rows[0])
    with pytest.raises(ValueError, match="perturbations must be given"):
        meter.update(evaluation(), {tuple(names): evaluation()}, torch.randn(2, 3, 2, 4, 4),
                     adv_grads={tuple(names): torch.randn(2, 3, 2, 4, 4)})


def test_set_label_of_names_outside_the_registry_also_from_a_generator():
    assert metrics.set_label(["segment_semantic", "depth_zbuffer"]) == "sd"
    assert metrics.set_label(n for n in ["class", "rotation"]) == "class+rotation"
    assert metrics.set_label(iter(["class"])) == "class"


def test_collapsed_heads_are_flagged():
    """A head that outputs one value for every image, or one class everywhere, looks robust; it is flagged."""
    from mtrobust_fast.evaluation.collapse import CollapseDetector
    from mtrobust_fast.tasks.classification import ClassificationTask
    head = ClassificationTask("class", 3)
    labels = {"class": torch.tensor([0, 1, 2, 1])}
    constant = CollapseDetector([head])
    constant.add({"class": torch.tensor([[0.1, 2.0, -1.0]]).repeat(4, 1)}, labels, {})
    assert constant.result() == {"class": "the same output for every image"}
    one_class = CollapseDetector([head])
    one_class.add({"class": torch.tensor([[0.0, 5.0, 0.0], [0.1, 4.0, 0.0], [0.2, 3.0, 0.3], [0.0, 2.0, 1.0]])},
                  labels, {})
    assert "predicts class 1 everywhere" in one_class.result()["class"]
    healthy = CollapseDetector([head])
    healthy.add({"class": torch.eye(3)[[0, 1, 2, 1]]}, labels, {})
    assert healthy.result() == {}
    agreeing = CollapseDetector([head])  # one class predicted where the labels hold one class too: not flagged
    agreeing.add({"class": torch.tensor([[3.0, 0.0, 0.0], [2.0, 1.0, 0.0]])}, {"class": torch.tensor([0, 0])}, {})
    assert agreeing.result() == {}
