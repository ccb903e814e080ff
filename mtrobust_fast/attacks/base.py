"""The common machinery of the iterative attacks: configuration checks, the per-row objective,
input gradients, random starts, restarts and batched attacked-task subsets.

Rows: an attack works on R rows, each an image with its own attacked-task weights (a row of ``W``, [R, T]),
budget (eps, alpha) and sample id. A plain call has one row per image; :meth:`Attack.run_subsets` repeats the
images once per attacked set, so every attacked set advances in the same forward/backward pass. Subclasses
implement :meth:`Attack._optimize` (one restart from a start point); every update goes through the fused
``attack_step`` operator. Nothing in a step loop reads a value back to the host, except early exit's per-row
fingerprints (:mod:`mtrobust_fast.attacks.early_exit`).
"""
import abc
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import combinations

import numpy as np
import torch

from mtrobust_fast import budgets, ops, task_names
from mtrobust_fast.attacks import dense
from mtrobust_fast.attacks.cost import Cost
from mtrobust_fast.attacks.specs import resolve_specs
from mtrobust_fast.models import folding
from mtrobust_fast.models.multitask import MultiTaskModel
from mtrobust_fast.registry import Registry, Setting, boolean, integer, number, text
from mtrobust_fast.tasks import opmath

ATTACKS = Registry("attack")  # every attack registers itself here (``@ATTACKS.register("pgd")``)

# The optional settings most attacks share; an attack lists the ones it takes in its ``settings``.
ALPHA = Setting("alpha", number, None, low=0, sweep="grid",
                help="step size in [0,1] pixels, e.g. 2/255 (default: the attack's own, 2.5*eps/steps for PGD)")
STEPS = Setting("steps", integer, None, low=1, sweep="grid", help="iterations (default: the attack's own, 25 for PGD)")
EARLY_EXIT = Setting("early_exit", boolean, True, sweep="value", cell_id=False,
                     help="stop a row once its iterate repeats an earlier one, with exactly the full run's result "
                          "(L-inf, eval mode, a deterministic model; see mtrobust_fast.attacks.early_exit)")
DENSE_LOSS = Setting("dense_loss", text, None, choices=dense.LOSSES, sweep="grid",
                     help="objective for segmentation and regression heads: task (their training loss), segpgd, "
                          "cospgd, masked_ce, balanced_masked_ce, js (default: the attack's own: segpgd for segpgd, "
                          "cospgd for cospgd, task otherwise)")

_NOISE_KINDS = {"rand": 0, "randn": 1}


def _check_budget(name, value):
    """A float, or one value per sample (a 1-D tensor or sequence), every value finite and >= 0."""
    if isinstance(value, (list, tuple, torch.Tensor)):
        values = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
        if values.dim() != 1 or values.numel() == 0:
            raise ValueError(f"{name} must be a number or one value per sample (1-D), got shape {tuple(values.shape)}")
        if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
            raise ValueError(f"{name} must be finite and >= 0 for every sample")
        return values
    if isinstance(value, str) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a finite number >= 0 (or one per sample), got {value!r}")
    return budgets.budget(value, name)


def _row_budget(name, value, block, repeats, x0):
    """The per-row tensor of a budget for `repeats` blocks of `block` samples, in the fused op's form."""
    if not isinstance(value, float):
        if value.numel() != block:
            raise ValueError(f"{name} has {value.numel()} values but the batch has {block} samples")
        value = value.to(device=x0.device).repeat(repeats)
    return ops.row_values(name, value, x0)


def _check_count(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _loss(spec, output, target, mask):
    """``spec``'s loss; an error torch raises inside it (labels out of range, float labels where class indices go,
    a mask of another size) becomes one ValueError naming the task and what it was given."""
    try:
        return spec.loss(output, target, mask)
    except (RuntimeError, IndexError, TypeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"task {spec.name!r}: its loss cannot use the targets given (outputs "
                         f"{list(output.shape)}, targets {list(target.shape)} {target.dtype}"
                         f"{'' if mask is None else f', mask {list(mask.shape)}'}): {first}") from error


def _per_sample(name, loss, rows):
    """``loss`` if it holds one value per row ([rows]); a loss of another shape (e.g. [B, 1], which would broadcast
    in the weighted sum) is an error naming its task."""
    if loss.shape != (rows,):
        raise ValueError(f"task {name!r}: its loss must return one value per sample, shape [{rows}], got "
                         f"{list(loss.shape)}")
    return loss


def _rows(t, repeats):
    """t [B, ...] repeated `repeats` times along the batch: row s·B + b is t[b]."""
    return t.repeat(repeats, *([1] * (t.dim() - 1)))


@dataclass
class Rows:
    """The rows one attack call works on: clean inputs, per-task targets and masks, the tasks attacked in any
    row (``active``) with per-row weights ``[R, len(active)]``, per-row budgets and sample ids.
    ``task_rows[name]``: indices of the rows that attack that task (None: every row)."""

    x0: torch.Tensor
    targets: dict
    masks: dict
    active: list
    weights: torch.Tensor
    eps: torch.Tensor
    alpha: torch.Tensor
    ids: torch.Tensor
    task_rows: dict

    def select(self, index):
        """The rows ``index`` (a device tensor of row positions) as a :class:`Rows` of their own."""
        total = self.x0.shape[0]
        task_rows = {}
        for name, chosen in self.task_rows.items():
            if chosen is None:
                task_rows[name] = None
                continue
            member = torch.zeros(total, dtype=torch.bool, device=index.device)
            member[chosen] = True
            task_rows[name] = member[index].nonzero().flatten()
        return Rows(self.x0[index], {k: v[index] for k, v in self.targets.items()},
                    {k: v[index] for k, v in self.masks.items()}, self.active, self.weights[index], self.eps[index],
                    self.alpha[index], self.ids[index.cpu()], task_rows)


MODEL_MODES = ("eval", "train")


def unwrap(model):
    """The module itself when ``model`` is a DistributedDataParallel/DataParallel wrapper: an attack's
    input-gradient passes must not trigger the wrapper's gradient all-reduce or its buffer broadcast."""
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model


class Attack(abc.ABC):
    """Base of the attacks. See :class:`mtrobust_fast.attacks.PGD` for the arguments.

    ``settings``: the declarations (:class:`~mtrobust_fast.registry.Setting`) of the optional settings a
    front-end (CLI, sweep, training objective) may pass to this attack besides the common ones (eps, norm,
    restarts, seed, ...); ``refused`` says why some others are refused. ``classifier_only``: the attack needs one
    classification head (so it cannot run on dense multi-task models). ``summary_key``: where
    :meth:`summary` (what a cascade's or an ensemble's members achieved) goes in an evaluation's summary.
    """

    default_random_start = True
    classifier_only = False
    # Whether the next iterate is a function of the current one alone (fixed step, no step-dependent weights), so
    # that an iterate repeating an earlier one can end its row exactly (``early_exit``).
    cycles_exactly = False
    stop_on_success = False  # PGD sets it from its declared setting (success stops, classification heads)
    settings = (ALPHA, STEPS, DENSE_LOSS)
    refused = {"normalize_task_grads": "only wgd normalises task gradients"}
    summary_key = None

    @classmethod
    def takes(cls, setting):
        """Whether this attack declares the optional setting named ``setting``."""
        return any(s.name == setting for s in cls.settings)

    @classmethod
    def option_settings(cls):
        """The declared settings besides alpha and steps (which every report shows as columns of their own)."""
        return tuple(s for s in cls.settings if s not in (ALPHA, STEPS))

    def summary(self):
        """What the members of a composite attack achieved (None for a single attack)."""
        return None

    @staticmethod
    def default_alpha(eps, steps):
        """The step size when none is given: 2.5·eps/steps (Madry et al. 2018), for either norm, so the walk can
        cross the ball and come back whatever the budget; per-sample budgets give per-sample steps."""
        return eps * (2.5 / steps)

    @classmethod
    def describe_steps(cls, alpha, eps, steps):
        """How a run of this attack steps, for reports: its step size (``alpha``, or the default for ``eps`` and
        ``steps`` when None; "adaptive" for attacks that choose their own) and its number of steps."""
        if not cls.takes("alpha"):
            return f"alpha=adaptive steps={steps}"
        alpha = f"{alpha:.5g}" if alpha is not None else f"{cls.default_alpha(eps, steps or 1):.5g} (default)"
        return f"alpha={alpha} steps={steps}"

    def __init__(self, model, tasks=None, *, eps=8 / 255, alpha=None, steps=25, norm="linf",
                 random_start=None, restarts=1, target_tasks=None, seed=0, deterministic=False, autocast=None,
                 channels_last=False, lo=0.0, hi=1.0, record_steps=False, model_mode="eval", dense_loss="task",
                 early_exit=True, fold_batchnorm=False):
        model = unwrap(model)
        self.model = model
        self.specs = resolve_specs(model, tasks)
        self.eps = _check_budget("eps", eps)
        self.steps = _check_count("steps", steps)
        self.alpha = _check_budget("alpha", self.default_alpha(self.eps, self.steps) if alpha is None else alpha)
        self.restarts = _check_count("restarts", restarts)
        self.norm = ops.check_norm(norm)
        self.random_start = self.default_random_start if random_start is None else bool(random_start)
        self.target_tasks = self.task_names(target_tasks) if target_tasks is not None else [s.name for s in self.specs]
        self.seed = budgets.seed(seed)
        self.deterministic = bool(deterministic)
        if autocast not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}")
        self.autocast = autocast
        self.channels_last = bool(channels_last)
        self.lo, self.hi = ops.check_bounds(lo, hi)
        largest = float(self.eps if isinstance(self.eps, float) else self.eps.max())
        if self.norm == "linf" and largest > self.hi - self.lo:
            raise ValueError(f"eps: {largest:g} is wider than the input box [{self.lo:g}, {self.hi:g}] itself, so it "
                             f"constrains nothing (images in [0, 1] take budgets like 8/255)")
        self.record_steps = bool(record_steps)
        if model_mode not in MODEL_MODES:
            raise ValueError(f"model_mode must be one of {MODEL_MODES}, got {model_mode!r}")
        self.model_mode = model_mode
        if dense_loss not in dense.LOSSES:
            raise ValueError(f"dense_loss must be one of {dense.LOSSES}, got {dense_loss!r}")
        self.dense_loss = dense_loss
        self.early_exit = bool(early_exit)
        self.fold_batchnorm = bool(fold_batchnorm)
        self._fingerprint = None  # set by early_exit.iterate for the step it runs
        self._stopped = None  # set by a step: its rows that stop on success (early_exit.iterate reads it)
        self._keep_step_errors = False  # loss evaluations also keep the heads' errors (success stops read them)
        self._step_errors = None  # [R, T] those errors, of the last loss evaluation
        self._deterministic_model = None  # whether this call's rows passed _check_determinism
        self.cost = Cost()  # what every call so far spent
        self._evaluations = 0  # gradient evaluations of the current restart: the dense losses' progress
        self.step_losses = None
        self.on_gradient = None  # optional callable(rows), told of every gradient evaluation and its rows (progress)
        self.on_stage = None  # optional callable(description, total rows): a composite attack announces each member
        self._generator = None

    # ---- public API ----

    def task_names(self, keys):
        """Names of the attack's tasks given as names or registry letters (:func:`~mtrobust_fast.task_names.
        model_tasks`), in the order given; errors name an unknown task."""
        known = [s.name for s in self.specs]
        if isinstance(keys, str):
            keys = [keys] if keys in known else list(keys)
        names = []
        for key in keys:
            try:
                names += [n for n in task_names.model_tasks(key, known) if n not in names]
            except ValueError:
                raise ValueError(f"unknown task {key!r}: this attack's tasks are {known}") from None
        if not names:
            raise ValueError("the attacked task set is empty")
        return names

    def __call__(self, x, targets, masks=None, sample_ids=None):
        """Adversarial examples for the attack's ``target_tasks``: a tensor like ``x``."""
        x, targets, masks, ids = self._check_batch(x, targets, masks, sample_ids)
        return self._attack(x, targets, masks, [self.target_tasks], ids)

    def run_subsets(self, x, targets, masks=None, subsets=None, sample_ids=None):
        """Attack the same images once per attacked set, all sets in one batch of rows.

        ``subsets``: list of attacked sets (each a list of task names/letters, or a letter string); default
        every non-empty subset of ``target_tasks``. Returns ``[len(subsets), *x.shape]``; entry s equals
        ``self(x, ...)`` with ``target_tasks=subsets[s]`` (same seed and sample ids).
        """
        x, targets, masks, ids = self._check_batch(x, targets, masks, sample_ids)
        named = self._subset_names(subsets)
        repeats = len(named)
        adv = self._attack(_rows(x, repeats), {k: _rows(v, repeats) for k, v in targets.items()},
                           {k: _rows(v, repeats) for k, v in masks.items()}, named, ids.repeat(repeats))
        return adv.reshape(repeats, *x.shape)

    def _subset_names(self, subsets):
        """Attacked sets as lists of task names; None means every non-empty subset of ``target_tasks``."""
        if isinstance(subsets, str):
            raise ValueError(f"subsets must be a list of attacked sets, e.g. [{subsets!r}] for one set or "
                             f"{list(subsets)!r} for one set per task; got the string {subsets!r}")
        if subsets is None:
            subsets = [list(c) for k in range(1, len(self.target_tasks) + 1)
                       for c in combinations(self.target_tasks, k)]
        named = [self.task_names(s) for s in subsets]
        if not named:
            raise ValueError("subsets is empty")
        return named

    @torch.no_grad()
    def outputs(self, x):
        """The model's outputs at ``x`` in the attack's ``model_mode`` (no gradient)."""
        with self._model_mode():
            return self.model(self._prepare(x))

    def losses(self, x, targets, masks=None):
        """Per-sample losses of every task of the attack at ``x``: ``{name: [B]}`` (no gradient)."""
        x, targets, masks, _ = self._check_batch(x, targets, masks, None)
        with torch.no_grad(), self._model_mode():
            per_task = self._task_losses(self._prepare(x), targets, masks, [s.name for s in self.specs])
        return {s.name: per_task[:, i] for i, s in enumerate(self.specs)}

    # ---- for subclasses ----

    @abc.abstractmethod
    def _optimize(self, x, rows):
        """One restart from start point ``x`` (modified in place or replaced); returns the final points."""

    def _task_losses(self, x, targets, masks, names, task_rows=None):
        """[R, len(names)] per-sample losses at x (graph kept when x requires grad); see
        :meth:`_task_loss_columns`."""
        return torch.stack(self._task_loss_columns(x, targets, masks, names, task_rows), dim=1)

    def _task_loss_columns(self, x, targets, masks, names, task_rows=None):
        """The per-sample losses [R] of each task of ``names``, as separate tensors: the gradient of one column
        back-propagates through the encoder and that task's head only (a column of a stacked tensor would also
        send zeros back through every other head).

        With ``task_rows`` (task name -> row indices or None for all rows) and a :class:`MultiTaskModel`, the
        shared encoder runs once and each task head only on the rows that attack that task; the other
        entries are 0. Heads no row attacks are neither run forward nor back-propagated, so a single-task
        attack costs encoder + one head, and ``run_subsets`` does no more head work than separate runs."""
        by_name = {s.name: s for s in self._step_specs()}
        keep = self._keep_step_errors
        errors = []
        with torch.autocast(x.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            if task_rows is None or not self._splits_heads(names):
                outputs = self.model(x)
                columns = []
                for n in names:
                    output = opmath(by_name[n].output(outputs))
                    columns.append(_per_sample(n, _loss(by_name[n], output, targets[n], masks.get(n)), x.shape[0]))
                    if keep:
                        errors.append(self._error(by_name[n], output, targets[n], masks.get(n)))
                if keep:
                    self._step_errors = torch.stack(errors, dim=1)
                return columns
            representation = self.model.encode(x)
            columns = []
            for n in names:
                index = task_rows.get(n)
                if index is not None and index.numel() == 0:  # no row of this batch attacks the task (rows left)
                    columns.append(torch.zeros(x.shape[0], dtype=opmath(x).dtype, device=x.device))
                    errors.append(columns[-1].detach())
                    continue
                mask, target = masks.get(n), targets[n]
                if index is not None:
                    mask, target = None if mask is None else mask[index], target[index]
                output = opmath(self.model.decoders[n](representation if index is None else representation[index]))
                loss = _per_sample(n, _loss(by_name[n], output, target, mask), target.shape[0])
                error = self._error(by_name[n], output, target, mask) if keep else None
                if index is not None:
                    loss = loss.new_zeros(x.shape[0]).index_copy(0, index, loss)
                    error = None if error is None else error.new_zeros(x.shape[0]).index_copy(0, index, error)
                columns.append(loss)
                errors.append(error)
            if keep:
                self._step_errors = torch.stack(errors, dim=1)
            return columns

    @staticmethod
    def _error(spec, output, target, mask):
        with torch.no_grad():
            return spec.error(output.detach(), target, mask).to(output.dtype)

    def _succeeded(self, x, rows, errors=None):
        """[R] whether every task a row attacks is wrong at ``x`` (its 0/1 error is 1); ``errors`` [R, T] if
        already known."""
        if errors is None:
            self._keep_step_errors = True
            try:
                with torch.no_grad():
                    self._row_losses(x, rows)
            finally:
                self._keep_step_errors = False
            errors = self._step_errors
        return ((errors >= 1) | (rows.weights == 0)).all(dim=1)

    def _may_exit_early(self):
        """Whether this attack's rows may stop once their iterate repeats, as far as its settings tell:
        ``early_exit`` on, an attack whose next iterate depends on the current one alone, L∞ sign steps, eval
        mode, no step-dependent objective, no recorded loss curves (they keep one value per row and step)."""
        return (self.early_exit and self.cycles_exactly and self.norm == "linf" and self.model_mode == "eval"
                and self.dense_loss not in dense.STEP_DEPENDENT and not self.record_steps)

    @property
    def exits_early(self):
        """Whether the current call's rows stop once their iterate repeats: :meth:`_may_exit_early`, and the
        model passed :meth:`_check_determinism` on this call's rows."""
        return self._may_exit_early() and bool(self._deterministic_model)

    def _check_determinism(self, rows):
        """A probe of what an exact early exit needs of the model: each row's losses must depend neither on chance
        nor on which other rows share its batch. The rows' losses at their clean inputs are computed as one batch,
        then again for the first two rows and for the last half as batches of their own; a single bit of
        difference (dropout left on, noise, batch-size-dependent arithmetic) turns early exit off for this call.
        A probe, not a proof: a backend that changes its arithmetic only at batch sizes the probe did not try
        would pass it. Costs about two forward passes, and none when early exit is off anyway."""
        self._deterministic_model = False
        total = rows.x0.shape[0]
        if not self._may_exit_early() or total == 0:
            return
        with torch.no_grad():
            full = self._row_losses(rows.x0, rows)
            for probe in (torch.arange(min(2, total)), torch.arange(total // 2, total)):
                sub = rows.select(probe.to(rows.x0.device))
                if not torch.equal(full[probe.to(full.device)], self._row_losses(sub.x0, sub)):
                    return
        self._deterministic_model = True

    def _step_specs(self):
        """The specs with the losses of this step: the tasks' own, or the ``dense_loss`` objective at the
        fraction of the steps taken so far."""
        if self.dense_loss == "task":
            return self.specs
        progress = min(self._evaluations / self.steps, 1.0)
        return [replace(s, loss=dense.loss_for(s.loss, self.dense_loss, progress)) for s in self.specs]

    def _splits_heads(self, names):
        """Whether heads can run on row subsets: a MultiTaskModel whose heads the specs read by task name."""
        if not isinstance(self.model, MultiTaskModel):
            return False
        by_name = {s.name: s for s in self.specs}
        return all(n in self.model.decoders and by_name[n].key == n for n in names)

    def _head_outputs(self, x, names):
        """The outputs of the heads ``names``: on a MultiTaskModel whose specs read its heads by name, only the
        encoder and those heads run (a GAT classifier's auxiliary heads cost nothing); otherwise the model."""
        if not self._splits_heads(names):
            return self.model(x)
        representation = self.model.encode(x)
        return {n: self.model.decoders[n](representation) for n in names}

    def _row_losses(self, x, rows):
        """[R, len(rows.active)] losses of the attacked tasks (0 where a row does not attack a task)."""
        return self._task_losses(x, rows.targets, rows.masks, rows.active, rows.task_rows)

    def _objective_and_grad(self, x, rows, weights=None):
        """Per-row objective Σ_t W[r,t]·L_t (W = ``rows.weights`` unless given) and its input gradient; no
        parameter gradient is computed. Returns (objective [R], per-task losses [R, T], gradient), detached."""
        xg = x.detach().requires_grad_(True)
        losses = self._row_losses(xg, rows)
        objective = ((rows.weights if weights is None else weights) * losses).sum(dim=1)
        (grad,) = torch.autograd.grad(objective.sum(), xg)
        self._record(losses)
        return objective.detach(), losses.detach(), grad

    def _record(self, losses):
        """Called once per step: keeps the step's per-row, per-task losses (on the device, no sync) when
        ``record_steps`` is on, and tells ``on_gradient``."""
        self._evaluations += 1
        if self._evaluations == 1 and not bool(torch.isfinite(losses).all()):  # one check per restart, not per step
            raise ValueError("model: its outputs give non-finite losses (NaN or infinite outputs, or a loss that "
                             "overflows) at the attack's start point")
        if self.record_steps:
            self._steps.append(losses.detach())
        if self.on_gradient is not None:
            self.on_gradient(losses.shape[0])

    def _objective(self, x, rows):
        with torch.no_grad():
            return (rows.weights * self._row_losses(x, rows)).sum(dim=1)

    def _score(self, x, rows, objective):
        """What the worst case over iterates and restarts maximises: the objective itself, or, under a
        ``dense_loss``, the attacked tasks' weighted error Σ_t W[r,t]·error_t (one more forward pass): the dense
        objectives fall as pixels flip (masked losses drop fooled pixels), so their value cannot pick the most
        damaging point (SEA keeps the point with the worst mIoU for the same reason)."""
        if self.dense_loss == "task" or any(s.error is None for s in self.specs if s.name in rows.active):
            return objective
        by_name = {s.name: s for s in self.specs}
        with torch.no_grad(), torch.autocast(x.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            outputs = self._head_outputs(x, list(rows.active))
            errors = torch.stack([by_name[n].error(opmath(by_name[n].output(outputs)), rows.targets[n],
                                                   rows.masks.get(n)) for n in rows.active], dim=1)
        return (rows.weights * errors.to(rows.weights.dtype)).sum(dim=1)

    def _step(self, x, rows, grads, alpha=None, task_weights=None, normalize_task_grads=False):
        """In-place fused update of x (grads [T, R, ...], optional per-row step sizes and task weights [R, T]);
        the arguments were brought to the op's form when the attack started, so the prepared path is taken."""
        return ops.attack_step_prepared_(x, rows.x0, grads, task_weights, rows.eps,
                                         rows.alpha if alpha is None else alpha, self.norm, normalize_task_grads,
                                         self.lo, self.hi, self._fingerprint)

    def _project(self, x, rows):
        """In place: x projected onto the rows' balls and the input box (the prepared path, as :meth:`_step`)."""
        return ops.project_prepared_(x, rows.x0, rows.eps, self.norm, self.lo, self.hi)

    # ---- internals ----

    def _check_batch(self, x, targets, masks, sample_ids):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
            raise ValueError("x must be a floating-point tensor [B, ...] of inputs in [lo, hi]")
        self._check_inputs(x)
        names = [s.name for s in self.specs]
        if isinstance(targets, torch.Tensor):
            if len(self.specs) != 1:
                raise ValueError(f"targets must be a dict keyed by task name for tasks {names}")
            targets = {names[0]: targets}
        if not isinstance(targets, dict):
            raise ValueError(f"targets must be a dict keyed by task name, got {type(targets).__name__}")
        missing = [n for n in names if n not in targets]
        if missing:
            raise ValueError(f"targets has no entry for task(s) {missing}")
        if isinstance(masks, torch.Tensor):
            if len(self.specs) != 1:
                raise ValueError(f"masks must be a dict keyed by task name for tasks {names}")
            masks = {names[0]: masks}
        masks = dict(masks or {})
        for name, t in list(targets.items()) + list(masks.items()):
            if t.shape[0] != x.shape[0]:
                raise ValueError(f"targets/masks[{name!r}] has {t.shape[0]} rows but x has {x.shape[0]}")
        if sample_ids is None:
            ids = torch.arange(x.shape[0])
        else:
            ids = torch.as_tensor(sample_ids, dtype=torch.int64).reshape(-1).cpu()
            if ids.numel() != x.shape[0]:
                raise ValueError(f"sample_ids has {ids.numel()} entries but x has {x.shape[0]} rows")
        targets = {n: targets[n] for n in names}
        masks = {n: masks[n] for n in names if n in masks}
        return x, targets, masks, ids


    def _check_inputs(self, x):
        """x must be finite, inside the box [lo, hi] (an attack clamps its points to the box, so inputs outside it,
        e.g. 0-255 images or images normalised to [-1, 1], would come back far from where they started), and of
        the model's dtype and device."""
        if x.numel() and not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or infinite values")
        if x.numel():
            low, high = float(x.min()), float(x.max())
            if low < self.lo or high > self.hi:
                raise ValueError(f"x has values in [{low:g}, {high:g}], outside the attack's input box [lo, hi] = "
                                 f"[{self.lo:g}, {self.hi:g}]: give images in [0, 1] (divide 0-255 images by 255; "
                                 f"put normalisation inside the model) or set lo and hi")
        parameter = next(self.model.parameters(), None)
        if parameter is not None and parameter.device != x.device:
            raise ValueError(f"x is on {x.device} but the model is on {parameter.device}: move one to the other")
        if parameter is not None and parameter.is_floating_point() and parameter.dtype != x.dtype \
                and self.autocast is None:
            raise ValueError(f"x is {x.dtype} but the model's parameters are {parameter.dtype}: convert one "
                             f"(x.to(dtype) or model.to(dtype))")

    def _prepare(self, x):
        x = x.detach()
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x.clone()

    @contextmanager
    def _model_mode(self):
        """The model in the attack's ``model_mode``; deterministic algorithms when asked; all restored afterwards.

        "eval": eval mode (BatchNorm uses its running statistics, dropout is off). "train": train mode (batch
        statistics, as during training) with every BatchNorm's running statistics left exactly as they were,
        so attacking inside a training step does not update them. With ``fold_batchnorm`` (eval mode only) the
        block sees ``self.model`` as its view with BatchNorms folded into convolutions
        (:func:`~mtrobust_fast.models.folding.folded`)."""
        original = self.model
        was_training = self.model.training
        was_deterministic = torch.are_deterministic_algorithms_enabled()
        norms = [m for m in self.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        saved = [{k: v.clone() for k, v in m.state_dict().items() if k.startswith(("running_", "num_batches"))}
                 for m in norms] if self.model_mode == "train" else []
        self.model.train(self.model_mode == "train")
        if self.fold_batchnorm and self.model_mode == "eval":
            self.model = folding.folded(original)
        if self.deterministic:
            torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            self.model = original
            for module, state in zip(norms, saved):
                for key, value in state.items():
                    getattr(module, key).copy_(value)
            self.model.train(was_training)
            torch.use_deterministic_algorithms(was_deterministic)

    def _noise(self, shape, ids, restart, device, kind):
        """Uniform [0,1) ("rand") or normal ("randn") noise of shape [R, ...]. Deterministic mode draws row r from
        a generator seeded by (seed, sample id, restart) alone, so it does not depend on the batch."""
        draw = torch.rand if kind == "rand" else torch.randn
        if not self.deterministic:
            if self._generator is None or self._generator.device != torch.device(device):
                self._generator = torch.Generator(device=device).manual_seed(self.seed)
            return draw(shape, generator=self._generator, device=device)
        per_row = []
        gen = torch.Generator()
        for sample in ids.tolist():
            key = np.random.SeedSequence([self.seed, sample, restart, _NOISE_KINDS[kind]])
            gen.manual_seed(int(key.generate_state(1, np.uint64)[0] >> 1))
            per_row.append(draw(shape[1:], generator=gen))
        return torch.stack(per_row).to(device)

    def _start(self, x0, ids, restart, eps):
        """A start point uniform in the eps-ball around x0 (projected into [lo, hi]), or x0 itself."""
        x = x0.clone()
        if not self.random_start:
            return x
        view = (-1,) + (1,) * (x0.dim() - 1)
        if self.norm == "linf":
            delta = (2 * self._noise(x0.shape, ids, restart, x0.device, "rand") - 1) * eps.view(view)
        else:
            direction = self._noise(x0.shape, ids, restart, x0.device, "randn").flatten(1)
            direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
            radius = self._noise((x0.shape[0], 1), ids, restart, x0.device, "rand") ** (1.0 / direction.shape[1])
            delta = (direction * radius * eps[:, None]).view(x0.shape)
        x += delta.to(x.dtype)
        ops.project_prepared_(x, x0, eps, self.norm, self.lo, self.hi)
        return x

    def _attack(self, x, targets, masks, attacked_sets, ids):
        """Attack rows whose consecutive blocks of x.shape[0] / len(attacked_sets) rows attack one set each. A set is
        a list of task names (each weighted 1) or a dict {task name: weight > 0} (the grid search's rows)."""
        x0 = self._prepare(x)
        count = x0.shape[0]
        attacked_sets = [dict(group) if isinstance(group, dict) else dict.fromkeys(group, 1.0)
                         for group in attacked_sets]
        active = [s.name for s in self.specs if any(s.name in group for group in attacked_sets)]
        table = torch.tensor([[float(group.get(n, 0.0)) for n in active] for group in attacked_sets])
        block = count // len(attacked_sets)
        task_rows = {}
        for n in active:
            blocks = [k for k, group in enumerate(attacked_sets) if n in group]
            task_rows[n] = None if len(blocks) == len(attacked_sets) else torch.cat(
                [torch.arange(k * block, (k + 1) * block) for k in blocks]).to(x0.device)
        repeats = len(attacked_sets)
        rows = Rows(x0, targets, masks, active, table.repeat_interleave(block, dim=0).to(x0.device),
                    _row_budget("eps", self.eps, block, repeats, x0),
                    _row_budget("alpha", self.alpha, block, repeats, x0), ids, task_rows)
        # input gradients even when called under no_grad
        with self._model_mode(), torch.enable_grad(), self.cost.counting(self.model, count):
            self._check_determinism(rows)
            best_x, best_loss = None, None
            for restart in range(self.restarts):
                self._steps, self._evaluations = [], 0
                x_adv = self._optimize(self._start(x0, ids, restart, rows.eps), rows)
                if self.record_steps:  # the last restart's curves; 0 where a row does not attack the task
                    stacked = torch.stack(self._steps)
                    self.step_losses = {name: stacked[:, :, i] for i, name in enumerate(rows.active)}
                if self.restarts == 1:
                    return x_adv.detach()
                loss = self._score(x_adv, rows, self._objective(x_adv, rows))
                if self.stop_on_success:  # a point every attacked head gets wrong wins
                    loss = torch.where(self._succeeded(x_adv, rows), torch.inf, loss)
                if best_x is None:
                    best_x, best_loss = x_adv.detach(), loss
                else:
                    better = loss > best_loss
                    best_x = torch.where(better.view((-1,) + (1,) * (x0.dim() - 1)), x_adv.detach(), best_x)
                    best_loss = torch.where(better, loss, best_loss)
            return best_x
