"""Fixed task weights: uniform 1/N, the AAAI'22 main/auxiliary (Zamir) table, or user-given; negative weights
subtract a task's loss (a "negative" task)."""
import math

from mtrobust_fast.weighting.base import WEIGHTINGS, Weighting


def parse_weights(text):
    """"s=1,d=-0.5" → {"s": 1.0, "d": -0.5} (keys: task letters or names, resolved by the caller)."""
    weights = {}
    for part in str(text).split(","):
        key, sep, value = part.strip().partition("=")
        try:
            if not sep or not key.strip():
                raise ValueError
            number = float(value)
        except ValueError:
            raise ValueError(f"task weights must look like TASK=WEIGHT,..., got {part.strip()!r} in {text!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"task weight of {key.strip()!r} must be finite, got {value!r}")
        if key.strip() in weights:
            raise ValueError(f"task {key.strip()!r} is weighted twice in {text!r}")
        weights[key.strip()] = number
    return weights


@WEIGHTINGS.register("static")
class StaticWeighting(Weighting):
    """Back-propagates Σ_t w_t · L_t with fixed ``weights`` ``{task name: w}`` (any sign, not all zero)."""

    def __init__(self, weights):
        if not weights:
            raise ValueError("weights must name at least one task")
        self.weights = {name: float(w) for name, w in weights.items()}
        bad = [name for name, w in self.weights.items() if not math.isfinite(w)]
        if bad:
            raise ValueError(f"task weights must be finite; {bad} are not")
        if all(w == 0 for w in self.weights.values()):
            raise ValueError("at least one task weight must be non-zero")

    def combine(self, values):
        return sum(self.weights[name] * value for name, value in values.items())

    def backward(self, losses, *, scaler=None, model=None, features=None):
        self._check(losses, list(self.weights))
        total = self.combine(losses)
        (total if scaler is None else scaler.scale(total)).backward()
        return total.detach()
