"""The gradient-curvature regulariser: ξ against a float64 reference and its gradient against autograd's
numerical check; undefined samples are left out without NaN; the objective adds the term."""
import numpy as np
import pytest
import torch

from mtrobust_fast.models import build_model
from mtrobust_fast.training import CleanObjective, TaskLosses
from mtrobust_fast.tasks import auxiliary
from mtrobust_fast.models import build_classifier
from mtrobust_fast.training.regularisers import (CurvatureRegularised, curvature_penalty, curvature_term, curvature_xi,
                                                  houdini, softmax_margin)
from mtrobust_fast.weighting import make_weighting


def _reference(g1, g2):
    out = []
    for a, b in zip(g1.reshape(len(g1), -1).tolist(), g2.reshape(len(g2), -1).tolist()):
        a, b = np.array(a), np.array(b)
        cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        out.append((1 - cos ** 2) * np.sum((a - b) ** 2) / np.sum((a + b) ** 2))
    return np.array(out)


def test_xi_matches_the_formula_and_its_gradient_is_right():
    gen = torch.Generator().manual_seed(0)
    g1 = torch.randn(5, 3, 4, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    g2 = torch.randn(5, 3, 4, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    assert np.allclose(curvature_xi(g1, g2).detach().numpy(), _reference(g1.detach(), g2.detach()), rtol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: curvature_xi(a, b), (g1, g2))
    assert torch.autograd.gradcheck(curvature_penalty, (g1, g2))
    same = curvature_xi(g1, 2 * g1)  # parallel, same direction: no conflict
    assert torch.allclose(same, torch.zeros_like(same), atol=1e-12)


def test_undefined_samples_are_left_out_without_nan():
    g1 = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    g2 = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        g2[0] = -g1[0]  # exactly opposed: g1 + g2 = 0
        g2[1] = 0  # a flat loss
    g2.requires_grad_(True)
    xi = curvature_xi(g1, g2)
    assert torch.isnan(xi[:2]).all() and torch.isfinite(xi[2])
    penalty = curvature_penalty(g1, g2)
    assert torch.allclose(penalty, xi[2])
    penalty.backward()
    assert torch.isfinite(g1.grad).all() and torch.isfinite(g2.grad).all()
    assert torch.count_nonzero(g1.grad[:2]) == 0


@pytest.mark.parametrize("weighting", ["static", "mgda"])
def test_the_objective_adds_the_curvature_of_two_tasks_and_trains(weighting):
    torch.manual_seed(0)
    model = build_model("sd", "resnet18", input_size=32)
    losses = TaskLosses(model.task_records.values())
    objective = CurvatureRegularised(CleanObjective(losses), losses, "segment_semantic", "depth_zbuffer")
    x = torch.rand(2, 3, 32, 32)
    targets = {"segment_semantic": torch.randint(1, 18, (2, 32, 32)), "depth_zbuffer": torch.rand(2, 1, 32, 32)}
    (out,) = objective.updates(model, x, targets, {})
    assert set(out.task_losses) == {"segment_semantic", "depth_zbuffer", "curvature"} and out.features is None

    xg = x.clone().requires_grad_(True)
    per_sample = losses.per_sample(model(xg), targets, {})
    g1 = torch.autograd.grad(per_sample["segment_semantic"].sum(), xg, retain_graph=True)[0]
    g2 = torch.autograd.grad(per_sample["depth_zbuffer"].sum(), xg)[0]
    assert torch.allclose(out.task_losses["curvature"], curvature_xi(g1, g2).mean(), rtol=1e-4)

    make_weighting(weighting, {"segment_semantic": 0.5, "depth_zbuffer": 0.5, "curvature": 1.0}).backward(
        out.task_losses, model=model, features=out.features)
    encoder_grad = model.encoder.stem[0][0].weight.grad
    assert encoder_grad is not None and torch.isfinite(encoder_grad).all()
    with pytest.raises(ValueError, match="two different tasks"):
        CurvatureRegularised(CleanObjective(losses), losses, "depth_zbuffer", "depth_zbuffer")


def _normal_density(m):
    return np.exp(-m ** 2 / 2) / np.sqrt(2 * np.pi)


def test_houdini_keeps_the_value_and_gives_the_smoothed_margin_gradient():
    value = torch.tensor([0.3, 2.0], dtype=torch.float64, requires_grad=True)
    margin = torch.tensor([0.1, -1.5], dtype=torch.float64, requires_grad=True)
    out = houdini(value, margin)
    assert torch.equal(out.detach(), value.detach())
    out.sum().backward()
    assert value.grad is None or torch.count_nonzero(value.grad) == 0  # the value is a constant of the surrogate
    expected = -value.detach().numpy() * _normal_density(margin.detach().numpy())
    assert np.allclose(margin.grad.numpy(), expected, rtol=1e-12)


def test_softmax_margin_against_numpy_and_refuses_dense_or_multilabel_heads():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 2])
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(1, keepdims=True)
    assert np.allclose(softmax_margin(logits, labels).numpy(), [p[0, 0] - p[0, 1], p[1, 2] - p[1, 1]])
    with pytest.raises(ValueError, match="single-label classification head"):
        softmax_margin(logits, torch.rand(2, 3))
    with pytest.raises(ValueError, match="single-label classification head"):
        softmax_margin(torch.randn(2, 18, 4, 4), torch.randint(0, 18, (2, 4, 4)))


def test_houdini_grad_value_is_xi_and_its_gradient_follows_the_cosine():
    gen = torch.Generator().manual_seed(1)
    g1 = torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    g2 = torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    term = curvature_term("houdini-grad", g1, g2)
    assert torch.allclose(term, curvature_xi(g1, g2).mean())
    term.backward()
    a, b = g1.detach(), g2.detach()
    xi = curvature_xi(a, b)
    # reference: d/dg1 of mean(xi * P(N > cos)) with xi constant, through autograd on the cosine in float64
    a_ref = a.clone().requires_grad_(True)
    cos_ref = torch.nn.functional.cosine_similarity(a_ref, b, dim=1)
    (xi * 0.5 * torch.erfc(cos_ref / np.sqrt(2))).mean().backward()
    assert torch.allclose(g1.grad, a_ref.grad, rtol=1e-10)


def test_houdini_out_needs_no_double_backprop_and_moves_only_through_the_outputs():
    torch.manual_seed(0)
    model = build_classifier("resnet18", classes=4, input_size=32, aux=())
    model.eval()
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    labels = torch.tensor([0, 1, 2])
    logits = model(x)["class"]
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    g1 = torch.autograd.grad(ce.sum(), x, retain_graph=True)[0]
    g2 = torch.autograd.grad(logits.logsumexp(1).sum(), x, retain_graph=True)[0]
    assert not g1.requires_grad and not g2.requires_grad  # first-order gradients only
    term = curvature_term("houdini-out", g1, g2, logits, labels)
    assert torch.allclose(term, curvature_xi(g1, g2).mean())
    (dlogits,) = torch.autograd.grad(term, logits)
    xi = curvature_xi(g1, g2).double()
    # d term / d logits = -mean(xi * phi(m) * dm/dlogits), with xi and phi(m) constants
    probe = logits.detach().double().requires_grad_(True)
    m = softmax_margin(probe, labels)
    (-(xi * torch.tensor(_normal_density(m.detach().numpy())) * m).mean()).backward()
    assert torch.allclose(dlogits.double(), probe.grad, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("kind", ["houdini-grad", "houdini-out"])
def test_the_objective_trains_with_either_houdini_variant(kind):
    torch.manual_seed(0)
    model = build_classifier("resnet18", classes=4, input_size=32, aux=[auxiliary.make_task("rotation")])
    losses = TaskLosses(model.task_records.values())
    objective = CurvatureRegularised(CleanObjective(losses), losses, "class", "rotation", kind)
    x = torch.rand(4, 3, 32, 32)
    targets = {"class": torch.tensor([0, 1, 2, 3]), "rotation": torch.tensor([0, 1, 2, 3])}
    (out,) = objective.updates(model, x, targets, {})
    assert torch.isfinite(out.task_losses["curvature"]) and out.task_losses["curvature"] > 0
    make_weighting("static", {"class": 1.0, "rotation": 1.0, "curvature": 1.0}).backward(out.task_losses, model=model)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert objective.describe()["curvature_kind"] == kind
