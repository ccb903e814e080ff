"""A sweep's settings (a YAML or TOML file, command-line flags, or both) expanded into cells.

A cell is one model × one attack configuration (attack, norm, eps, alpha, steps, restarts, seed) with all of its
attacked sets, which run batched (``Attack.run_subsets``). Its id hashes everything that changes its rows plus the
model's identity (the checkpoint's content hash, or a train spec's settings), so re-running a sweep finds the cells
it has already finished, and a changed or retrained checkpoint is never mistaken for an old one.
"""
import hashlib
import itertools
import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from mtrobust_fast import budgets
from mtrobust_fast.evaluation import metrics
from mtrobust_fast import tasks as task_registry
from mtrobust_fast.attacks import ATTACKS
from mtrobust_fast.models.checkpoint import read_checkpoint
from mtrobust_fast.registry import SettingValueError
from mtrobust_fast.training.config import DEFAULT_TASKS, TrainConfig

# The sweep's own keys: key -> (default, kind); kind "list:..." keys take one value or a list and form the grid.
# The attacks' sweep keys (alpha, steps, dense_loss, grid_weights, ...) come from their declared settings.
CORE_KEYS = {
    "data": (None, "path"),
    "models": (None, "models"),
    "attacks": (["pgd"], "list:attack"),
    "norms": (["linf"], "list:norm"),
    "eps_units": (1, "units"),
    "eps": ([8 / 255], "list:budget"),
    "restarts": ([1], "list:int"),
    "seeds": ([0], "list:seed"),
    "sets": (["all"], "sets"),
    "main": (None, "task"),
    "split": ("val", "split"),
    "limit": (None, "int?"),
    "size": (None, "int?"),
    "batch_size": (16, "int"),
    "gradients": (True, "bool"),
    "deterministic": (False, "bool"),
    "per_sample": (False, "bool"),
    "max_cells": (10000, "int"),
}
SET_WORDS = ("main", "all", "subsets")
MODEL_KEYS = ("checkpoint", "train", "name", "main", "surrogate")
NORMS = ("linf", "l2")
SPLITS = ("train", "val", "test")


class PlanError(ValueError):
    """A bad sweep setting; the message starts with the key (``eps[1]``, ``models[0].train``)."""


@dataclass(frozen=True)
class Model:
    name: str
    tasks: str  # letters, in the model's order
    encoder: str
    weights: str  # task-weight mode ("uniform", "zamir") or "" when the checkpoint does not say
    main: str  # main task letter, for the attacked set "main"
    identity: str  # "sha256:<checkpoint content>" or "train:<spec hash>"
    checkpoint: str  # the file to attack (for a train spec: where it will be written)
    train: str = ""  # JSON of the TrainConfig fields to train it with, or "" for a given checkpoint
    surrogate: str = ""  # a checkpoint that crafts the attacks (transfer), or "" (white-box)
    recipe: str = ""  # how it was trained apart from its tasks and seed (recipe_label); not part of cell ids


@dataclass(frozen=True)
class Cell:
    cell_id: str
    model: Model
    attack: str
    norm: str
    eps: float
    alpha: object  # float, or None for the attack's own (or one that takes no alpha)
    steps: object  # int, or None for the attack's own
    restarts: int
    seed: int
    sets: tuple  # attacked-set labels (task letters), in the order they are reported
    data: str
    split: str
    limit: object
    size: object
    batch_size: int
    gradients: bool
    deterministic: bool
    # The attack's other declared sweep settings it takes, {name: value} (None: the attack's own).
    options: dict = field(default_factory=dict, hash=False)
    # Also keep each image's values (OUT/per_sample/<cell_id>.parquet); output only, not part of the id.
    per_sample: bool = False

    def settings(self):
        """The cell as plain data (the model flattened), e.g. for a tracker or a Ray task."""
        out = asdict(self)
        out["model"] = asdict(self.model)
        return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that gives one key twice (the plain loader keeps the last value
    silently, so a sweep would run settings other than the ones the file seems to say)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_file(path):
    """The settings dict of a ``.yaml``/``.yml`` or ``.toml`` file."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"--config: file not found: {path}")
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise PlanError(f"--config: {path} must end in .yaml, .yml or .toml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise PlanError(f"--config: {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    try:
        if path.suffix == ".toml":
            settings = tomllib.loads(text)  # TOML refuses a key given twice
        else:
            settings = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except Exception as error:  # tomllib.TOMLDecodeError or yaml.YAMLError
        raise PlanError(f"--config: cannot parse {path}: {error}") from None
    if not isinstance(settings, dict):
        raise PlanError(f"--config: {path} must hold a mapping of settings, not a {type(settings).__name__}")
    return settings


def _value(key, kind, value):
    """One checked value of ``kind`` (``?`` allows None); errors name ``key``."""
    if kind.endswith("?"):
        if value is None or value == "none":
            return None
        kind = kind[:-1]
    try:
        if kind == "attack" and value in ATTACKS:
            if ATTACKS[value].classifier_only:
                raise ValueError(f"{value} attacks one classification head, and sweeps measure multi-task Taskonomy "
                                 f"models: use ensemble (AutoAttack's dense version) here, or attack a classifier "
                                 f"with `mtrobust-fast attack --attack {value}`")
            return value
        if kind == "norm" and value in NORMS:
            return value
        if kind == "split" and value in SPLITS:
            return value
        if kind == "budget" and not isinstance(value, bool) and isinstance(value, (int, float, str)):
            return budgets.budget(value, key)
        if kind == "seed":
            return budgets.seed(value, key)
        if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ValueError(f"must be >= 1, got {value}")
            return value
        if kind == "bool" and isinstance(value, bool):
            return value
        if kind == "units" and value in (1, 255) and not isinstance(value, bool):
            return value
        if kind == "path" and isinstance(value, (str, Path)):
            return str(value)
        if kind == "task" and isinstance(value, str):
            return task_registry.get_task(value).letter
    except Exception as error:
        reason = error.reason if isinstance(error, SettingValueError) else error
        raise PlanError(f"{key}: {reason}") from None
    choices = {"attack": tuple(ATTACKS), "norm": NORMS, "split": SPLITS, "units": ("1", "255")}.get(kind)
    expected = f"one of {', '.join(choices)}" if choices else f"a {kind}"
    raise PlanError(f"{key}: expected {expected}, got {value!r}")


def _sets(value):
    """Attacked-set words ("main", "all", "subsets") and task-letter sets, checked against the registry."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise PlanError(f"sets: expected main, all, subsets or task letters (a list or comma-separated), got {value!r}")
    out = []
    for i, item in enumerate(items):
        item = item.strip() if isinstance(item, str) else item
        if not isinstance(item, str) or not item:
            raise PlanError(f"sets[{i}]: expected main, all, subsets or task letters, got {item!r}")
        if item not in SET_WORDS:
            try:
                item = task_registry.task_string(item)
            except ValueError as error:
                raise PlanError(f"sets[{i}]: {error}") from None
        out.append(item)
    return out


def attack_keys():
    """The attacks' declared sweep settings by name (grid keys take a list of values, value keys one value)."""
    return {name: s for name, s in ATTACKS.settings().items() if s.sweep}


def _setting_value(key, setting, value):
    if value == "none":
        return None
    try:
        return setting.parse(value)
    except SettingValueError as error:
        raise PlanError(f"{key}: {error.reason}") from None


def check(settings):
    """All settings with defaults filled in and every value checked; unknown keys are errors."""
    declared = attack_keys()
    known = list(CORE_KEYS) + list(declared)
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise PlanError(f"{unknown[0]}: unknown key (known keys: {', '.join(known)})")
    out = {}
    for key, setting in declared.items():
        value = settings.get(key)
        if setting.sweep == "grid":
            values = value if isinstance(value, list) else [value]
            if not values:
                raise PlanError(f"{key}: empty list")
            out[key] = list(dict.fromkeys(_setting_value(f"{key}[{i}]", setting, v) for i, v in enumerate(values)))
        else:
            out[key] = _setting_value(key, setting, value)
    for key, (default, kind) in CORE_KEYS.items():
        value = settings.get(key, default)
        if kind.startswith("list:"):
            values = value if isinstance(value, list) else [value]
            if not values:
                raise PlanError(f"{key}: empty list")
            out[key] = list(dict.fromkeys(_value(f"{key}[{i}]", kind[5:], v) for i, v in enumerate(values)))
        elif kind == "sets":
            out[key] = _sets(value)
        elif kind == "models" or value is None:
            out[key] = value
        else:
            out[key] = _value(key, kind, value)
    for key in ("eps", "alpha"):  # budgets in [0, 1] pixels, or grey levels under eps_units: 255
        try:
            out[key] = [None if v is None else budgets.to_pixels(v, out["eps_units"], f"{key}[{i}]",
                                                                 "set eps_units: 255")
                        for i, v in enumerate(out[key])]
        except ValueError as error:
            raise PlanError(str(error)) from None
    if out["size"] is not None and out["size"] % 32:
        raise PlanError(f"size: must be a multiple of 32 (the encoders' stride), got {out['size']}")
    if out["data"] is None:
        raise PlanError("data: missing (the Taskonomy root the models are evaluated on)")
    if not Path(out["data"]).is_dir():
        raise PlanError(f"data: {out['data']} is not a directory (the Taskonomy root the models are evaluated on)")
    if not out["models"]:
        raise PlanError("models: missing (a list of checkpoints or train specs)")
    return out


def file_hash(path, chunk=1 << 22):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _hash(value):
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _model(i, entry, settings, out):
    """The :class:`Model` of ``models[i]``: a checkpoint path or ``{checkpoint|train, name, main}``."""
    key = f"models[{i}]"
    entry = {"checkpoint": entry} if isinstance(entry, str) else entry
    if not isinstance(entry, dict):
        raise PlanError(f"{key}: expected a checkpoint path or a mapping with checkpoint or train")
    unknown = sorted(set(entry) - set(MODEL_KEYS))
    if unknown or ("checkpoint" in entry) == ("train" in entry):
        bad = f"{key}.{unknown[0]}: unknown key" if unknown else f"{key}: give exactly one of checkpoint or train"
        raise PlanError(f"{bad} (a model is a checkpoint path, or a mapping with checkpoint or train, and "
                        f"optionally name, main and surrogate)")
    main = _value(f"{key}.main", "task", entry["main"]) if "main" in entry else settings["main"]
    if "checkpoint" in entry:
        path = Path(_value(f"{key}.checkpoint", "path", entry["checkpoint"]))
        try:
            payload = read_checkpoint(path)
        except (FileNotFoundError, ValueError) as error:
            raise PlanError(f"{key}.checkpoint: {error}") from None
        config, meta = payload["config"], payload["meta"]
        if config.get("kind") == "classifier":
            raise PlanError(f"{key}.checkpoint: {path} is a classifier; sweeps measure multi-task Taskonomy models "
                            f"(attack a classifier with `mtrobust-fast attack`)")
        record = meta.get("train_config") or {}
        tasks, encoder = task_registry.task_string(config["tasks"]), config["encoder"]
        weights = record.get("weights", "")
        main = main or record.get("main") or tasks[0]
        identity, checkpoint, train = f"sha256:{file_hash(path)}", str(path), ""
        name = entry.get("name") or default_model_name(path)
        recipe = recipe_label(record) if record else f"checkpoint={name}"  # unknown training: never pooled
    else:
        spec = entry["train"]
        if not isinstance(spec, dict):
            raise PlanError(f"{key}.train: expected a mapping of training settings (tasks, encoder, epochs, ...)")
        for forbidden in ("data", "out", "resume"):
            if forbidden in spec:
                raise PlanError(f"{key}.train.{forbidden}: set by the sweep (data: the sweep's data; out: under "
                                f"--out/models); leave it out")
        spec_hash = _hash({"train": spec, "data": str(Path(settings["data"]).resolve())})[:16]
        checkpoint = str(Path(out) / "models" / spec_hash / "last.pt")
        try:
            config = train_config(spec, settings["data"], checkpoint)
        except (TypeError, ValueError) as error:
            raise PlanError(f"{key}.train: {error}") from None
        tasks, encoder, weights = config.tasks or DEFAULT_TASKS, config.encoder, config.weights
        main = main or config.main or tasks[0]
        identity, train = f"train:{spec_hash}", json.dumps(spec, sort_keys=True)
        recipe = recipe_label(config.to_dict())
        name = entry.get("name") or f"{encoder}_{tasks}_{spec_hash[:8]}"
    if main not in tasks:
        raise PlanError(f"{key}.main: task {main} is not one of the model's tasks {tasks}")
    surrogate = ""
    if "surrogate" in entry:  # a transfer attack: its identity joins the model's, so the cells differ
        surrogate = _value(f"{key}.surrogate", "path", entry["surrogate"])
        if not Path(surrogate).is_file():
            raise PlanError(f"{key}.surrogate: checkpoint not found: {surrogate}")
        identity += f"|surrogate:sha256:{file_hash(surrogate)}"
    return Model(str(name), tasks, encoder, weights, main, identity, checkpoint, train, surrogate, recipe)


# Training settings that do not make a different kind of model: the task set, main task and task weights (their
# own columns), the seed (models of one recipe with different seeds are replicates), and bookkeeping.
RECIPE_IGNORED = {"tasks", "main", "weights", "encoder", "seed", "data", "out", "resume", "progress", "workers",
                  "device", "val_before", "save_every", "limit_val", "val_batch_size", "objective_settings",
                  "split_csv", "layout", "robust_val", "robust_val_steps", "select", "amp"}


def recipe_label(train_config):
    """How a model was trained apart from what the table's other columns say and its seed: "key=value ..." of its
    training settings (sorted), so a report keeps models of different recipes apart and averages only seeds."""
    return " ".join(f"{key}={str(value).replace(' ', '')}" for key, value in sorted(train_config.items())
                    if key not in RECIPE_IGNORED)


def default_model_name(path):
    """A checkpoint's name in the table: the run folder for ``RUN/last.pt``/``best.pt``, ``RUN_checkpoint_150`` for
    the source code's ``RUN/savecheckpoint/checkpoint_150.pth.tar``, else the file name without suffixes."""
    stem = path.name.split(".")[0]
    if stem in ("last", "best"):
        return path.parent.name
    if path.parent.name == "savecheckpoint":
        return f"{path.parent.parent.name}_{stem}"
    return stem


def train_config(spec, data, checkpoint):
    """The :class:`TrainConfig` of a train spec: trained into the checkpoint's folder, resumed if interrupted,
    data loaded in-process unless the spec sets ``workers``."""
    return TrainConfig(data=data, out=str(Path(checkpoint).parent), resume=True, progress=False,
                       **{"workers": 0, **spec})


def attacked_sets(words, model):
    """Labels of the attacked sets ``words`` name for ``model``, in order, without repeats."""
    labels = []
    for word in words:
        if word == "main":
            labels.append(model.main)
        elif word == "all":
            labels.append(model.tasks)
        elif word == "subsets":
            labels += ["".join(c) for k in range(1, len(model.tasks) + 1)
                       for c in itertools.combinations(model.tasks, k)]
        else:
            missing = [t for t in word if t not in model.tasks]
            if missing:
                raise PlanError(f"sets: model {model.name} has tasks {model.tasks}; it has no {''.join(missing)}")
            labels.append(metrics.set_label(t.name for t in task_registry.resolve(word)))
    return tuple(dict.fromkeys(labels))


def _check_size(settings, axes):
    """Refuse a grid of more than ``max_cells`` cells before building it (its size is the product of the axes'
    lengths times the models: an upper bound, as attacks drop axes they do not take)."""
    lengths = [len(settings["models"])] + [len(settings[key]) for key in
                                           ("attacks", "norms", "eps", "alpha", "steps", "restarts", "seeds", *axes)]
    count = 1
    for length in lengths:
        count *= length
    if count > settings["max_cells"]:
        raise PlanError(f"max_cells: the grid has up to {count} cells (models x attacks x norms x eps x alpha x steps "
                        f"x restarts x seeds{''.join(' x ' + a for a in axes)}), more than max_cells = "
                        f"{settings['max_cells']}; raise max_cells if you mean it")


def expand(settings, out):
    """The cells of the checked ``settings`` (see :func:`check`), in a deterministic order, without repeats.

    Values of settings an attack does not declare are dropped for it (fgsm's steps, apgd's alpha, the grid
    attack's weights on other attacks), so a grid mixing attacks never asks for an impossible cell. A cell's id
    hashes the settings its attack takes: alpha and steps always, the other declared ones as their declarations
    say (by default only when not at their default, so a newly declared setting keeps earlier ids)."""
    settings = check(settings)
    declared = attack_keys()
    axes = [key for key, s in declared.items() if s.sweep == "grid" and key not in ("alpha", "steps")]
    _check_size(settings, axes)
    models = [_model(i, entry, settings, out) for i, entry in enumerate(settings["models"])]
    data = str(Path(settings["data"]).resolve())
    cells = {}
    for model in models:
        sets = attacked_sets(settings["sets"], model)
        grid = itertools.product(settings["attacks"], settings["norms"], settings["eps"], settings["alpha"],
                                 settings["steps"], settings["restarts"], settings["seeds"],
                                 *(settings[key] for key in axes))
        for attack, norm, eps, alpha, steps, restarts, seed, *chosen in grid:
            cls = ATTACKS[attack]
            taken = {key: value for key, value in zip(["alpha", "steps", *axes], [alpha, steps, *chosen])
                     if cls.takes(key)}
            taken.update({key: settings[key] for key, s in declared.items() if s.sweep == "value" and cls.takes(key)})
            values = dict(attack=attack, norm=norm, eps=eps, alpha=taken.pop("alpha", None),
                          steps=taken.pop("steps", None), restarts=restarts, seed=seed, sets=sets, data=data,
                          split=settings["split"], limit=settings["limit"], size=settings["size"],
                          batch_size=settings["batch_size"], gradients=settings["gradients"],
                          deterministic=settings["deterministic"])
            hashed = {key: value for key, value in taken.items() if declared[key].hashed(value)}
            cell_id = _hash({"model": model.identity, **values, **hashed})[:20]
            cells.setdefault(cell_id, Cell(cell_id=cell_id, model=model, **values, options=taken,
                                           per_sample=settings["per_sample"]))
    return list(cells.values())


def cell_from_settings(settings):
    """The inverse of :meth:`Cell.settings` (a Ray task gets plain data)."""
    values = {f.name: settings[f.name] for f in fields(Cell)}
    values["model"] = Model(**settings["model"])
    values["sets"] = tuple(values["sets"])
    values["options"] = dict(values["options"])
    return Cell(**values)
