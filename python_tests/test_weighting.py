"""Weighting strategies: static weights, and torchjd aggregators of the shared encoder's per-task gradients
compared with torchjd called directly on the same Jacobian."""
import importlib.util

import pytest
import torch
import torch.nn as nn
from torchjd import aggregation

from mtrobust_fast.models import build_model
from mtrobust_fast.training import AttackSettings, CleanObjective, TaskLosses, make_objective
from mtrobust_fast.weighting import make_weighting


class TwoHeads(nn.Module):
    """A shared linear encoder and two linear heads (float64)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(6, 5).double()
        self.heads = nn.ModuleList([nn.Linear(5, 1).double(), nn.Linear(5, 1).double()])

    def shared_parameters(self):
        return list(self.encoder.parameters())

    def losses(self, x):
        features = torch.tanh(self.encoder(x))
        return features, [head(features).square().mean() for head in self.heads]


def _grads(module):
    return [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("name, aggregator", [("mgda", aggregation.MGDA()), ("upgrad", aggregation.UPGrad()),
                                              ("imtlg", aggregation.IMTLG()), ("dualproj", aggregation.DualProj()),
                                              ("aligned_mtl", aggregation.AlignedMTL()), ("mean", aggregation.Mean())])
def test_aggregators_equal_torchjd_on_the_same_jacobian(name, aggregator):
    net, x = TwoHeads(), torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weights = {"a": 1.0, "b": -0.5}
    features, (la, lb) = net.losses(x)
    make_weighting(name, weights).backward({"a": la, "b": lb}, model=net, features=[features])
    shared, heads = _grads(net.encoder), [_grads(h) for h in net.heads]

    features, (la, lb) = net.losses(x)
    rows = [torch.cat([g.flatten() for g in torch.autograd.grad(w * loss, list(net.encoder.parameters()),
                                                                retain_graph=True)])
            for w, loss in ((1.0, la), (-0.5, lb))]
    expected = aggregator(torch.stack(rows))
    assert torch.allclose(torch.cat([g.flatten() for g in shared]), expected, atol=1e-10)
    for head, loss, w, got in zip(net.heads, (la, lb), (1.0, -0.5), heads):  # heads keep their own gradient
        own = torch.autograd.grad(w * loss, list(head.parameters()), retain_graph=True)
        assert all(torch.allclose(a, b) for a, b in zip(own, got))


def test_equal_weights_equal_the_summed_losses():
    net, x = TwoHeads(), torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    features, (la, lb) = net.losses(x)
    make_weighting("ew", {"a": 1.0, "b": 1.0}).backward({"a": la, "b": lb}, model=net, features=[features])
    ew = _grads(net)
    net.zero_grad()
    _, (la, lb) = net.losses(x)
    make_weighting("static", {"a": 1.0, "b": 1.0}).backward({"a": la, "b": lb})
    assert all(torch.allclose(a, b) for a, b in zip(ew, _grads(net)))


def test_jacobian_weightings_train_a_multitask_model_through_the_objectives():
    torch.manual_seed(0)
    model = build_model("sd", "resnet18", input_size=32)
    losses = TaskLosses(model.task_records.values())
    x = torch.rand(2, 3, 32, 32)
    targets = {"segment_semantic": torch.randint(1, 18, (2, 32, 32)), "depth_zbuffer": torch.rand(2, 1, 32, 32)}
    weighting = make_weighting("mgda", model.config["task_weights"])
    for objective in (CleanObjective(losses),
                      make_objective("madry_mix", losses, AttackSettings(eps=2 / 255, steps=1), ["segment_semantic"])):
        model.zero_grad()
        (out,) = objective.updates(model, x, targets, {})
        assert len(out.features) == (1 if isinstance(objective, CleanObjective) else 2)
        weighting.backward(out.task_losses, model=model, features=out.features)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_unknown_and_unavailable_weightings_are_named():
    with pytest.raises(ValueError, match="unknown method 'mgdaa'"):
        make_weighting("mgdaa", {"a": 1.0})
    if importlib.util.find_spec("cvxpy") is None:
        with pytest.raises(ValueError, match=r'pip install "torchjd\[cagrad\]"'):
            make_weighting("cagrad", {"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match="needs the model"):
        make_weighting("mgda", {"a": 1.0}).backward({"a": torch.tensor(1.0, requires_grad=True)})


@pytest.mark.parametrize("name", ["mgda", "upgrad"])
def test_without_features_the_full_jacobian_gives_the_same_gradients(name):
    """The path for terms that do not factor through the representation agrees with mtl_backward's."""
    net, x = TwoHeads(), torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    features, (la, lb) = net.losses(x)
    make_weighting(name, {"a": 1.0, "b": 0.5}).backward({"a": la, "b": lb}, model=net, features=[features])
    via_features = _grads(net)
    net.zero_grad()
    _, (la, lb) = net.losses(x)
    make_weighting(name, {"a": 1.0, "b": 0.5}).backward({"a": la, "b": lb}, model=net, features=None)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(via_features, _grads(net)))
