"""The Taskonomy task table without torch: letters, names, canonical order, metric directions and the parsing of
task sets. :mod:`mtrobust_fast.tasks` builds the full task records on it; commands that only read results
tables (select, report) use this module alone, so they start without importing torch."""
from types import MappingProxyType

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
