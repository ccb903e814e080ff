"""The rules every front-end and attack applies to perturbation budgets and seeds (no torch import).

Budgets (eps, alpha) are in the units of the inputs, [0, 1] pixels for images: ``8/255`` means eight grey
levels. A budget is finite and >= 0; front-ends refuse one above 1 unless the user says the numbers are grey
levels (:func:`to_pixels`).
"""
import math

from mtrobust_fast.registry import number

MAX_SEED = 2 ** 63 - 1  # torch.manual_seed takes a signed 64-bit integer
UNITS = (1, 255)


def budget(value, name="eps"):
    """One budget, given as a number or as text ("0.03", "8/255"): finite and >= 0. Errors name ``name``."""
    try:
        result = number(value)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    if not math.isfinite(result) or result < 0:
        raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
    return result


def to_pixels(value, units=1, name="eps", hint="give it in grey levels (units of 255)"):
    """A budget in [0, 1] pixel units: ``value`` divided by 255 when ``units`` is 255 (grey levels). Either way
    the result must be at most 1 (images are in [0, 1]: 8 in pixel units is almost surely meant as 8/255; 300
    grey levels is no budget). ``hint``: how the caller's user gives grey levels (a flag, a key)."""
    if units not in UNITS:
        raise ValueError(f"eps_units must be 1 or 255, got {units!r}")
    if units == 255:
        if value > 255:
            raise ValueError(f"{name}: {value:g} grey levels is more than the whole range of 255 (images are in "
                             f"[0, 1])")
        return value / 255
    if value > 1:
        raise ValueError(f"{name}: {value:g} is above 1, but images are in [0, 1]: give {value:g}/255, or {hint}")
    return value


def seed(value, name="seed"):
    """A random seed: an integer in [0, 2**63 - 1]."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ValueError(f"{name}: must be an integer in [0, 2**63 - 1], got {value!r}")
    return value
