"""Hand-computed checks of the pure-PyTorch oracle ``mtrobust_fast.ops.reference``.

These need no native extension: they check the oracle itself, so that the fused-op tests compare
against something known to be right. Values are chosen to be exact in binary floating point.
"""
import importlib.util
import math
from pathlib import Path

import pytest
import torch


def _load_reference():
    """Load reference.py by path: ``import mtrobust_fast.ops`` loads the native extension, and these
    checks of the oracle must run (and pass) whether or not the extension has been built."""
    path = Path(__file__).resolve().parents[1] / "mtrobust_fast" / "ops" / "reference.py"
    spec = importlib.util.spec_from_file_location("_mtrobust_fast_ops_reference_standalone", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


R = _load_reference()

F64 = torch.float64


def t(*rows, dtype=F64):
    return torch.tensor(rows, dtype=dtype)


def test_linf_step_moves_by_alpha_sign_and_clips_to_ball_and_box():
    """One row, 4 elements: sign step, then clamp to [x0-eps, x0+eps] ∩ [0, 1]."""
    x0 = t([0.0625, 0.5, 0.9375, 0.5])
    x = t([0.125, 0.375, 0.9375, 0.6875])
    g = t([1.0, -3.0, 2.0, 0.5])
    out = R.attack_step(x, x0, g, eps=0.25, alpha=0.125, norm="linf")
    # y = [0.25, 0.25, 1.0625, 0.8125]; lower = [0, .25, .6875, .25]; upper = [.3125, .75, 1, .75]
    torch.testing.assert_close(out, t([0.25, 0.25, 1.0, 0.75]), rtol=0, atol=0)


def test_linf_zero_gradient_coordinate_does_not_move():
    """sign(0) = 0: coordinates with zero gradient keep their value."""
    x0 = t([0.5, 0.5, 0.5, 0.5])
    x = t([0.5, 0.625, 0.375, 0.5])
    g = t([0.0, 0.0, 1.0, -1.0])
    out = R.attack_step(x, x0, g, eps=0.25, alpha=0.0625, norm="linf")
    torch.testing.assert_close(out, t([0.5, 0.625, 0.4375, 0.4375]), rtol=0, atol=0)


def test_l2_step_is_alpha_along_unit_gradient_inside_ball():
    """One row: y = x + alpha * g / ||g||; eps large so no projection."""
    x = torch.full((1, 4), 0.5, dtype=F64)
    g = t([3.0, 4.0, 0.0, 0.0])
    out = R.attack_step(x, x, g, eps=1.0, alpha=0.1, norm="l2")
    torch.testing.assert_close(out, t([0.56, 0.58, 0.5, 0.5]), rtol=0, atol=1e-15)


def test_l2_step_is_rescaled_onto_the_eps_sphere_then_clipped_to_box():
    """delta = [0.06, 0.08, 0, 0] has norm 0.1; eps = 0.05 halves it; hi = 0.535 clips one entry."""
    x = torch.full((1, 4), 0.5, dtype=F64)
    g = t([3.0, 4.0, 0.0, 0.0])
    out = R.attack_step(x, x, g, eps=0.05, alpha=0.1, norm="l2")
    torch.testing.assert_close(out, t([0.53, 0.54, 0.5, 0.5]), rtol=0, atol=1e-15)
    out = R.attack_step(x, x, g, eps=0.05, alpha=0.1, norm="l2", hi=0.535)
    torch.testing.assert_close(out, t([0.53, 0.535, 0.5, 0.5]), rtol=0, atol=1e-15)


def test_normalized_task_grads_change_the_linf_sign():
    """Raw sum [30-20, 40] is positive; per-task unit vectors give [0.6-1, 0.8]: first sign flips."""
    x = torch.full((1, 4), 0.5, dtype=F64)
    g = torch.stack([t([30.0, 40.0, 0.0, 0.0]), t([-20.0, 0.0, 0.0, 0.0])])  # [T=2, B=1, 4]
    raw = R.attack_step(x, x, g, eps=0.25, alpha=0.125, norm="linf")
    normed = R.attack_step(x, x, g, eps=0.25, alpha=0.125, norm="linf", normalize_task_grads=True)
    torch.testing.assert_close(raw, t([0.625, 0.625, 0.5, 0.5]), rtol=0, atol=0)
    torch.testing.assert_close(normed, t([0.375, 0.625, 0.5, 0.5]), rtol=0, atol=0)


def test_weights_scale_each_task_before_combining():
    """weights [2, 1]: 2*[0.6, 0.8] + [-1, 0] = [0.2, 1.6] (normalised); weights [0, 1] keep task 1 only."""
    x = torch.full((1, 4), 0.5, dtype=F64)
    g = torch.stack([t([30.0, 40.0, 0.0, 0.0]), t([-20.0, 0.0, 0.0, 0.0])])
    out = R.attack_step(x, x, g, t([2.0, 1.0]), eps=0.25, alpha=0.125, norm="linf", normalize_task_grads=True)
    torch.testing.assert_close(out, t([0.625, 0.625, 0.5, 0.5]), rtol=0, atol=0)
    out = R.attack_step(x, x, g, t([0.0, 1.0]), eps=0.25, alpha=0.125, norm="linf")
    torch.testing.assert_close(out, t([0.375, 0.5, 0.5, 0.5]), rtol=0, atol=0)


def test_l2_with_normalized_task_grads_uses_the_unit_combination():
    """Unit vectors [0.6, 0.8] and [-1, 0] combine to [-0.4, 0.8]; step alpha along its direction."""
    x = torch.full((1, 4), 0.5, dtype=F64)
    g = torch.stack([t([30.0, 40.0, 0.0, 0.0]), t([-20.0, 0.0, 0.0, 0.0])])
    out = R.attack_step(x, x, g, eps=1.0, alpha=0.1, norm="l2", normalize_task_grads=True)
    s = 0.1 / math.sqrt(0.8)
    torch.testing.assert_close(out, t([0.5 - 0.4 * s, 0.5 + 0.8 * s, 0.5, 0.5]), rtol=0, atol=1e-15)


def test_per_row_eps_and_alpha_apply_to_their_own_row():
    """Row 0 steps by alpha 0.125 within eps 0.25; row 1 has eps 0 and stays at x0."""
    x0 = torch.full((2, 3), 0.5, dtype=F64)
    g = t([1.0, -1.0, 0.0], [1.0, 1.0, 1.0])
    out = R.attack_step(x0, x0, g, eps=t(0.25, 0.0), alpha=t(0.125, 0.5), norm="linf")
    torch.testing.assert_close(out, t([0.625, 0.375, 0.5], [0.5, 0.5, 0.5]), rtol=0, atol=0)


def test_l2_norms_are_per_row_not_over_the_batch():
    """Rows with gradients of very different size each move exactly alpha in L2 (source BUG: batch norm)."""
    x = torch.full((2, 4), 0.5, dtype=F64)
    g = t([3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 3e-3, -4e-3])
    out = R.attack_step(x, x, g, eps=1.0, alpha=0.1, norm="l2")
    torch.testing.assert_close((out - x).norm(dim=1), t(0.1, 0.1), rtol=0, atol=1e-15)
    torch.testing.assert_close(out[1:], t([0.5, 0.5, 0.56, 0.42]), rtol=0, atol=1e-15)


def test_normalization_is_per_task_and_per_row():
    """Each (task, row) gradient is normalised by its own norm: rows with tiny grads count as much."""
    x = torch.full((2, 2), 0.5, dtype=F64)
    g = torch.stack([t([1e-6, 0.0], [0.0, 1e6]), t([0.0, 1e6], [1e-6, 0.0])])
    out = R.attack_step(x, x, g, eps=1.0, alpha=0.1, norm="l2", normalize_task_grads=True)
    d = 0.1 / math.sqrt(2.0)
    torch.testing.assert_close(out, torch.full((2, 2), 0.5 + d, dtype=F64), rtol=0, atol=1e-15)


def test_single_task_grads_forms_are_equivalent():
    """grads [B, *S], [1, B, *S] and weights None vs ones give the same step."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 2, 5, generator=gen, dtype=F64)
    x = (x0 + 0.01 * torch.randn(3, 2, 5, generator=gen, dtype=F64)).clamp(0, 1)
    g = torch.randn(3, 2, 5, generator=gen, dtype=F64)
    for norm in ("linf", "l2"):
        a = R.attack_step(x, x0, g, eps=0.03, alpha=0.01, norm=norm)
        b = R.attack_step(x, x0, g[None], eps=0.03, alpha=0.01, norm=norm)
        c = R.attack_step(x, x0, g[None], torch.ones(3, 1, dtype=F64), eps=0.03, alpha=0.01, norm=norm)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_zero_gradient_means_no_move_inside_the_ball(norm):
    """All-zero gradient: x (inside the ball and the box) is returned unchanged."""
    x0 = t([0.25, 0.5, 0.75, 0.5])
    x = t([0.3, 0.45, 0.8, 0.5])
    out = R.attack_step(x, x0, torch.zeros_like(x), eps=0.1, alpha=0.05, norm=norm)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-16)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_exactly_opposite_task_gradients_cancel_to_no_move(norm):
    """Two tasks with G and -G (weights None) cancel exactly: no move."""
    x0 = t([0.25, 0.5, 0.75, 0.5])
    x = t([0.3, 0.45, 0.8, 0.5])
    g = t([0.3, -1.7, 2.0, 0.0])
    out = R.attack_step(x, x0, torch.stack([g, -g]), eps=0.1, alpha=0.05, norm=norm, normalize_task_grads=True)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-16)


def test_linf_conflicting_bounds_follow_torch_clamp_upper_wins():
    """x0 outside [lo, hi]: max(x0-eps, lo) > min(x0+eps, hi), and the upper bound wins."""
    x0 = t([1.5, -0.5])
    x = t([0.5, 0.5])
    out = R.attack_step(x, x0, t([1.0, 1.0]), eps=0.125, alpha=0.0625, norm="linf")
    # upper = min(1.625, 1) = 1 and min(-0.375, 1) = -0.375
    torch.testing.assert_close(out, t([1.0, -0.375]), rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_eps_zero_returns_x0_clamped_to_box(norm):
    """eps = 0 collapses the ball to x0 (inside the box here)."""
    x0 = t([0.25, 0.5, 0.75, 1.0])
    x = t([0.3, 0.45, 0.8, 0.9])
    out = R.attack_step(x, x0, t([1.0, -1.0, 1.0, 1.0]), eps=0.0, alpha=0.05, norm=norm)
    torch.testing.assert_close(out, x0, rtol=0, atol=0)


def test_project_linf_clips_to_ball_and_box():
    """Projection only: each coordinate into [max(x0-eps, lo), min(x0+eps, hi)]."""
    x0 = t([0.0625, 0.5, 0.9375, 0.5])
    x = t([-0.5, 0.25, 1.5, 0.625])
    out = R.project(x, x0, eps=0.125, norm="linf")
    torch.testing.assert_close(out, t([0.0, 0.375, 1.0, 0.625]), rtol=0, atol=0)


def test_project_l2_rescales_only_rows_outside_the_ball():
    """Row 0 has ||delta|| = 0.5 > eps = 0.25 and is halved; row 1 (norm 0.1) is unchanged."""
    x0 = torch.full((2, 4), 0.5, dtype=F64)
    x = x0 + t([0.3, 0.4, 0.0, 0.0], [0.0, 0.0, -0.06, 0.08])
    out = R.project(x, x0, eps=0.25, norm="l2")
    torch.testing.assert_close(out, x0 + t([0.15, 0.2, 0.0, 0.0], [0.0, 0.0, -0.06, 0.08]), rtol=0, atol=1e-15)
    out = R.project(x, x0, eps=t(0.05, 0.05), norm="l2", lo=0.0, hi=0.6)
    torch.testing.assert_close(out, x0 + t([0.03, 0.04, 0.0, 0.0], [0.0, 0.0, -0.03, 0.04]), rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_computed_in_float32_and_returned_in_input_dtype(dtype):
    """fp16/bf16 inputs: the result is the float32 computation rounded once to the input dtype."""
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(2, 3, 4, generator=gen).to(dtype)
    x = (x0.float() + 0.02 * torch.randn(2, 3, 4, generator=gen)).clamp(0, 1).to(dtype)
    g = torch.randn(3, 2, 3, 4, generator=gen).to(dtype)
    for norm in ("linf", "l2"):
        out = R.attack_step(x, x0, g, eps=0.03, alpha=0.01, norm=norm, normalize_task_grads=True)
        want = R.attack_step(x.float(), x0.float(), g.float(), eps=0.03, alpha=0.01, norm=norm,
                             normalize_task_grads=True).to(dtype)
        assert out.dtype == dtype
        torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_empty_batch_returns_empty_tensor_of_input_shape_and_dtype():
    """B = 0 gives an empty result with the same shape and dtype."""
    x = torch.zeros(0, 3, 2, dtype=torch.float16)
    for norm in ("linf", "l2"):
        out = R.attack_step(x, x, torch.zeros(2, 0, 3, 2, dtype=torch.float16), eps=0.1, alpha=0.1, norm=norm)
        assert out.shape == (0, 3, 2) and out.dtype == torch.float16
        out = R.project(x, x, eps=0.1, norm=norm)
        assert out.shape == (0, 3, 2) and out.dtype == torch.float16


def test_reference_does_not_modify_its_inputs():
    """The oracle is out-of-place."""
    x0 = torch.full((1, 4), 0.5, dtype=F64)
    x = x0.clone()
    g = t([1.0, -1.0, 2.0, 0.0])
    R.attack_step(x, x0, g, eps=0.1, alpha=0.05, norm="linf")
    assert torch.equal(x, x0)


def test_unknown_norm_is_rejected():
    """Even the oracle refuses a norm it does not know."""
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="norm"):
        R.attack_step(x, x, x, eps=0.1, alpha=0.1, norm="l1")
    with pytest.raises(ValueError, match="norm"):
        R.project(x, x, eps=0.1, norm="l1")


# ------------------------------------------------------------------------------------------------
# The error model of the fused-op tests (python_tests/ops_cases.py), checked on the oracle itself:
# the oracle in its opmath dtype must agree with the same math done in float64 (then rounded once)
# within HALF the tolerance the fused op gets. Two implementations each within half of it of the
# exact answer are then within the full tolerance of each other, and the model is not looser than
# the arithmetic needs.
# ------------------------------------------------------------------------------------------------
from hypothesis import given, settings  # noqa: E402

import ops_cases as C  # noqa: E402


def _float64_step(b):
    grads = b.grads.double()
    weights = None if b.weights is None else b.weights.double()
    out = R.attack_step(b.x.double(), b.x0.double(), grads, weights, eps=b.eps_rows, alpha=b.alpha_rows,
                        norm=b.case.norm, normalize_task_grads=b.case.normalize, lo=b.case.box[0],
                        hi=b.case.box[1])
    return out.to(b.case.dtype)


@settings(max_examples=150, deadline=None)
@given(case=C.step_cases())
def test_error_model_covers_the_oracle_opmath_rounding_with_half_the_tolerance(case):
    """Oracle (opmath) vs oracle (float64): within half the fused-op tolerance, ambiguity included."""
    b = C.build(case)
    C.assert_matches_reference_step(_float64_step(b), b, slack=0.5)


@settings(max_examples=80, deadline=None)
@given(case=C.step_cases(projection=True))
def test_error_model_covers_the_oracle_projection_with_half_the_tolerance(case):
    """Projection oracle (opmath) vs float64: within half the fused-op tolerance."""
    b = C.build(case)
    exact = R.project(b.x.double(), b.x0.double(), eps=b.eps_rows, norm=case.norm, lo=case.box[0],
                      hi=case.box[1]).to(case.dtype)
    C.assert_matches_reference_project(exact, b, slack=0.5)


@settings(max_examples=80, deadline=None)
@given(case=C.step_cases())
def test_oracle_satisfies_the_step_invariants(case):
    """The oracle's own results lie in the ball ∩ box and move at most alpha from inside points."""
    b = C.build(case)
    C.assert_step_invariants(R.attack_step(b.x, b.x0, b.grads, b.weights, **b.step_kwargs()), b)
