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


class WriteError(ValueError):
    """A file could not be written (a full disk, a read-only or vanished folder); the previous version of the file,
    if any, is left as it was. One line for the command line."""

    def __init__(self, path, reason):
        super().__init__(f"cannot write {path}: {reason} (is the disk full, or the folder read-only?); the previous "
                         f"version, if any, is unchanged")
        self.path = path


# How torch.save reports a failed write (its zip writer raises RuntimeError, not OSError).
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter", "inline_container", "file write failed", "unexpected pos")


def write_failure(path, error):
    """``error`` as a :class:`WriteError` when it is a failed write (OSError, or torch's writer errors), else
    None."""
    if isinstance(error, OSError):
        return WriteError(path, error.strerror or str(error))
    if isinstance(error, RuntimeError) and any(marker in str(error) for marker in _TORCH_WRITE_FAILURES):
        return WriteError(path, str(error).strip().splitlines()[0])
    return None


def atomic_write(path, write):
    """``write(tmp_path)``, fsync, rename over ``path``, fsync the folder: ``path`` is whole or absent (a kill
    leaves the previous version). The temporary is removed if ``write`` fails; a failed write (full disk,
    read-only folder) raises :class:`WriteError`."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except (OSError, RuntimeError) as error:
        failure = write_failure(path, error)
        if failure is None:
            raise
        raise failure from error
    finally:
        tmp.unlink(missing_ok=True)
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


def writable_folder(folder, name="out"):
    """``folder`` (a Path) created if needed and checked writable before any work is spent on what goes into it:
    a blank name (which would write into the current folder), an existing file, or a folder that cannot be
    created or written (read-only, full, under a file) is a ValueError naming ``name``."""
    if not str(folder).strip():
        raise ValueError(f"{name}: an empty path would write into the current folder; name a folder")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{name}: {folder} is a file; {name} names a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temporary_path(folder / "write-check")
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as error:
        raise ValueError(f"{name}: cannot write into {folder}: {error.strerror or error}") from None
    return folder


class FolderLock:
    """Held while one process writes a run folder: ``marker`` (``.lock``) created atomically, holding the pid. A
    second process is refused while the holder lives (a ValueError naming ``name``); a dead holder's lock is taken
    over, so a killed run leaves nothing locked."""

    def __init__(self, folder, name="out", marker=".lock"):
        self.path, self.name = Path(folder) / marker, name

    def __enter__(self):
        for _ in range(2):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    holder = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    holder = 0
                if holder and holder != os.getpid() and process_alive(holder):
                    raise ValueError(f"{self.name}: {self.path.parent} is being written by another process (pid "
                                     f"{holder}); wait for it to finish or choose another folder") from None
                self.path.unlink(missing_ok=True)  # a dead (or unreadable) holder: take the folder over
                continue
            with os.fdopen(descriptor, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise ValueError(f"{self.name}: could not lock {self.path.parent}")

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)
        return False


def contained(relative, where):
    """``relative`` (a path read from a dataset's own files) as a Path, if it stays inside the folder it is read
    against: an absolute path or one with a ``..`` part could reach any file on the machine, so it is a ValueError
    naming ``where`` (the file that gave it)."""
    path = Path(relative)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"{where}: the path {str(relative)!r} leaves the dataset's folder; paths there must be "
                         f"relative and without '..'")
    return path
