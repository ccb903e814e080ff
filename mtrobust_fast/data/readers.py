"""Dataset readers by name: each reader registers itself where it is defined, says whether a folder holds its
layout (``detect``), and opens one split of it (``open``) with the options it declares.

A classification reader's options are some of ``domain`` (coarse/domain labels), ``depth`` (depth maps for
GAT's depth task) and ``findings`` (which chest X-ray labels to read); asking a reader for an option it does not
declare is an error naming the option and the readers that have it. ``priority`` orders detection (a folder
that matches several layouts is read by the first).
"""
import importlib
import pkgutil

from mtrobust_fast.data import refuse_unfinished
from mtrobust_fast.registry import Registry, Setting, boolean, text

READERS = Registry("dataset reader")

DOMAIN = Setting("domain", boolean, False, help="also read the coarse (domain) labels")
DEPTH = Setting("depth", boolean, False, help="also read the depth maps")
FINDINGS = Setting("findings", text, None, help="chest X-ray findings to choose from")


# What each option is called where users set it (a training config field).
_WHERE = {"domain": "domain_labels", "depth": "aux", "findings": "findings"}


def _load():
    """Import every module of the data package once, so that each reader defined there has registered (on first
    use, so that `import mtrobust_fast.data` stays light): a new reader is one new file."""
    import mtrobust_fast.data as package

    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)


def find(root):
    """The reader of the classification layout at ``root``, or None (the folder is then read as Taskonomy)."""
    _load()
    for reader in sorted(READERS.values(), key=lambda r: r.priority):
        if reader.detect(root):
            return reader
    return None


def open_split(root, split="train", size=None, **options):
    """Split ``split`` of the classification dataset at ``root``; ``options``: values of reader options (False or
    None: not wanted)."""
    refuse_unfinished(root)
    reader = find(root)
    declared = set() if reader is None else {s.name for s in reader.settings}
    for name, value in options.items():
        if value and name not in declared:
            what = READERS.settings()[name].help.removeprefix("also read ").removeprefix("the ")
            raise ValueError(f"{_WHERE.get(name, name)}: {root} holds no {what} (readers that have them: "
                             f"{', '.join(READERS.takers(name))})")
    if reader is None:
        raise FileNotFoundError(f"{root} is not a classification dataset (none of the readers "
                                f"{', '.join(READERS)} detects its layout)")
    return reader.open(root, split, size, **{k: v for k, v in options.items() if k in declared})
