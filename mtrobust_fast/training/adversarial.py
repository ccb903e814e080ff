"""Adversarial training objectives on the attack engine, and robust validation.

Every inner attack is the project's PGD/FGSM (updates through the fused ``attack_step`` operator), run on the
unwrapped module (never through the DDP wrapper) in the attack's ``model_mode``: "eval" (default, as
torchattacks does during training) or "train" (batch statistics, BatchNorm running statistics untouched).
The attack's random start is drawn from a seed taken from torch's global generator, which the trainer re-seeds
every epoch, so a resumed run draws the same perturbations as an uninterrupted one.

Objectives (``attacked``: the tasks whose loss the inner attack raises; the others are still trained):

- ``madry`` (Madry et al. 2018): every task's loss at x_adv = PGD(x).
- ``madry_mix``: attacked tasks 0.5·L(x) + 0.5·L(x_adv), the other tasks L(x) (what the GAT code called
  "MADRY").
- ``trades`` (Zhang et al. 2019): L_t(x) + β·D_t(f(x_adv), f(x)) for attacked tasks, D = KL(softmax f(x) ‖
  softmax f(x_adv)) for classification and segmentation, L1 between outputs for regression tasks; the inner
  attack maximises D from a uniform random start (the paper started at x + 0.001·N(0, 1)).
- ``mart`` (Wang et al. 2020): for attacked softmax classification heads, a boosted cross-entropy at x_adv plus
  β·KL(clean ‖ adversarial) weighted by how wrong the clean prediction is (:func:`mart_loss`).
- ``fgsm_rs`` (Wong et al. 2020): ``madry`` with a single FGSM step from a uniform random start, α = 1.25·ε
  by default.
- ``nfgsm`` (de Jorge et al. 2022): ``madry`` at one FGSM step of α = ε from noise uniform in 2ε, left
  unprojected onto the ε-ball.
- ``free`` (Shafahi et al. 2019): each batch is replayed m times; one backward gives the parameter gradient
  (the optimiser steps) and the input gradient, with which the perturbation δ takes a step of α (default ε) and
  is projected. δ is carried across replays and batches and restarts at 0 every epoch. Because the perturbation
  ascends the same weighted loss the parameters descend, ``free`` attacks every trained task.
"""
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F

from mtrobust_fast import ops
from mtrobust_fast.attacks import ATTACKS, FGSM, NFGSM, PGD, TaskSpec, build_attack
from mtrobust_fast.attacks.pgd import NFGSM_NOISE
from mtrobust_fast.tasks import opmath
from mtrobust_fast.tasks.classification import ClassificationTask
from mtrobust_fast.registry import Registry, Setting, integer, number
from mtrobust_fast.training.objectives import Objective, ObjectiveOutput, forward

OBJECTIVES = Registry("adversarial objective")  # every adversarial training objective registers itself here
FREE = "free"  # Free's replayed perturbation: an inner "attack" that is never built as one


def draw_seed():
    """A seed for one inner attack, from torch's global generator (re-seeded by the trainer every epoch)."""
    return int(torch.randint(0, 2 ** 62, (1,)).item())


def default_alpha(attack, eps, steps):
    """The step size when none is given: PGD's own (2.5·ε/steps), 1.25·ε for FGSM with a random start (Wong et
    al.'s fast adversarial training), ε for Free (Shafahi et al.)."""
    if attack == FREE:
        return eps
    return 1.25 * eps if ATTACKS[attack] is FGSM else ATTACKS[attack].default_alpha(eps, steps)


@dataclass(frozen=True)
class AttackSettings:
    """The inner attack of an objective or of robust validation."""

    attack: str = "pgd"  # a registered attack ("pgd", "fgsm"), or FREE (never built as an attack)
    norm: str = "linf"
    eps: float = 8 / 255
    alpha: Optional[float] = None  # None: default_alpha
    steps: int = 10
    model_mode: str = "eval"
    autocast: Optional[torch.dtype] = None
    options: tuple = ()  # (setting, value) pairs of the attack's own declared settings (nfgsm_noise)

    @property
    def step_size(self):
        return default_alpha(self.attack, self.eps, self.steps) if self.alpha is None else self.alpha

    def build(self, model, tasks, attacked, seed, deterministic=False, early_exit=True, fold_batchnorm=False):
        """The attack on ``model`` (unwrapped from DDP by the attack) raising the losses of ``attacked``.
        ``early_exit=False`` turns the attack's exact early exit off where it has one, ``fold_batchnorm`` runs an
        eval-mode attack on the model with BatchNorms folded into convolutions (see ``AdversarialObjective``)."""
        cls = ATTACKS[self.attack]
        return build_attack(self.attack, model, tasks, eps=self.eps, norm=self.norm, alpha=self.step_size,
                            steps=self.steps if cls.takes("steps") else None,
                            random_start=True, target_tasks=list(attacked), seed=seed,
                            deterministic=deterministic, model_mode=self.model_mode, autocast=self.autocast,
                            early_exit=None if early_exit or not cls.takes("early_exit") else False,
                            fold_batchnorm=fold_batchnorm,
                            **dict(self.options))

    def describe(self):
        label = "Free" if self.attack == FREE else f"{self.attack.upper()}-{self.steps}" \
            if ATTACKS[self.attack].takes("steps") else f"{self.attack.upper()}-RS"
        return f"{label} {self.norm} eps={self.eps:.4g} alpha={self.step_size:.4g}"

    def scaled(self, factor):
        """These settings with the budget (and an explicit step size) times ``factor``: the ε warm-up."""
        return replace(self, eps=self.eps * factor, alpha=None if self.alpha is None else self.alpha * factor)

    def to_dict(self):
        out = {k: v for k, v in asdict(self).items() if k not in ("autocast", "options")}
        return {**out, **dict(self.options)}


class AdversarialObjective(Objective):
    """Shared parts: the task losses, the attacked task names, the inner attack's settings.

    ``inner_attack``: the attack it trains against (what ``AttackSettings.attack`` is for it); ``settings``: its
    own declared settings, passed by :func:`make_objective`."""

    name = "adversarial"
    inner_attack = PGD.registered_name
    settings = ()

    def __init__(self, losses, attack, attacked):
        self.losses, self.attack, self.full_attack = losses, attack, attack
        unknown = [n for n in attacked if n not in losses.names]
        if unknown or not attacked:
            raise ValueError(f"attack_tasks must be a non-empty subset of the trained tasks {losses.names}, "
                             f"got {list(attacked)}")
        self.attacked = [n for n in losses.names if n in attacked]
        self._holding, self._held = False, None

    def scale_budget(self, factor):
        self.attack = self.full_attack if factor == 1 else self.full_attack.scaled(factor)

    @contextmanager
    def holding(self):
        """Within this block the first adversarial batch is kept and returned again by later calls (AWP
        evaluates the objective twice on the same adversarial points)."""
        self._holding, self._held = True, None
        try:
            yield
        finally:
            self._holding, self._held = False, None

    def adversarial(self, model, images, targets, masks):
        """x_adv: the inner attack on the attacked tasks' losses (the held batch inside :meth:`holding`)."""
        if self._held is not None:
            return self._held
        x_adv = self.attack_points(model, images, targets, masks)
        if self._holding:
            self._held = x_adv
        return x_adv

    def attack_points(self, model, images, targets, masks):
        """The inner attack's points for this batch (subclasses attack another objective)."""
        return self.build_attack(model, self.losses.tasks)(images, targets, masks)

    def build_attack(self, model, specs):
        """The inner attack on ``specs`` for one batch. Its exact early exit is off: a training attack runs a few
        steps from a random start, where rows rarely repeat an iterate, and the exit's determinism probe would cost
        about 1.5 forward passes per batch (the points are the same either way). In eval ``model_mode`` it runs on
        the model with BatchNorms folded into convolutions (the same function up to float rounding, computed in
        fewer passes; the folded weights are recomputed after every optimiser step)."""
        return self.attack.build(model, specs, self.attacked, draw_seed(), early_exit=False, fold_batchnorm=True)

    def describe(self):
        return {"objective": self.name, "attacked": self.attacked, **self.attack.to_dict()}


@OBJECTIVES.register("madry")
class Madry(AdversarialObjective):
    """Every task's loss at the adversarial input."""

    name = "madry"

    def __call__(self, model, images, targets, masks):
        x_adv = self.adversarial(model, images, targets, masks)
        features = []
        return ObjectiveOutput(self.losses.means(forward(model, x_adv, features), targets, masks), features or None)


@OBJECTIVES.register("fgsm_rs")
class FgsmRS(Madry):
    """``madry`` with one FGSM step from a uniform random start."""

    name = "fgsm_rs"
    inner_attack = FGSM.registered_name


@OBJECTIVES.register("nfgsm")
class NFgsm(Madry):
    """``madry`` at N-FGSM's point (noise of ``nfgsm_noise``·ε, one step of α = ε by default, no projection onto
    the ε-ball; see :class:`~mtrobust_fast.attacks.NFGSM`)."""

    name = "nfgsm"
    inner_attack = NFGSM.registered_name
    settings = (NFGSM_NOISE,)

    def __init__(self, losses, attack, attacked, nfgsm_noise=2.0):
        noise = NFGSM_NOISE.parse(nfgsm_noise)
        super().__init__(losses, replace(attack, options=(("nfgsm_noise", noise),)), attacked)


@OBJECTIVES.register("madry_mix")
class MadryMix(AdversarialObjective):
    """Attacked tasks: half clean, half adversarial loss; other tasks: clean loss."""

    name = "madry_mix"

    def __call__(self, model, images, targets, masks):
        x_adv = self.adversarial(model, images, targets, masks)
        features = []
        outputs = forward(model, images, features)
        clean = self.losses.means(outputs, targets, masks)
        adv = self.losses.means(forward(model, x_adv, features), targets, masks, tasks=self.attacked)
        return ObjectiveOutput({n: 0.5 * clean[n] + 0.5 * adv[n] if n in adv else clean[n] for n in clean},
                               features or None, clean_outputs=outputs)


def _divergence_spec(task):
    """An attack spec whose per-sample loss is the task's divergence from a reference output (the 'target')."""
    return TaskSpec(task.name, task.divergence, key=task.name)


BETA = Setting("beta", number, 6.0, low=0, help="trades, mart: weight of the divergence term")
REPLAYS = Setting("replays", integer, 4, low=1, help="free: replays of each batch")


@OBJECTIVES.register("trades")
class Trades(AdversarialObjective):
    """Clean loss plus β times the divergence between adversarial and clean outputs (attacked tasks)."""

    name = "trades"
    settings = (BETA,)

    def __init__(self, losses, attack, attacked, beta=6.0):
        super().__init__(losses, attack, attacked)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
            raise ValueError(f"beta must be a number >= 0, got {beta!r}")
        self.beta = float(beta)
        self.specs = [_divergence_spec(t) for t in losses.tasks if t.name in self.attacked]

    def attack_points(self, model, images, targets, masks):
        """The point that most moves the attacked outputs away from the clean ones."""
        attack = self.build_attack(model, self.specs)
        clean_in_attack_mode = attack.outputs(images)
        reference = {n: clean_in_attack_mode[n] for n in self.attacked}
        return attack(images, reference, {n: m for n, m in masks.items() if n in self.attacked})

    def __call__(self, model, images, targets, masks):
        x_adv = self.adversarial(model, images, targets, masks)
        features = []
        clean_outputs = forward(model, images, features)
        adv_outputs = forward(model, x_adv, features)
        losses = self.losses.means(clean_outputs, targets, masks)
        for task in self.losses.tasks:
            if task.name in self.attacked:
                divergence = task.divergence(adv_outputs[task.name], clean_outputs[task.name], masks.get(task.name))
                losses[task.name] = losses[task.name] + self.beta * divergence.mean()
        return ObjectiveOutput(losses, features or None, clean_outputs=clean_outputs)

    def describe(self):
        return {**super().describe(), "beta": self.beta}


def mart_loss(clean_logits, adv_logits, labels, beta):
    """Per-sample MART loss (Wang et al., ICLR'20) of a softmax head: a boosted cross-entropy at the adversarial
    point, CE(x') − log(1 − max_{k≠y} p_k(x')), which also pushes down the strongest wrong class, plus β times
    KL(p(x) ‖ p(x')) weighted by 1 − p_y(x), so that the samples the model gets least right on clean inputs
    count most in the robustness term."""
    clean_logits, adv_logits = opmath(clean_logits), opmath(adv_logits)
    clean_log, adv_log = F.log_softmax(clean_logits, 1), F.log_softmax(adv_logits, 1)
    clean_probs, adv_probs = clean_log.exp(), adv_log.exp()
    strongest_other = adv_probs.scatter(1, labels[:, None], 0.0).max(1).values
    boosted = F.nll_loss(adv_log, labels, reduction="none") - torch.log((1 - strongest_other).clamp_min(1e-12))
    divergence = (clean_probs * (clean_log - adv_log)).sum(1)
    return boosted + beta * divergence * (1 - clean_probs.gather(1, labels[:, None])[:, 0])


@OBJECTIVES.register("mart")
class Mart(AdversarialObjective):
    """MART on the attacked tasks, which must be softmax classification heads (it is not defined for dense or
    regression outputs); the other tasks keep their clean loss. The inner attack is PGD on cross-entropy."""

    name = "mart"
    settings = (BETA,)

    def __init__(self, losses, attack, attacked, beta=6.0):
        super().__init__(losses, attack, attacked)
        self.beta = BETA.parse(beta)
        by_name = {t.name: t for t in losses.tasks}
        wrong = [n for n in self.attacked if not (isinstance(by_name[n], ClassificationTask)
                                                  and by_name[n].loss_name == "ce")]
        if wrong:
            raise ValueError(f"adversarial mart: is defined for softmax classification heads; attacked task(s) "
                             f"{wrong} are not (use madry or trades, or attack_tasks main)")

    def __call__(self, model, images, targets, masks):
        x_adv = self.adversarial(model, images, targets, masks)
        features = []
        clean_outputs = forward(model, images, features)
        adv_outputs = forward(model, x_adv, features)
        losses = self.losses.means(clean_outputs, targets, masks,
                                   tasks=[n for n in self.losses.names if n not in self.attacked])
        for name in self.attacked:
            losses[name] = mart_loss(clean_outputs[name], adv_outputs[name], targets[name], self.beta).mean()
        return ObjectiveOutput({n: losses[n] for n in self.losses.names}, features or None,
                               clean_outputs=clean_outputs)

    def describe(self):
        return {**super().describe(), "beta": self.beta}


@OBJECTIVES.register("free")
class Free(AdversarialObjective):
    """Free adversarial training: ``replays`` parameter updates per batch, each also stepping the perturbation."""

    name = "free"
    inner_attack = FREE
    settings = (REPLAYS,)

    def __init__(self, losses, attack, attacked, replays=4):
        super().__init__(losses, attack, attacked)
        if self.attacked != losses.names:
            raise ValueError("attack_tasks: free adversarial training steps the perturbation with the gradient of "
                             "the trained loss, so it attacks every trained task; use attack_tasks=all")
        if isinstance(replays, bool) or not isinstance(replays, int) or replays < 1:
            raise ValueError(f"replays must be an integer >= 1, got {replays!r}")
        self.replays = replays
        self.delta = None

    def start_epoch(self, epoch):
        self.delta = None

    def updates(self, model, images, targets, masks):
        delta = self.delta if self.delta is not None and self.delta.shape == images.shape else \
            torch.zeros_like(images)
        for _ in range(self.replays):
            perturbation = delta.detach().requires_grad_(True)
            x = (images + perturbation).clamp(0.0, 1.0)
            features = []
            yield ObjectiveOutput(self.losses.means(forward(model, x, features), targets, masks), features or None)
            # The trainer has back-propagated the weighted loss: the perturbation's gradient is its input gradient.
            if perturbation.grad is None:
                raise RuntimeError("free: the backward pass did not reach the input perturbation")
            grad = torch.nan_to_num(perturbation.grad, nan=0.0, posinf=0.0, neginf=0.0)
            delta = ops.attack_step(x.detach(), images, grad, eps=self.attack.eps, alpha=self.attack.step_size,
                                    norm=self.attack.norm) - images
        self.delta = delta.detach()

    def describe(self):
        return {**super().describe(), "replays": self.replays}


@dataclass
class RobustValidation:
    """Robust validation: a fixed loader (the first N validation images), the attack and what it attacks; the
    attack's random start is seeded with ``seed`` every time, so epochs are scored on the same perturbations'
    distribution."""

    loader: object
    attack: AttackSettings
    tasks: list
    attacked: list
    seed: int = 0

    def make_attack(self, model):
        return self.attack.build(model, self.tasks, self.attacked, self.seed, deterministic=False)

    def describe(self):
        return self.attack.describe()


def make_objective(name, losses, attack, attacked, **settings):
    """The adversarial objective ``name`` (registered in ``OBJECTIVES``); ``settings``: values of the settings it
    declares (trades: beta; free: replays). A setting it does not declare is an error."""
    if name not in OBJECTIVES:
        raise ValueError(f"adversarial must be one of {', '.join(OBJECTIVES)}, got {name!r}")
    cls = OBJECTIVES[name]
    declared = {s.name for s in cls.settings}
    stray = [key for key in settings if key not in declared]
    if stray:
        raise ValueError(f"adversarial {name!r} takes no {', '.join(stray)}")
    return cls(losses, attack, attacked, **settings)
