"""Weighting strategies: how per-task losses become parameter gradients.

An objective returns one loss per task with its graph; a :class:`Weighting` owns the backward pass
(``weighting.backward(losses, scaler=...)``), so the trainer does not know which method runs. Static weights
(uniform, the Zamir table, user-given; negative weights allowed) live in ``static.py``; gradient-based
aggregators over the shared encoder's per-task gradients (MGDA, UPGrad, PCGrad, ... through torchjd) in
``jacobian.py``.
"""
from mtrobust_fast.weighting.base import Weighting
from mtrobust_fast.weighting.static import StaticWeighting, parse_weights

METHODS = ("static", "ew", "mean", "mgda", "upgrad", "pcgrad", "imtlg", "aligned_mtl", "dualproj", "graddrop",
           "cagrad", "nashmtl")


def make_weighting(method, weights):
    """The weighting ``method`` ("static", or a torchjd aggregator name) over task weights ``{task: w}``."""
    if method == "static":
        return StaticWeighting(weights)
    from mtrobust_fast.weighting.jacobian import JacobianWeighting

    return JacobianWeighting(method, weights)


__all__ = ["METHODS", "StaticWeighting", "Weighting", "make_weighting", "parse_weights"]
