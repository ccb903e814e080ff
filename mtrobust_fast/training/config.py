"""What a training run is: one plain dataclass (recorded in every checkpoint) and the step LR schedule."""
from dataclasses import asdict, dataclass
from typing import Optional

from mtrobust_fast import tasks as task_registry
from mtrobust_fast.models.registry import canonical_encoder_name

# The source's step schedules (epoch index from which a learning rate applies), per optimiser:
# Adam for every Taskonomy job, SGD's config default otherwise.
DEFAULT_SCHEDULES = {"adam": "0:1e-3,120:1e-4,140:1e-5", "sgd": "0:1e-2,140:1e-3,200:1e-4"}
DEFAULT_WEIGHT_DECAY = {"adam": 0.0, "sgd": 1e-4}
OPTIMIZERS = tuple(DEFAULT_SCHEDULES)
WEIGHT_MODES = ("uniform", "zamir")


def parse_schedule(text):
    """"0:1e-3,120:1e-4" → [(0, 1e-3), (120, 1e-4)]: from epoch index 0 use 1e-3, from index 120 use 1e-4."""
    steps = []
    for part in str(text).split(","):
        epoch, sep, lr = part.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            steps.append((int(epoch), float(lr)))
        except ValueError:
            raise ValueError(f"schedule entries must look like EPOCH:LR, got {part.strip()!r} in {text!r}") from None
    if steps[0][0] != 0:
        raise ValueError(f"schedule must start at epoch 0, got {text!r}")
    if any(b[0] <= a[0] for a, b in zip(steps, steps[1:])):
        raise ValueError(f"schedule epochs must increase, got {text!r}")
    if any(not lr > 0 for _, lr in steps):
        raise ValueError(f"schedule learning rates must be positive, got {text!r}")
    return steps


def lr_at(schedule, epoch):
    """The learning rate of a parsed schedule at 0-based ``epoch``."""
    return [lr for start, lr in schedule if start <= epoch][-1]


@dataclass
class TrainConfig:
    """Every choice of a clean multi-task training run (the ``mtrobust-fast train`` flags)."""

    data: str
    out: str
    tasks: str = "sdnE"
    encoder: str = "resnet18"
    size: int = 256
    epochs: int = 150
    batch_size: int = 32
    val_batch_size: Optional[int] = None  # default: batch_size
    optim: str = "adam"
    lr: Optional[float] = None  # shorthand for the constant schedule "0:LR"
    schedule: Optional[str] = None  # default: DEFAULT_SCHEDULES[optim]
    momentum: float = 0.9  # SGD only
    weight_decay: Optional[float] = None  # default: DEFAULT_WEIGHT_DECAY[optim]
    weights: str = "uniform"
    main: Optional[str] = None
    seed: int = 42
    save_every: int = 50
    resume: bool = False
    amp: bool = False
    workers: int = 4
    limit_train: Optional[int] = None
    limit_val: Optional[int] = None
    val_before: bool = False
    device: str = "auto"
    layout: str = "auto"
    split_csv: Optional[str] = None
    point_threshold: Optional[int] = None
    progress: bool = True

    def __post_init__(self):
        self.tasks = task_registry.task_string(self.tasks)
        self.encoder = canonical_encoder_name(self.encoder)
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"optim must be one of {OPTIMIZERS}, got {self.optim!r}")
        if self.weights not in WEIGHT_MODES:
            raise ValueError(f"weights must be one of {WEIGHT_MODES}, got {self.weights!r}")
        if self.lr is not None and self.schedule is not None:
            raise ValueError("give lr (a constant rate) or schedule, not both")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        for name in ("epochs", "batch_size", "size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("val_batch_size", "limit_train", "limit_val"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 when given, got {value}")
        if self.save_every < 0 or self.workers < 0:
            raise ValueError(f"save_every and workers must be >= 0, got {self.save_every}, {self.workers}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        parse_schedule(self.lr_schedule)
        self.task_weights()

    def task_weights(self):
        """Loss weights by task name: uniform, or the paper's main/auxiliary ("Zamir") table for ``main``."""
        return task_registry.task_weights(self.tasks, main=self.main, mode=self.weights)

    @property
    def lr_schedule(self):
        """The schedule string in force: an explicit schedule, a constant lr, or the optimiser's default."""
        if self.schedule is not None:
            return self.schedule
        if self.lr is not None:
            return f"0:{self.lr}"
        return DEFAULT_SCHEDULES[self.optim]

    @property
    def decay(self):
        return DEFAULT_WEIGHT_DECAY[self.optim] if self.weight_decay is None else self.weight_decay

    def to_dict(self):
        return asdict(self)


# Settings that must not change when a run is resumed (the rest — epochs, workers, progress … — may).
RESUME_FIXED = ("tasks", "encoder", "size", "optim", "weights", "main", "seed", "batch_size")
