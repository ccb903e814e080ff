"""What a training run is: one plain dataclass, recorded in every checkpoint."""
import math
import os
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from typing import Any, Optional

import torch

from mtrobust_fast import task_names
from mtrobust_fast import tasks as task_registry
from mtrobust_fast.models.registry import canonical_encoder_name
from mtrobust_fast.attacks import ATTACKS, MODEL_MODES
from mtrobust_fast.budgets import MAX_SEED
from mtrobust_fast.tasks.auxiliary import AUXILIARY
from mtrobust_fast.training.adversarial import FREE, OBJECTIVES, AttackSettings
from mtrobust_fast.training.augment import check as check_augment
from mtrobust_fast.training.gat import ROUTINGS
from mtrobust_fast.training import averaging, awp, gradalign  # noqa: F401 - they register their recipe parts
from mtrobust_fast.training.recipes import RECIPES
from mtrobust_fast.training.regularisers import KINDS as CURVATURE_KINDS
from mtrobust_fast.training.schedules import parse_schedule
from mtrobust_fast.weighting import WEIGHTINGS
from mtrobust_fast.weighting import parse_weights

# The source's step schedules (epoch index from which a learning rate applies), per optimiser:
# Adam for every Taskonomy job, SGD's config default otherwise.
DEFAULT_SCHEDULES = {"adam": "0:1e-3,120:1e-4,140:1e-5", "sgd": "0:1e-2,140:1e-3,200:1e-4"}
DEFAULT_WEIGHT_DECAY = {"adam": 0.0, "sgd": 1e-4}
OPTIMIZERS = tuple(DEFAULT_SCHEDULES)
WEIGHT_MODES = ("uniform", "zamir")  # or explicit "TASK=W,..." weights
DEFAULT_TASKS = "sdnE"  # Taskonomy tasks when none are given
ADVERSARIAL = ("none",) + OBJECTIVES.names()
NORMS = ("linf", "l2")
CLASS_LOSSES = ("ce", "bce")
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # mixed precision's compute type
CURVATURE = ("none",) + CURVATURE_KINDS
KEEP = ("all", "weights")  # what a finished run's last.pt holds
SELECT = ("clean", "robust")  # best.pt: lowest weighted clean validation loss, or adversarial validation error
DEFAULT_ROBUST_VAL = 64  # validation images attacked every epoch when training adversarially


@dataclass
class _TrainConfig:
    """Every choice of a training run (the ``mtrobust-fast train`` flags), recorded in every checkpoint.

    ``tasks``: Taskonomy task letters (default sdnE); None on classification data (the model has one "class"
    head). ``size``: None means the images' own size (the first training image's side).
    ``adversarial``: "none" or an objective of :mod:`mtrobust_fast.training.adversarial`, with its inner
    attack (``attack_tasks``, ``norm``, ``eps``, ``alpha``, ``steps``, ``attack_mode``). The settings the
    objectives and auxiliary tasks declare (``beta`` of trades, ``replays`` of free, ``jigsaw_permutations``,
    ``jigsaw_grid``, ...) are fields too, added from their declarations (None: the declared default), so a new
    component's setting is a field with no change here. ``robust_val``: validation images attacked (PGD-``robust_val_steps``) every epoch; None
    means 64 when training adversarially, else 0. ``select``: which validation score picks ``best.pt``.
    """

    data: str
    out: str
    tasks: Optional[str] = None
    encoder: str = "resnet18"
    size: Optional[int] = None
    epochs: int = 150
    batch_size: int = 32
    val_batch_size: Optional[int] = None  # default: batch_size
    optim: str = "adam"
    lr: Optional[float] = None  # shorthand for the constant schedule "0:LR"
    schedule: Optional[str] = None  # default: DEFAULT_SCHEDULES[optim]
    momentum: float = 0.9  # SGD only
    weight_decay: Optional[float] = None  # default: DEFAULT_WEIGHT_DECAY[optim]
    weights: str = "uniform"
    weighting: str = "static"
    main: Optional[str] = None
    seed: int = 42
    save_every: int = 50
    resume: bool = False
    amp: Optional[str] = None  # mixed precision: "fp16" (CUDA only, loss scaling) or "bf16"; True means "fp16"
    channels_last: bool = False  # the model's weights and every batch in channels-last memory order
    workers: int = min(4, os.cpu_count() or 1)  # data-loading processes: at most the CPU count
    limit_train: Optional[int] = None
    data_subset: Optional[float] = None  # keep this fraction of the training set (its first images)
    limit_val: Optional[int] = None
    val_before: bool = False
    device: str = "auto"
    layout: str = "auto"
    split_csv: Optional[str] = None
    point_threshold: Optional[int] = None
    class_loss: str = "ce"
    segment_loss: str = "ce"  # "balanced": every class of an image weighs the same in its training loss
    findings: Optional[str] = None  # chest X-rays: comma-separated labels of the main head (default all)
    augment: str = "none"  # training batches: "flip", "crop" or "crop+flip" (see training.augment)
    adversarial: str = "none"
    attack_tasks: str = "all"
    norm: str = "linf"
    eps: float = 8 / 255
    alpha: Optional[float] = None
    steps: int = 10
    attack_mode: str = "eval"
    aux: Optional[str] = None
    domain_labels: bool = False
    aux_routing: str = "shared"
    curvature: str = "none"
    curvature_tasks: Optional[str] = None
    curvature_weight: float = 1.0
    robust_val: Optional[int] = None
    robust_val_steps: int = 10
    select: str = "clean"
    progress: bool = True
    keep: str = "all"  # "weights": a finished run's last.pt keeps the weights only (no optimiser state)

    def __post_init__(self):
        for name, setting in COMPONENT_SETTINGS.items():  # errors name the setting
            value = getattr(self, name)
            setattr(self, name, setting.default if value is None else setting.parse(value))
        if self.tasks is not None:
            self.tasks = task_registry.task_string(self.tasks)
        self.encoder = canonical_encoder_name(self.encoder)
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"optim must be one of {OPTIMIZERS}, got {self.optim!r}")
        if self.weights not in WEIGHT_MODES:
            parse_weights(self.weights)
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS.names()}, got {self.weighting!r}")
        self._check_adversarial()
        if isinstance(self.amp, bool):  # runs recorded before bf16 was a choice
            self.amp = "fp16" if self.amp else None
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {tuple(AMP_DTYPES)} or None, got {self.amp!r}")
        if self.amp == "fp16" and self.device == "cpu":
            raise ValueError("amp: fp16 mixed precision needs CUDA (its loss scaling); use bf16 on the CPU")
        check_augment(self.augment)
        if self.lr is not None and self.schedule is not None:
            raise ValueError("give lr (a constant rate) or schedule, not both")
        if self.lr is not None and not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be positive and finite, got {self.lr}")
        if not 0 <= self.momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1], got {self.momentum}")
        if self.weight_decay is not None and not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be finite and >= 0, got {self.weight_decay}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**63 - 1], got {self.seed}")
        for name in ("epochs", "batch_size", "steps", "robust_val_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("size", "val_batch_size", "limit_train", "limit_val"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 when given, got {value}")
        if self.data_subset is not None and not 0 < self.data_subset <= 1:
            raise ValueError(f"data_subset must be a fraction in (0, 1], got {self.data_subset}")
        if self.save_every < 0 or self.workers < 0:
            raise ValueError(f"save_every and workers must be >= 0, got {self.save_every}, {self.workers}")
        if self.keep not in KEEP:
            raise ValueError(f"keep must be one of {KEEP}, got {self.keep!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        steps = parse_schedule(self.lr_schedule)
        if self.schedule_kind != "step" and len(steps) != 1:
            raise ValueError(f"schedule_kind {self.schedule_kind}: give the peak learning rate as lr, not a step "
                             f"schedule ({self.lr_schedule})")
        if self.schedule_kind == "step" and self.warmup_epochs:
            raise ValueError("warmup_epochs: the step schedule has no warm-up; use schedule_kind cosine or onecycle")
        if self.gradalign and self.adversarial in ("none", "free"):
            raise ValueError(f"gradalign: needs an adversarial objective with one update per batch (its eps sets the "
                             f"noise), not {self.adversarial!r}")
        if self.awp_gamma and self.adversarial == "free":
            raise ValueError("awp_gamma: free replays each batch with a carried perturbation; AWP wraps the other "
                             "objectives")
        if self.tasks is not None:
            self.task_weights()

    def _check_adversarial(self):
        choices = {"adversarial": ADVERSARIAL, "norm": NORMS, "attack_mode": MODEL_MODES, "select": SELECT,
                   "class_loss": CLASS_LOSSES,
                   "segment_loss": tuple(task_registry.SEGMENT_LOSSES)}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        for key in ("eps", "alpha"):
            value = getattr(self, key)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"{key} must be in [0, 1] (pixels in [0, 1]; 8/255 for 8 grey levels), got {value}")
        if self.steps != _TrainConfig.steps and (self.adversarial == "none" or self.attack_settings().attack == FREE
                                                 or not ATTACKS[self.attack_settings().attack].takes("steps")):
            what = "clean training has no inner attack" if self.adversarial == "none" else \
                f"{self.adversarial} takes no steps (one step, or Free's replays)"
            raise ValueError(f"steps: {what}; leave it out (robust validation's PGD takes robust_val_steps)")
        if self.aux_routing not in ROUTINGS:
            raise ValueError(f"aux_routing must be one of {ROUTINGS}, got {self.aux_routing!r}")
        unknown = [a for a in self.aux_names if a not in AUXILIARY]
        if unknown:
            raise ValueError(f"aux: unknown auxiliary task(s) {unknown}; choose from {', '.join(AUXILIARY)}")
        if len(set(self.aux_names)) != len(self.aux_names):
            raise ValueError(f"aux: a task is given twice in {self.aux!r}")
        if self.curvature != "none" and self.aux_names and self.aux_routing != "shared":
            raise ValueError("curvature: compares two tasks' input gradients at one input; use aux_routing shared")
        if self.curvature not in CURVATURE:
            raise ValueError(f"curvature must be one of {CURVATURE}, got {self.curvature!r}")
        if not -math.inf < self.curvature_weight < math.inf:
            raise ValueError(f"curvature_weight must be finite, got {self.curvature_weight}")
        if self.robust_val is not None and self.robust_val < 0:
            raise ValueError(f"robust_val must be >= 0, got {self.robust_val}")
        if self.select == "robust" and self.robust_images == 0:
            raise ValueError("select: 'robust' needs robust validation (robust_val > 0)")

    @property
    def aux_names(self):
        """The auxiliary tasks, in the order given."""
        return [part.strip() for part in (self.aux or "").split(",") if part.strip()]

    @property
    def robust_images(self):
        """Validation images attacked every epoch (0: no robust validation)."""
        if self.robust_val is not None:
            return self.robust_val
        return DEFAULT_ROBUST_VAL if self.adversarial != "none" else 0

    def attack_settings(self, validation=False, autocast=None):
        """The inner attack of the objective, or (``validation``) the PGD of robust validation."""
        if validation:
            return AttackSettings("pgd", self.norm, self.eps, None, self.robust_val_steps, "eval", autocast)
        attack = OBJECTIVES[self.adversarial].inner_attack
        return AttackSettings(attack, self.norm, self.eps, self.alpha, self.steps, self.attack_mode, autocast)

    def task_weights(self, names=None):
        """Loss weights by task name: uniform, the paper's main/auxiliary ("Zamir") table for ``main``, or the
        explicit ``TASK=W,...`` weights (any sign). ``names``: the model's task names (default ``tasks``)."""
        if self.weights in WEIGHT_MODES and self.tasks is not None and names is None:
            return task_registry.task_weights(self.tasks, main=self.main, mode=self.weights)
        names = list(names) if names is not None else [t.name for t in task_registry.resolve(self.tasks)]
        if self.weights == "uniform":
            return {name: 1.0 / len(names) for name in names}
        if self.weights == "zamir":
            return task_registry.task_weights(names, main=self.main, mode="zamir")
        given = parse_weights(self.weights)
        by_name = {}
        for key, weight in given.items():
            try:
                found = task_names.model_tasks(key, names, "weights")
            except ValueError as error:
                raise ValueError(str(error)) from None
            if len(found) != 1:
                raise ValueError(f"weights: {key!r} names {len(found)} tasks; give one weight per task")
            by_name[found[0]] = weight
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ValueError(f"weights: give a weight for every task; missing {missing}")
        if all(w == 0 for w in by_name.values()):
            raise ValueError("weights: at least one task weight must be non-zero")
        return by_name

    @property
    def lr_schedule(self):
        """The schedule string in force: an explicit schedule, a constant lr, or the optimiser's default."""
        if self.schedule is not None:
            return self.schedule
        if self.lr is not None:
            return f"0:{self.lr}"
        return DEFAULT_SCHEDULES[self.optim]

    @property
    def amp_dtype(self):
        """The torch dtype mixed precision computes in, or None (full precision)."""
        return AMP_DTYPES.get(self.amp)

    @property
    def decay(self):
        return DEFAULT_WEIGHT_DECAY[self.optim] if self.weight_decay is None else self.weight_decay

    def to_dict(self):
        return asdict(self)


# The settings the training components declare (objectives, auxiliary tasks, recipe parts), by name.
COMPONENT_SETTINGS = {**OBJECTIVES.settings(), **AUXILIARY.settings(), **RECIPES.settings()}
if set(COMPONENT_SETTINGS) & {f.name for f in fields(_TrainConfig)}:
    raise TypeError(f"declared settings {set(COMPONENT_SETTINGS) & {f.name for f in fields(_TrainConfig)}} clash "
                    f"with training config fields")
TrainConfig = make_dataclass("TrainConfig", [(name, Any, field(default=None)) for name in COMPONENT_SETTINGS],
                             bases=(_TrainConfig,))
TrainConfig.__module__, TrainConfig.__doc__ = __name__, _TrainConfig.__doc__

# Settings that must not change when a run is resumed (the rest — epochs, workers, progress … — may).
RESUME_FIXED = ("tasks", "encoder", "size", "data_subset", "optim", "weights", "weighting", "main", "seed", "batch_size", "class_loss",
                "segment_loss", "findings", "augment",
                "adversarial", "attack_tasks", "norm", "eps", "alpha", "steps", "attack_mode",
                "curvature", "curvature_tasks", "curvature_weight", "aux", "domain_labels", "aux_routing",
                "select") + tuple(COMPONENT_SETTINGS)
