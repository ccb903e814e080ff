"""Vulnerability metrics of multi-task models under attack (AAAI'22 Definitions 1-4, Theorems 2 and 4).

Everything is computed per sample (shape ``[B]``) and reduced only at the end, in :class:`VulnerabilityMeter`.

- Relative task vulnerability (the paper's main metric) ``v_i = E_k[(f_i(x_k+δ) − f_i(x_k)) / f_i(x_k)]`` with
  ``f_i`` the task error (``Task.error``: 1 − per-sample mIoU for s, masked MSE otherwise). A sample whose clean
  error is 0 (a perfect prediction, or no valid pixel) has no defined relative change: it is left out of the mean
  and counted (``rel_vuln_undefined``); v_i is NaN when no sample is left. The source code instead divided
  batch-averaged errors (a ratio of means, reported as ``rel_vuln_ratio_of_means``) and measured the "clean" error
  at its attack's start point x+ε rather than at x; here both variants use the clean input.
- Adversarial vulnerability (Definition 1) ``E|L_T'(x+δ) − L_T'(x)|`` per task and for the joint loss of the
  attacked set, ``L_T' = Σ_{t∈T'} w_t L_t`` with equal weights ``1/|T'|`` unless given (Theorem 4's setting).
- Marginal vulnerability (Definition 3) ``Δ_N = E[δL(T_{N+1})] − E[δL(T_N)]`` for every pair of attacked sets
  where one is the other plus one task, with the Theorem-4 first-order bound
  ``ε((N+1)·w_{N+1}·E‖r_{N+1}‖_q + N·max_{i≤N} w_i·E‖r_i‖_q)``; ``r_i = ∇ₓL_i``, q the dual norm of the attack
  (L1 for L∞ attacks, L2 for L2), so ``ε·‖r‖_q`` is the first-order loss increase (Lemma 2).
- Input-gradient statistics between tasks (Theorem 2): per-sample norms, dot products, cosines and covariances
  (over input elements) of the per-task input gradients ``[T, B, ...]``, and Theorem 2's factor
  ``sqrt((1 + (2/M)·Σ_i Σ_{j<i} Cov(r_i, r_j)/Cov(r_i, r_i)) / M)`` from the mean covariances.
- Clean and adversarial task performance through the tasks' own metric helpers (mIoU, pixel accuracy, L1, MSE).
- The perturbation actually applied, per sample: ``‖δ‖_1``, ``‖δ‖_2``, ``‖δ‖_∞`` and the L2 signal-to-noise ratio
  ``20·log10(‖x‖_2/‖δ‖_2)`` dB (samples left unperturbed, ``δ = 0``, have an infinite SNR: they are left out of
  its mean and counted as ``unperturbed``).
- Input-gradient norms (L1, L2, L∞) per task and of each attacked set's joint loss, at the clean input and,
  optionally, at each attacked set's adversarial input.
"""
import math
from dataclasses import dataclass
from itertools import combinations
from typing import Dict, Optional

import torch

from mtrobust_fast import tasks as task_registry
from mtrobust_fast.analysis import statistics
from mtrobust_fast.task_names import set_label
from mtrobust_fast.tasks import opmath

DUAL_NORMS = {"linf": "l1", "l2": "l2"}


# ---- relative task vulnerability ----

def relative_change(clean_error, adv_error):
    """Per-sample ``(adv − clean) / clean`` [B]; NaN where the clean error is 0 (undefined)."""
    clean, adv = clean_error.double(), adv_error.double()
    defined = clean != 0
    ratio = (adv - clean) / torch.where(defined, clean, torch.ones_like(clean))
    return torch.where(defined, ratio, torch.full_like(ratio, math.nan))


def relative_vulnerability(clean_error, adv_error):
    """The paper's v_i: the mean per-sample relative change over samples with a non-zero clean error (NaN if none)."""
    change = relative_change(clean_error, adv_error)
    defined = ~change.isnan()
    return float(change[defined].mean()) if defined.any() else math.nan


def relative_vulnerability_of_means(clean_error, adv_error):
    """The source code's variant: ``(mean adv error − mean clean error) / mean clean error`` (NaN if the mean is 0)."""
    clean, adv = float(clean_error.double().mean()), float(adv_error.double().mean())
    return (adv - clean) / clean if clean != 0 else math.nan


# ---- adversarial and marginal vulnerability ----

def adversarial_vulnerability(clean_loss, adv_loss):
    """Per-sample loss increase ``|L(x+δ) − L(x)|`` [B] (its mean is Definition 1's vulnerability)."""
    return (adv_loss.double() - clean_loss.double()).abs()


def set_weights(attacked, weights=None):
    """Joint-loss weights of an attacked set: ``weights[t]`` for each task, or equal weights 1/|T'| when None."""
    if weights is None:
        return {name: 1.0 / len(attacked) for name in attacked}
    missing = [name for name in attacked if name not in weights]
    if missing:
        raise ValueError(f"weights has no entry for task(s) {missing}")
    return {name: float(weights[name]) for name in attacked}


def joint_loss(losses, attacked, weights=None):
    """Per-sample joint loss ``Σ_{t∈attacked} w_t·L_t`` [B] of per-task losses ``{name: [B]}`` (see set_weights)."""
    return sum(w * losses[name].double() for name, w in set_weights(attacked, weights).items())


def marginal_vulnerabilities(vulnerability):
    """Δ_N for every pair of attacked sets in ``vulnerability`` (``{tuple of task names: E[δL]}``) where one set is
    the other plus one task: a list of ``{"base", "added", "delta"}``, base as a tuple, in the mapping's order."""
    sets = {frozenset(key): key for key in vulnerability}
    pairs = []
    for key in vulnerability:
        for added in key:
            base = sets.get(frozenset(key) - {added})
            if base is not None:
                pairs.append({"base": base, "added": added, "delta": vulnerability[key] - vulnerability[base]})
    return pairs


# ---- input-gradient statistics ----

def dual_norm(norm):
    """The norm q of the gradient bounding an ε-ball attack in ``norm``: L1 for L∞ attacks, L2 for L2 attacks."""
    if norm not in DUAL_NORMS:
        raise ValueError(f"norm must be one of {sorted(DUAL_NORMS)}, got {norm!r}")
    return DUAL_NORMS[norm]


def _flat(grads):
    if grads.dim() < 3:
        raise ValueError(f"grads must be per-task input gradients [T, B, ...], got shape {tuple(grads.shape)}")
    return grads.detach().double().flatten(2)


def gradient_norms(grads):
    """Per-sample L1, L2 and L∞ norms of per-task input gradients ``[T, B, ...]``: ``{"l1"|"l2"|"linf": [T, B]}``."""
    flat = _flat(grads)
    return {"l1": flat.abs().sum(2), "l2": flat.norm(dim=2), "linf": flat.abs().amax(2)}


def perturbation_norms(x, adv):
    """Per-sample norms of ``δ = adv − x`` and the L2 SNR in dB: ``{"l1", "l2", "linf", "snr_db"}`` each ``[B]``
    (float64; SNR +inf where δ = 0, −inf where x = 0 and δ ≠ 0)."""
    if x.shape != adv.shape or x.dim() < 1:
        raise ValueError(f"x and adv must have the same shape [B, ...], got {tuple(x.shape)} and {tuple(adv.shape)}")
    clean = x.detach().double().flatten(1)
    delta = adv.detach().double().flatten(1) - clean
    l2 = delta.norm(dim=1)
    with torch.no_grad():
        snr = 20 * (torch.log10(clean.norm(dim=1)) - torch.log10(l2))
    return {"l1": delta.abs().sum(1), "l2": l2, "linf": delta.abs().amax(1), "snr_db": snr}


def joint_gradient(grads, tasks, attacked, weights=None):
    """The input gradient of an attacked set's joint loss, ``Σ_t w_t·∇L_t`` [B, ...], from per-task gradients
    ``[T, B, ...]`` ordered as ``tasks``."""
    return sum(w * grads[tasks.index(t)] for t, w in set_weights(attacked, weights).items())


def gradient_similarity(grads):
    """Per-sample pairwise statistics of per-task input gradients ``[T, B, ...]``, each ``[T, T, B]``: ``dot``
    (r_i·r_j), ``cosine`` (0 where a gradient is zero) and ``covariance`` (over the input elements, n−1 divisor,
    as numpy.cov of the two flattened gradients)."""
    flat = _flat(grads)
    dot = torch.einsum("tbn,sbn->tsb", flat, flat)
    norms = dot.diagonal(dim1=0, dim2=1).permute(1, 0).sqrt()  # [T, B]
    denominator = norms[:, None] * norms[None, :]
    cosine = torch.where(denominator > 0, dot / denominator.clamp_min(1e-300), torch.zeros_like(dot))
    centred = flat - flat.mean(2, keepdim=True)
    covariance = torch.einsum("tbn,sbn->tsb", centred, centred) / max(flat.shape[2] - 1, 1)
    return {"dot": dot, "cosine": cosine, "covariance": covariance}


def theorem2_factor(covariance):
    """Theorem 2's ``sqrt((1 + (2/M)·Σ_i Σ_{j<i} Cov(r_i, r_j)/Cov(r_i, r_i)) / M)`` from a ``[M, M]`` covariance
    matrix (NaN if a variance is 0 or the radicand is negative)."""
    cov = torch.as_tensor(covariance, dtype=torch.float64)
    m = cov.shape[0]
    if cov.shape != (m, m) or m == 0:
        raise ValueError(f"covariance must be a non-empty square matrix, got shape {tuple(cov.shape)}")
    variances = cov.diagonal()
    if (variances == 0).any():
        return math.nan
    ratios = sum(float(cov[i, j] / variances[i]) for i in range(m) for j in range(i))
    radicand = (1 + 2 / m * ratios) / m
    return math.sqrt(radicand) if radicand >= 0 else math.nan


def theorem4_bound(mean_grad_norms, base, added, eps, weights=None):
    """Theorem 4's first-order bound on Δ_N when ``added`` joins the attacked set ``base`` (N tasks):
    ``ε·((N+1)·w_{N+1}·E‖r_{N+1}‖ + N·max_{i∈base} w_i·E‖r_i‖)``.

    ``mean_grad_norms``: ``{task: E‖r_i‖_q}``. ``weights``: ``{task: w}``; None means equal weights (1/(N+1) in
    the grown set, 1/N in the base), which gives the paper's ``ε·(E‖r_{N+1}‖ + max_i E‖r_i‖)``.
    """
    base = list(base)
    if not base:
        raise ValueError("base must hold at least one task")
    if added in base:
        raise ValueError(f"added task {added!r} is already in base {base}")
    n = len(base)
    w_added = 1.0 / (n + 1) if weights is None else float(weights[added])
    w_base = {t: 1.0 / n for t in base} if weights is None else {t: float(weights[t]) for t in base}
    worst = max(w_base[t] * mean_grad_norms[t] for t in base)
    return eps * ((n + 1) * w_added * mean_grad_norms[added] + n * worst)


def input_gradients(model, x, targets, masks, tasks):
    """Per-task input gradients ``[T, B, *x.shape[1:]]`` of the per-sample losses at ``x`` (model in eval mode;
    one forward, one backward per task, no parameter gradient). Row b of task t is ∇ₓL_t(x_b): samples do not
    interact in eval mode, so the gradient of the batch sum gives every sample's own gradient. ``tasks``: task
    records or registry names."""
    xg = x.detach().requires_grad_(True)
    outputs = model(xg)
    grads = []
    for i, task in enumerate(map(task_registry.record, tasks)):
        loss = task.loss(opmath(outputs[task.name]), targets[task.name], masks.get(task.name)).sum()
        (grad,) = torch.autograd.grad(loss, xg, retain_graph=i + 1 < len(tasks))
        grads.append(grad)
    return torch.stack(grads)


# ---- per-batch evaluation and the meter ----

@dataclass
class Evaluation:
    """One batch at one input (clean or adversarial): per-sample ``losses`` and ``errors`` ``{task: [B]}``, and
    optionally the tasks' summable metric statistics ``{task: tensor}`` (``Task.metric_stats``) and each
    sample's own ``sample_stats`` ``{task: [B, K]}`` (for bootstrap intervals of the metrics)."""

    losses: Dict[str, torch.Tensor]
    errors: Dict[str, torch.Tensor]
    stats: Optional[Dict[str, torch.Tensor]] = None
    sample_stats: Optional[Dict[str, torch.Tensor]] = None


# Each sample's metric statistics are kept when they are at most this many numbers (a segmentation confusion
# matrix, counts); larger ones (the multi-label heads' score histograms) get no interval for their metrics.
MAX_SAMPLE_STATS = 4096


def _per_sample_stats(task, output, target, mask, summed):
    if summed.numel() > MAX_SAMPLE_STATS:
        return None
    return torch.stack([task.metric_stats(output[i:i + 1], target[i:i + 1], None if mask is None else mask[i:i + 1])
                        .reshape(-1) for i in range(output.shape[0])])


@torch.no_grad()
def evaluate(outputs, targets, masks, tasks):
    """The :class:`Evaluation` of model outputs ``{task name: output}`` for ``tasks`` (records or registry names)."""
    losses, errors, stats, sample_stats = {}, {}, {}, {}
    for task in map(task_registry.record, tasks):
        name = task.name
        output, target, mask = opmath(outputs[name]), targets[name], masks.get(name)
        losses[name] = task.loss(output, target, mask)
        errors[name] = task.error(output, target, mask)
        stats[name] = task.metric_stats(output, target, mask)
        per = _per_sample_stats(task, output, target, mask, stats[name])
        if per is not None:
            sample_stats[name] = per
    return Evaluation(losses, errors, stats, sample_stats)


def _cat(chunks):
    return torch.cat([c.detach().double().cpu() for c in chunks])


class VulnerabilityMeter:
    """Collects per-sample clean and adversarial losses/errors (and optionally clean input gradients) batch by
    batch, and computes every metric of this module at the end.

    ``tasks``: the evaluated tasks (task records, or registry names). ``eps``/``norm``: the attack budget,
    used by the first-order terms. ``weights``: joint-loss weights ``{task: w}``; None = equal weights per
    attacked set. Every :meth:`update` must give the same attacked sets, so samples stay aligned.
    """

    def __init__(self, tasks, eps, norm="linf", weights=None):
        self.records = {task.name: task for task in map(task_registry.record, tasks)}
        self.tasks = list(self.records)
        if not self.tasks:
            raise ValueError("tasks is empty")
        self.eps = float(eps)
        self.q = dual_norm(norm)
        self.weights = None if weights is None else set_weights(self.tasks, weights)
        self._clean = {"losses": {t: [] for t in self.tasks}, "errors": {t: [] for t in self.tasks}}
        self._adv = {}
        self._stats = {}
        self._sample_stats = {}  # (where, task name) -> [[B, K], ...]: each sample's metric statistics
        self._grads = {"cosine": [], "covariance": [], "dot": []}
        self._grad_norms = {}  # (where, task name or ("joint", attacked set)) -> {"l1"|"l2"|"linf": [[B], ...]}
        self._perturbation = {}  # attacked set -> {"l1"|"l2"|"linf"|"snr_db": [[B], ...]}
        self._sets = None
        self.samples = 0

    def _attacked(self, key):
        names = [key] if isinstance(key, str) and key in self.tasks else list(key)
        unknown = [n for n in names if n not in self.tasks]
        if unknown or not names:
            raise ValueError(f"attacked set {key!r} must be non-empty task names from {self.tasks}")
        return tuple(n for n in self.tasks if n in names)

    def _add_stats(self, where, evaluation):
        for name, value in (evaluation.stats or {}).items():
            key = (where, name)
            self._stats[key] = value.detach() if key not in self._stats else self._stats[key] + value.detach()
        for name, value in (evaluation.sample_stats or {}).items():
            self._sample_stats.setdefault((where, name), []).append(value.detach().double().cpu())

    def update(self, clean, adversarial, grads=None, perturbations=None, adv_grads=None):
        """Add one batch: ``clean`` (an :class:`Evaluation`), ``adversarial`` ``{attacked set: Evaluation}`` (a set
        is a tuple of task names) and, optionally, the clean per-task input gradients ``[T, B, ...]`` in the order
        of ``tasks``, the perturbations ``{attacked set: (x, adv)}`` and the per-task input gradients at each
        set's adversarial input ``{attacked set: [T, B, ...]}``. Each optional part must come with every batch
        or none. Everything is checked before anything is stored."""
        sets = {self._attacked(key): value for key, value in adversarial.items()}
        if not sets:
            raise ValueError("adversarial is empty: give at least one attacked set")
        if self._sets is not None and set(sets) != set(self._sets):
            raise ValueError(f"every batch must give the same attacked sets: {self._sets}, got {list(sets)}")
        evaluations = [("clean", clean)] + list(sets.items())
        batch = self._check_batch(evaluations)
        if self.samples and (grads is None) != (not self._grads["dot"]):
            raise ValueError("grads must be given for every batch or for none")
        if grads is not None and tuple(grads.shape[:2]) != (len(self.tasks), batch):
            raise ValueError(f"grads must be [T={len(self.tasks)}, B={batch}, ...], got {tuple(grads.shape)}")
        perturbations = None if perturbations is None else {self._attacked(k): v for k, v in perturbations.items()}
        adv_grads = None if adv_grads is None else {self._attacked(k): v for k, v in adv_grads.items()}
        for name, given, seen in (("perturbations", perturbations, self._perturbation),
                                  ("adv_grads", adv_grads, any(w != "clean" for w, _ in self._grad_norms))):
            if self.samples and (given is None) != (not seen):
                raise ValueError(f"{name} must be given for every batch or for none")
            if given is not None and set(given) != set(sets):
                raise ValueError(f"{name} must have one entry per attacked set {list(sets)}, got {list(given)}")
        for attacked, value in (adv_grads or {}).items():
            if tuple(value.shape[:2]) != (len(self.tasks), batch):
                raise ValueError(f"adv_grads[{attacked}] must be [T={len(self.tasks)}, B={batch}, ...], got "
                                 f"{tuple(value.shape)}")
        if self._sets is None:
            self._sets = list(sets)
            self._adv = {s: {"losses": {t: [] for t in self.tasks}, "errors": {t: [] for t in self.tasks}}
                         for s in self._sets}
        for where, evaluation in evaluations:
            store = self._clean if where == "clean" else self._adv[where]
            for kind in ("losses", "errors"):
                for name in self.tasks:
                    store[kind][name].append(getattr(evaluation, kind)[name].detach())
            self._add_stats(where, evaluation)
        if grads is not None:
            self._update_gradients(grads)
        for attacked, value in (adv_grads or {}).items():
            self._add_gradient_norms(attacked, value, [attacked])
        for attacked, (x, adv) in (perturbations or {}).items():
            for key, value in perturbation_norms(x, adv).items():
                self._perturbation.setdefault(attacked, {}).setdefault(key, []).append(value.cpu())
        self.samples += batch

    def _check_batch(self, evaluations):
        """The batch size shared by every per-sample value of the batch."""
        sizes = set()
        for _, evaluation in evaluations:
            for kind in ("losses", "errors"):
                for name in self.tasks:
                    value = getattr(evaluation, kind).get(name)
                    if value is None or value.dim() != 1:
                        raise ValueError(f"{kind}[{name!r}] must be a [B] tensor in every evaluation of the batch")
                    sizes.add(value.shape[0])
        if len(sizes) != 1:
            raise ValueError(f"the evaluations of one batch have different batch sizes {sorted(sizes)}")
        return sizes.pop()

    def _update_gradients(self, grads):
        flat = _flat(grads)  # one float64 copy, shared by the statistics below (a no-op for them)
        for key, value in gradient_similarity(flat).items():
            self._grads[key].append(value)
        self._add_gradient_norms("clean", flat, self._sets)

    def _add_gradient_norms(self, where, grads, joint_sets):
        flat = _flat(grads)
        items = [(name, flat[i]) for i, name in enumerate(self.tasks)]
        items += [(("joint", attacked), joint_gradient(flat, self.tasks, attacked, self.weights))
                  for attacked in joint_sets]
        for key, value in items:
            store = self._grad_norms.setdefault((where, key), {})
            for norm, per_sample in gradient_norms(value[None]).items():
                store.setdefault(norm, []).append(per_sample[0].cpu())

    def _mean_norms(self, where, key):
        return {norm: float(torch.cat(values).mean()) for norm, values in self._grad_norms[(where, key)].items()}

    def _perturbation_summary(self, attacked):
        values = {key: torch.cat(chunks) for key, chunks in self._perturbation[attacked].items()}
        snr = values["snr_db"]
        finite = snr[torch.isfinite(snr)]
        return {"l1": float(values["l1"].mean()), "l2": float(values["l2"].mean()),
                "linf": float(values["linf"].mean()), "linf_max": float(values["linf"].max()),
                "snr_db": float(finite.mean()) if finite.numel() else math.nan,
                "unperturbed": int((values["l2"] == 0).sum())}

    def _scores(self, where, name, intervals=False, confidence=0.95, seed=0):
        """The task's metrics at ``where``; with ``intervals``, each with its bootstrap interval over samples
        ``<metric>_ci`` when every batch kept its samples' statistics."""
        stats = self._stats.get((where, name))
        if stats is None:
            return {}
        record = self.records[name]
        scores = record.metric_scores(stats.cpu())
        chunks = self._sample_stats.get((where, name), [])
        if intervals and sum(len(c) for c in chunks) == self.samples:
            shape = stats.shape
            bounds = statistics.statistic_interval(
                torch.cat(chunks).numpy(), lambda summed: record.metric_scores(torch.from_numpy(summed).view(shape)),
                confidence, seed=seed)
            scores.update({f"{metric}_ci": list(bounds[metric]) for metric in list(scores) if metric in bounds})
        return scores

    def compute(self, intervals=False, per_sample=False, confidence=0.95, seed=0):
        """The summary: a JSON-ready dict (see the module docstring for the definitions).

        ``intervals``: add a ``<metric>_ci`` ``[low, high]`` percentile-bootstrap interval over samples (at
        ``confidence``) next to every per-sample mean: clean loss and error, adversarial loss and error,
        relative and adversarial vulnerability. ``per_sample``: add ``per_sample`` ``{"clean": {task: {"error",
        "loss"}}, "attacks": {set label: {task: {"error", "loss"}}}}`` lists in sample order, for paired
        comparisons between models or attacks on the same samples."""
        if self._sets is None:
            raise RuntimeError("VulnerabilityMeter has seen no batch")
        clean = {kind: {t: _cat(v) for t, v in per.items()} for kind, per in self._clean.items()}

        def ci(values):
            if not intervals:
                return {}
            _, low, high = statistics.mean_interval(values.cpu().numpy(), confidence, seed=seed)
            return {"ci": [low, high]}

        def with_ci(name, values):
            return {name: float(values.mean()), **{f"{name}_{k}": v for k, v in ci(values).items()}}

        summary = {
            "tasks": list(self.tasks), "samples": self.samples, "eps": self.eps, "dual_norm": self.q,
            "clean": {t: {**with_ci("loss", clean["losses"][t]), **with_ci("error", clean["errors"][t]),
                          **self._scores("clean", t, intervals, confidence, seed)} for t in self.tasks},
            "attacks": {},
        }
        if per_sample:
            summary["per_sample"] = {"clean": {t: {"error": clean["errors"][t].tolist(),
                                                   "loss": clean["losses"][t].tolist()} for t in self.tasks},
                                     "attacks": {}}
        joint_vulnerability = {}
        for attacked in self._sets:
            adv = {kind: {t: _cat(v) for t, v in per.items()} for kind, per in self._adv[attacked].items()}
            per_task = {}
            for t in self.tasks:
                change = relative_change(clean["errors"][t], adv["errors"][t])
                per_task[t] = {
                    **with_ci("adv_loss", adv["losses"][t]),
                    **with_ci("adv_error", adv["errors"][t]),
                    "rel_vuln": relative_vulnerability(clean["errors"][t], adv["errors"][t]),
                    **{f"rel_vuln_{k}": v for k, v in ci(change).items()},
                    "rel_vuln_undefined": int(change.isnan().sum()),
                    "rel_vuln_ratio_of_means": relative_vulnerability_of_means(clean["errors"][t], adv["errors"][t]),
                    **with_ci("adv_vuln", adversarial_vulnerability(clean["losses"][t], adv["losses"][t])),
                    **{f"adv_{k}": v for k, v in self._scores(attacked, t, intervals, confidence, seed).items()},
                }
            joint = adversarial_vulnerability(joint_loss(clean["losses"], attacked, self.weights),
                                              joint_loss(adv["losses"], attacked, self.weights))
            entry = {"attacked": list(attacked), **with_ci("joint_adv_vuln", joint), "tasks": per_task}
            joint_vulnerability[attacked] = entry["joint_adv_vuln"]
            if self._grads["dot"]:
                entry["clean_joint_grad_norms"] = self._mean_norms("clean", ("joint", attacked))
                entry["first_order_joint"] = self.eps * entry["clean_joint_grad_norms"][self.q]
            if (attacked, ("joint", attacked)) in self._grad_norms:
                entry["adv_grad_norms"] = {t: self._mean_norms(attacked, t) for t in self.tasks}
                entry["adv_joint_grad_norms"] = self._mean_norms(attacked, ("joint", attacked))
            if attacked in self._perturbation:
                entry["perturbation"] = self._perturbation_summary(attacked)
            summary["attacks"][set_label(attacked)] = entry
            if per_sample:
                summary["per_sample"]["attacks"][set_label(attacked)] = {
                    t: {"error": adv["errors"][t].tolist(), "loss": adv["losses"][t].tolist()} for t in self.tasks}
        summary["marginal"] = [{"base": list(p["base"]), "added": p["added"], "delta": p["delta"]}
                               for p in marginal_vulnerabilities(joint_vulnerability)]
        if self._grads["dot"]:
            summary["gradients"] = self._gradient_summary(summary["marginal"])
        return summary

    def _gradient_summary(self, marginal):
        norms = {t: self._mean_norms("clean", t) for t in self.tasks}
        mean_norms = {t: v[self.q] for t, v in norms.items()}
        pairs = {key: torch.cat([v.cpu() for v in self._grads[key]], dim=2).mean(2)
                 for key in ("dot", "cosine", "covariance")}
        by_pair = {key: {f"{set_label([a])}|{set_label([b])}": float(value[i, j])
                         for (i, a), (j, b) in combinations(enumerate(self.tasks), 2)}
                   for key, value in pairs.items()}
        for item in marginal:
            item["theorem4_bound"] = theorem4_bound(mean_norms, item["base"], item["added"], self.eps, self.weights)
        return {
            f"mean_norm_{self.q}": mean_norms,
            "norms": norms,
            "first_order": {t: self.eps * v for t, v in mean_norms.items()},
            "variance": {t: float(pairs["covariance"][i, i]) for i, t in enumerate(self.tasks)},
            **by_pair,
            "theorem2_factor": theorem2_factor(pairs["covariance"]),
        }


def _bounds(values):
    """``{"x_ci": [low, high]}`` entries as ``x_low`` and ``x_high`` columns; other entries unchanged."""
    out = {}
    for key, value in values.items():
        if key.endswith("_ci"):
            out[f"{key[:-3]}_low"], out[f"{key[:-3]}_high"] = value
        else:
            out[key] = value
    return out


# What the attack spent, on every row (all attacked sets of a run share one batch, so one cost): passes through
# the model per attacked row, steps saved by early exit, rows that left early, seconds.
COST_COLUMNS = ("forward_per_row", "backward_per_row", "steps_saved", "rows_exited", "seconds")


def summary_rows(summary):
    """A tidy table of a :meth:`VulnerabilityMeter.compute` summary: one dict per (attacked set, evaluated task);
    an interval ``x_ci`` becomes the columns ``x_low`` and ``x_high``; what the attack spent becomes the
    ``cost_*`` columns."""
    table = []
    for label, entry in summary["attacks"].items():
        for t, values in entry["tasks"].items():
            clean = _bounds(summary["clean"][t])
            row = {"attacked": label, "task": t, "samples": summary["samples"],
                   "clean_loss": clean["loss"], "clean_error": clean["error"], **_bounds(values),
                   **_bounds({k: v for k, v in entry.items() if k.startswith("joint_adv_vuln")})}
            row.update({f"clean_{k}": v for k, v in clean.items() if k not in ("loss", "error")})
            if "gradients" in summary:
                row["first_order"] = summary["gradients"]["first_order"][t]
                row["first_order_joint"] = entry["first_order_joint"]
                row.update({f"clean_grad_{n}": v for n, v in summary["gradients"]["norms"][t].items()})
                row.update({f"clean_joint_grad_{n}": v for n, v in entry["clean_joint_grad_norms"].items()})
            if "adv_grad_norms" in entry:
                row.update({f"adv_grad_{n}": v for n, v in entry["adv_grad_norms"][t].items()})
                row.update({f"adv_joint_grad_{n}": v for n, v in entry["adv_joint_grad_norms"].items()})
            if "perturbation" in entry:
                row.update({f"pert_{n}": v for n, v in entry["perturbation"].items()})
            row.update({f"cost_{n}": summary["cost"][n] for n in COST_COLUMNS if "cost" in summary})
            if "collapsed" in summary:
                row["collapsed"] = summary["collapsed"].get(t, "")
            table.append(row)
    return table
