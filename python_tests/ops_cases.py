"""Shared pieces of the attack-step op tests: hypothesis strategies, case builders and checkers.

Not a test module. The checkers compare a candidate implementation (the fused op) with the oracle
``mtrobust_fast/ops/reference.py`` under an explicit error model:

* output rounding: ``OUT_ULPS`` units in the last place of the output dtype;
* opmath error: a few unit roundoffs of the opmath dtype (float32 for fp16/bf16/fp32, float64 for
  float64) times the magnitude of the values involved;
* per-row L2 reductions: the norms may be summed in another order (or in double) than the oracle does,
  which changes them by about sqrt(N) roundoffs;
* cancellation: the combined gradient g = sum_t w[b,t] * gh[t,b] is only determined to about
  T * u * sum_t |w[b,t] * gh[t,b]|. Where |g| is below that (exactly opposite task gradients, ties),
  the sign (Linf) or the direction (L2) is genuinely ambiguous; there the result is checked against
  the set of admissible answers (Linf: one of P(x - alpha), P(x), P(x + alpha) per coordinate) or
  against the invariants only (L2 rows), never skipped.

The same model is checked against the oracle itself (opmath vs float64, with half the tolerance) in
``test_ops_reference.py``, so it is not looser than the arithmetic requires.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from hypothesis import strategies as st


def load_reference():
    """The oracle module, loaded by path so that it works without the native extension."""
    path = Path(__file__).resolve().parents[1] / "mtrobust_fast" / "ops" / "reference.py"
    spec = importlib.util.spec_from_file_location("_mtrobust_fast_ops_reference_for_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


R = load_reference()

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# Boxes whose bounds are exact in every dtype, so "result in [lo, hi]" is checked exactly.
BOXES = ((0.0, 1.0), (-1.0, 1.0), (0.25, 0.75))
OUT_ULPS = {torch.float64: 1.0, torch.float32: 1.0, torch.float16: 2.0, torch.bfloat16: 2.0}
C_ROUND = 8.0     # roundoffs allowed per elementwise value
C_REDUCE = 8.0    # roundoffs (times sqrt(N)) allowed per row reduction
C_CANCEL = 32.0   # roundoffs (times T + sqrt(N)) in the combined gradient
L2_AMBIGUOUS_DIR_ERR = 1e-2  # relative direction error above which an L2 row is "ambiguous"


def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff of the opmath dtype used for inputs of ``dtype``."""
    return 2.0 ** -53 if dtype == torch.float64 else 2.0 ** -24


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers at |values| (float64 tensor)."""
    fi = torch.finfo(dtype)
    a = values.double().abs().clamp_min(fi.tiny)
    _, e = torch.frexp(a)  # a = m * 2**e with m in [0.5, 1)
    return fi.eps * torch.ldexp(torch.ones_like(a), e - 1)


def row_view(t: torch.Tensor) -> torch.Tensor:
    """[B, N] view (copy) of a [B, *S] tensor, in float64."""
    return t.double().reshape(t.shape[0], math.prod(t.shape[1:]))


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------

@dataclass
class StepCase:
    """Everything needed to build one attack_step / project call (tensors come from ``seed``)."""
    dtype: torch.dtype
    batch: int
    shape: tuple            # S, the per-row shape
    tasks: int
    grads_form: str         # "tbs" ([T,B,*S]) or "bs" ([B,*S], only when T == 1)
    grad_kind: str          # normal | zeros | opposite | ties | row_zero | sparse
    weights_kind: str       # none | ones | random | with_zeros | equal_pair
    weights_in_opmath: bool
    eps: object             # float or list of B floats (in "units": scaled by sqrt(N) for l2)
    alpha: object
    norm: str
    normalize: bool
    box: tuple
    start: str              # at_x0 | inside | outside
    x0_in_box: bool
    layout: str             # contiguous | channels_last | strided
    seed: int

    @property
    def n(self) -> int:
        return math.prod(self.shape)


def _budget(unit_max):
    return st.one_of(st.sampled_from([0.0, 1 / 255, 8 / 255, 0.05, unit_max]), st.floats(1e-4, unit_max))


@st.composite
def step_cases(draw, *, projection=False, dtypes=DTYPES, norms=("linf", "l2"), grad_kinds=None,
               starts=("at_x0", "inside", "outside"), x0_in_box=None):
    """Random small attack_step (or, with projection=True, project) cases."""
    dtype = draw(st.sampled_from(dtypes))
    batch = draw(st.integers(1, 4))
    rank = draw(st.sampled_from([1, 1, 2, 3, 3]))
    if rank == 1:
        shape = (draw(st.integers(1, 40)),)
    elif rank == 2:
        shape = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    else:
        shape = draw(st.sampled_from([(3, 5, 7), (1, 1, 1), (2, 3, 3)])
                     | st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 6)))
    kinds = grad_kinds or ("normal", "normal", "zeros", "opposite", "ties", "row_zero", "sparse")
    grad_kind = "none" if projection else draw(st.sampled_from(kinds))
    min_tasks = 2 if grad_kind == "opposite" else 1
    tasks = 0 if projection else draw(st.integers(min_tasks, 8))
    grads_form = draw(st.sampled_from(["tbs", "bs"])) if tasks == 1 else "tbs"
    if projection:
        weights_kind = "none"
    elif grad_kind == "opposite":
        weights_kind = draw(st.sampled_from(["none", "ones", "equal_pair"]))
    else:
        weights_kind = draw(st.sampled_from(["none", "ones", "random", "with_zeros"]))
    per_row_eps = draw(st.booleans())
    per_row_alpha = draw(st.booleans())
    eps = [draw(_budget(0.5)) for _ in range(batch)] if per_row_eps else draw(_budget(0.5))
    alpha = [draw(_budget(0.3)) for _ in range(batch)] if per_row_alpha else draw(_budget(0.3))
    layouts = ["contiguous", "strided"] + (["channels_last", "channels_last"] if rank == 3 else [])
    return StepCase(
        dtype=dtype, batch=batch, shape=shape, tasks=tasks, grads_form=grads_form, grad_kind=grad_kind,
        weights_kind=weights_kind, weights_in_opmath=draw(st.booleans()), eps=eps, alpha=alpha,
        norm=draw(st.sampled_from(norms)), normalize=False if projection else draw(st.booleans()),
        box=draw(st.sampled_from(BOXES)), start=draw(st.sampled_from(starts)),
        x0_in_box=draw(st.integers(0, 5)) > 0 if x0_in_box is None else x0_in_box,
        layout=draw(st.sampled_from(layouts)), seed=draw(st.integers(0, 2 ** 31 - 1)))


def _relayout(t: torch.Tensor, layout: str, lead: int = 1) -> torch.Tensor:
    """Same values, another memory layout (``lead`` = number of leading batch-like dims)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":  # every [*lead] slice is channels_last: C innermost
        c_dim = lead
        perm = list(range(lead)) + list(range(lead + 1, t.dim())) + [c_dim]
        inv = [perm.index(i) for i in range(t.dim())]
        return t.permute(perm).contiguous().permute(inv)
    if layout == "strided":  # every other element of a twice-as-wide buffer
        wide = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype, device=t.device)
        view = wide[..., ::2]
        view.copy_(t)
        return view
    raise ValueError(layout)


@dataclass
class Built:
    """Tensors and keyword arguments of one case, plus what the checkers need to know."""
    case: StepCase
    x: torch.Tensor
    x0: torch.Tensor
    grads: torch.Tensor | None
    weights: torch.Tensor | None
    eps: object
    alpha: object
    eps_rows: torch.Tensor      # float64 [B], as the op sees them (after rounding to opmath)
    alpha_rows: torch.Tensor
    x_inside: bool              # x lies in the ball ∩ box (up to the rounding of x to its dtype)

    def step_kwargs(self):
        c = self.case
        return dict(eps=self.eps, alpha=self.alpha, norm=c.norm, normalize_task_grads=c.normalize,
                    lo=c.box[0], hi=c.box[1])

    def project_kwargs(self):
        c = self.case
        return dict(eps=self.eps, norm=c.norm, lo=c.box[0], hi=c.box[1])


def build(case: StepCase, device="cpu") -> Built:
    """Materialise ``case`` on ``device`` (generated on the CPU from its seed, then moved)."""
    gen = torch.Generator().manual_seed(case.seed)
    B, S, n = case.batch, case.shape, case.n
    lo, hi = case.box
    op = R.opmath_dtype(case.dtype)
    scale = math.sqrt(n) if case.norm == "l2" else 1.0

    def rows(v):
        vals = [v] * B if not isinstance(v, list) else v
        return torch.tensor([x * scale for x in vals], dtype=op).double()

    eps_rows, alpha_rows = rows(case.eps), rows(case.alpha)

    def as_arg(v):
        if isinstance(v, list):
            return torch.tensor([x * scale for x in v], dtype=op, device=device)
        return v * scale

    x0 = lo + (hi - lo) * torch.rand((B,) + S, generator=gen, dtype=torch.float64)
    if not case.x0_in_box:  # some coordinates outside [lo, hi]: conflicting bounds (upper wins)
        out_mask = torch.rand((B,) + S, generator=gen) < 0.3
        x0 = torch.where(out_mask, x0 + (hi - lo) * (torch.rand((B,) + S, generator=gen, dtype=torch.float64)
                                                     - 0.5) * 1.5, x0)
    e = eps_rows.reshape((B,) + (1,) * len(S))
    if case.start == "at_x0":
        x = x0.clone()
    elif case.start == "inside":
        if case.norm == "linf":
            x = x0 + e * (2 * torch.rand((B,) + S, generator=gen, dtype=torch.float64) - 1)
        else:
            d = torch.randn((B,) + S, generator=gen, dtype=torch.float64)
            r = torch.rand((B,) + (1,) * len(S), generator=gen, dtype=torch.float64)
            x = x0 + d * (e * r / row_view(d).norm(dim=1).clamp_min(1e-30).reshape(r.shape))
        x = x.clamp(lo, hi) if case.x0_in_box else x
    else:
        x = (lo - 0.2 * (hi - lo)) + 1.4 * (hi - lo) * torch.rand((B,) + S, generator=gen, dtype=torch.float64)
    x_inside = case.start in ("at_x0", "inside") and case.x0_in_box

    grads = weights = None
    if case.tasks:
        T = case.tasks
        task_scale = 10.0 ** torch.empty((T, 1) + (1,) * len(S), dtype=torch.float64).uniform_(-3, 3, generator=gen)
        g = torch.randn((T, B) + S, generator=gen, dtype=torch.float64) * task_scale
        if case.grad_kind == "zeros":
            g = torch.zeros_like(g)
        elif case.grad_kind == "opposite":
            g[1] = -g[0]
        elif case.grad_kind == "ties":
            g = torch.randint(-2, 3, (T, B) + S, generator=gen).double()
        elif case.grad_kind == "row_zero":
            keep = (torch.rand(B, generator=gen) < 0.5).double().reshape((1, B) + (1,) * len(S))
            g = g * keep
        elif case.grad_kind == "sparse":
            g = g * (torch.rand((T, B) + S, generator=gen) < 0.5).double()
        wdtype = op if case.weights_in_opmath else case.dtype
        if case.weights_kind == "ones":
            weights = torch.ones(B, T, dtype=wdtype)
        elif case.weights_kind == "random":
            weights = torch.randn(B, T, generator=gen, dtype=torch.float64).to(wdtype)
        elif case.weights_kind == "with_zeros":
            w = torch.randn(B, T, generator=gen, dtype=torch.float64)
            weights = (w * (torch.rand(B, T, generator=gen) < 0.5)).to(wdtype)
        elif case.weights_kind == "equal_pair":
            w = torch.randn(B, T, generator=gen, dtype=torch.float64)
            w[:, 1] = w[:, 0]
            weights = w.to(wdtype)
        grads = g.to(case.dtype)
        if case.grads_form == "bs":
            grads = grads[0]
        grads = _relayout(grads.to(device), case.layout, lead=grads.dim() - len(S))
        if weights is not None:
            weights = weights.to(device)

    x = _relayout(x.to(case.dtype).to(device), case.layout)
    x0 = _relayout(x0.to(case.dtype).to(device), case.layout)
    return Built(case, x, x0, grads, weights, as_arg(case.eps), as_arg(case.alpha), eps_rows, alpha_rows,
                 x_inside)


# --------------------------------------------------------------------------------------------------
# Checkers
# --------------------------------------------------------------------------------------------------

def _bshape(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((like.shape[0],) + (1,) * (like.dim() - 1))


def value_scale(b: Built) -> float:
    """Magnitude of the values the elementwise math works with."""
    lo, hi = b.case.box
    return max(1.0, abs(lo), abs(hi), float(b.x.double().abs().max()) if b.x.numel() else 0.0,
               float(b.x0.double().abs().max()) if b.x0.numel() else 0.0,
               float(b.eps_rows.max()) if b.eps_rows.numel() else 0.0,
               float(b.alpha_rows.max()) if b.alpha_rows.numel() else 0.0)


def combined_gradient(b: Built):
    """(g, m) in float64: g = sum_t w*gh and m = sum_t |w*gh| (its conditioning), shapes [B, *S]."""
    g = b.grads.double()
    if g.dim() == b.x.dim():
        g = g.unsqueeze(0)
    T, B = g.shape[0], g.shape[1]
    w = torch.ones(B, T, dtype=torch.float64, device=g.device) if b.weights is None else b.weights.double()
    terms = []
    for t in range(T):
        gt = g[t]
        if b.case.normalize:
            gt = gt / _bshape(row_view(gt).norm(dim=1).clamp_min(R.TINY), gt)
        terms.append(_bshape(w[:, t], gt) * gt)
    terms = torch.stack(terms)
    return terms.sum(0), terms.abs().sum(0)


class Tolerance:
    """Absolute tolerance per element of the result, in float64, for comparing with the oracle."""

    def __init__(self, b: Built, ref: torch.Tensor, slack: float = 1.0):
        c = b.case
        u = unit_roundoff(c.dtype)
        n = c.n
        scale = value_scale(b)
        base = OUT_ULPS[c.dtype] * ulp(ref, c.dtype) + C_ROUND * u * scale
        self.ambiguous = torch.zeros(ref.shape, dtype=torch.bool, device=ref.device)
        if c.norm == "l2":
            # reductions: ||delta|| (and ||g||) are determined to ~sqrt(N) roundoffs
            base = base + C_REDUCE * math.sqrt(n) * u * scale
        if c.tasks:
            g, m = combined_gradient(b)
            k = c.tasks + (math.sqrt(n) if c.normalize else 0.0)
            if c.norm == "linf":
                self.ambiguous = (g.abs() <= C_CANCEL * k * u * m) & (m > 0)
            else:
                gn, mn = row_view(g).norm(dim=1), row_view(m).norm(dim=1)
                kappa = torch.where(mn > 0, mn / gn.clamp_min(1e-300), torch.zeros_like(mn))
                dir_err = C_CANCEL * k * u * kappa
                row_amb = (dir_err > L2_AMBIGUOUS_DIR_ERR) & (mn > 0)
                self.ambiguous = _bshape(row_amb, ref).expand(ref.shape)
                base = base + _bshape(b.alpha_rows.to(ref.device) * dir_err.clamp(max=1.0), ref)
        self.abs = base * slack


def _fmt_mismatch(out, want, tol, mask, what):
    diff = (out.double() - want.double()).abs()
    bad = ~(diff <= tol) & mask  # NaN counts as a mismatch
    idx = bad.nonzero()[:5].tolist()
    rows = [(i, float(out[tuple(i)]), float(want[tuple(i)]), float(tol[tuple(i)]) if tol.dim() else float(tol))
            for i in idx]
    return f"{what}: {int(bad.sum())} elements differ; first (index, got, want, tol): {rows}"


def assert_matches_reference_step(out: torch.Tensor, b: Built, ref: torch.Tensor | None = None,
                                  slack: float = 1.0):
    """``out`` (an attack_step result for ``b``) agrees with the oracle under the error model."""
    c = b.case
    if ref is None:
        ref = R.attack_step(b.x, b.x0, b.grads, b.weights, **b.step_kwargs())
    assert out.shape == b.x.shape and out.dtype == b.x.dtype and out.device == b.x.device
    tol = Tolerance(b, ref, slack)
    o, r = out.double(), ref.double()
    sure = ~tol.ambiguous
    close = (o - r).abs() <= tol.abs
    assert bool((close | ~sure).all()), _fmt_mismatch(out, ref, tol.abs.expand(ref.shape), sure, "vs reference")
    if c.norm == "linf" and bool(tol.ambiguous.any()):
        # admissible: the step of either sign, or none, then the same projection
        cands = [R.attack_step(b.x, b.x0, torch.full_like(b.x, float(s)), None, **{**b.step_kwargs(),
                                                                                   "normalize_task_grads": False})
                 for s in (-1, 0, 1)]
        ok = torch.zeros_like(close)
        for cand in cands:
            ok |= (o - cand.double()).abs() <= tol.abs
        assert bool((ok | sure).all()), _fmt_mismatch(out, ref, tol.abs.expand(ref.shape), ~ok & ~sure,
                                                      "ambiguous-sign coordinates outside {P(x-a), P(x), P(x+a)}")
    if c.norm == "l2" and bool(tol.ambiguous.any()):
        assert_step_invariants(out, b, rows=tol.ambiguous.reshape(b.x.shape[0], -1)[:, 0] if b.x.numel() else None)


def assert_matches_reference_project(out: torch.Tensor, b: Built, ref: torch.Tensor | None = None,
                                     slack: float = 1.0):
    """``out`` (a project result for ``b``) agrees with the oracle."""
    if ref is None:
        ref = R.project(b.x, b.x0, **b.project_kwargs())
    assert out.shape == b.x.shape and out.dtype == b.x.dtype and out.device == b.x.device
    tol = Tolerance(b, ref, slack)
    diff = (out.double() - ref.double()).abs()
    assert bool((diff <= tol.abs).all()), _fmt_mismatch(out, ref, tol.abs.expand(ref.shape),
                                                         torch.ones_like(diff, dtype=torch.bool), "project vs reference")


def ball_box_slack(b: Built, out: torch.Tensor) -> torch.Tensor:
    """Per-element slack for membership checks: rounding of the result and the opmath error."""
    u = unit_roundoff(b.case.dtype)
    return OUT_ULPS[b.case.dtype] * ulp(out, b.case.dtype) + C_ROUND * u * value_scale(b)


def assert_step_invariants(out: torch.Tensor, b: Built, *, rows: torch.Tensor | None = None,
                           moved_by_alpha: bool = True):
    """Result in [lo, hi] and in the eps-ball around x0 (per row); if x started inside the ball ∩ box,
    it moved by at most alpha (Linf: per coordinate; L2: in norm). ``rows`` selects rows to check."""
    c = b.case
    lo, hi = c.box
    B = b.x.shape[0]
    if B == 0:
        return
    sel = torch.ones(B, dtype=torch.bool) if rows is None else rows.cpu()
    o, x, x0 = row_view(out).cpu()[sel], row_view(b.x).cpu()[sel], row_view(b.x0).cpu()[sel]
    eps, alpha = b.eps_rows[sel], b.alpha_rows[sel]
    slack = row_view(ball_box_slack(b, out)).cpu()[sel]
    assert not bool(torch.isnan(o).any()), "NaN in the result"
    if c.x0_in_box:  # otherwise the bounds may conflict and the upper one wins (torch.clamp)
        assert bool(((o >= lo) & (o <= hi)).all()), f"result outside [{lo}, {hi}]: {o.min()}..{o.max()}"
        if c.norm == "linf":
            over = (o - x0).abs() - eps[:, None] - slack
            assert bool((over <= 0).all()), f"outside the Linf ball by {float(over.max())}"
        else:
            over = (o - x0).norm(dim=1) - eps - slack.norm(dim=1)
            assert bool((over <= 0).all()), f"outside the L2 ball by {float(over.max())}"
    if moved_by_alpha and b.x_inside:
        if c.norm == "linf":
            over = (o - x).abs() - alpha[:, None] - 2 * slack
            assert bool((over <= 0).all()), f"Linf step larger than alpha by {float(over.max())}"
        else:
            over = (o - x).norm(dim=1) - alpha - 2 * slack.norm(dim=1)
            assert bool((over <= 0).all()), f"L2 step larger than alpha by {float(over.max())}"


def assert_project_invariants(out: torch.Tensor, b: Built):
    """Projection result in [lo, hi] and in the eps-ball around x0."""
    assert_step_invariants(out, b, moved_by_alpha=False)
