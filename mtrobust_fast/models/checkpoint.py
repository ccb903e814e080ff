"""Checkpoints that hold only plain data and tensors, load with ``torch.load(weights_only=True)``, and rebuild
their model from the file alone (the source pickled whole modules behind DataParallel ``module.`` prefixes).

File layout: ``{"format": FORMAT, "config": model.config, "state_dict": ..., "meta": {...}}``.
"""
import os

import torch

from mtrobust_fast.files import atomic_write
from mtrobust_fast.models import libmtl, source_import
from mtrobust_fast.models.registry import model_from_config

FORMAT = "mtrobust-fast/multitask-checkpoint/v1"


def _check_plain(value, where):
    """Raise TypeError unless ``value`` is something ``torch.load(weights_only=True)`` can read back."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.dtype, torch.device)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where} has a key of type {type(key).__name__}; only str/int keys are allowed")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__name__}; checkpoints hold only tensors, numbers, strings, lists and dicts"
    )


def save_checkpoint(path, model, **metadata):
    """Write ``model`` (its config and state_dict) plus ``metadata`` to ``path`` atomically.

    The file is written next to ``path`` under a temporary name and renamed over it, so an interrupted save
    never leaves a truncated checkpoint behind (see :mod:`mtrobust_fast.files`). ``model`` may be wrapped (DDP): its ``.module`` is saved.
    """
    model = getattr(model, "module", model)
    if not getattr(model, "config", None):
        raise ValueError("model has no config; build it with mtrobust_fast.models.build_model")
    payload = {"format": FORMAT, "config": dict(model.config), "state_dict": model.state_dict(), "meta": metadata}
    _check_plain(payload["config"], "config")
    _check_plain(metadata, "metadata")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path


def load_plain(path, map_location="cpu"):
    """The object stored at ``path``, read with ``torch.load(weights_only=True)`` (no code runs); FileNotFoundError
    or ValueError naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any file that is not a checkpoint: pickle, zip, key, value errors
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        detail = next((line for line in lines if line.startswith("WeightsUnpickler error")),
                      f"{type(err).__name__}: {lines[0]}")
        raise ValueError(f"{path} cannot be read as a checkpoint (torch.load weights_only failed: {detail})") from err


def read_checkpoint(path, map_location="cpu"):
    """Load and validate the raw checkpoint dict (format, config, state_dict, meta) without building a model.

    A checkpoint of the MTRobust / AAAI'22 training code (:mod:`mtrobust_fast.models.source_import`) or a state
    dict saved by LibMTL's trainer (:mod:`mtrobust_fast.models.libmtl`) is recognised by its keys and converted on
    the fly, so it is accepted wherever a checkpoint is."""
    path = os.fspath(path)
    payload = load_plain(path, map_location)
    if source_import.is_source_payload(payload):
        return source_import.convert(payload, where=path)
    if libmtl.is_libmtl_state_dict(payload):
        return libmtl.convert(payload, where=path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path} is not an mtrobust-fast checkpoint (expected format {FORMAT!r}, found {found!r})")
    for key in ("config", "state_dict", "meta"):
        if not isinstance(payload.get(key), dict):
            raise ValueError(f"{path} is a damaged checkpoint: its {key!r} entry is missing or not a dict")
    odd = next((name for name, value in payload["state_dict"].items() if not isinstance(value, torch.Tensor)), None)
    if odd is not None:
        raise ValueError(f"{path} is a damaged checkpoint: its state_dict entry {odd!r} is a "
                         f"{type(payload['state_dict'][odd]).__name__}, not a tensor")
    return payload


def _state_dict_mismatch(expected, found):
    """Describe how ``found`` differs from ``expected`` (missing, unexpected, wrong shape), or '' if it matches."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [
        f"{k} {tuple(found[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and tuple(found[k].shape) != tuple(v.shape)
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape (file vs model)", reshaped)):
        if items:
            more = f" … (+{len(items) - 5} more)" if len(items) > 5 else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:5])}{more}")
    return "; ".join(parts)


def _check_values(path, expected, found):
    """Every tensor of ``found`` has the dtype kind of the model's (``load_state_dict`` would silently truncate
    float weights stored as integers), is finite, and BatchNorm running variances are >= 0 (a negative one
    gives NaN outputs)."""
    for name, value in found.items():
        want = expected[name]
        if want.is_floating_point() != value.is_floating_point():
            raise ValueError(f"{path}: tensor {name} is stored as {value.dtype} but the model's is {want.dtype}; "
                             f"loading would {'truncate its values' if want.is_floating_point() else 'change it'} "
                             f"(a damaged or hand-edited checkpoint)")
    broken = [name for name, value in found.items()
              if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if broken:
        more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
        raise ValueError(f"{path}: tensor {broken[0]}{more} holds NaN or Inf values; the model cannot be used "
                         f"(a diverged training?)")
    negative = [name for name, value in found.items() if name.endswith("running_var") and bool((value < 0).any())]
    if negative:
        raise ValueError(f"{path}: BatchNorm variance {negative[0]} has negative entries; the model would output NaN "
                         f"(a damaged checkpoint)")


def load_checkpoint(path, map_location="cpu"):
    """Rebuild the model described by the checkpoint's config, load its weights, and return ``(model, meta)``.

    The model is returned in eval mode, on ``map_location``.
    """
    payload = read_checkpoint(path, map_location)
    config = payload["config"]
    try:
        model = model_from_config(config)
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: cannot rebuild the model from its config {config!r}: {err}") from err
    state_dict = payload["state_dict"]
    mismatch = _state_dict_mismatch(model.state_dict(), state_dict)
    if mismatch:
        raise ValueError(f"{path}: state_dict does not match its config {config!r}: {mismatch}")
    _check_values(path, model.state_dict(), state_dict)
    epoch = payload["meta"].get("epoch")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0):
        raise ValueError(f"{path}: its meta 'epoch' must be an integer >= 0, got {epoch!r} (a damaged checkpoint)")
    model.load_state_dict(state_dict)
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval(), payload["meta"]
