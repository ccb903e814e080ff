"""Command-line value parsers shared by the sub-commands (no torch import, so light commands stay light)."""
import argparse
import sys
from pathlib import Path

from mtrobust_fast import budgets
from mtrobust_fast.budgets import MAX_SEED
from mtrobust_fast.registry import SettingValueError


def budget(text):
    """A budget given as a float ("0.03") or a fraction ("8/255"); must be finite and >= 0."""
    try:
        return budgets.budget(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 or a fraction like 8/255, got {text!r}") \
            from None


def _integer(text, low, high, rule):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
    return value


def seed(text):
    """A random seed: an integer in [0, 2**63 - 1]."""
    return _integer(text, 0, MAX_SEED, "in [0, 2**63 - 1]")


def workers(text):
    """A number of data-loading processes (0: load in the main process)."""
    return _integer(text, 0, None, ">= 0 (0 loads data in the main process)")


def positive_int(text):
    return _integer(text, 1, None, "an integer >= 1")


def folder(text):
    """A folder to write into: any non-blank path (a blank one would write into the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path would write into the current folder; name a folder")
    return Path(text)


def add_budget_units(parser):
    parser.add_argument("--eps-units", type=int, choices=(1, 255), default=1,
                        help="units of --eps and --alpha: 1 = pixels in [0, 1] (8/255), 255 = grey levels "
                             "(8 means 8/255) (default 1)")


def pixel_budgets(args, names=("eps", "alpha")):
    """Bring ``args``' budgets to [0, 1] pixel units in place (:func:`mtrobust_fast.budgets.to_pixels`: divided
    by 255 under ``--eps-units 255``, refused above 1 either way)."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            setattr(args, name, budgets.to_pixels(value, args.eps_units, f"--{name}", "add --eps-units 255"))


def run_reporting(command, action, expected=(ValueError, FileNotFoundError, FileExistsError), flags=None):
    """``action()``'s exit code; an ``expected`` error, or any error raised in a DataLoader worker, is printed
    as one line (``mtrobust-fast COMMAND: error: ...``) and gives exit code 2. A library error that names an API
    argument (:class:`~mtrobust_fast.registry.SettingValueError`) is printed with that argument's flag:
    ``flags`` maps argument names to flags (default ``--name-with-dashes``)."""
    try:
        return action()
    except expected as error:
        message = error_line(error) if not isinstance(error, SettingValueError) else flagged(error, flags or {})
    except RuntimeError as error:
        if not is_worker_error(error):
            raise
        message = error_line(error)
    print(f"mtrobust-fast {command}: error: {message}", file=sys.stderr)
    return 2


def flagged(error, flags):
    """The message of a library error that names an API argument, with the argument's flag instead."""
    name = flags.get(error.setting, "--" + error.setting.replace("_", "-"))
    return f"{name}{'' if error.value is None else f' {error.value}'}: {error.reason}"


def error_line(error):
    """The one line to print for ``error``. An error raised in a DataLoader worker process reaches the main
    process with the worker's whole traceback in its message: keep only the original error's own message."""
    text = str(error)
    if "in DataLoader worker process" in text:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        text = lines[-1].split(": ", 1)[-1] if lines else text
    return text


def is_worker_error(error):
    """Whether ``error`` was raised inside a DataLoader worker (re-raised in the main process)."""
    return "in DataLoader worker process" in str(error)
