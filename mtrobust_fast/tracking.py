"""Experiment tracking for sweeps: local files always, Comet ML when asked.

``--tracker`` picks the kind (see :func:`make_tracker`):

* ``local`` (default): JSON-lines files under ``RUN_DIR/tracking/`` -- ``parameters.jsonl``,
  ``metrics.jsonl``, ``curves.jsonl`` (per-step series such as an attack's loss per step) and
  ``figures.jsonl`` (paths of the figures written). Nothing leaves the machine.
* ``comet``: the local files plus an online ``comet_ml.Experiment``. The API key is read from the
  ``COMET_API_KEY`` environment variable only -- never from a flag, so it cannot end up in shell history,
  ``argv`` or logged parameters. A missing key is an error raised before anything touches the network.
* ``comet-offline``: the local files plus a ``comet_ml.OfflineExperiment`` whose archive (a ``.zip``) is
  written under ``RUN_DIR/comet/``; upload it later with ``comet upload``. No key and no network needed.

Comet's automatic logging (code, git, environment, host, CLI arguments, stdout, framework hooks) is
switched off: it could capture environment variables or argv, and it reaches for details a sweep does
not need. Parameters are scrubbed before they are written anywhere: any entry whose name looks like a
secret (``*api_key*``, ``*apikey*``, ``*token*``, ``*secret*``, ``*password*``) or whose value contains
the ``COMET_API_KEY`` value is replaced by ``"<redacted>"``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

KINDS = ("local", "comet", "comet-offline")
KEY_VAR = "COMET_API_KEY"
REDACTED = "<redacted>"
_SECRET_NAME = re.compile(r"api_?key|token|secret|password", re.IGNORECASE)
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".svg"}
# Constructor switches that keep Comet from capturing anything beyond what the tracker logs explicitly.
_COMET_QUIET = dict(log_code=False, log_graph=False, auto_param_logging=False, auto_metric_logging=False,
                    parse_args=False, auto_output_logging=False, log_env_details=False, log_git_metadata=False,
                    log_git_patch=False, log_env_gpu=False, log_env_host=False, log_env_cpu=False,
                    log_env_network=False, log_env_disk=False, display_summary_level=0)


def redact(value, key: str | None = None):
    """``value`` with every occurrence of the API key (``COMET_API_KEY`` unless ``key`` is given) replaced by
    ``<redacted>`` when it is a string (a model name or path holding the key, say); other values unchanged."""
    key = os.environ.get(KEY_VAR) if key is None else key
    return value.replace(key, REDACTED) if key and isinstance(value, str) else value


def scrub(params: dict, key: str | None = None) -> dict:
    """Copy ``params`` with secret-looking names and any value containing ``key`` redacted (recursively)."""
    key = os.environ.get(KEY_VAR) if key is None else key
    out = {}
    for name, value in params.items():
        name = redact(str(name), key)
        if _SECRET_NAME.search(name) or (key and key in str(value) and not isinstance(value, dict)):
            out[name] = REDACTED
        elif isinstance(value, dict):
            out[name] = scrub(value, key)
        else:
            out[name] = value
    return out


def _plain(value):
    """JSON fallback for tensors, numpy scalars/arrays and paths."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


class Tracker:
    """Writes every record to ``run_dir/tracking/*.jsonl`` and mirrors it to a Comet experiment if given."""

    def __init__(self, run_dir, experiment=None):
        self.dir = Path(run_dir) / "tracking"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.experiment = experiment
        self._closed = False

    def _append(self, name: str, record: dict) -> None:
        # Append-and-close per record: a killed sweep keeps everything logged so far.
        with open(self.dir / f"{name}.jsonl", "a") as f:
            f.write(json.dumps(record, default=_plain) + "\n")

    def log_parameters(self, params: dict) -> None:
        params = scrub(params)
        self._append("parameters", params)
        if self.experiment is not None:
            self.experiment.log_parameters(params)

    def log_metrics(self, metrics: dict, step: int | None = None, prefix: str | None = None) -> None:
        metrics = {redact(f"{prefix}/{k}" if prefix else str(k)): _plain(v) if hasattr(v, "item") else v
                   for k, v in metrics.items()}
        self._append("metrics", {"step": step, "metrics": metrics})
        if self.experiment is not None:
            self.experiment.log_metrics(metrics, step=step)

    def log_curve(self, name: str, values) -> None:
        """Log a per-step series (index = step); Comet gets one metric point per step under ``name``."""
        values = [float(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]
        name = redact(name)
        self._append("curves", {"name": name, "values": values})
        if self.experiment is not None:
            for step, value in enumerate(values):
                self.experiment.log_metric(name, value, step=step)

    def log_figure(self, path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"figure {path} does not exist")
        self._append("figures", {"path": str(path.resolve())})
        if self.experiment is not None:
            if path.suffix.lower() in _IMAGE_SUFFIXES:
                self.experiment.log_image(str(path), name=path.name)
            else:
                self.experiment.log_asset(str(path), file_name=path.name)

    def close(self) -> None:
        """Finish the Comet experiment (writes the offline archive); safe to call twice."""
        if not self._closed and self.experiment is not None:
            self.experiment.end()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _import_comet():
    # Keep comet_ml from hooking into frameworks at import time; explicit logging only.
    os.environ.setdefault("COMET_DISABLE_AUTO_LOGGING", "1")
    try:
        import comet_ml
    except ImportError as e:
        raise ImportError("--tracker comet/comet-offline needs the comet_ml package: pip install comet_ml") from e
    return comet_ml


def check_tracker(kind: str) -> None:
    """Raise what :func:`make_tracker` would raise for ``kind`` (an unknown kind, no comet_ml, no API key) without
    creating anything or touching the network: for front-ends that must refuse before long work."""
    if kind not in KINDS:
        raise ValueError(f"unknown tracker {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "comet" and not os.environ.get(KEY_VAR):
        raise RuntimeError(f"--tracker comet needs the API key in the {KEY_VAR} environment variable "
                           f"(or use --tracker comet-offline)")
    if kind != "local":
        _import_comet()


def make_tracker(kind: str, run_dir, project: str | None = None, experiment_name: str | None = None) -> Tracker:
    """Build the tracker for ``--tracker KIND``; see the module docstring for what each kind writes."""
    check_tracker(kind)
    if kind == "local":
        return Tracker(run_dir)
    if kind == "comet":
        key = os.environ.get(KEY_VAR)
        experiment = _import_comet().Experiment(api_key=key, project_name=redact(project), **_COMET_QUIET)
    else:
        offline_dir = Path(run_dir) / "comet"
        offline_dir.mkdir(parents=True, exist_ok=True)
        experiment = _import_comet().OfflineExperiment(offline_directory=str(offline_dir), project_name=redact(project),
                                                       **_COMET_QUIET)
    if experiment_name:
        experiment.set_name(redact(experiment_name))
    return Tracker(run_dir, experiment)
