"""Projected gradient descent (Madry et al.) on the sum of the attacked tasks' per-sample losses, and FGSM."""
import dataclasses

from mtrobust_fast.attacks import early_exit
from mtrobust_fast.attacks.base import ALPHA, ATTACKS, DENSE_LOSS, EARLY_EXIT, STEPS, Attack
from mtrobust_fast.registry import Setting, boolean, number

STOP_ON_SUCCESS = Setting(
    "stop_on_success", boolean, False,
    help="classification heads: stop a row at its first iterate that every attacked head gets wrong (a robust "
         "accuracy lower than or equal to the full run's, not identical to it)")


@ATTACKS.register("pgd")
class PGD(Attack):
    """PGD on a multi-task model: each step ascends Σ_{t attacked} L_t per sample and projects.

    Args:
        model: an ``nn.Module`` returning a dict (keyed by task name), a tuple or a tensor.
        tasks: the model's tasks: None (``model.task_names``), a letter string like ``"sd"``, or a list of
            :class:`~mtrobust_fast.attacks.TaskSpec`, registry tasks, letters or names.
        eps, alpha: ball radius and step size in input units ([0, 1] pixels: 8/255 means 8/255); a float, or
            one value per sample of the batches the attack will see (per-row budgets). ``alpha`` defaults to
            2.5·eps/steps (Madry et al.'s rule; for L∞ and L2 alike).
        steps: number of iterations (>= 1).
        norm: ``"linf"`` or ``"l2"`` (per-sample norms).
        random_start: start uniformly inside the ball (default True for PGD).
        restarts: independent starts; the per-sample worst case (highest attacked loss) is kept.
        target_tasks: the attacked set (names or letters); default every task.
        seed, deterministic: with ``deterministic=True`` the random start of a sample depends only on
            (seed, its sample id, restart), so results do not depend on batch composition, and torch's
            deterministic algorithms are enabled during the attack.
        autocast: None, ``torch.bfloat16`` or ``torch.float16`` for the model's forward/backward.
        channels_last: run the model on channels_last inputs (faster convolutions on GPUs).
        fold_batchnorm: in eval mode, run a view of the model with each BatchNorm folded into the convolution
            before it (:mod:`~mtrobust_fast.models.folding`): the same function, up to float rounding, in fewer
            passes (on 2 CPU cores 1.07-1.25x faster per step for ResNets, most where activations are large).
            Adversarial training's inner attacks use it.
        lo, hi: the valid input range.
        model_mode: "eval" (default; BatchNorm running statistics, no dropout) or "train" (batch statistics as
            in training, with BatchNorm running statistics left untouched): the mode the model runs in during
            the attack, whatever mode it was in before (restored afterwards). A DDP/DataParallel wrapper is
            unwrapped: the attack runs on its module.
        record_steps: keep the per-row losses of each attacked task at every step of the last restart in
            ``step_losses`` (``{task name: [steps, R]}``, on the device), for attack curves.

    Differences from the AAAI'22 code: the random start is uniform in the ball (the source always started at
    the corner ``min(1, x + eps)``), and L2 norms are per sample (the source normalised over the whole batch).

    ``atk(x, targets, masks)`` returns the adversarial batch; ``atk.run_subsets(...)`` attacks many attacked
    sets at once.
    """

    cycles_exactly = True
    settings = (ALPHA, STEPS, DENSE_LOSS, EARLY_EXIT, STOP_ON_SUCCESS)

    def __init__(self, model, tasks=None, *, stop_on_success=False, **kwargs):
        super().__init__(model, tasks, **kwargs)
        self.stop_on_success = bool(stop_on_success)
        wrong = [s.name for s in self.specs if s.name in self.target_tasks and not s.top1]
        if self.stop_on_success and wrong:
            raise ValueError(f"stop_on_success needs classification heads (a 0/1 top-1 error); {wrong} are not")

    def _optimize(self, x, rows):
        return early_exit.iterate(self, x, rows, self._pgd_step)

    def _pgd_step(self, x, rows, state, number):
        self._keep_step_errors = self.stop_on_success
        try:
            _, _, grad = self._objective_and_grad(x, rows)
        finally:
            self._keep_step_errors = False
        if self.stop_on_success:  # a row already wrong everywhere stays where it is and leaves
            self._stopped = self._succeeded(x, rows, self._step_errors)
            grad[self._stopped] = 0
        self._step(x, rows, grad.unsqueeze(0))
        return state


@ATTACKS.register("fgsm")
class FGSM(PGD):
    """Fast gradient sign method: one step of size ``eps`` from the clean input (``alpha`` defaults to ``eps``).
    With ``random_start=True`` and a smaller ``alpha`` it is the FGSM-RS step of fast adversarial training."""

    default_random_start = False
    cycles_exactly = False  # one step: nothing to save
    settings = (ALPHA, DENSE_LOSS)
    refused = {**PGD.refused, "steps": "fgsm takes exactly one step; leave steps out or use pgd",
               "stop_on_success": "fgsm takes one step: there is nothing to stop"}

    @staticmethod
    def default_alpha(eps, steps):
        return eps

    def __init__(self, model, tasks=None, *, eps=8 / 255, alpha=None, **kwargs):
        if "steps" in kwargs:
            raise ValueError("FGSM takes exactly one step; use PGD for more")
        super().__init__(model, tasks, eps=eps, alpha=alpha, steps=1, **kwargs)


NFGSM_NOISE = Setting("nfgsm_noise", number, 2.0, low=0,
                     help="nfgsm: half-width of the uniform noise around the input, in multiples of eps")


@ATTACKS.register("nfgsm")
class NFGSM(FGSM):
    """N-FGSM (de Jorge et al., NeurIPS'22), the single-step attack of noise-augmented fast adversarial training:
    start from x + η with η uniform in the ball of radius ``nfgsm_noise``·eps (2·eps by default), take one signed
    gradient step of ``alpha`` (default eps), and do *not* project back onto the eps-ball: the training point
    may lie up to (nfgsm_noise·eps + alpha) from x. Only the input box [lo, hi] is enforced. The stronger noise
    and the missing projection are what keep single-step training from collapsing at larger budgets."""

    default_random_start = True
    settings = (ALPHA, DENSE_LOSS, NFGSM_NOISE)

    def __init__(self, model, tasks=None, *, nfgsm_noise=2.0, **kwargs):
        if kwargs.get("random_start") is False:
            raise ValueError("nfgsm: its noise is part of the method; random_start cannot be False")
        super().__init__(model, tasks, **kwargs)
        self.noise = NFGSM_NOISE.parse(nfgsm_noise)

    def _start(self, x0, ids, restart, eps):
        return super()._start(x0, ids, restart, eps * self.noise)

    def _optimize(self, x, rows):
        _, _, grad = self._objective_and_grad(x, rows)
        unprojected = dataclasses.replace(rows, eps=rows.eps * self.noise + rows.alpha)  # a ball the step cannot leave
        self._step(x, unprojected, grad.unsqueeze(0))
        return x


@ATTACKS.register("segpgd")
class SegPGD(PGD):
    """PGD on the SegPGD objective (Gu et al., ECCV'22) for segmentation heads: pixel cross-entropy weighted
    1 − λ on still-correct pixels and λ on wrong ones, λ rising from 0 to ½ over the steps (see
    :mod:`mtrobust_fast.attacks.dense`). Regression and classification heads keep their own losses."""

    def __init__(self, model, tasks=None, *, dense_loss="segpgd", **kwargs):
        super().__init__(model, tasks, dense_loss=dense_loss, **kwargs)


@ATTACKS.register("cospgd")
class CosPGD(PGD):
    """PGD on the CosPGD objective (Agnihotri et al., ICML'24): each pixel's loss weighted by the detached
    cosine between prediction and target, for segmentation and Taskonomy regression heads (see
    :mod:`mtrobust_fast.attacks.dense`)."""

    def __init__(self, model, tasks=None, *, dense_loss="cospgd", **kwargs):
        super().__init__(model, tasks, dense_loss=dense_loss, **kwargs)
