"""Every attack on a CUDA device (skipped without one): its steps go through the CUDA fused op, the result stays on
the GPU inside the budget and the image box, and a deterministic attack lands where the same attack lands on the
CPU (up to float32 rounding, which may flip the sign of a near-zero gradient entry on a few pixels)."""
import pytest
import torch
import torch.nn as nn

from mtrobust_fast import tasks
from mtrobust_fast.attacks import ATTACKS, AutoAttack, build_attack, classification

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SEG, DEPTH, NORMAL = (tasks.BY_LETTER[letter] for letter in "sdn")
EPS = {"linf": 8 / 255, "l2": 0.5}
DENSE = [name for name in ATTACKS.names() if not ATTACKS.get(name).classifier_only]
CLASSIFIER = [name for name in ATTACKS.names() if ATTACKS.get(name).classifier_only]
RANDOMISED = {"ensemble"}  # members with random starts drawn on the device: compared by strength, not by points


class ThreeHeads(nn.Module):
    """Segmentation, depth and normal heads on a small conv trunk, with BatchNorm (eval mode in attacks)."""

    task_names = [SEG.name, DEPTH.name, NORMAL.name]

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Tanh(),
                                   nn.Conv2d(8, 8, 3, padding=1), nn.Tanh())
        self.heads = nn.ModuleDict({SEG.name: nn.Conv2d(8, 4, 1), DEPTH.name: nn.Conv2d(8, 1, 1),
                                    NORMAL.name: nn.Conv2d(8, 3, 1)})

    def forward(self, x):
        h = self.trunk(x * 2 - 1)
        return {name: head(h) for name, head in self.heads.items()}


def dense_problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 12, 12, generator=gen)
    labels = torch.randint(0, 4, (6, 12, 12), generator=gen)
    targets = {SEG.name: labels, DEPTH.name: torch.rand(6, 1, 12, 12, generator=gen),
               NORMAL.name: torch.rand(6, 3, 12, 12, generator=gen) * 2 - 1}
    masks = {SEG.name: (labels > 0)[:, None], DEPTH.name: torch.rand(6, 1, 12, 12, generator=gen) > 0.1}
    torch.manual_seed(0)
    model = ThreeHeads().eval()
    return model, x, targets, masks


def on(device, model, x, targets, masks):
    return (model.to(device), x.to(device), {k: v.to(device) for k, v in targets.items()},
            {k: v.to(device) for k, v in masks.items()})


def check_budget(adv, x, norm, eps):
    assert adv.device.type == "cuda" and adv.dtype == x.dtype
    delta = (adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert adv.min() >= 0 and adv.max() <= 1


def _objective(model, adv, targets, masks):
    """The summed per-sample loss of the three tasks at ``adv`` (float64 on the CPU)."""
    model = model.cpu().double()
    with torch.no_grad():
        out = model(adv.cpu().double())
        total = sum(t.loss(out[t.name], targets[t.name].cpu(), masks[t.name].cpu() if t.name in masks else None)
                    for t in (SEG, DEPTH, NORMAL))
    model.float()
    return total


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", DENSE)
def test_dense_attacks_on_cuda_match_the_cpu(name, norm):
    model, x, targets, masks = dense_problem()
    settings = dict(eps=EPS[norm], norm=norm, seed=3)
    if "steps" in ATTACKS[name].settings:
        settings["steps"] = 5
    if name not in RANDOMISED:
        settings["random_start"] = False
    results = {}
    for device in ("cpu", "cuda"):
        m, xd, td, md = on(device, model, x, targets, masks)
        results[device] = build_attack(name, m, **settings)(xd, td, md)
    check_budget(results["cuda"], x.cuda(), norm, EPS[norm])
    moved = (results["cuda"].cpu() - results["cpu"]).abs() > 1e-4
    if name in RANDOMISED:
        cpu, cuda = (_objective(model, results[d], targets, masks) for d in ("cpu", "cuda"))
        assert cuda.sum() >= 0.9 * cpu.sum()
    else:
        assert moved.float().mean() <= 0.05, f"{name}: {moved.float().mean():.3f} of the entries differ from the CPU's"


def prototype_classifier():
    """A linear classifier of 6 classes on 3x8x8 inputs trained on noisy prototypes; 48 of its training points."""
    gen = torch.Generator().manual_seed(0)
    prototypes = torch.rand(6, 3, 8, 8, generator=gen)
    labels = torch.arange(6).repeat(30)
    x = (prototypes[labels] + 0.15 * torch.randn(180, 3, 8, 8, generator=gen)).clamp(0, 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 6))
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(200):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(x), labels).backward()
        optimiser.step()
    return model.eval(), x[:48], labels[:48]


def _accuracy(model, x, labels):
    with torch.no_grad():
        return (model(x).argmax(1) == labels).float().mean().item()


@pytest.mark.parametrize("norm,eps", [("linf", 0.25), ("l2", 5.0)])
@pytest.mark.parametrize("name", CLASSIFIER)
def test_classifier_attacks_on_cuda_are_as_strong_as_on_the_cpu(name, norm, eps):
    """Budgets large enough that 1000 Square queries break most points of this classifier."""
    model, x, labels = prototype_classifier()
    settings = dict(eps=eps, norm=norm, steps=1000 if name == "square" else 10, seed=1)
    accuracy = {}
    for device in ("cpu", "cuda"):
        m = model.to(device)
        if name == "autoattack":
            atk = AutoAttack(m, [classification("label")], queries=1000, **settings)
        else:
            atk = build_attack(name, m, [classification("label")], **settings)
        adv = atk(x.to(device), labels.to(device))
        if device == "cuda":
            check_budget(adv, x.cuda(), norm, eps)
        accuracy[device] = _accuracy(m, adv, labels.to(device))
    model.cpu()
    assert accuracy["cuda"] < _accuracy(model, x, labels) - 0.2
    assert accuracy["cuda"] <= accuracy["cpu"] + 0.1


def test_the_fused_op_has_a_cuda_kernel():
    import mtrobust_fast.ops  # noqa: F401  (registers the op)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mtrobust_fast::attack_step", "CUDA")
