"""Learning-rate and budget schedules, evaluated at every optimiser update.

``step`` is the MTRobust code's schedule: a rate per range of epochs ("0:1e-3,120:1e-4"). The per-update kinds
take the schedule's (only) rate as the peak η and count updates u = 0 … U − 1 over the whole run (U = epochs ×
batches per epoch), with W warm-up updates (``warmup_epochs`` × batches per epoch):

- ``cosine``: η·(u + 1)/W while u < W, then η·½(1 + cos(π·(u − W)/(U − W))), which falls towards 0 at the end;
- ``onecycle``: the piecewise-linear cycle of fast adversarial training (Wong et al. 2020): η·(u + 1)/W up to the
  peak, then η·(U − u)/(U − W) down, reaching η/(U − W) at the last update; W defaults to 2/5 of the run.

No update runs at a rate of exactly 0. ``eps_warmup_epochs`` ramps the adversarial budget: ε·min(1, (u + 1)/E)
over E updates (the step size scales with it), which some single-step methods need to avoid collapsing early.
"""
import math

from mtrobust_fast.registry import Setting, number, text
from mtrobust_fast.training.recipes import RECIPES

KINDS = ("step", "cosine", "onecycle")
ONECYCLE_WARMUP = 0.4  # of the run, when warmup_epochs is not given


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
    if any(not 0 < lr < math.inf for _, lr in steps):
        raise ValueError(f"schedule learning rates must be positive and finite, got {text!r}")
    return steps


def lr_at(schedule, epoch):
    """The learning rate of a parsed step schedule at 0-based ``epoch``."""
    return [lr for start, lr in schedule if start <= epoch][-1]


SCHEDULE_KIND = Setting("schedule_kind", text, "step", choices=KINDS,
                        help="learning-rate schedule: step (EPOCH:LR ranges), cosine (warm-up, then cosine decay "
                             "to 0) or onecycle (linear up to the peak, linear down), per update; the peak of "
                             "cosine/onecycle is --lr")
WARMUP_EPOCHS = Setting("warmup_epochs", number, None, low=0,
                        help="epochs (fractions allowed) of linear learning-rate warm-up (default: onecycle 2/5 of "
                             "the run, cosine 0)")
EPS_WARMUP_EPOCHS = Setting("eps_warmup_epochs", number, 0.0, low=0,
                            help="epochs (fractions allowed) over which the training attack's eps (and step size) "
                                 "ramps linearly from 0 to its value")


@RECIPES.register("schedule")
class Schedule:
    """The learning rate and the budget factor of every update of a run.

    ``steps``: the parsed step schedule (for ``cosine``/``onecycle`` it must hold one rate, the peak);
    ``updates_per_epoch``: batches per epoch."""

    settings = (SCHEDULE_KIND, WARMUP_EPOCHS, EPS_WARMUP_EPOCHS)

    def __init__(self, steps, epochs, updates_per_epoch, kind="step", warmup_epochs=None, eps_warmup_epochs=0.0):
        if kind not in KINDS:
            raise ValueError(f"schedule_kind must be one of {KINDS}, got {kind!r}")
        if kind != "step" and len(steps) != 1:
            raise ValueError(f"schedule_kind {kind}: give the peak learning rate as lr (one rate), not the step "
                             f"schedule {steps}")
        if kind == "step" and warmup_epochs:
            raise ValueError("warmup_epochs: the step schedule has no warm-up; use schedule_kind cosine or onecycle")
        if epochs < 1 or updates_per_epoch < 1:
            raise ValueError(f"a schedule needs epochs and updates per epoch >= 1, got {epochs}, {updates_per_epoch}")
        self.steps, self.kind, self.per_epoch = steps, kind, updates_per_epoch
        self.total = epochs * updates_per_epoch
        if warmup_epochs is None:
            warmup_epochs = ONECYCLE_WARMUP * epochs if kind == "onecycle" else 0.0
        self.warmup = round(warmup_epochs * updates_per_epoch)
        if kind != "step" and self.warmup >= self.total:
            raise ValueError(f"warmup_epochs: {warmup_epochs:g} epochs leave no update after the warm-up of a "
                             f"{epochs}-epoch run")
        self.eps_warmup = round((eps_warmup_epochs or 0.0) * updates_per_epoch)

    def lr(self, epoch, batch):
        """The rate of update ``batch`` (0-based) of 0-based ``epoch``."""
        if self.kind == "step":
            return lr_at(self.steps, epoch)
        peak, u = self.steps[0][1], epoch * self.per_epoch + batch
        if u < self.warmup:
            return peak * (u + 1) / self.warmup
        if self.kind == "cosine":
            return peak * 0.5 * (1 + math.cos(math.pi * (u - self.warmup) / (self.total - self.warmup)))
        return peak * (self.total - u) / (self.total - self.warmup)

    def eps_factor(self, epoch, batch):
        """The fraction of the adversarial budget in force at update ``batch`` of ``epoch``."""
        if not self.eps_warmup:
            return 1.0
        return min(1.0, (epoch * self.per_epoch + batch + 1) / self.eps_warmup)
