"""Property tests: the fused ops ``mtrobust_fast.ops.{attack_step, attack_step_, project, project_}``
agree with the pure-PyTorch oracle and satisfy their documented invariants.

Needs the native extension (``pip install --no-build-isolation -e .``); a missing build fails at import,
on purpose. Cases (``ops_cases.step_cases``) cover dtypes float64/32/16/bfloat16, B = 1..4, rows of
1-D, 2-D and 3-D shape (odd sizes such as 3x5x7), T = 1..8, per-row and scalar eps/alpha (zeros
included), both norms, with/without task normalisation, contiguous / channels_last / strided layouts,
zero, sparse, integer-tied and exactly opposite task gradients, weights None/ones/random/with zeros, and
x at x0, inside the ball or anywhere (x0 sometimes outside [lo, hi]). The error model (per-dtype
tolerances, sign/direction ambiguity under cancellation) is documented in ``ops_cases.py``.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtrobust_fast.ops as ops
from mtrobust_fast.ops import reference
import ops_cases as C

R = C.R

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
MAIN = settings(max_examples=60, deadline=None)
SMALL = settings(max_examples=30, deadline=None)


def _snapshot(b):
    return [t.clone() for t in (b.x, b.x0, b.grads, b.weights) if t is not None]


def _assert_unchanged(b, snap):
    now = [t for t in (b.x, b.x0, b.grads, b.weights) if t is not None]
    for before, after in zip(snap, now):
        assert torch.equal(before, after), "an input tensor was modified"


def _assert_layout_kept(out, x):
    """Contiguous and channels_last inputs give a result with the same strides (documented layout rule)."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        assert out.stride() == x.stride(), f"result strides {out.stride()} != input strides {x.stride()}"


@pytest.mark.parametrize("device", DEVICES)
@MAIN
@given(case=C.step_cases())
def test_attack_step_matches_reference_and_invariants(device, case):
    """Out-of-place step == oracle (ambiguous signs: an admissible value); in ball ∩ box; |move| <= alpha."""
    b = C.build(case, device)
    snap = _snapshot(b)
    out = ops.attack_step(b.x, b.x0, b.grads, b.weights, **b.step_kwargs())
    _assert_unchanged(b, snap)
    _assert_layout_kept(out, b.x)
    C.assert_matches_reference_step(out, b)
    C.assert_step_invariants(out, b)


@pytest.mark.parametrize("device", DEVICES)
@MAIN
@given(case=C.step_cases())
def test_attack_step_inplace_updates_and_returns_x(device, case):
    """attack_step_ writes the step into x itself (any layout) and returns that same tensor."""
    b = C.build(case, device)
    target = C.build(case, device).x  # same values, same layout, a separate tensor
    ptr, strides = target.data_ptr(), target.stride()
    out = ops.attack_step_(target, b.x0, b.grads, b.weights, **b.step_kwargs())
    assert out is target
    assert target.data_ptr() == ptr and target.stride() == strides
    C.assert_matches_reference_step(target, b)
    C.assert_step_invariants(target, b)


@pytest.mark.parametrize("device", DEVICES)
@MAIN
@given(case=C.step_cases(projection=True))
def test_project_matches_reference_and_is_idempotent(device, case):
    """project == oracle; result in ball ∩ box; projecting again changes nothing (within rounding)."""
    b = C.build(case, device)
    snap = _snapshot(b)
    out = ops.project(b.x, b.x0, **b.project_kwargs())
    _assert_unchanged(b, snap)
    _assert_layout_kept(out, b.x)
    C.assert_matches_reference_project(out, b)
    C.assert_project_invariants(out, b)
    if case.x0_in_box:  # with conflicting bounds the "upper wins" result is not a fixed point in general
        again = ops.project(out, b.x0, **b.project_kwargs())
        slack = C.ball_box_slack(b, out)
        diff = (again.double() - out.double()).abs()
        if case.norm == "l2":
            # rounding P(x) to the dtype moves it off the sphere by up to the norm of the rounding errors of
            # its row (large for bf16 and a small eps), and the second projection may take that back
            diff, slack = C.row_view(diff).norm(dim=1), C.row_view(slack).norm(dim=1)
        assert bool((diff <= slack).all()), f"project is not idempotent: max change {float(diff.max())}"


@pytest.mark.parametrize("device", DEVICES)
@SMALL
@given(case=C.step_cases(projection=True))
def test_project_inplace_updates_and_returns_x(device, case):
    """project_ writes the projection into x itself and returns that same tensor."""
    b = C.build(case, device)
    target = C.build(case, device).x
    ptr = target.data_ptr()
    out = ops.project_(target, b.x0, **b.project_kwargs())
    assert out is target and target.data_ptr() == ptr
    C.assert_matches_reference_project(target, b)


@pytest.mark.parametrize("device", DEVICES)
@SMALL
@given(case=C.step_cases(grad_kinds=("normal", "sparse", "ties")))
def test_single_task_forms_and_budget_forms_agree(device, case):
    """T=1: grads [B,*S] == [1,B,*S]; weights None == ones; float eps/alpha == the same value per row."""
    b = C.build(case, device)
    g = b.grads if b.grads.dim() == b.x.dim() + 1 else b.grads.unsqueeze(0)
    g1 = g[:1]
    kw = b.step_kwargs()
    base = ops.attack_step(b.x, b.x0, g1, None, **kw)
    forms = {
        "[B,*S]": ops.attack_step(b.x, b.x0, g1[0], None, **kw),
        "weights ones": ops.attack_step(b.x, b.x0, g1, torch.ones(b.x.shape[0], 1, device=device,
                                                                  dtype=b.x.dtype), **kw),
        "per-row eps/alpha": ops.attack_step(
            b.x, b.x0, g1, None, **{**kw, "eps": b.eps_rows.to(device, C.R.opmath_dtype(case.dtype)),
                                     "alpha": b.alpha_rows.to(device, C.R.opmath_dtype(case.dtype))}),
    }
    for name, out in forms.items():
        assert torch.equal(out, base), f"{name} differs from [1,B,*S] with weights None"


@pytest.mark.parametrize("device", DEVICES)
@SMALL
@given(case=C.step_cases(grad_kinds=("zeros",), starts=("at_x0", "inside"), x0_in_box=True))
def test_zero_gradient_does_not_move_points_inside_the_ball(device, case):
    """All task gradients zero and x in ball ∩ box: x' == x (up to rounding of the projection)."""
    b = C.build(case, device)
    out = ops.attack_step(b.x, b.x0, b.grads, b.weights, **b.step_kwargs())
    # x is the rounding of a point inside the ball, so a projection may pull it back by that rounding only
    diff = (out.double() - b.x.double()).abs()
    slack = 2 * C.ball_box_slack(b, b.x) + (C.C_REDUCE * case.n ** 0.5 * C.unit_roundoff(case.dtype)
                                            if case.norm == "l2" else 0.0)
    assert bool((diff <= slack).all()), f"zero gradient moved x by up to {float(diff.max())}"


@pytest.mark.parametrize("device", DEVICES)
@SMALL
@given(case=C.step_cases(starts=("at_x0", "inside"), x0_in_box=True),
       weights=st.sampled_from([None, "ones", "twos"]))
def test_exactly_opposite_task_gradients_give_no_move(device, case, weights):
    """Tasks G and -G with weights None, 1 or 2 (unnormalised) cancel exactly in any order, even with FMA:
    x' == x. (With normalisation, w/||G|| * G is not exact and an FMA may leave a rounding residue whose
    sign is arbitrary; the main test treats that as the documented ambiguity.)"""
    b = C.build(case, device)
    g = b.grads if b.grads.dim() == b.x.dim() + 1 else b.grads.unsqueeze(0)
    pair = torch.stack([g[0], -g[0]])
    w = None if weights is None else torch.full((b.x.shape[0], 2), 1.0 if weights == "ones" else 2.0,
                                                dtype=b.x.dtype, device=device)
    out = ops.attack_step(b.x, b.x0, pair, w, **{**b.step_kwargs(), "normalize_task_grads": False})
    diff = (out.double() - b.x.double()).abs()
    slack = 2 * C.ball_box_slack(b, b.x) + (C.C_REDUCE * case.n ** 0.5 * C.unit_roundoff(case.dtype)
                                            if case.norm == "l2" else 0.0)
    assert bool((diff <= slack).all()), f"opposite gradients moved x by up to {float(diff.max())}"


@pytest.mark.parametrize("device", DEVICES)
@SMALL
@given(case=C.step_cases(x0_in_box=True), per_row=st.booleans())
def test_eps_zero_returns_x0_exactly(device, case, per_row):
    """eps = 0 (as a float or per row): attack_step and project both return clamp(x0, lo, hi) = x0."""
    b = C.build(case, device)
    eps = torch.zeros(b.x.shape[0], device=device, dtype=R.opmath_dtype(case.dtype)) if per_row else 0.0
    kw = {**b.step_kwargs(), "eps": eps}
    out = ops.attack_step(b.x, b.x0, b.grads, b.weights, **kw)
    assert torch.equal(out, b.x0), f"max |x' - x0| = {float((out.double() - b.x0.double()).abs().max())}"
    out = ops.project(b.x, b.x0, eps=eps, norm=case.norm, lo=case.box[0], hi=case.box[1])
    assert torch.equal(out, b.x0), f"max |P(x) - x0| = {float((out.double() - b.x0.double()).abs().max())}"


@pytest.mark.parametrize("device", DEVICES)
@SMALL
@given(case=C.step_cases())
def test_alpha_zero_step_is_the_projection(device, case):
    """alpha = 0: the step reduces to projecting x (fused attack_step == fused project)."""
    b = C.build(case, device)
    step = ops.attack_step(b.x, b.x0, b.grads, b.weights, **{**b.step_kwargs(), "alpha": 0.0})
    proj = ops.project(b.x, b.x0, **b.project_kwargs())
    tol = C.Tolerance(b, proj).abs if case.norm == "l2" else 0.0
    diff = (step.double() - proj.double()).abs()
    assert bool((diff <= tol).all()), f"alpha=0 step differs from projection by {float(diff.max())}"


@pytest.mark.parametrize("norm,normalize", [("linf", False), ("linf", True), ("l2", False), ("l2", True)])
@pytest.mark.parametrize("batch,row", [(1, 3 * 100 * 100), (5, 3 * 40 * 40)])
def test_cpu_result_does_not_depend_on_the_thread_count(norm, normalize, batch, row):
    """Chunked per-row sums are added in a fixed order: 1 and 2 threads give bit-identical results, both
    when rows are split over threads (B=1, long rows) and when whole rows go to threads (B >= threads)."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, row, generator=gen)
    x = (x0 + 0.05 * torch.randn(batch, row, generator=gen)).clamp(0, 1)
    grads = torch.randn(3, batch, row, generator=gen)
    weights = torch.rand(batch, 3, generator=gen)
    kwargs = dict(eps=0.3, alpha=0.1, norm=norm, normalize_task_grads=normalize)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.attack_step(x, x0, grads, weights, **kwargs)
        torch.set_num_threads(2)
        two = ops.attack_step(x, x0, grads, weights, **kwargs)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def _same_with_nan(a, b, atol):
    return torch.equal(a.isnan(), b.isnan()) and torch.allclose(a.nan_to_num(0.5), b.nan_to_num(0.5), atol=atol)


@pytest.mark.parametrize("device", DEVICES)
@SMALL
@given(norm=st.sampled_from(ops.NORMS), normalize=st.booleans(), where=st.sampled_from(["x", "x0", "grads", "weights"]),
       value=st.sampled_from([float("nan"), float("inf"), -float("inf")]), dtype=st.sampled_from(["float32", "float64"]),
       tasks=st.integers(1, 3), position=st.integers(0, 10 ** 6), seed=st.integers(0, 2 ** 16))
def test_non_finite_inputs_follow_the_documented_rules_like_the_oracle(device, norm, normalize, where, value, dtype,
                                                                         tasks, position, seed):
    """L∞ element by element (NaN stays NaN, sign(NaN) included); L2: a non-finite value makes its row NaN."""
    dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 2, 5, 3, generator=gen, dtype=dtype)
    x0 = torch.rand(3, 2, 5, 3, generator=gen, dtype=dtype)
    grads = torch.randn(tasks, 3, 2, 5, 3, generator=gen, dtype=dtype)
    weights = torch.rand(3, tasks, generator=gen, dtype=torch.float64)
    target = {"x": x, "x0": x0, "grads": grads, "weights": weights}[where]
    target.view(-1)[position % target.numel()] = value
    x, x0, grads, weights = (t.to(device) for t in (x, x0, grads, weights))
    fused = ops.attack_step(x, x0, grads, weights, eps=0.1, alpha=0.03, norm=norm, normalize_task_grads=normalize)
    oracle = R.attack_step(x, x0, grads, weights, eps=0.1, alpha=0.03, norm=norm, normalize_task_grads=normalize)
    assert _same_with_nan(fused, oracle, 1e-5)
    if where in ("x", "x0"):
        assert _same_with_nan(ops.project(x, x0, eps=0.1, norm=norm), R.project(x, x0, eps=0.1, norm=norm), 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@SMALL
@given(case=C.step_cases())
def test_fingerprint_is_the_references_and_leaves_the_step_unchanged(device, case):
    """attack_step_ with a fingerprint gives the same step as without, and the fingerprint of each updated row
    equals the NumPy reference; a row equal to another (the batch repeated) gets the same fingerprint."""
    b = C.build(case, device)
    plain = ops.attack_step(b.x, b.x0, b.grads, b.weights, **b.step_kwargs())
    target = C.build(case, device).x
    fingerprint = torch.full((target.shape[0], 2), -1, dtype=torch.int64, device=device)  # zeroed by the op
    ops.attack_step_(target, b.x0, b.grads, b.weights, **b.step_kwargs(), fingerprint=fingerprint)
    assert torch.equal(target.isnan(), plain.isnan()) and torch.equal(target.nan_to_num(), plain.nan_to_num())
    assert torch.equal(fingerprint.cpu(), reference.fingerprint(target))
    twice = torch.cat([target, target])
    prints = reference.fingerprint(twice)
    assert torch.equal(prints[: target.shape[0]], prints[target.shape[0]:])


def test_fingerprint_tells_rows_apart_and_does_not_depend_on_the_thread_count():
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 3 * 60 * 60, generator=gen)
    grads = torch.randn(2, 6, 3 * 60 * 60, generator=gen)
    prints = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            x, fingerprint = x0.clone(), torch.zeros(6, 2, dtype=torch.int64)
            ops.attack_step_(x, x0, grads, eps=0.1, alpha=0.02, fingerprint=fingerprint)
            prints.append(fingerprint)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(prints[0], prints[1])
    assert len({tuple(row.tolist()) for row in prints[0]}) == 6  # six different rows, six fingerprints
    changed = x.clone()
    changed[2, 1000] = torch.nextafter(changed[2, 1000], torch.tensor(2.0))  # one element one ulp up
    assert not torch.equal(reference.fingerprint(changed)[2], reference.fingerprint(x)[2])


def test_a_bad_fingerprint_tensor_is_refused():
    x = torch.rand(2, 5)
    for bad, error in ((torch.zeros(2, 2), TypeError), (torch.zeros(3, 2, dtype=torch.int64), ValueError)):
        with pytest.raises(error, match="fingerprint"):
            ops.attack_step_(x, x.clone(), torch.randn(5 * 2).view(2, 5), eps=0.1, alpha=0.1, fingerprint=bad)
