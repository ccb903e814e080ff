"""Argument errors, empty inputs and operator registration of the fused attack-step ops.

Every bad argument raises a clear Python exception that names it; the registered operators pass
``torch.library.opcheck`` (schema, fake implementation, autograd registration, AOT dispatch) and work
under ``torch.compile(fullgraph=True)``. Needs the native extension: a missing build fails at import.
"""
import math

import pytest
import torch

import mtrobust_fast.ops as ops
import ops_cases as C

R = C.R
B, S, T = 3, (2, 4, 5), 2

STEP_FUNCS = {"attack_step": ops.attack_step, "attack_step_": ops.attack_step_}
PROJECT_FUNCS = {"project": ops.project, "project_": ops.project_}
ALL_NAMES = list(STEP_FUNCS) + list(PROJECT_FUNCS)


def _inputs(dtype=torch.float32, device="cpu", batch=B, shape=S, tasks=T):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand((batch,) + shape, generator=gen).to(dtype=dtype, device=device)
    x = (x0 + 0.01 * torch.randn((batch,) + shape, generator=gen).to(dtype=dtype, device=device)).clamp(0, 1)
    grads = torch.randn((tasks, batch) + shape, generator=gen).to(dtype=dtype, device=device)
    weights = torch.rand(batch, tasks, generator=gen).to(dtype=dtype, device=device)
    return x, x0, grads, weights


def _call(name, x, x0, grads=None, weights=None, **kw):
    """Call one of the four wrappers with defaults for whatever the test does not vary."""
    kw.setdefault("eps", 0.03)
    kw.setdefault("norm", "linf")
    if name in STEP_FUNCS:
        kw.setdefault("alpha", 0.01)
        if grads is None:
            grads = torch.zeros((1,) + tuple(x.shape), dtype=x.dtype, device=x.device)
        return STEP_FUNCS[name](x, x0, grads, weights, **kw)
    return PROJECT_FUNCS[name](x, x0, **kw)


# ---------------------------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("name", ALL_NAMES)
def test_x0_shape_mismatch_is_a_value_error_naming_x0(name):
    """x0 must have exactly the shape of x."""
    x, x0, _, _ = _inputs()
    with pytest.raises(ValueError, match="x0"):
        _call(name, x, x0[:, :1])
    with pytest.raises(ValueError, match="x0"):
        _call(name, x, x0.reshape(B, -1))


@pytest.mark.parametrize("name", list(STEP_FUNCS))
@pytest.mark.parametrize("bad_shape", [(T, B + 1) + S, (T, B, 2, 4, 4), (T, 1, B) + S, (B, 2, 4), (T,) + S])
def test_grads_shape_mismatch_is_a_value_error_naming_grads(name, bad_shape):
    """grads must be [T, B, *S] or [B, *S]."""
    x, x0, _, _ = _inputs()
    with pytest.raises(ValueError, match="grads"):
        _call(name, x, x0, torch.zeros(bad_shape))


@pytest.mark.parametrize("name", list(STEP_FUNCS))
@pytest.mark.parametrize("bad_shape", [(B, T + 1), (B, 1), (B + 1, T), (T, B), (B * T,), (B, T, 1)])
def test_weights_shape_mismatch_is_a_value_error_naming_weights(name, bad_shape):
    """weights must be [B, T] with T the number of task gradients."""
    x, x0, grads, _ = _inputs()
    with pytest.raises(ValueError, match="weights"):
        _call(name, x, x0, grads, torch.ones(bad_shape))


@pytest.mark.parametrize("name", list(STEP_FUNCS))
def test_empty_weights_are_a_value_error_naming_weights(name):
    """weights with no column (T=0) is refused."""
    x, x0, grads, _ = _inputs()
    with pytest.raises(ValueError, match="weights"):
        _call(name, x, x0, grads[:1], torch.ones(B, 0))
    with pytest.raises(ValueError, match="weights"):
        _call(name, x, x0, grads, torch.ones(B, 0))


@pytest.mark.parametrize("name", list(STEP_FUNCS))
def test_no_task_gradient_is_a_value_error(name):
    """grads with T=0 tasks (with weights None or [B, 0]) is refused, naming grads or weights."""
    x, x0, _, _ = _inputs()
    empty = torch.zeros((0, B) + S)
    with pytest.raises(ValueError, match="grads|weights"):
        _call(name, x, x0, empty)
    with pytest.raises(ValueError, match="grads|weights"):
        _call(name, x, x0, empty, torch.ones(B, 0))


@pytest.mark.parametrize("name", list(STEP_FUNCS))
def test_too_many_tasks_is_a_value_error_naming_grads(name):
    """More task gradients than the kernels support (ops.MAX_TASKS) is refused in Python, naming grads."""
    x, x0, _, _ = _inputs()
    with pytest.raises(ValueError, match="grads"):
        _call(name, x, x0, torch.zeros((ops.MAX_TASKS + 1, B) + S))


@pytest.mark.parametrize("name", ALL_NAMES)
def test_zero_dim_x_is_a_value_error(name):
    """x needs a leading batch dimension."""
    x = torch.tensor(0.5)
    with pytest.raises(ValueError, match=r"\bx\b"):
        _call(name, x, x.clone(), torch.zeros(1) if name in STEP_FUNCS else None)


# ---------------------------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("bad_dtype", [torch.int64, torch.uint8, torch.bool, torch.complex64])
def test_non_floating_x_or_x0_is_a_type_error_naming_it(name, bad_dtype):
    """x, x0 must be floating point."""
    x, x0, _, _ = _inputs()
    with pytest.raises(TypeError, match=r"\bx\b"):
        _call(name, x.to(bad_dtype), x0.to(bad_dtype))
    with pytest.raises(TypeError, match="x0"):
        _call(name, x, x0.to(bad_dtype))


@pytest.mark.parametrize("name", list(STEP_FUNCS))
@pytest.mark.parametrize("bad_dtype", [torch.int32, torch.bool])
def test_non_floating_grads_or_weights_is_a_type_error_naming_it(name, bad_dtype):
    """grads and weights must be floating point."""
    x, x0, grads, weights = _inputs()
    with pytest.raises(TypeError, match="grads"):
        _call(name, x, x0, grads.to(bad_dtype))
    with pytest.raises(TypeError, match="weights"):
        _call(name, x, x0, grads, weights.to(bad_dtype))


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("other", [torch.float64, torch.float16, torch.bfloat16])
def test_mixed_dtypes_among_x_x0_grads_are_a_type_error(name, other):
    """x, x0 and grads must share one dtype (no silent casts of big tensors)."""
    x, x0, grads, _ = _inputs()
    with pytest.raises(TypeError, match="x0"):
        _call(name, x, x0.to(other), grads)
    if name in STEP_FUNCS:
        with pytest.raises(TypeError, match="grads"):
            _call(name, x, x0, grads.to(other))


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("param", ["eps", "alpha"])
def test_non_floating_or_non_number_budget_is_a_type_error(name, param):
    """eps/alpha must be a real number or a floating tensor."""
    if param == "alpha" and name in PROJECT_FUNCS:
        pytest.skip("project has no alpha")
    x, x0, _, _ = _inputs()
    with pytest.raises(TypeError, match=param):
        _call(name, x, x0, **{param: torch.ones(B, dtype=torch.int64)})
    with pytest.raises(TypeError, match=param):
        _call(name, x, x0, **{param: "0.1"})


# ---------------------------------------------------------------------------------------------- values

BAD_BUDGETS = [-0.01, -math.inf, math.inf, math.nan]


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("param", ["eps", "alpha"])
@pytest.mark.parametrize("value", BAD_BUDGETS)
def test_negative_or_non_finite_budget_is_a_value_error_naming_it(name, param, value):
    """eps/alpha < 0, inf or NaN are refused, as a float and inside a CPU [B] tensor."""
    if param == "alpha" and name in PROJECT_FUNCS:
        pytest.skip("project has no alpha")
    x, x0, _, _ = _inputs()
    with pytest.raises(ValueError, match=param):
        _call(name, x, x0, **{param: value})
    rows = torch.full((B,), 0.01)
    rows[1] = value
    with pytest.raises(ValueError, match=param):
        _call(name, x, x0, **{param: rows})


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("param", ["eps", "alpha"])
@pytest.mark.parametrize("length", [B - 1, B + 1, 1])
def test_budget_tensor_of_wrong_length_is_a_value_error_naming_it(name, param, length):
    """A per-row eps/alpha tensor must have exactly B entries."""
    if param == "alpha" and name in PROJECT_FUNCS:
        pytest.skip("project has no alpha")
    x, x0, _, _ = _inputs()
    with pytest.raises(ValueError, match=param):
        _call(name, x, x0, **{param: torch.full((length,), 0.01)})
    with pytest.raises(ValueError, match=param):
        _call(name, x, x0, **{param: torch.full((B, 1), 0.01)})


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("norm", ["l1", "Linf2", "", "inf"])
def test_unknown_norm_is_a_value_error_naming_norm(name, norm):
    """Only "linf" and "l2" are known."""
    x, x0, _, _ = _inputs()
    with pytest.raises(ValueError, match="norm"):
        _call(name, x, x0, norm=norm)


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("lo,hi", [(1.0, 0.0), (0.5, 0.4999), (math.nan, 1.0), (0.0, math.nan)])
def test_lo_above_hi_is_a_value_error(name, lo, hi):
    """The valid range must be non-empty: lo <= hi (and not NaN)."""
    x, x0, _, _ = _inputs()
    with pytest.raises(ValueError, match="lo|hi"):
        _call(name, x, x0, lo=lo, hi=hi)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_errors_leave_the_inplace_target_untouched(name):
    """A refused call does not write into x."""
    x, x0, grads, _ = _inputs()
    before = x.clone()
    with pytest.raises(ValueError):
        _call(name, x, x0, grads if name in STEP_FUNCS else None, eps=-1.0)
    assert torch.equal(x, before)


# ---------------------------------------------------------------------------------------------- devices

def _assert_device_mismatch_refused(name, x, x0, grads, weights, other):
    """Each of x0, grads, weights on another device than x is a ValueError naming it."""
    cases = [("x0", dict(x0=x0.to(other)))]
    if name in STEP_FUNCS:
        cases += [("grads", dict(grads=grads.to(other))), ("weights", dict(weights=weights.to(other)))]
    for arg, change in cases:
        args = dict(x=x, x0=x0, grads=grads if name in STEP_FUNCS else None,
                    weights=weights if name in STEP_FUNCS else None)
        args.update(change)
        with pytest.raises(ValueError, match=arg):
            _call(name, args["x"], args["x0"], args["grads"], args["weights"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ALL_NAMES)
def test_tensors_on_different_devices_are_a_value_error_cuda(name):
    """x on CUDA with x0/grads/weights on the CPU (and x on the CPU with x0 on CUDA) is refused."""
    x, x0, grads, weights = _inputs(device="cuda")
    _assert_device_mismatch_refused(name, x, x0, grads, weights, "cpu")
    xc, x0c, _, _ = _inputs()
    with pytest.raises(ValueError, match="x0"):
        _call(name, xc, x0c.cuda())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("param", ["eps", "alpha"])
def test_budget_tensor_on_another_device_is_refused_or_moved(name, param):
    """A per-row eps/alpha on the other device is either a ValueError naming it or used as if on x's device."""
    if param == "alpha" and name in PROJECT_FUNCS:
        pytest.skip("project has no alpha")
    for dev, other in (("cuda", "cpu"), ("cpu", "cuda")):
        x, x0, grads, weights = _inputs(device=dev)
        rows = torch.tensor([0.03, 0.0, 0.01])
        want = _call(name, x.clone(), x0, grads, weights if name in STEP_FUNCS else None,
                     **{param: rows.to(dev)})
        try:
            got = _call(name, x.clone(), x0, grads, weights if name in STEP_FUNCS else None,
                        **{param: rows.to(other)})
        except ValueError as exc:
            assert param in str(exc)
        else:
            assert torch.equal(got, want)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_tensors_on_different_devices_are_a_value_error_meta(name):
    """Without a GPU: x on the CPU with x0/grads/weights on the "meta" device is refused by the wrapper."""
    x, x0, grads, weights = _inputs()
    try:
        _call(name, x, x0.to("meta"))
    except ValueError:
        pass
    except Exception as exc:  # the wrapper does not see meta as another device: nothing to test here
        pytest.skip(f"mixed cpu/meta is not checked by the wrapper ({type(exc).__name__})")
    else:
        pytest.fail("x on cpu with x0 on meta was accepted")
    _assert_device_mismatch_refused(name, x, x0, grads, weights, "meta")


# ---------------------------------------------------------------------------------------------- empty

@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(0, 3, 4), (0, 7), (2, 0), (2, 3, 0, 5)])
def test_empty_inputs_return_an_empty_tensor_of_the_right_shape_and_dtype(name, dtype, shape):
    """B = 0 (or rows with no element): empty result, same shape and dtype; in-place forms return x."""
    x = torch.zeros(shape, dtype=dtype)
    x0 = torch.zeros(shape, dtype=dtype)
    grads = torch.zeros((2,) + shape, dtype=dtype)
    weights = torch.ones(shape[0], 2, dtype=dtype)
    eps = torch.full((shape[0],), 0.1)
    for norm in ("linf", "l2"):
        out = _call(name, x, x0, grads, weights if name in STEP_FUNCS else None, eps=eps, norm=norm,
                    **({"alpha": eps} if name in STEP_FUNCS else {}))
        assert out.shape == shape and out.dtype == dtype and out.device == x.device
        if name.endswith("_"):
            assert out is x


# ---------------------------------------------------------------------------------------------- operators

def _op_args(dtype, norm, normalize, with_weights, channels_last=False, tasks=T):
    x, x0, grads, weights = _inputs(dtype=dtype, tasks=tasks)
    if channels_last:
        x, x0 = x.contiguous(memory_format=torch.channels_last), x0.contiguous(memory_format=torch.channels_last)
    op = R.opmath_dtype(dtype)
    eps = torch.full((B,), 0.03, dtype=op)
    alpha = torch.tensor([0.01, 0.0, 0.02], dtype=op)
    return x, x0, grads, weights if with_weights else None, eps, alpha, norm, normalize


OPCHECK_CASES = [
    (torch.float32, "linf", False, False, False),
    (torch.float32, "l2", True, True, False),
    (torch.float64, "l2", False, True, True),
    (torch.float16, "linf", True, True, True),
]


@pytest.mark.parametrize("dtype,norm,normalize,with_weights,channels_last", OPCHECK_CASES)
@pytest.mark.parametrize("op_name", ["attack_step", "attack_step_"])
def test_opcheck_attack_step_operators(op_name, dtype, norm, normalize, with_weights, channels_last):
    """torch.library.opcheck passes for mtrobust_fast::attack_step and ::attack_step_."""
    op = getattr(torch.ops.mtrobust_fast, op_name).default
    x, x0, grads, weights, eps, alpha, norm, normalize = _op_args(dtype, norm, normalize, with_weights,
                                                                  channels_last)
    torch.library.opcheck(op, (x, x0, grads, weights, eps, alpha, norm, normalize, 0.0, 1.0))


@pytest.mark.parametrize("dtype,norm,channels_last", [(torch.float32, "linf", False), (torch.float64, "l2", True),
                                                      (torch.bfloat16, "l2", False)])
@pytest.mark.parametrize("op_name", ["project", "project_"])
def test_opcheck_project_operators(op_name, dtype, norm, channels_last):
    """torch.library.opcheck passes for mtrobust_fast::project and ::project_."""
    op = getattr(torch.ops.mtrobust_fast, op_name).default
    x, x0, _, _, eps, _, norm, _ = _op_args(dtype, norm, False, False, channels_last)
    torch.library.opcheck(op, (x, x0, eps, norm, -0.5, 1.0))


def _compiled_equals_eager(fn, *args):
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    want = fn(*[a.clone() for a in args])
    got = compiled(*[a.clone() for a in args])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    return got


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_torch_compile_fullgraph_attack_step_matches_eager_and_oracle(norm):
    """torch.compile(aot_eager, fullgraph) of attack_step (float eps/alpha) + project == eager == oracle."""
    x, x0, grads, weights = _inputs()

    def two_steps(x, x0, grads, weights):
        y = ops.attack_step(x, x0, grads, weights, eps=0.03, alpha=0.01, norm=norm, normalize_task_grads=True)
        y = ops.attack_step(y, x0, grads, None, eps=0.03, alpha=0.01, norm=norm)
        return ops.project(y + 0.05, x0, eps=0.03, norm=norm)

    got = _compiled_equals_eager(two_steps, x, x0, grads, weights)
    ref = R.attack_step(x, x0, grads, weights, eps=0.03, alpha=0.01, norm=norm, normalize_task_grads=True)
    ref = R.attack_step(ref, x0, grads, None, eps=0.03, alpha=0.01, norm=norm)
    ref = R.project(ref + 0.05, x0, eps=0.03, norm=norm)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_torch_compile_fullgraph_with_per_row_eps_tensor(norm):
    """Per-row eps/alpha tensors (graph inputs) also compile in one graph and match eager."""
    x, x0, grads, weights = _inputs()
    eps, alpha = torch.tensor([0.03, 0.0, 0.05]), torch.tensor([0.01, 0.02, 0.0])

    def step(x, x0, grads, weights, eps, alpha):
        y = ops.attack_step(x, x0, grads, weights, eps=eps, alpha=alpha, norm=norm)
        return ops.project(y, x0, eps=eps, norm=norm)

    _compiled_equals_eager(step, x, x0, grads, weights, eps, alpha)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_torch_compile_fullgraph_inplace_forms_match_eager(norm):
    """attack_step_ and project_ compile in one graph (functionalised) and match eager."""
    x, x0, grads, weights = _inputs()

    def steps(x, x0, grads, weights):
        y = x.clone()
        ops.attack_step_(y, x0, grads, weights, eps=0.03, alpha=0.01, norm=norm)
        ops.project_(y, x0, eps=0.02, norm=norm)
        return y

    _compiled_equals_eager(steps, x, x0, grads, weights)


def test_inputs_that_require_grad_are_refused_not_silently_cut():
    x = torch.rand(2, 3, requires_grad=True)
    x0 = torch.rand(2, 3)
    for call in (lambda: ops.attack_step(x, x0, torch.rand(2, 3), eps=0.1, alpha=0.01),
                 lambda: ops.attack_step(x0, x0, x, eps=0.1, alpha=0.01),
                 lambda: ops.project(x, x0, eps=0.1)):
        with pytest.raises(ValueError, match="requires grad, but the attack step is not differentiable"):
            call()
    with torch.no_grad():
        ops.project(x, x0, eps=0.1)  # no graph is being built: fine
