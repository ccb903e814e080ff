"""Weighting strategies: how per-task losses become parameter gradients.

An objective returns one loss per task with its graph; a :class:`Weighting` owns the backward pass
(``weighting.backward(losses, scaler=...)``), so the trainer does not know which method runs. Static weights
(uniform, the Zamir table, user-given; negative weights allowed) live in ``static.py``; gradient-based
aggregators over the shared encoder's per-task gradients (MGDA, UPGrad, PCGrad, ... through torchjd) in
``jacobian.py``.
"""
from mtrobust_fast.weighting.base import WEIGHTINGS, Weighting
from mtrobust_fast.weighting.jacobian import JacobianWeighting  # importing it registers the torchjd methods
from mtrobust_fast.weighting.static import StaticWeighting, parse_weights


def make_weighting(method, weights):
    """The weighting ``method`` (registered in ``WEIGHTINGS``: "static", or a torchjd aggregator name) over task
    weights ``{task: w}``."""
    if method not in WEIGHTINGS:
        raise ValueError(f"weighting: unknown method {method!r}; choose one of {', '.join(WEIGHTINGS)}")
    return WEIGHTINGS[method](weights)


__all__ = ["WEIGHTINGS", "JacobianWeighting", "StaticWeighting", "Weighting", "make_weighting", "parse_weights"]
