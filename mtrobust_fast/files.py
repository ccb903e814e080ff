"""Files that land whole: atomic writes (a temporary name, fsync, rename), and the clean-up of the temporaries
that a killed writer leaves behind (only those of processes no longer running, so a concurrent writer's file is
never touched)."""
import os
import re
from pathlib import Path

_TEMPORARY = re.compile(r"^\..+\.(\d+)\.tmp$")


def temporary_path(path):
    """Where ``path`` is written before its rename: ``.NAME.PID.tmp`` in the same folder."""
    path = Path(path)
    return path.parent / f".{path.name}.{os.getpid()}.tmp"


def _fsync_folder(folder):
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write(path, write):
    """``write(tmp_path)``, fsync, rename over ``path``, fsync the folder: ``path`` is whole or absent (a kill
    leaves the previous version). The temporary is removed if ``write`` fails."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_folder(path.parent)
    return path


def process_alive(pid):
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_stale_temporaries(folder):
    """Delete the ``.NAME.PID.tmp`` files in ``folder`` whose writer process is gone; returns their names."""
    removed = []
    for candidate in Path(folder).glob(".*.tmp"):
        match = _TEMPORARY.match(candidate.name)
        if match and int(match.group(1)) != os.getpid() and not process_alive(int(match.group(1))):
            candidate.unlink(missing_ok=True)
            removed.append(candidate.name)
    return removed
