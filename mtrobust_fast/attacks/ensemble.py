"""An attack ensemble for dense multi-task models: several attacks on the same attacked set, the worst case kept
per sample and per task, and a record of which attack won how often.

PGD alone overestimates the robustness of dense heads (SegPGD, CosPGD and SEA each found much lower mIoU than
PGD), and for a multi-task set no single objective is known to be best, so the ensemble runs, on the attacked
set: APGD on the tasks' own losses; SegPGD for segmentation; CosPGD for segmentation and regression heads; and,
when the set holds several tasks, WGD and the relative-loss-change attack. For every sample and every task of
the model it keeps the highest error any member reached (``summary()["worst_error"]``), so its per-task numbers
are at least as bad for the model as any member's; the point it returns for a sample is the member's that
raised the attacked set's summed error most. AutoAttack(version="dense") builds it.
"""
import time

import torch

from mtrobust_fast import tasks as task_registry
from mtrobust_fast.attacks.apgd import APGD
from mtrobust_fast.attacks.base import ATTACKS, STEPS, Attack
from mtrobust_fast.attacks.pgd import CosPGD, SegPGD
from mtrobust_fast.attacks.relative import RelativePGD
from mtrobust_fast.attacks.wgd import WGD
from mtrobust_fast.task_names import set_label
from mtrobust_fast.tasks import opmath

MEMBERS = {"apgd": APGD, "segpgd": SegPGD, "cospgd": CosPGD, "wgd": WGD, "relative": RelativePGD}


@ATTACKS.register("ensemble")
class DenseEnsemble(Attack):
    """The ensemble on the attack's ``target_tasks``. ``steps``: iterations of every member (default 25);
    ``attacks``: members to run (default: every one that applies to the set, see the module docstring)."""

    default_random_start = False  # the members draw their own starts
    settings = (STEPS,)
    summary_key = "ensemble"
    refused = {**Attack.refused, "alpha": "the ensemble's members use their own default step sizes",
               "dense_loss": "the ensemble runs its own objectives"}

    def __init__(self, model, tasks=None, *, attacks=None, steps=25, restarts=1, **kwargs):
        if restarts != 1:
            raise ValueError("the dense ensemble takes no restarts (its members are its restarts)")
        super().__init__(model, tasks, steps=steps, **kwargs)
        unknown = [a for a in (attacks or ()) if a not in MEMBERS]
        if unknown:
            raise ValueError(f"attacks must be among {', '.join(MEMBERS)}; got {unknown}")
        self.attacks = tuple(attacks) if attacks else None
        self._sums = {}  # attacked-set label -> running sums (see summary)

    def members(self):
        """The members that apply to the attacked set, in the order they run."""
        if self.attacks is not None:
            return self.attacks
        losses = {s.loss for s in self.specs if s.name in self.target_tasks}
        chosen = ["apgd"]
        if task_registry.segment_loss in losses:
            chosen.append("segpgd")
        if losses & {task_registry.segment_loss, task_registry.l1_loss}:
            chosen.append("cospgd")
        if len(self.target_tasks) > 1:
            chosen += ["wgd", "relative"]
        return tuple(chosen)

    def run_subsets(self, x, targets, masks=None, subsets=None, sample_ids=None):
        """One attacked set after the other (the members differ between sets); each set keeps its own summary.
        ``subsets``: default every non-empty subset of ``target_tasks``, as for the other attacks."""
        named = self._subset_names(subsets)
        kept = self.target_tasks
        try:
            results = []
            for names in named:
                self.target_tasks = names
                results.append(self(x, targets, masks, sample_ids))
        finally:
            self.target_tasks = kept
        return torch.stack(results)

    def _errors(self, points, rows):
        """[B, T] per-sample errors of every task of the attack at ``points``."""
        with torch.no_grad():
            outputs = self._head_outputs(points, [s.name for s in self.specs])
            return torch.stack([s.damage(opmath(s.output(outputs)), rows.targets[s.name], rows.masks.get(s.name))
                                .double() for s in self.specs], dim=1)

    def _optimize(self, x, rows):
        names = [s.name for s in self.specs]
        attacked = torch.tensor([n in self.target_tasks for n in names], device=rows.x0.device)
        best_x, best_joint, worst = None, None, None
        members = self.members()
        label = set_label(n for n in names if n in self.target_tasks)
        if label not in self._sums:
            self._sums[label] = {"worst": torch.zeros(len(names), dtype=torch.float64),
                                 "member": {m: torch.zeros(len(names), dtype=torch.float64) for m in members},
                                 "wins": {m: torch.zeros(len(names), dtype=torch.int64) for m in members},
                                 "seconds": dict.fromkeys(members, 0.0), "samples": 0}
        sums = self._sums[label]
        per_member = []
        for name in members:
            start = time.perf_counter()
            member = MEMBERS[name](self.model, self.specs, eps=rows.eps.double().cpu(), norm=self.norm,
                                   steps=self.steps, seed=self.seed, deterministic=self.deterministic,
                                   autocast=self.autocast, channels_last=self.channels_last,
                                   fold_batchnorm=self.fold_batchnorm, lo=self.lo, hi=self.hi,
                                   model_mode=self.model_mode, target_tasks=self.target_tasks)
            member.on_gradient = self.on_gradient
            adv = member(rows.x0, rows.targets, rows.masks, sample_ids=rows.ids)
            errors = self._errors(adv, rows)
            per_member.append(errors)
            joint = (errors * attacked).sum(1)
            if best_x is None:
                best_x, best_joint, worst = adv, joint, errors.clone()
            else:
                better = joint > best_joint
                best_x = torch.where(better.view((-1,) + (1,) * (adv.dim() - 1)), adv, best_x)
                best_joint = torch.where(better, joint, best_joint)
                worst = torch.maximum(worst, errors)
            sums["member"][name] += errors.sum(0).cpu()
            sums["seconds"][name] += time.perf_counter() - start
        winners = torch.stack(per_member).argmax(0)  # [B, T]: the first member reaching the worst error
        for k, name in enumerate(members):
            sums["wins"][name] += (winners == k).sum(0).cpu()
        sums["worst"] += worst.sum(0).cpu()
        sums["samples"] += rows.x0.shape[0]
        return best_x

    def summary(self):
        """Per attacked set (its label, e.g. "sd"), per evaluated task: the mean worst-case error over the members
        (``worst_error``), each member's mean error (``member_error``), how many samples each member won
        (``wins``), and each member's seconds."""
        names = [s.name for s in self.specs]
        out = {}
        for label, sums in self._sums.items():
            count = max(sums["samples"], 1)
            out[label] = {
                "members": list(sums["member"]),
                "worst_error": {n: float(v) / count for n, v in zip(names, sums["worst"])},
                "member_error": {m: {n: float(v) / count for n, v in zip(names, values)}
                                 for m, values in sums["member"].items()},
                "wins": {n: {m: int(sums["wins"][m][i]) for m in sums["wins"]} for i, n in enumerate(names)},
                "seconds": {m: round(v, 3) for m, v in sums["seconds"].items()}}
        return out
