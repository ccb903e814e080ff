"""Weight averaging: an exponential moving average (EMA) of the model's weights over training updates.

Robust models are judged on averaged weights today: the average sits in a flatter, more robust region than
the last iterate and smooths out the epoch-to-epoch swings of adversarial training. After update n (0-based)
the average becomes ``avg = d_n·avg + (1 − d_n)·w`` with ``d_n = min(decay, (1 + n)/(warmup + n))``: early
updates weigh more (close to a plain mean of the first iterates), so a short run is not dominated by its
random initial weights; ``warmup = 1`` uses ``decay`` from the start. BatchNorm statistics are handled by
averaging the running mean and variance buffers the same way (integer buffers, the batch counters, are copied),
so the averaged model needs no recomputation pass. The trainer validates, selects and saves the averaged model;
see :class:`~mtrobust_fast.training.loop.Trainer`.
"""
import copy

import torch

from mtrobust_fast.registry import Setting, integer, number
from mtrobust_fast.training.recipes import RECIPES


def _check_decay(value):
    if not value < 1:
        raise ValueError(f"must be < 1 (1 would never move from the initial weights), got {value!r}")


EMA = Setting("ema", number, None, low=0, check=_check_decay,
              help="keep an exponential moving average of the weights with this decay, e.g. 0.999 (validated, "
                   "selected and saved as the model; default: off)")
EMA_WARMUP = Setting("ema_warmup", integer, 10, low=1,
                     help="EMA warm-up: the decay at update n is min(ema, (1 + n)/(ema_warmup + n)); 1: none")


@RECIPES.register("ema")
class WeightAverage:
    """The averaged copy of ``model`` (which it starts equal to) and the number of updates folded in."""

    settings = (EMA, EMA_WARMUP)

    def __init__(self, model, decay, warmup=10):
        EMA.parse(decay)
        EMA_WARMUP.parse(warmup)
        self.model = copy.deepcopy(model).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.decay, self.warmup, self.updates = float(decay), int(warmup), 0

    def decay_at(self, update):
        """The decay applied at 0-based ``update``."""
        return min(self.decay, (1 + update) / (self.warmup + update))

    @torch.no_grad()
    def update(self, model):
        """Fold ``model``'s current weights and buffers into the average."""
        d = self.decay_at(self.updates)
        averaged, current = self.model.state_dict(), model.state_dict()
        for name, value in averaged.items():
            if value.is_floating_point() and d > 0:
                value.mul_(d).add_(current[name].detach(), alpha=1 - d)
            else:
                value.copy_(current[name])
        self.updates += 1

    def load(self, state_dict, updates):
        """Continue from a saved average (a resumed run)."""
        self.model.load_state_dict(state_dict)
        self.updates = int(updates)
