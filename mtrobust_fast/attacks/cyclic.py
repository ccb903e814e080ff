"""Cyclic multi-task attacks (the AAAI'22 study's "Cyclic" strategies): instead of ascending the sum of the
attacked tasks' losses, attack one task at a time, in turn, either per step or per batch."""
import torch

from mtrobust_fast.attacks import early_exit
from mtrobust_fast.attacks.base import ATTACKS
from mtrobust_fast.attacks.pgd import PGD, STOP_ON_SUCCESS


@ATTACKS.register("cyclic_step")
class CyclicStep(PGD):
    """PGD whose step i ascends only one attacked task of each row: the ``i mod n``-th of the row's n attacked
    tasks (in the model's task order). The task's loss is divided by its value at the step where the task was
    first attacked (1 when that value is 0), as the source study normalised it; with one task per step the scale
    changes no step (L∞ steps take the sign, L2 steps the unit direction), so the walk is the cycle itself. One
    forward and one backward per step, every row of every attacked set together. Arguments are PGD's; restarts
    keep the point with the highest summed loss of the attacked tasks. Early exit (L∞) compares a row's iterates
    only at the same position in its cycle of n tasks, once every task has had its turn."""

    settings = tuple(s for s in PGD.settings if s is not STOP_ON_SUCCESS)
    refused = {**PGD.refused, "stop_on_success": "cyclic_step attacks several tasks in turn; use pgd"}

    def _optimize(self, x, rows):
        attacked = rows.weights != 0
        count = attacked.sum(dim=1).clamp_min(1)
        state = (torch.zeros_like(attacked), torch.ones_like(rows.weights))
        return early_exit.iterate(self, x, rows, self._cyclic_step, state=state, periods=count)

    def _cyclic_step(self, x, rows, state, number):
        """One in-place step on the task whose turn it is at step ``number``; ``state``: (the tasks [R, T] seen so
        far, their losses when first attacked); returns it updated."""
        seen, first = state
        attacked = rows.weights != 0
        order = attacked.cumsum(dim=1) - 1  # the position of each attacked task within its row's set
        turn = attacked & (order == (number % attacked.sum(dim=1).clamp_min(1))[:, None])
        xg = x.detach().requires_grad_(True)
        columns = self._task_loss_columns(xg, rows.targets, rows.masks, rows.active, rows.task_rows)
        losses = torch.stack(columns, dim=1)
        self._record(losses)
        current = losses.detach()
        new = turn & ~seen
        first = torch.where(new, torch.where(current > 0, current, torch.ones_like(current)), first)
        weights = torch.where(turn, rows.weights / first, torch.zeros_like(first))
        # Only the columns some row ascends this step: the other heads are not back-propagated at all.
        ascended = turn.any(dim=0).nonzero().flatten().tolist()
        objective = sum((weights[:, t] * columns[t]).sum() for t in ascended) if ascended else (weights * losses).sum()
        (grad,) = torch.autograd.grad(objective, xg)
        self._step(x, rows, grad.unsqueeze(0))
        return seen | turn, first


@ATTACKS.register("cyclic_batch")
class CyclicBatch(PGD):
    """PGD on one attacked task per batch, in turn: the k-th call of the attack (counting from 0, or from
    ``batch_index``) attacks task ``k mod n`` of each n-task attacked set (in the model's task order), with plain PGD
    steps. Results therefore depend on the order batches arrive in; the counter is ``self.batch_index``.
    Arguments are PGD's."""

    def __init__(self, model, tasks=None, *, batch_index=0, **kwargs):
        super().__init__(model, tasks, **kwargs)
        if isinstance(batch_index, bool) or not isinstance(batch_index, int) or batch_index < 0:
            raise ValueError(f"batch_index must be an integer >= 0, got {batch_index!r}")
        self.batch_index = batch_index

    def _attack(self, x, targets, masks, attacked_sets, ids):
        order = [s.name for s in self.specs]
        turn = [[sorted(group, key=order.index)[self.batch_index % len(group)]] for group in attacked_sets]
        self.batch_index += 1
        return super()._attack(x, targets, masks, turn, ids)
