"""The one interface of every weighting strategy."""
import abc

import torch

from mtrobust_fast.registry import Registry

# Every weighting method registers a factory ``weights -> Weighting`` here (``weights``: {task name: w}).
WEIGHTINGS = Registry("weighting")


class Weighting(abc.ABC):
    """Turns ``{task name: scalar loss with its graph}`` into gradients on the model's parameters.

    ``backward`` accumulates into ``.grad`` (the caller zeroes and steps the optimiser) and returns the detached
    combined loss for logging. With a ``torch.amp.GradScaler`` the scaled loss is back-propagated, so the
    optimiser step must go through the same scaler. ``combine`` reduces per-task values (e.g. validation losses)
    to the one number that ranks checkpoints.
    """

    needs_model = False  # whether backward needs the model (its shared parameters) and the shared features

    @abc.abstractmethod
    def backward(self, losses, *, scaler=None, model=None, features=None):
        """Back-propagate the per-task ``losses``; returns the combined loss (detached). ``model``: the module
        (``shared_parameters()`` names its encoder); ``features``: the shared representation(s) every loss
        depends on the encoder only through, or None when some loss does not factor that way."""

    @abc.abstractmethod
    def combine(self, values):
        """The weighted sum of per-task numbers or tensors ``{task name: value}`` (any subset of the weighted
        tasks, e.g. validation losses without a regulariser term)."""

    def _check(self, losses, names):
        missing = [n for n in names if n not in losses]
        extra = [n for n in losses if n not in names]
        if missing or extra:
            raise KeyError(f"the weighting expects losses for {list(names)}; missing {missing}, unexpected {extra}")
        for name in names:
            loss = losses[name]
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError(f"the loss of {name!r} must be a scalar tensor")
