"""Multi-task Weighted Gradient Attack (WGD, AAAI'22 paper Definition 5): PGD whose task gradients are weighted
per sample by each task's relative inverse attack rate."""
import torch

from mtrobust_fast.attacks import early_exit
from mtrobust_fast.attacks.base import ALPHA, ATTACKS, DENSE_LOSS, EARLY_EXIT, STEPS, Attack
from mtrobust_fast.registry import Setting, boolean

# A start loss at or below this counts as zero (see WGD's docstring).
_ZERO_LOSS = 1e-12


def relative_rates(losses, start_losses, weights):
    """r_i(t) = L̃_i(t) / mean_j L̃_j(t) with L̃_i(t) = L_i(t) / L_i(0), per row ([R, T] each).

    The mean is the ``weights``-weighted mean over the row's attacked tasks (0/1 weights: the row's own set).
    A task whose start loss is zero has no attack rate; it gets L̃ = 1 (a neutral weight) instead of an
    infinite one. Rows whose rates are all zero get r = 0 (no direction to weight).
    """
    zero = start_losses <= _ZERO_LOSS
    ratio = torch.where(zero, torch.ones_like(losses), losses / torch.where(zero, 1.0, start_losses))
    mean = (weights * ratio).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True)
    return ratio / mean.clamp_min(_ZERO_LOSS)


NORMALIZE_TASK_GRADS = Setting("normalize_task_grads", boolean, False, sweep="grid",
                               help="L2-normalise each task's input gradient per sample before weighting")


@ATTACKS.register("wgd")
class WGD(Attack):
    """WGD: at step t every sample ascends Σ_i r_i(t)·∇L_i over its attacked tasks i, where
    r_i(t) = L̃_i(t) / mean_j L̃_j(t), L̃_i(t) = L_i(t) / L_i(0), L_i(0) the loss at the restart's start point
    (so r_i(0) = 1) and r detached. A task that keeps up with the others (relative to where it started) keeps
    weight 1; one whose loss rose faster than the row's average gets more.

    Arguments are PGD's (see :class:`~mtrobust_fast.attacks.PGD`), plus
        normalize_task_grads: L2-normalise each task's input gradient per sample before weighting, so the
            step direction depends on r and the gradients' directions, not their scales.

    Without normalisation r is detached, so one backward of Σ_i r_i·L_i gives the combined gradient; with one
    attacked task r = L̃/L̃ = 1 exactly (while its loss is positive) and WGD is PGD. With normalisation the
    per-task gradients come from one backward per task, each through the encoder and that task's head only
    (ResNet-18 sdnE, batch 16 at 64 px on 2 CPU threads: 2.0x a bare forward + backward, measured with
    ``scripts/bench_attack.py``); ``batched_vjp=True`` takes them from one batched vector-Jacobian product
    (``is_grads_batched``) instead, which runs every head's backward for every task (3.2x there). A
    model whose backward cannot be batched (vmap raises for one of its operators) falls back to one backward per
    task, and the attack remembers that for its later steps. The fused ``attack_step`` normalises and combines.

    Zero start losses: L̃_i is undefined when L_i(0) = 0 (a task already perfect at the start point); such a
    task gets L̃_i = 1 for the whole restart (as if its loss had not moved) rather than an infinite weight.
    Losses are assumed non-negative (the Taskonomy losses and cross-entropy are).

    Differences from the source's ``RELATIVE_WEIGHT`` strategy (MTVulnerability ``mtask_attack.py``): from
    step 1 on it ascends Σ_i L_i(t)/L_i(0) with L_i(0) detached, i.e. scales each task's gradient by the fixed
    1/L_i(0), ignoring the current losses; here the scale is L_i(t)/L_i(0) as Definition 5 states (r's
    row-wide mean divisor changes no step direction). Its step 0 is unweighted, which r_i(0) = 1 reproduces.
    Its start is always the corner x + eps (a bug; here uniform in the ball), and it has no per-task gradient
    normalisation.
    """

    settings = (ALPHA, STEPS, NORMALIZE_TASK_GRADS, DENSE_LOSS, EARLY_EXIT)
    refused = {}
    cycles_exactly = True  # r depends on the current losses and the fixed start losses only

    def __init__(self, model, tasks=None, *, normalize_task_grads=False, batched_vjp=False, **kwargs):
        super().__init__(model, tasks, **kwargs)
        self.normalize_task_grads = bool(normalize_task_grads)
        self._batched_vjp = bool(batched_vjp)

    def _optimize(self, x, rows):
        return early_exit.iterate(self, x, rows, self._weighted_step, state=(None,))

    def _weighted_step(self, x, rows, state, number):
        """One in-place WGD step of x; ``state`` is ``(L(0),)``, L(0) [R, T] (None at step 0: measured here).
        Returns ``(L(0),)``. A method of its own so the step's graph is freed before the next forward."""
        (start,) = state
        xg = x.detach().requires_grad_(True)
        columns = self._task_loss_columns(xg, rows.targets, rows.masks, rows.active, rows.task_rows)
        losses = torch.stack(columns, dim=1)
        self._record(losses)
        current = losses.detach()
        start = current if start is None else start
        task_weights = rows.weights * relative_rates(current, start, rows.weights)
        if self.normalize_task_grads:
            self._step(x, rows, self._task_grads(columns, xg), task_weights=task_weights, normalize_task_grads=True)
        else:
            (grad,) = torch.autograd.grad((task_weights * losses).sum(), xg)
            self._step(x, rows, grad.unsqueeze(0))
        return (start,)

    def _task_grads(self, columns, xg):
        """Input gradients of every task's per-row loss column, [T, R, ...]: ∇ of Σ_r columns[t][r] for each t."""
        tasks = len(columns)
        if self._batched_vjp:
            one_hot = torch.eye(tasks, dtype=columns[0].dtype, device=xg.device)
            try:  # the graph is kept so that the fallback can still use it if this raises
                (grads,) = torch.autograd.grad(
                    columns, xg, grad_outputs=[one_hot[:, t, None].expand(tasks, *c.shape) for t, c in enumerate(columns)],
                    is_grads_batched=True, retain_graph=True)
                return grads
            except RuntimeError:
                self._batched_vjp = False
        return torch.stack([torch.autograd.grad(column.sum(), xg, retain_graph=t < tasks - 1)[0]
                            for t, column in enumerate(columns)])
