"""The Taskonomy task table without torch: letters, names, canonical order, metric directions and the parsing of
task sets. :mod:`mtrobust_fast.tasks` builds the full task records on it; commands that only read results
tables (select, report) use this module alone, so they start without importing torch."""
from types import MappingProxyType

from mtrobust_fast.registry import SettingValueError

CANONICAL_ORDER = "sdDnkKeEprA"
NAMES = MappingProxyType({
    "s": "segment_semantic", "d": "depth_zbuffer", "D": "depth_euclidean", "n": "normal", "k": "keypoints2d",
    "K": "keypoints3d", "e": "edge_texture", "E": "edge_occlusion", "p": "principal_curvature", "r": "reshading",
    "A": "autoencoder",
})
LETTERS = MappingProxyType({name: letter for letter, name in NAMES.items()})
ALIASES = MappingProxyType({"segmentsemantic": "s"})  # the source's folder name
SEGMENT_DIRECTIONS = MappingProxyType({"miou": True, "pixel_acc": True})
DENSE_DIRECTIONS = MappingProxyType({"l1": False, "mse": False})


def directions(letter):
    """Metric name -> higher is better, for the task with this letter."""
    return SEGMENT_DIRECTIONS if letter == "s" else DENSE_DIRECTIONS


def letter_of(key):
    """The letter of a task given by letter (case-sensitive), name, the source's alias, or a record with a
    ``letter``."""
    key = getattr(key, "letter", key)
    letter = key if key in NAMES else LETTERS.get(key) or ALIASES.get(key)
    if letter is None:
        raise ValueError(f"unknown task {key!r}; letters are {' '.join(CANONICAL_ORDER)} (case-sensitive), "
                         f"names are {', '.join(LETTERS)}")
    return letter


def letters(spec):
    """The letters of a task set given as a letter string ("sdnE"), one name, or a list of letters/names/records,
    in the canonical order s d D n k K e E p r A whatever the input order."""
    if isinstance(spec, str):
        items = [spec] if spec in LETTERS or spec in ALIASES else list(spec)
        for letter in items:
            if letter not in NAMES and letter not in LETTERS and letter not in ALIASES:
                raise ValueError(f"unknown task letter {letter!r} in {spec!r}; letters are "
                                 f"{' '.join(CANONICAL_ORDER)} (case-sensitive)")
    elif hasattr(spec, "letter"):
        items = [spec]
    else:
        items = list(spec)
    if not items:
        raise ValueError("no tasks given")
    chosen = []
    for item in items:
        letter = letter_of(item)
        if letter in chosen:
            raise ValueError(f"task {NAMES[letter]!r} is given twice in {spec!r}")
        chosen.append(letter)
    return sorted(chosen, key=CANONICAL_ORDER.index)


class TaskNotInModel(SettingValueError):
    """A task that is not one of the model's (as opposed to text that names no task at all)."""


def model_tasks(spec, names, what="tasks"):
    """The tasks of a model with task (head) names ``names`` that ``spec`` names, in the model's order, each
    once: what a user wrote turned into the model's tasks, the one rule for every front-end and the library.

    ``spec``: a head name ("class", "seg"), Taskonomy letters ("sd") or a Taskonomy name, a record (anything with a
    ``name``), comma-separated text of these ("s,d", "class,rotation"), or a list of them. A head name wins over
    letters, so a head called "sd" is that head. ``what`` names the argument in errors."""
    names = list(names)

    def unknown(key):
        return TaskNotInModel(what, f"{key!r} is not one of the model's tasks ({', '.join(names)}): unknown task "
                                    f"{key!r} for this model")

    if isinstance(spec, str):
        items = [part.strip() for part in spec.split(",")] if "," in spec else [spec.strip()]
    elif hasattr(spec, "name"):
        items = [spec]
    else:
        items = list(spec)
    chosen = []
    for item in items:
        item = getattr(item, "name", item)
        if not isinstance(item, str) or not item:
            raise SettingValueError(what, f"expected task names or letters, got {item!r}")
        if item in names:
            chosen.append(item)
            continue
        keys = [item] if item in LETTERS or item in ALIASES else list(item)
        for key in keys:
            if key not in NAMES and key not in LETTERS and key not in ALIASES:
                if len(keys) == 1:
                    raise unknown(key)
                raise SettingValueError(what, f"unknown task letter {key!r} in {item!r}; letters are "
                                              f"{' '.join(CANONICAL_ORDER)} (case-sensitive), and the model's tasks "
                                              f"are {names}")
            name = NAMES[letter_of(key)]
            if name not in names:
                raise unknown(key)
            chosen.append(name)
    if not chosen:
        raise SettingValueError(what, "no task given")
    return [name for name in names if name in chosen]


def set_label(names):
    """A short label of a task set: Taskonomy letters in the given order ("sd"), else the names joined with "+"
    (a classifier's "class", a custom model's "seg+depth")."""
    names = list(names)  # read twice below: a generator would be spent by the first try
    try:
        return "".join(letter_of(name) for name in names)
    except ValueError:
        return "+".join(names)
