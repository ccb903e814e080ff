"""Dense-task attack objectives (SegPGD, CosPGD, SEA's masked CE / balanced masked CE / Jensen–Shannon) against
hand values, and the attacks that use them (SegPGD, CosPGD, the relative-loss-change attack) against hand-written
loops: ball, box, and what each must achieve."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtrobust_fast import tasks
from mtrobust_fast.attacks import PGD, CosPGD, RelativePGD, SegPGD, build_attack
from mtrobust_fast.attacks import dense
from mtrobust_fast.models import build_model


def test_cospgd_on_one_pixel_equals_the_hand_value():
    logits = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64).view(1, 3, 1, 1)
    label = torch.tensor([[[1]]])
    p = np.exp([2.0, 1.0, 0.0]) / np.exp([2.0, 1.0, 0.0]).sum()
    expected = p[1] / np.linalg.norm(p) * -math.log(p[1])
    assert dense.cospgd(logits, label).item() == pytest.approx(expected, rel=1e-12)


def test_js_on_one_pixel_equals_the_hand_value_and_is_bounded():
    logits = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64).view(1, 3, 1, 1)
    label = torch.tensor([[[1]]])
    p = np.exp([0.5, -1.0, 2.0]) / np.exp([0.5, -1.0, 2.0]).sum()
    y = np.array([0.0, 1.0, 0.0])
    m = (p + y) / 2
    expected = 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.log(1 / m[1])
    assert dense.js(logits, label).item() == pytest.approx(expected, rel=1e-12)
    hopeless = torch.tensor([50.0, -50.0, 0.0], dtype=torch.float64).view(1, 3, 1, 1)
    assert dense.js(hopeless, label).item() <= math.log(2) + 1e-12


def _seg_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, 3, 4, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, 5, (2, 3, 4), generator=gen)
    labels[0, 0, :2] = logits[0, :, 0, :2].argmax(0)  # some pixels correct for sure
    labels[0, 0, 0] = max(int(labels[0, 0, 0]), 1)
    logits[0, labels[0, 0, 0], 0, 0] += 10
    return logits, labels


def test_segpgd_weights_move_from_correct_to_wrong_pixels():
    logits, labels = _seg_batch()
    ce = F.cross_entropy(logits, labels, reduction="none", ignore_index=0)
    valid = labels > 0
    correct = logits.argmax(1) == labels
    for progress in (0.0, 0.4, 1.0):
        lam = progress / 2
        weight = torch.where(correct, 1 - lam, lam)
        expected = [(weight[b] * ce[b])[valid[b]].sum().item() / valid[b].sum().item() for b in range(2)]
        assert dense.segpgd(logits, labels, progress=progress).tolist() == pytest.approx(expected, rel=1e-12)
    # at the start only correct pixels count (= SEA's masked CE); at the end it is half the plain CE
    assert torch.allclose(dense.segpgd(logits, labels, progress=0.0), dense.masked_ce(logits, labels))
    assert torch.allclose(dense.segpgd(logits, labels, progress=1.0), 0.5 * tasks.segment_loss(logits, labels))


def test_balanced_masked_ce_counts_each_class_among_correct_pixels_once():
    logits, labels = _seg_batch(1)
    correct = (logits.argmax(1) == labels) & (labels > 0)
    ce = F.cross_entropy(logits, labels, reduction="none", ignore_index=0)
    for b in range(2):
        classes = labels[b][correct[b]].unique().tolist()
        expected = np.mean([ce[b][correct[b] & (labels[b] == c)].mean().item() for c in classes]) if classes else 0.0
        assert dense.balanced_masked_ce(logits, labels)[b].item() == pytest.approx(expected, rel=1e-12)


def test_cospgd_regression_is_l1_for_one_channel_and_cosine_weighted_for_three():
    gen = torch.Generator().manual_seed(2)
    out, target = torch.randn(2, 1, 3, 3, generator=gen), torch.randn(2, 1, 3, 3, generator=gen)
    mask = torch.rand(2, 1, 3, 3, generator=gen) > 0.3
    assert torch.allclose(dense.cospgd_regression(out, target, mask), tasks.l1_loss(out, target, mask))
    out3 = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    target3 = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1)
    p, q = np.exp([1, 0, 0]) / np.exp([1, 0, 0]).sum(), np.exp([0, 0, 1]) / np.exp([0, 0, 1]).sum()
    expected = p @ q / (np.linalg.norm(p) * np.linalg.norm(q)) * 2 / 3
    assert dense.cospgd_regression(out3, target3).item() == pytest.approx(expected, rel=1e-6)


def test_loss_for_swaps_only_dense_registry_losses():
    s, d = tasks.get_task("s"), tasks.get_task("d")
    assert dense.loss_for(s.loss, "task", 0.5) is s.loss
    assert dense.loss_for(d.loss, "segpgd", 0.5) is d.loss  # regression keeps its loss except under cospgd
    assert dense.loss_for(d.loss, "cospgd", 0.5) is not d.loss
    with pytest.raises(ValueError, match="dense loss must be one of"):
        dense.loss_for(s.loss, "dice", 0.5)


@pytest.fixture(scope="module")
def model_and_batch():
    torch.manual_seed(0)
    model = build_model("sd", "resnet18", input_size=32).double().eval()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
    targets = {"segment_semantic": out["segment_semantic"].argmax(1).clamp_min(1),  # the model is right
               "depth_zbuffer": torch.rand(2, 1, 32, 32, dtype=torch.float64)}
    return model, x, targets


def _hand_pgd(model, x, targets, loss_of_step, eps, alpha, steps):
    """Sign steps from x (no random start), projected on the L∞ ball and [0, 1]."""
    adv = x.clone()
    for step in range(steps):
        xg = adv.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_of_step(model(xg), step).sum(), xg)
        adv = torch.min(torch.max(adv + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return adv


def test_segpgd_equals_a_hand_loop_with_the_rising_lambda(model_and_batch):
    model, x, targets = model_and_batch
    eps, alpha, steps = 4 / 255, 1 / 255, 3

    def loss(out, step):
        return dense.segpgd(out["segment_semantic"], targets["segment_semantic"], progress=step / steps)

    atk = SegPGD(model, "s", eps=eps, alpha=alpha, steps=steps, random_start=False)
    adv = atk(x, {"segment_semantic": targets["segment_semantic"]})
    assert torch.allclose(adv, _hand_pgd(model, x, targets, loss, eps, alpha, steps), atol=1e-12)
    assert (adv - x).abs().max() <= eps + 1e-12 and adv.min() >= 0 and adv.max() <= 1


def test_segpgd_at_lambda_zero_on_a_right_model_is_pgd_on_the_pixel_ce(model_and_batch):
    """λ = 0 at the first step weighs every correct pixel 1 and every wrong one 0: where the model is right on
    every valid pixel (the target is its own prediction; label 0 is ignored by both), the step is PGD's on the
    per-pixel cross-entropy."""
    model, x, _ = model_and_batch
    with torch.no_grad():
        labels = {"segment_semantic": model(x)["segment_semantic"].argmax(1)}
    settings = dict(eps=4 / 255, alpha=1 / 255, random_start=False)
    seg = SegPGD(model, "s", steps=1, **settings)(x, labels)
    pgd = PGD(model, "s", steps=1, **settings)(x, labels)
    assert torch.equal(seg, pgd) and not torch.equal(seg, x)


def test_cospgd_and_sea_losses_run_through_pgd_and_apgd_and_raise_the_error(model_and_batch):
    model, x, targets = model_and_batch
    with torch.no_grad():
        clean = tasks.segment_error(model(x)["segment_semantic"], targets["segment_semantic"])
    assert clean.mean() < 0.2  # the labels are (nearly) the model's own predictions
    for atk in (CosPGD(model, "sd", eps=8 / 255, steps=5, target_tasks="s"),
                build_attack("apgd", model, "sd", eps=8 / 255, steps=5, dense_loss="masked_ce", target_tasks="s"),
                build_attack("pgd", model, "sd", eps=8 / 255, steps=5, dense_loss="js", target_tasks="s")):
        adv = atk(x, targets)
        assert (adv - x).abs().max() <= 8 / 255 + 1e-12 and adv.min() >= 0 and adv.max() <= 1
        with torch.no_grad():
            error = tasks.segment_error(model(adv)["segment_semantic"], targets["segment_semantic"])
        assert error.mean() > clean.mean() + 0.2, type(atk).__name__


def test_relative_attack_steps_along_the_sum_of_relative_gradients(model_and_batch):
    model, x, targets = model_and_batch
    s, d = tasks.get_task("s"), tasks.get_task("d")

    def relative(out, step):
        return (s.loss(out["segment_semantic"], targets["segment_semantic"]).log()
                + d.loss(out["depth_zbuffer"], targets["depth_zbuffer"]).log())

    atk = RelativePGD(model, "sd", eps=4 / 255, alpha=1 / 255, steps=2, random_start=False)
    adv = atk(x, targets)
    assert torch.allclose(adv, _hand_pgd(model, x, targets, relative, 4 / 255, 1 / 255, 2), atol=1e-12)
    single = RelativePGD(model, "sd", eps=4 / 255, alpha=1 / 255, steps=2, random_start=False, target_tasks="d")
    plain = PGD(model, "sd", eps=4 / 255, alpha=1 / 255, steps=2, random_start=False, target_tasks="d")
    assert torch.allclose(single(x, targets), plain(x, targets), atol=1e-12)  # one task: same sign step


def test_attack_cli_names_the_dense_attacks(tmp_path):
    from mtrobust_fast.attacks import ATTACKS
    assert {"segpgd", "cospgd", "relative"} <= set(ATTACKS)
    with pytest.raises(ValueError, match="dense_loss must be one of"):
        PGD(build_model("s", "resnet18", input_size=32), "s", dense_loss="dice")


def test_dense_ensemble_is_at_least_as_strong_as_each_member_on_every_task(model_and_batch):
    from mtrobust_fast.attacks import AutoAttack, DenseEnsemble, WGD
    model, x, targets = model_and_batch
    ensemble = AutoAttack(model, "sd", version="dense", eps=4 / 255, steps=3, deterministic=True)
    assert isinstance(ensemble, DenseEnsemble)
    assert ensemble.members() == ("apgd", "segpgd", "cospgd", "wgd", "relative")
    adv = ensemble(x, targets)
    assert (adv - x).abs().max() <= 4 / 255 + 1e-12 and adv.min() >= 0 and adv.max() <= 1
    summary = ensemble.summary()["sd"]
    s, d = tasks.get_task("s"), tasks.get_task("d")
    for name, cls in (("apgd", build_attack), ("segpgd", SegPGD), ("cospgd", CosPGD), ("wgd", WGD),
                      ("relative", RelativePGD)):
        kwargs = dict(eps=4 / 255, steps=3, deterministic=True)
        member = cls("apgd", model, "sd", **kwargs) if cls is build_attack else cls(model, "sd", **kwargs)
        member_adv = member(x, targets)
        with torch.no_grad():
            out = model(member_adv)
        errors = {"segment_semantic": s.error(out["segment_semantic"], targets["segment_semantic"]).mean().item(),
                  "depth_zbuffer": d.error(out["depth_zbuffer"], targets["depth_zbuffer"]).mean().item()}
        for task, value in errors.items():
            assert summary["member_error"][name][task] == pytest.approx(value, rel=1e-6)
            assert summary["worst_error"][task] >= value - 1e-12
    for task in ("segment_semantic", "depth_zbuffer"):
        assert sum(summary["wins"][task].values()) == x.shape[0]
    single = AutoAttack(model, "sd", version="dense", eps=4 / 255, steps=2, target_tasks="d")
    assert single.members() == ("apgd", "cospgd")


def test_the_ensemble_attacks_several_sets_one_after_the_other_with_a_summary_each(model_and_batch):
    from mtrobust_fast.attacks import DenseEnsemble
    model, x, targets = model_and_batch
    kwargs = dict(eps=4 / 255, steps=2, deterministic=True)
    both = DenseEnsemble(model, "sd", **kwargs)
    adv = both.run_subsets(x, targets, subsets=["d", "sd"])
    assert adv.shape == (2, *x.shape)
    summary = both.summary()
    assert list(summary) == ["d", "sd"] and summary["d"]["members"] == ["apgd", "cospgd"]
    alone = DenseEnsemble(model, "sd", target_tasks="d", **kwargs)
    torch.testing.assert_close(adv[0], alone(x, targets), rtol=0, atol=0)
    assert alone.summary()["d"] == {**summary["d"], "seconds": alone.summary()["d"]["seconds"]}
    assert both.target_tasks == ["segment_semantic", "depth_zbuffer"]  # restored after the sets
