"""The gradient-curvature regulariser: ξ against a float64 reference and its gradient against autograd's
numerical check; undefined samples are left out without NaN; the objective adds the term."""
import numpy as np
import pytest
import torch

from mtrobust_fast.models import build_model
from mtrobust_fast.training import CleanObjective, TaskLosses
from mtrobust_fast.training.regularisers import CurvatureRegularised, curvature_penalty, curvature_xi
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
