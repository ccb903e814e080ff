"""Training: a loop with a pluggable per-batch objective (clean, or adversarial on the attack engine) and a
pluggable weighting strategy (``mtrobust_fast.weighting``)."""
from mtrobust_fast.training.adversarial import AttackSettings, RobustValidation, make_objective
from mtrobust_fast.training.config import TrainConfig
from mtrobust_fast.training.schedules import lr_at, parse_schedule
from mtrobust_fast.training.loop import Trainer
from mtrobust_fast.training.objectives import CleanObjective, Objective, ObjectiveOutput, TaskLosses
from mtrobust_fast.training.runner import train

__all__ = [
    "AttackSettings",
    "CleanObjective",
    "Objective",
    "ObjectiveOutput",
    "RobustValidation",
    "TaskLosses",
    "TrainConfig",
    "Trainer",
    "lr_at",
    "make_objective",
    "parse_schedule",
    "train",
]
