"""Grid search over the attacked tasks' weights: PGD once per weight vector, all vectors as rows of one batch,
and per sample the point that hurts one chosen task most.

The AAAI'22 study meant to search task weights this way; its version divided by zero and never ran its loop.
"""
import math
from itertools import product

import torch

from mtrobust_fast import task_names
from mtrobust_fast.attacks.base import ATTACKS
from mtrobust_fast.attacks.pgd import PGD
from mtrobust_fast.registry import Setting, number_list
from mtrobust_fast.tasks import opmath



def _task_key(value):
    """A task given by letter or name: a Taskonomy task's letter (so "d" and "depth_zbuffer" are one setting), or
    any other head's name as written."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a task letter or name, got {value!r}")
    try:
        return task_names.letter_of(value.strip())
    except ValueError:
        return value.strip()


def _some_positive(weights):
    if max(weights) <= 0:
        raise ValueError(f"weights must not all be 0, got {','.join(f'{w:g}' for w in weights)}")


# "always": a grid cell's id has always hashed both, at their defaults too (so earlier sweeps keep their ids).
GRID_WEIGHTS = Setting("grid_weights", number_list, (0.0, 1.0, 10.0), low=0, check=_some_positive, sweep="value",
                       cell_id="always",
                       help="the weights tried for each attacked task, comma-separated; every combination runs "
                            "as its own rows, so the cost grows as (number of weights)^(tasks in the set)")
GRID_TASK = Setting("grid_task", _task_key, None, sweep="value", cell_id="always",
                    help="the task (letter or name) whose error picks each image's point (default: each set's "
                         "first task)")


@ATTACKS.register("grid")
class GridPGD(PGD):
    """PGD on Σ_t w_t·L_t for every weight vector w of the grid ``grid_weights``^n over an attacked set's n tasks
    (vectors that are all zero, or proportional to an earlier one, are dropped: a positive multiple of the
    objective gives the same sign or unit-direction steps). The uniform vector runs first. Every vector of
    every attacked set advances in the same forward/backward pass (one row per image and vector), so a call
    costs about as much as PGD on (number of vectors) times the batch.

    For each image and attacked set it returns the point with the highest error of ``grid_task`` (a task
    name or letter; default the set's first task), ties going to the higher loss of that task and then to the
    earlier vector: the result is never worse for that task than PGD with uniform weights from the same
    start (``deterministic=True`` makes the starts equal). ``vectors(names)`` lists a set's vectors.
    """

    settings = PGD.settings + (GRID_WEIGHTS, GRID_TASK)

    def __init__(self, model, tasks=None, *, grid_weights=(0.0, 1.0, 10.0), grid_task=None, **kwargs):
        super().__init__(model, tasks, **kwargs)
        if not isinstance(grid_weights, (list, tuple)):
            raise ValueError(f"grid_weights must be a non-empty list of finite weights >= 0, one of them > 0; got "
                             f"{grid_weights!r}")
        self.grid_weights = tuple(dict.fromkeys(GRID_WEIGHTS.parse(grid_weights)))
        self.grid_task = None if grid_task is None else self.task_names([grid_task])[0]

    def vectors(self, names):
        """The weight vectors ({task: weight > 0}) searched for the attacked set ``names``, uniform first."""
        seen, vectors = set(), []
        for weights in [(1.0,) * len(names)] + list(product(self.grid_weights, repeat=len(names))):
            top = max(weights)
            if top <= 0:
                continue
            key = tuple(round(w / top, 12) for w in weights)
            if key not in seen:
                seen.add(key)
                vectors.append({n: w for n, w in zip(names, weights) if w > 0})
        return vectors

    def _attack(self, x, targets, masks, attacked_sets, ids):
        block = x.shape[0] // len(attacked_sets)
        groups, owners = [], []
        for k, group in enumerate(attacked_sets):
            vectors = self.vectors(list(group))
            groups += vectors
            owners += [k] * len(vectors)
        index = torch.cat([torch.arange(k * block, (k + 1) * block) for k in owners])
        on_device = index.to(x.device)
        adv = super()._attack(x[on_device], {n: v[on_device] for n, v in targets.items()},
                              {n: v[on_device] for n, v in masks.items()}, groups, ids[index])
        error, loss = self._chosen_scores(adv, targets, masks, on_device, attacked_sets, owners)
        picked = []
        for k in range(len(attacked_sets)):
            rows = [j for j, owner in enumerate(owners) if owner == k]
            e = error.view(-1, block)[rows]  # [vectors of set k, block]
            l = loss.view(-1, block)[rows]
            tied = e == e.max(dim=0, keepdim=True).values
            best = torch.where(tied, l, torch.full_like(l, -math.inf)).argmax(dim=0)  # first maximum on ties
            candidates = adv.view(-1, block, *x.shape[1:])[rows]
            picked.append(candidates[best, torch.arange(block, device=x.device)])
        return torch.cat(picked)

    def _chosen(self, group):
        """The task whose error picks the point of an attacked set."""
        return self.grid_task or list(group)[0]

    def _chosen_scores(self, adv, targets, masks, index, attacked_sets, owners):
        """(error, loss) [rows] of each row's chosen task at its adversarial point."""
        outputs = self.outputs(adv)
        by_name = {s.name: s for s in self.specs}
        errors, losses = torch.empty(adv.shape[0], dtype=torch.float64), torch.empty(adv.shape[0], dtype=torch.float64)
        block = adv.shape[0] // len(owners)
        for name in dict.fromkeys(self._chosen(group) for group in attacked_sets):
            rows = torch.cat([torch.arange(j * block, (j + 1) * block) for j, owner in enumerate(owners)
                              if self._chosen(attacked_sets[owner]) == name])
            spec, on_device = by_name[name], rows.to(adv.device)
            output = opmath(spec.output(outputs))[on_device]
            target, mask = targets[name][index][on_device], masks.get(name)
            mask = None if mask is None else mask[index][on_device]
            losses[rows] = spec.loss(output, target, mask).double().cpu()
            errors[rows] = spec.damage(output, target, mask).double().cpu()
        return errors.to(adv.device), losses.to(adv.device)
