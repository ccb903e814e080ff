"""Weighting strategies: how per-task losses become parameter gradients.

An objective returns one loss per task with its graph; a :class:`Weighting` owns the backward pass
(``weighting.backward(losses, scaler=...)``), so the trainer does not know which method runs. Static weights
(uniform, the Zamir table, user-given; negative weights allowed) live in ``static.py``; gradient-based
aggregators (MGDA, PCGrad, ...) plug in beside it.
"""
from mtrobust_fast.weighting.base import Weighting
from mtrobust_fast.weighting.static import StaticWeighting, parse_weights

__all__ = ["StaticWeighting", "Weighting", "parse_weights"]
