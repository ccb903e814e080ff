"""BatchNorm folding (models/folding.py): the folded view computes the eval-mode model's function, follows its
weights, folds only what it may, and is what training's inner attacks run on."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from mtrobust_fast.attacks import PGD
from mtrobust_fast.models import build_classifier, build_model, list_encoders
from mtrobust_fast.models.folding import FoldedConv, folded
from mtrobust_fast.tasks.classification import ClassificationTask
from mtrobust_fast.training import AttackSettings, TaskLosses, make_objective

CONV = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d), 3: (nn.Conv3d, nn.BatchNorm3d)}
TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def randomise_statistics(model, seed=0):
    """Running statistics and affine parameters far from their initial values, so that folding matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 2 + 0.2)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
    return model


def batch_norm_calls(monkeypatch):
    """A list that grows by one for every F.batch_norm call (what each BatchNorm module's forward runs)."""
    calls, real = [], F.batch_norm

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "batch_norm", counting)
    return calls


@settings(max_examples=30, deadline=None)
@given(dims=st.sampled_from([1, 2, 3]), transposed=st.booleans(), affine=st.booleans(), conv_bias=st.booleans(),
       groups=st.sampled_from([1, 2]), stride=st.sampled_from([1, 2]), seed=st.integers(0, 10 ** 6))
def test_folded_pair_equals_conv_then_eval_batchnorm(dims, transposed, affine, conv_bias, groups, stride, seed):
    torch.manual_seed(seed)
    conv_cls, norm_cls = CONV[dims]
    conv_cls = TRANSPOSED[dims] if transposed else conv_cls
    groups = 1 if transposed else groups  # grouped transposed convolutions are left unfolded (tested below)
    model = randomise_statistics(nn.Sequential(conv_cls(4, 6, 3, stride=stride, padding=1, groups=groups,
                                                        bias=conv_bias), norm_cls(6, affine=affine), nn.ReLU()),
                                 seed).eval()
    view = folded(model)
    assert isinstance(view[0], FoldedConv) and isinstance(view[1], nn.Identity)
    x = torch.randn((3, 4) + (6,) * dims, dtype=torch.float64).float().requires_grad_(True)
    expected = model(x)
    (grad,) = torch.autograd.grad(expected.square().sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    got = view(x2)
    (grad2,) = torch.autograd.grad(got.square().sum(), x2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad2, grad, rtol=1e-4, atol=1e-4)


def test_every_registered_encoder_folds_every_batchnorm_and_keeps_its_outputs():
    for encoder in list_encoders():
        if encoder.endswith("_dilated"):
            continue  # LibMTL's DeepLab encoders: larger models, same building blocks
        model = randomise_statistics(build_model("sd", encoder, 64)).eval()
        view = folded(model)
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        left = [m for m in view.modules() if isinstance(m, nn.BatchNorm2d)]
        assert norms and not left, (encoder, len(left))
        x = torch.rand(2, 3, 64, 64)
        with torch.no_grad():
            expected, got = model(x), view(x)
        for name in expected:  # relative to the output's scale: random statistics compound over 150 layers
            scale = float(expected[name].abs().max())
            assert float((got[name] - expected[name]).abs().max()) <= 1e-4 * scale, (encoder, name)


def test_view_shares_tensors_follows_training_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = randomise_statistics(build_classifier("resnet18_cpu", 10, 32, "ce", None))
    view = folded(model.eval())
    assert folded(model) is view and folded(view) is view  # cached; a view is its own view
    assert {p.data_ptr() for p in view.parameters()} <= {p.data_ptr() for p in model.parameters()}
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the model keeps its layers
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):  # a training step changes weights and running statistics in place
        model.train()
        F.cross_entropy(model(x)["class"], y).backward()
        optimiser.step()
        optimiser.zero_grad()
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(view(x)["class"], model(x)["class"], rtol=1e-4, atol=1e-4)
    assert model.training is False and all(not m.training for m in view.modules())


def test_a_convolution_used_twice_or_hooked_is_not_folded():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            z = self.conv(x)
            return self.norm(z) + z  # the convolution's output is also used unnormalised

    model = randomise_statistics(Twice()).eval()
    assert folded(model) is model
    grouped = nn.Sequential(nn.ConvTranspose2d(4, 4, 2, 2, groups=2), nn.BatchNorm2d(4)).eval()
    assert folded(grouped) is grouped

    class Shared(nn.Module):  # one convolution called twice, once before the BatchNorm
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.norm(self.conv(x)) + self.conv(x * 2)

    shared = randomise_statistics(Shared()).eval()
    assert folded(shared) is shared
    hooked = randomise_statistics(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))).eval()
    seen = []
    hooked[1].register_forward_hook(lambda module, args, out: seen.append(out))
    assert folded(hooked) is hooked  # the hook still sees the BatchNorm's output
    hooked(torch.rand(1, 3, 4, 4))
    assert len(seen) == 1


def test_attack_with_folding_runs_no_batchnorm_and_finds_equally_strong_points(monkeypatch):
    torch.manual_seed(0)
    model = randomise_statistics(build_classifier("resnet18_cpu", 10, 32, "ce", None)).eval()
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    plain = PGD(model, ["class"], eps=8 / 255, steps=5, seed=0)(x, {"class": y})
    calls = batch_norm_calls(monkeypatch)
    folded_points = PGD(model, ["class"], eps=8 / 255, steps=5, seed=0, fold_batchnorm=True)(x, {"class": y})
    assert not calls
    assert (folded_points - x).abs().max() <= 8 / 255 + 1e-6
    with torch.no_grad():
        loss = lambda points: F.cross_entropy(model(points)["class"], y, reduction="none")  # noqa: E731
        clean, a, b = loss(x), loss(plain), loss(folded_points)
    assert (b > clean).float().mean() >= 0.9  # the attack raised the loss of (almost) every image
    torch.testing.assert_close(b.mean(), a.mean(), rtol=0.05, atol=0.05)


def test_training_inner_attack_runs_on_the_folded_model(monkeypatch):
    torch.manual_seed(0)
    model = randomise_statistics(build_classifier("resnet18_cpu", 10, 32, "ce", None))
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    losses = TaskLosses([ClassificationTask("class", 10)])
    objective = make_objective("madry", losses, AttackSettings("pgd", "linf", 8 / 255, None, 3), ["class"])
    model.train()
    calls = batch_norm_calls(monkeypatch)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    objective(model, x, {"class": y}, {})
    assert len(calls) == norms  # the training forward alone; 3 attack steps would add 3 x norms unfolded
    assert model.training


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_view_on_cuda_matches_under_bf16_autocast(channels_last):
    torch.manual_seed(0)
    model = randomise_statistics(build_classifier("resnet18_cpu", 10, 32, "ce", None)).cuda().eval()
    x = torch.rand(8, 3, 32, 32, device="cuda")
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    view = folded(model)
    with torch.no_grad():
        torch.testing.assert_close(view(x)["class"], model(x)["class"], rtol=1e-3, atol=1e-3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got, expected = view(x)["class"].float(), model(x)["class"].float()
    assert float((got - expected).abs().max()) <= 0.05 * float(expected.abs().max())  # bf16: 8 mantissa bits
    y = torch.randint(0, 10, (8,), device="cuda")
    points = PGD(model, ["class"], eps=8 / 255, steps=3, fold_batchnorm=True, autocast=torch.bfloat16)(x, {"class": y})
    assert points.is_cuda and float((points - x).abs().max()) <= 8 / 255 + 1e-6
