"""Named components and the settings they declare, in one small mechanism used by every kind of component.

A component (an attack, a weighting method, an auxiliary task, ...) registers itself where it is defined::

    ATTACKS = Registry("attack")

    @ATTACKS.register("pgd")
    class PGD(Attack):
        settings = (ALPHA, STEPS, DENSE_LOSS)

and declares each of its optional settings once as a :class:`Setting` (type, default, bounds, help, whether it is
a sweep key and whether it enters a sweep cell's id). Front-ends derive what they need from the declarations:
the command line builds its flags and ``--help`` from them, a sweep its keys, their checks and its cell ids, a
results table its settings columns. Nothing else lists a component by name.

The module imports no torch, so light commands can read declarations cheaply.
"""
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Optional

# ---- value converters: each takes what a user wrote (an API value, a YAML value, or command-line text) ----


def number(value):
    """A float given as a number or as text ("0.03", "8/255")."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(Fraction(text)) if "/" in text else float(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"expected a number or a fraction like 8/255, got {value!r}") from None
    if isinstance(value, (int, float)):
        return float(value)
    raise ValueError(f"expected a number, got {value!r}")


def integer(value):
    """An int given as an int or as text ("25"); floats and booleans are refused."""
    if isinstance(value, bool) or isinstance(value, float):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
    if isinstance(value, int):
        return value
    raise ValueError(f"expected an integer, got {value!r}")


def boolean(value):
    """True/False, or the text true/false/yes/no/1/0."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "false", "no", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    raise ValueError(f"expected true or false, got {value!r}")


def text(value):
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value.strip()


def number_list(value):
    """A tuple of floats from a list or comma-separated text ("0,1,10")."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"expected a list of numbers (or comma-separated text like 0,1,10), got {value!r}")
    return tuple(number(item) for item in items)


# ---- declarations ----

SWEEP_KINDS = ("", "value", "grid")  # not a sweep key; one value per sweep; a list of values forms a grid axis


@dataclass(frozen=True)
class Setting:
    """One optional setting of a component.

    ``convert`` turns what a user wrote into the value (raising ValueError); ``choices``, ``low``/``high``
    (inclusive) and ``check`` (a callable raising ValueError) then constrain it. ``default`` is the component's
    own; None there means "the component chooses" (a default that depends on other settings).
    ``sweep``: "" (not a sweep key), "value" (one value per sweep) or "grid" (a list of values forms a grid axis);
    ``cell_id``: whether a sweep cell's id depends on it: True (when its value is not the default, so declaring
    a new setting leaves earlier sweeps' ids as they were), "always" (at the default too) or False.
    ``flag``: the command-line spelling when the name alone would be ambiguous there (AutoAttack's ``version``).
    """

    name: str
    convert: Callable[[Any], Any]
    default: Any = None
    help: str = ""
    choices: Optional[tuple] = None
    low: Optional[float] = None
    high: Optional[float] = None
    check: Optional[Callable[[Any], None]] = None
    sweep: str = ""
    cell_id: Any = True
    flag: Optional[str] = None

    def __post_init__(self):
        if self.sweep not in SWEEP_KINDS:
            raise ValueError(f"setting {self.name}: sweep must be one of {SWEEP_KINDS}, got {self.sweep!r}")
        if self.cell_id not in (True, False, "always"):
            raise ValueError(f"setting {self.name}: cell_id must be True, False or 'always', got {self.cell_id!r}")

    def hashed(self, value):
        """Whether a sweep cell whose component takes this setting with ``value`` hashes it into its id."""
        return self.cell_id == "always" or (self.cell_id is True and not self.is_default(value))

    def parse(self, value):
        """``value`` converted and checked; None stays None (the component's own default). Errors name the
        setting."""
        if value is None:
            return None
        try:
            value = self.convert(value)
            if self.choices is not None and value not in self.choices:
                raise ValueError(f"expected one of {', '.join(map(str, self.choices))}, got {value!r}")
            for item in value if isinstance(value, tuple) else (value,):
                if isinstance(item, (int, float)) and not isinstance(item, bool):
                    if isinstance(item, float) and not math.isfinite(item):
                        raise ValueError(f"must be finite, got {value!r}")
                    if self.low is not None and item < self.low:
                        raise ValueError(f"must be >= {self.low:g}, got {value!r}")
                    if self.high is not None and item > self.high:
                        raise ValueError(f"must be <= {self.high:g}, got {value!r}")
            if self.check is not None:
                self.check(value)
        except ValueError as error:
            raise SettingValueError(self.name, str(error)) from None
        return value

    def is_default(self, value):
        """Whether ``value`` leaves the component at its own default (None, or equal to ``default``)."""
        return value is None or value == self.default


class SettingValueError(ValueError):
    """A bad value of a setting; ``setting`` names it as the API does (front-ends translate the name into their
    own, e.g. a flag), ``value`` optionally says which value (an attack's name), ``reason`` what is wrong."""

    def __init__(self, setting, reason, value=None):
        super().__init__(f"{setting}{'' if value is None else f' {value}'}: {reason}")
        self.setting, self.reason, self.value = setting, reason, value


class Registry:
    """Components of one kind by name, registered where they are defined (:meth:`register`)."""

    def __init__(self, kind):
        self.kind = kind
        self._items = {}

    def register(self, name):
        """Decorator registering a component class (or factory) under ``name``; it gets ``registered_name``.
        The settings it declares (``settings``, a tuple of :class:`Setting`) must agree, name by name, with those
        of the components already registered."""

        def add(component):
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            known = self.settings()
            for setting in getattr(component, "settings", ()):
                if not isinstance(setting, Setting):
                    raise TypeError(f"{self.kind} {name!r}: settings must be Setting declarations, got {setting!r}")
                if setting.name in known and known[setting.name] != setting:
                    raise ValueError(f"{self.kind} {name!r} declares setting {setting.name!r} differently from "
                                     f"another {self.kind}; share one declaration")
            self._items[name] = component
            component.registered_name = name
            return component

        return add

    def unregister(self, name):
        """Remove ``name`` (for tests that register a component of their own)."""
        del self._items[name]

    def __contains__(self, name):
        return name in self._items

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)

    def __getitem__(self, name):
        return self.get(name)

    def values(self):
        return self._items.values()

    def names(self):
        return tuple(self._items)

    def get(self, name):
        """The component ``name``; ValueError listing the choices otherwise."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self._items)}") from None

    def settings(self):
        """Every setting declared by a registered component, by name, in registration order."""
        out = {}
        for component in self._items.values():
            for setting in getattr(component, "settings", ()):
                out.setdefault(setting.name, setting)
        return out

    def takers(self, setting):
        """Names of the components that declare ``setting`` (a name)."""
        return [name for name, c in self._items.items() if any(s.name == setting for s in getattr(c, "settings", ()))]
