"""Multi-task training: a loop with a pluggable per-batch objective (clean now; adversarial and GAT next)."""
from mtrobust_fast.training.config import TrainConfig, lr_at, parse_schedule
from mtrobust_fast.training.loop import Trainer
from mtrobust_fast.training.objectives import CleanObjective, ObjectiveOutput, WeightedTaskLoss
from mtrobust_fast.training.runner import train

__all__ = [
    "CleanObjective",
    "ObjectiveOutput",
    "TrainConfig",
    "Trainer",
    "WeightedTaskLoss",
    "lr_at",
    "parse_schedule",
    "train",
]
