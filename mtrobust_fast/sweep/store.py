"""The results table on disk: one Parquet part file per finished cell, written atomically, so an interrupted sweep
(Ctrl-C, kill -9, a lost node) keeps every finished cell and leaves no partial one; a re-run skips the cells whose
part exists, and since a cell has exactly one part the table never holds a row twice."""
import os
import warnings
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mtrobust_fast.files import atomic_write, process_alive, remove_stale_temporaries

ORDER = ["model", "attack", "norm", "eps", "alpha", "steps", "restarts", "seed", "cell_id"]
# What a row measures: two rows from different cells must not share all of these (a retrained checkpoint at the
# same path would give different values under one key).
KEY = ["model", "checkpoint", "data", "split", "limit", "attack", "norm", "eps", "alpha", "steps", "restarts",
       "seed", "attacked", "task"]
LAST = ["version", "seconds", "device"]


def _part_problem(path):
    """Why the part at ``path`` cannot be used, or None."""
    try:
        ids = pq.read_table(path, columns=["cell_id"]).column("cell_id").to_pylist()
    except (OSError, ValueError, KeyError, pa.ArrowException) as error:
        return f"not a readable results part ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
    if not ids or set(ids) != {path.stem}:
        return f"its rows belong to cell(s) {sorted(set(ids))[:3]}, not {path.stem}"
    return None


def _claim_alive(path):
    """Whether the process that wrote the claim ``path`` (its pid) still runs, other than this one."""
    try:
        holder = int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return False
    return bool(holder) and holder != os.getpid() and process_alive(holder)


class Store:
    """``OUT/cells/<cell_id>.parquet`` parts, and ``OUT/results.parquet``/``.csv`` rebuilt from them."""

    def __init__(self, out):
        self.out = Path(out)
        self.cells = self.out / "cells"
        self.cells.mkdir(parents=True, exist_ok=True)
        for folder in (self.cells, self.out):  # parts and exports whose writer was killed before its rename
            remove_stale_temporaries(folder)
        for claim in self.cells.glob("*.claim"):  # claims of killed sweeps: their cells are free again
            if not _claim_alive(claim):
                claim.unlink(missing_ok=True)

    def done(self):
        """The ids of the cells whose part is whole. A part that cannot be read, or whose rows belong to another
        cell (a truncated or renamed file), is moved to ``cells/bad/`` with a warning naming it, so its cell
        counts as pending and is computed again."""
        finished = set()
        for path in sorted(self.cells.glob("*.parquet")):
            problem = _part_problem(path)
            if problem is None:
                finished.add(path.stem)
                continue
            bad = self.cells / "bad"
            bad.mkdir(exist_ok=True)
            os.replace(path, bad / path.name)
            warnings.warn(f"{path}: {problem}; moved to {bad / path.name}, and the cell will be run again",
                          stacklevel=2)
        return finished

    def claim(self, cell_id, again=False):
        """Mark the cell as run by this process (``<id>.claim`` created atomically, holding its pid); False when
        it is finished (unless ``again``: a finished cell run again for its per-image values) or a live process
        on this machine holds it. A dead holder's claim is taken over, so concurrent sweeps on one folder share
        the pending cells and a killed one leaves nothing locked."""
        path = self.cells / f"{cell_id}.claim"
        for _ in range(2):
            if not again and (self.cells / f"{cell_id}.parquet").exists():
                return False
            try:
                descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if _claim_alive(path):
                    return False
                path.unlink(missing_ok=True)  # a dead (or unreadable) holder: take the cell over
                continue
            with os.fdopen(descriptor, "w") as f:
                f.write(str(os.getpid()))
            return True
        return False

    def release(self, cell_id):
        (self.cells / f"{cell_id}.claim").unlink(missing_ok=True)

    def per_sample_path(self, cell_id):
        """``OUT/per_sample/<cell_id>.parquet``: each image's values of the cell, when it kept them."""
        return self.out / "per_sample" / f"{cell_id}.parquet"

    def write(self, cell_id, rows, images=None):
        """The cell's part; ``images`` (each image's values, a DataFrame) first, so a finished cell that kept
        them always has them."""
        if images is not None:
            path = self.per_sample_path(cell_id)
            path.parent.mkdir(exist_ok=True)
            atomic_write(path, lambda tmp: images.to_parquet(tmp, index=False))
        frame = pd.DataFrame(rows)
        atomic_write(self.cells / f"{cell_id}.parquet", lambda tmp: frame.to_parquet(tmp, index=False))
        self.release(cell_id)

    def identities(self):
        """{checkpoint path: the model identities (content hashes) its finished cells measured}, from the parts
        that record them."""
        found = {}
        for cell_id in self.done():
            try:
                part = pq.read_table(self.cells / f"{cell_id}.parquet", columns=["checkpoint", "model_identity"])
            except (OSError, ValueError, KeyError, pa.ArrowException):
                continue  # a part from before identities were recorded (export still checks it)
            for path, identity in set(zip(*(part.column(c).to_pylist() for c in ("checkpoint", "model_identity")))):
                found.setdefault(path, set()).add(identity)
        return found

    def changed_checkpoints(self, cells):
        """Checkpoints of ``cells`` whose content differs from what finished cells in this folder measured at the
        same path (retrained in place): ``{path: model name}``."""
        earlier = self.identities()
        return {cell.model.checkpoint: cell.model.name for cell in cells
                if cell.model.checkpoint in earlier and cell.model.identity not in earlier[cell.model.checkpoint]}

    def table(self):
        """Every part, parts ordered by their settings (so the order does not depend on which finished first),
        each part's rows in their reported order."""
        parts = [pd.read_parquet(self.cells / f"{cell_id}.parquet") for cell_id in sorted(self.done())]
        if not parts:
            return pd.DataFrame()
        parts.sort(key=lambda part: tuple(str(part[key].iloc[0]) for key in ORDER))
        table = pd.concat(parts, ignore_index=True)
        last = [column for column in LAST if column in table.columns]  # after metric columns any part adds
        return table[[column for column in table.columns if column not in last] + last]

    def export(self):
        """Write ``results.parquet`` and ``results.csv``; returns ``(table, paths)``. ValueError, naming the
        cells, when two cells measure the same thing (see ``KEY``) with different model contents."""
        table = self.table()
        key = [column for column in KEY if column in table.columns]
        if len(table) and key:
            clash = table[table.duplicated(key, keep=False)]
            if len(clash):
                cells = sorted(set(clash["cell_id"]))
                raise ValueError(
                    f"cells {', '.join(cells[:4])} in {self.cells} measure the same model path, attack and task "
                    f"(e.g. {clash.iloc[0]['checkpoint']} attacked on {clash.iloc[0]['attacked']}) with "
                    f"different results: the checkpoint was retrained in place. Move the older parts out of "
                    f"{self.cells}, or sweep the new checkpoint into another --out")
        paths = self.out / "results.parquet", self.out / "results.csv"
        atomic_write(paths[0], lambda tmp: table.to_parquet(tmp, index=False))
        atomic_write(paths[1], lambda tmp: table.to_csv(tmp, index=False))
        return table, paths
