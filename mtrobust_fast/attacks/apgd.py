"""Auto-PGD (Croce & Hein, ICML 2020, Algorithm 1) on the per-row attacked objective: momentum, a per-sample
step size halved at checkpoints, restarts from the best point. Works for dense multi-task objectives and for
classification heads (CE or DLR specs)."""
from dataclasses import replace
from functools import partial

import torch

from mtrobust_fast.attacks.base import ATTACKS, DENSE_LOSS, STEPS, Attack
from mtrobust_fast.tasks.classification import targeted_dlr



def checkpoints(steps):
    """The checkpoint iterations w_j = ceil(p_j · steps), j >= 1, that leave at least one step after them.

    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06); the p_j are kept in hundredths so
    the ceilings are exact (0.22 · 100 is 22.000000000000004 in floating point). Short runs where two
    ceilings coincide keep one checkpoint (an empty interval has nothing to judge).
    """
    points, p, gap = [], 0, 22
    while True:
        p += gap
        w = -(-p * steps // 100)
        if w >= steps:
            return points
        if not points or w > points[-1]:
            points.append(w)
        gap = max(gap - 3, 6)


@ATTACKS.register("apgd")
class APGD(Attack):
    """Auto-PGD: at iteration k (f = the row's objective Σ_t W[r,t]·L_t, per sample)

        z = P(x_k + η·s(∇f(x_k))),   x_{k+1} = P(x_k + 0.75·(z − x_k) + 0.25·(x_k − x_{k−1}))

    (no momentum term at k = 0), with s the sign (Linf) or the per-sample normalised gradient (L2) and P the
    projection onto the eps-ball ∩ [lo, hi]. The step size η starts at 2·eps per sample. At each checkpoint
    w_j (:func:`checkpoints`) a sample halves η and restarts from its best point when (1) fewer than
    ρ·(w_j − w_{j−1}) of its steps since the last checkpoint raised f, or (2) η was not halved at the last
    checkpoint and the best loss has not changed since. The best point (highest f seen) is returned.

    Arguments are PGD's (see :class:`~mtrobust_fast.attacks.PGD`) except ``alpha`` (the step size is
    adaptive), plus ``rho`` (0.75 in the paper) and ``eot``: for models with randomness (randomised defences),
    the objective and its gradient are averaged over ``eot`` passes at every step (expectation over
    transformation; AutoAttack's "rand" version uses 20); 1 (the default) for deterministic models. ``steps`` = the paper's N_iter: ``steps`` updates with
    ``steps`` gradients, and one more forward pass to score the last iterate.

    Where the paper leaves a choice open, or where the reference implementation (fra31/auto-attack) departs
    from it, this follows the paper:
    - a restart from the best point continues with the gradient stored with that point (the reference does
      the same; the paper leaves it implicit), and its momentum term is x_best − x_{k−1}, the paper's
      x^{(k+1)} − x^{(k)} after its assignment x^{(k+1)} ← x_max;
    - checkpoints are the paper's ⌈p_j·N⌉; the reference uses whole-iteration intervals (⌊0.22·N⌋, shrinking
      by max(⌊0.03·N⌋, 1) down to max(⌊0.06·N⌋, 1)): the same for N = 100, not for others (N = 25: the
      reference checks at 5, 9, 12, 14, 15 and then every iteration; the paper at 6, 11, 15, 18, 20, 22, 24);
    - condition 1 is the paper's strict "<" (the reference counts "<="), and condition 2 already applies at
      the first checkpoint (η(w_0) = η(w_1) holds there; the reference starts as if η had just been halved);
    - the random start is uniform in the ball (the reference starts on the ball's surface);
    - the point with the highest objective is returned (the reference's ``best_loss=True`` mode: dense tasks
      have no "misclassified" point to stop at); restarts keep the per-sample best, as in PGD;
    - coinciding checkpoints of very short runs are merged.
    """

    settings = (STEPS, DENSE_LOSS)
    refused = {**Attack.refused, "alpha": "apgd sets its own step size (2*eps, halved at checkpoints)"}

    def __init__(self, model, tasks=None, *, rho=0.75, eot=1, **kwargs):
        if "alpha" in kwargs:
            raise ValueError("APGD sets its own step size (2·eps, halved at checkpoints); do not pass alpha")
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 <= rho <= 1:
            raise ValueError(f"rho must be a number in [0, 1], got {rho!r}")
        if isinstance(eot, bool) or not isinstance(eot, int) or eot < 1:
            raise ValueError(f"eot must be an integer >= 1, got {eot!r}")
        super().__init__(model, tasks, **kwargs)
        self.rho, self.eot = float(rho), eot

    def _objective_and_grad(self, x, rows, weights=None):
        """The base's (objective, losses, gradient), averaged over ``eot`` passes (one recorded step)."""
        if self.eot == 1:
            return super()._objective_and_grad(x, rows, weights)
        weights = rows.weights if weights is None else weights
        xg = x.detach().requires_grad_(True)
        losses, grad = 0, 0
        for _ in range(self.eot):
            per_task = self._row_losses(xg, rows)
            grad = grad + torch.autograd.grad((weights * per_task).sum(), xg)[0]
            losses = losses + per_task.detach()
        losses, grad = losses / self.eot, grad / self.eot
        self._record(losses)
        return (weights * losses).sum(dim=1), losses, grad

    def _objective(self, x, rows):
        return sum(super(APGD, self)._objective(x, rows) for _ in range(self.eot)) / self.eot

    def _optimize(self, x, rows):
        view = (-1,) + (1,) * (x.dim() - 1)
        schedule = set(checkpoints(self.steps))
        eta = 2 * rows.eps
        loss, _, grad = self._objective_and_grad(x, rows)
        best_x, best_grad, best_loss = x.clone(), grad.clone(), loss.clone()
        best_score = self._score(x, rows, loss)  # what best_x maximises (the loss, or the error: see _score)
        x_prev = x.clone()
        previous_loss = loss
        increases = torch.zeros_like(loss)
        best_at_checkpoint = best_loss.clone()
        reduced = torch.zeros_like(loss, dtype=torch.bool)
        last_checkpoint = 0
        for k in range(self.steps):
            z = x.clone()
            self._step(z, rows, grad.unsqueeze(0), alpha=eta)
            if k > 0:  # x_{k+1} = P(0.75·z + 0.5·x_k − 0.25·x_{k−1}); x_prev becomes x_k
                z.mul_(0.75).add_(x, alpha=0.5).sub_(x_prev, alpha=0.25)
                self._project(z, rows)
            x_prev, x = x, z
            if k + 1 < self.steps:
                loss, _, grad = self._objective_and_grad(x, rows)
            else:
                loss = self._objective(x, rows)
            increases += loss > previous_loss
            previous_loss = loss
            improved = loss > best_loss
            best_loss = torch.where(improved, loss, best_loss)
            score = self._score(x, rows, loss)
            if score is not loss:  # the kept point follows the error; the step size still follows the loss
                improved = score > best_score
            best_score = torch.where(improved, score, best_score)
            best_x = torch.where(improved.view(view), x, best_x)
            if k + 1 < self.steps:
                best_grad = torch.where(improved.view(view), grad, best_grad)
            if k + 1 in schedule:
                halve = ((increases < self.rho * (k + 1 - last_checkpoint))
                         | (~reduced & (best_loss <= best_at_checkpoint)))
                eta = torch.where(halve, eta / 2, eta)
                x = torch.where(halve.view(view), best_x, x)
                grad = torch.where(halve.view(view), best_grad, grad)
                previous_loss = torch.where(halve, best_loss, loss)
                reduced, best_at_checkpoint, last_checkpoint = halve, best_loss, k + 1
                increases.zero_()
        return best_x


RANKINGS = ("logits", "malt")


def malt_scores(logits_of, x, labels, norm):
    """MALT's target ranking (Melamed, Yehudai and Shamir, NeurIPS 2024): how far, to first order, each sample
    is from the boundary between its true class ``y`` and each class ``k``. Near a point a network behaves
    almost linearly, so the margin ``z_y - z_k`` divided by the dual norm of its input gradient (L1 for L∞
    budgets, L2 for L2) estimates the perturbation size that reaches that boundary; the smaller it is, the
    more promising the target. Returns [B, K], +inf at the true class. One backward per class."""
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = logits_of(xg)
        margins = logits.gather(1, labels[:, None]) - logits  # [B, K]
        scores = torch.empty_like(margins, dtype=torch.float64)
        for k in range(logits.shape[1]):
            (grad,) = torch.autograd.grad(margins[:, k].sum(), xg, retain_graph=k + 1 < logits.shape[1])
            dual = grad.flatten(1).abs().sum(1) if norm == "linf" else grad.flatten(1).norm(dim=1)
            scores[:, k] = margins[:, k].detach().double() / dual.double().clamp_min(1e-30)
    scores.scatter_(1, labels[:, None], float("inf"))
    return scores


@ATTACKS.register("apgdt")
class APGDT(APGD):
    """Targeted APGD on the targeted DLR loss (Croce & Hein 2020), AutoAttack's second member: for each of the
    ``target_classes`` most promising wrong classes at the clean input, APGD pushes the logit of that class
    above the true one, run only on the samples still classified correctly; a sample's adversarial point is the
    first one found that is misclassified (else the clean input's last attempt). ``ranking``: which classes are
    most promising: "logits" (AutoAttack's: the 2nd, 3rd, ... largest logit) or "malt" (:func:`malt_scores`:
    the nearest boundaries by a local linear estimate, which finds the class that breaks with fewer targets).
    Needs a model with exactly one attacked classification head (``target_tasks``) of at least 4 classes whose
    labels are class indices. ``restarts`` count per target class."""

    classifier_only = True

    def __init__(self, model, tasks=None, *, target_classes=9, ranking="logits", **kwargs):
        super().__init__(model, tasks, **kwargs)
        if isinstance(target_classes, bool) or not isinstance(target_classes, int) or target_classes < 1:
            raise ValueError(f"target_classes must be an integer >= 1, got {target_classes!r}")
        if len(self.target_tasks) != 1:
            raise ValueError(f"apgdt attacks one classification head; got target_tasks {self.target_tasks}")
        if ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {RANKINGS}, got {ranking!r}")
        self.target_classes, self.ranking = target_classes, ranking

    def _ranked_targets(self, x, labels, logits, spec):
        """[B, K - 1] the wrong classes of each sample, most promising first."""
        if self.ranking == "logits":  # on the samples still attacked the largest logit is the label
            order = logits.argsort(dim=1, descending=True)
            return torch.where(order[:, :1] == labels[:, None], order[:, 1:], order[:, :-1])
        with self._model_mode():
            scores = malt_scores(lambda xg: spec.output(self.model(xg)).float(), x, labels, self.norm)
        return scores.argsort(dim=1)[:, :-1]

    def __call__(self, x, targets, masks=None, sample_ids=None):
        with self.cost.counting(self.model, x.shape[0]):
            return self._targeted_runs(x, targets, masks, sample_ids)

    def _targeted_runs(self, x, targets, masks, sample_ids):
        x, targets, masks, ids = self._check_batch(x, targets, masks, sample_ids)
        (name,) = self.target_tasks
        spec = next(s for s in self.specs if s.name == name)
        labels = targets[name]
        logits = spec.output(self.outputs(x))
        if logits.dim() != 2 or labels.shape != logits.shape[:1] or labels.is_floating_point():
            raise ValueError(f"apgdt needs a classification head (logits [B, K], class labels [B]); {name!r} gives "
                             f"{tuple(logits.shape)} outputs and labels {tuple(labels.shape)}")
        ranked = self._ranked_targets(x, labels, logits, spec)
        adv = x.clone()
        robust = logits.argmax(1) == labels
        original, budgets = self.specs, (self.eps, self.alpha)

        def subset(value, index):
            return value if isinstance(value, float) else value[index.cpu()]

        try:
            for rank in range(min(self.target_classes, logits.shape[1] - 1)):
                index = robust.nonzero().flatten()
                if index.numel() == 0:
                    break
                chosen = ranked[index, rank]
                self.specs = [replace(s, loss=partial(_targeted, classes=chosen)) if s.name == name else s
                              for s in original]
                self.eps, self.alpha = (subset(value, index) for value in budgets)
                sub = self._attack(x[index], {k: v[index] for k, v in targets.items()},
                                   {k: v[index] for k, v in masks.items()}, [self.target_tasks], ids[index.cpu()])
                adv[index] = sub
                with torch.no_grad():
                    fooled = spec.output(self.outputs(sub)).argmax(1) != labels[index]
                robust[index[fooled]] = False
        finally:
            self.specs = original
            self.eps, self.alpha = budgets
        return adv

    def run_subsets(self, x, targets, masks=None, subsets=None, sample_ids=None):
        """One attacked set only (its single classification head): the targeted runs are per sample."""
        if subsets is None or len(subsets) != 1 or self.task_names(subsets[0]) != self.target_tasks:
            raise ValueError(f"apgdt attacks only its one head {self.target_tasks}; give that single set")
        return self(x, targets, masks, sample_ids)[None]


def _targeted(logits, labels, mask=None, classes=None):
    return targeted_dlr(logits, labels, classes)
