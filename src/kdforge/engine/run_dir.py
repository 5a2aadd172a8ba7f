"""The run folder: where a run writes its recipe, metrics, checkpoints and report.

A folder kdforge creates carries a marker file (``.kdforge-run``); ``--overwrite`` replaces only such a
folder, and only after the new run has written its first checkpoint (the old one waits aside until then).
A lock file (``.lock``, ``fcntl.flock``) stops two runs from writing one folder.
"""

from __future__ import annotations

import csv
import errno
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdforge.errors import KdforgeError

MARKER = ".kdforge-run"
LOCK = ".lock"
# What a run writes into its folder; a folder holding only these (and no state) may start over on resume.
RUN_FILES = frozenset({MARKER, LOCK, "config.yaml", "metrics.csv", "tb", "checkpoints", "report.md", "curves.png"})
# Temp names of atomic writes: ``.NAME.XXXXXXXX`` (tempfile's 8-character suffix) and ``metrics.csv.tmp``.
_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}$")
_ASIDE = re.compile(r"^\.(?P<name>.+)\.old-(?P<pid>\d+)$")
_HELD: dict[str, RunDirLease] = {}


@dataclass(eq=False)
class RunDirLease:
    """A run folder held by this process: its lock, and the previous run kept aside until ``commit()``.

    ``fresh`` is True when ``resume`` was asked for a kdforge folder that holds no state yet (the run was
    stopped before its first checkpoint): the caller starts the run over instead of loading state.
    """

    path: Path
    fresh: bool = False
    aside: Path | None = None
    created: bool = False
    adopted: bool = False
    stale: list[Path] = field(default_factory=list)
    _fd: int | None = None

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, other: str) -> Path:
        return self.path / other

    def commit(self) -> None:
        """The new run works (first checkpoint written): delete the previous run kept aside."""
        for p in [self.aside, *self.stale]:
            if p is not None and p.exists():
                shutil.rmtree(p, ignore_errors=True)
        self.aside, self.stale, self.created, self.adopted = None, [], False, False

    def settle(self) -> None:
        """Commit if the run got as far as a checkpoint or a result, else roll back; then unlock."""
        if (self.path / "checkpoints" / "state").is_dir() or (self.path / "results.json").is_file():
            self.commit()
        else:
            self.rollback()
        self.release()

    def rollback(self) -> None:
        """Set-up failed: remove what this run wrote and put the previous run back (idempotent)."""
        if self.aside is None and not self.created and not self.adopted:
            return
        self.release()
        if self.path.is_dir() and (self.path / MARKER).is_file():
            if self.adopted:  # the user's empty folder: empty it again, keep it
                for p in self.path.iterdir():
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            else:
                shutil.rmtree(self.path, ignore_errors=True)
        if self.aside is not None and self.aside.exists():
            os.replace(self.aside, self.path)
        self.aside, self.created, self.adopted = None, False, False

    def release(self) -> None:
        """Unlock the folder (also happens when the process exits)."""
        if self._fd is not None:
            import fcntl

            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None
        if _HELD.get(_key(self.path)) is self:
            del _HELD[_key(self.path)]


def prepare_run_dir(path: Path, resume: bool = False, overwrite: bool = False) -> RunDirLease:
    """Create (or check) a run folder and lock it; never writes into an existing one without a flag."""
    path = Path(path)
    if resume and overwrite:
        raise KdforgeError("--resume and --overwrite exclude each other: choose one")
    check_writable_dir(path, "run folder")
    _release_own(path)
    if resume:
        return _prepare_resume(path)
    if not path.exists():
        _restore_orphan(path)
    if path.exists() and not _is_empty(path):
        if not overwrite:
            hint = "pass --resume to continue it or --overwrite to replace it" if _is_run(path) else (
                "it was not made by kdforge, so --overwrite will not replace it either; choose another folder")
            raise KdforgeError(f"run folder {str(path)!r} already exists; {hint}")
        return _prepare_overwrite(path)
    existed = path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KdforgeError(f"cannot create run folder {str(path)!r}: {e.strerror}") from None
    lease = _lock(RunDirLease(path, created=not existed, adopted=existed and not _is_run(path)))
    (path / MARKER).write_text("made by kdforge; 'kdforge train --overwrite' may replace this folder\n")
    return lease


def _prepare_resume(path: Path) -> RunDirLease:
    if not path.is_dir():
        raise KdforgeError(f"cannot resume: run folder {str(path)!r} does not exist")
    lease = _lock(RunDirLease(path, stale=_asides(path)))
    from kdforge.engine.checkpoint import recover_state

    remove_temp_files(path)
    recover_state(path / "checkpoints" / "state")
    if (path / "checkpoints" / "state").is_dir():
        return lease
    if _is_run(path) and all(p.name in RUN_FILES for p in path.iterdir()):
        # Stopped before its first checkpoint: nothing of value yet, so start over in the same folder.
        for p in path.iterdir():
            if p.name not in (MARKER, LOCK, "config.yaml"):  # the recipe stays: resume reads it
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        lease.fresh = True
        return lease
    lease.release()
    why = ("it finished without resumable state (train.save_checkpoints: false)" if (path / "results.json").exists()
           else "it is not a kdforge run folder" if not _is_run(path) else "its checkpoints/state is missing")
    raise KdforgeError(f"cannot resume {str(path)!r}: {why}; start a new run in another folder "
                       "(or replace this one with --overwrite)")


def _prepare_overwrite(path: Path) -> RunDirLease:
    _refuse_special(path)
    if not _is_run(path):
        raise KdforgeError(f"--overwrite refused: {str(path)!r} was not made by kdforge (no {MARKER} file); "
                           "remove it yourself or choose another folder")
    old = _lock(RunDirLease(path))  # fails if another run is writing it
    aside = path.with_name(f".{path.name}.old-{os.getpid()}")
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(path, aside)
    old.release()
    try:
        path.mkdir()
        lease = _lock(RunDirLease(path, aside=aside, stale=_asides(path, exclude=aside)))
        (path / MARKER).write_text("made by kdforge; 'kdforge train --overwrite' may replace this folder\n")
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(aside, path)
        raise
    return lease


def commit_pending(under: Path | None = None) -> None:
    """Commit every lease of this process (or those whose folder contains ``under``): the new runs work."""
    for lease in list(_HELD.values()):
        if under is None or _contains(lease.path, Path(under)):
            lease.commit()


def rollback_pending() -> None:
    """Roll back every lease of this process not yet committed (set-up failed)."""
    for lease in list(_HELD.values()):
        lease.rollback()


def release_all() -> None:
    """Commit nothing, unlock every run folder this process holds."""
    for lease in list(_HELD.values()):
        lease.release()


def check_writable_dir(path: Path, what: str = "output folder") -> None:
    """Fail in one line if ``path`` is a file, lies below a file, or cannot be created or written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise KdforgeError(f"{what} {str(path)!r} is a file, not a folder; choose a folder path")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise KdforgeError(f"{what} {str(path)!r} cannot be created: {str(probe)!r} is a file")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        where = "it" if probe == path else repr(str(probe))
        raise KdforgeError(f"{what} {str(path)!r} is not writable ({where} denies write permission); "
                           "choose another folder")


def remove_temp_files(directory: Path) -> list[Path]:
    """Delete temp files left by interrupted atomic writes in ``directory``; returns what was removed."""
    gone = []
    if not directory.is_dir():
        return gone
    for p in directory.iterdir():
        if _TEMP.match(p.name) or p.name.endswith(".csv.tmp"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def _refuse_special(path: Path) -> None:
    real = path.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise KdforgeError(f"--overwrite refused: {str(path)!r} is the current directory or contains it; "
                           "give a run folder below it")
    if real == Path.home().resolve() or real.parent == real or os.path.ismount(real):
        raise KdforgeError(f"--overwrite refused: {str(path)!r} is the home directory or a filesystem root; "
                           "give a run folder below it")


def _lock(lease: RunDirLease) -> RunDirLease:
    import fcntl

    lock = lease.path / LOCK
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise KdforgeError(f"cannot write to run folder {str(lease.path)!r}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        other = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        raise KdforgeError(f"run folder {str(lease.path)!r} is in use by another kdforge run"
                           f"{f' (pid {other})' if other else ''}; wait for it to finish or choose another folder"
                           ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    lease._fd = fd
    _HELD[_key(lease.path)] = lease
    return lease


def _release_own(path: Path) -> None:
    """A folder this process locked for an earlier run (sequential runs in one process) is unlocked first."""
    held = _HELD.get(_key(path))
    if held is not None:
        held.settle()


def _asides(path: Path, exclude: Path | None = None) -> list[Path]:
    """Previous runs kept aside by processes that died before their successor's first checkpoint."""
    out = []
    if not path.parent.is_dir():
        return out
    for p in path.parent.iterdir():
        m = _ASIDE.match(p.name)
        if m and m["name"] == path.name and p != exclude and (p / MARKER).is_file() and not _alive(int(m["pid"])):
            out.append(p)
    return out


def _restore_orphan(path: Path) -> None:
    """A process killed between moving the old run aside and creating the new one: put the old one back."""
    stale = _asides(path)
    if stale:
        os.replace(max(stale, key=lambda p: p.stat().st_mtime), path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_run(path: Path) -> bool:
    return (path / MARKER).is_file()


def _is_empty(path: Path) -> bool:
    return path.is_dir() and all(p.name in (MARKER, LOCK) for p in path.iterdir())


def _key(path: Path) -> str:
    return str(Path(path).resolve())


def _contains(parent: Path, child: Path) -> bool:
    p, c = Path(parent).resolve(), Path(child).resolve()
    return p == c or p in c.parents


class CsvLog:
    """Append-only metrics.csv; the header grows if a new key appears (the file is rewritten)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = read_csv(path) if path.is_file() else []
        if path.is_file() and path.stat().st_size and not self.rows:
            with path.open(newline="", errors="replace") as f:
                header = f.readline().strip().split(",")
            if header != [""] and "epoch" not in header:
                raise _corrupt(path, "its header has no 'epoch' column")
        for r in self.rows:
            for k, v in r.items():
                try:
                    float(v) if v != "" else None
                except ValueError:
                    raise _corrupt(path, f"column {k!r} holds {v[:20]!r}, not a number") from None

    def truncate_after(self, epoch: int) -> None:
        """Drop rows of epochs after ``epoch`` (written by a run that was killed later)."""
        try:
            self.rows = [r for r in self.rows if int(float(r["epoch"])) <= epoch]
        except (KeyError, TypeError, ValueError):
            raise _corrupt(self.path, "a row without a numeric 'epoch'") from None
        self._write()

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._write()

    def _write(self) -> None:
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        tmp = self.path.with_suffix(".csv.tmp")
        try:
            with tmp.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keys)
                w.writeheader()
                w.writerows(self.rows)
            tmp.replace(self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise KdforgeError(f"cannot write {str(self.path)!r}: {e.strerror or e}") from None


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.csv as dicts of strings; a damaged file is a one-line KdforgeError."""
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (csv.Error, UnicodeDecodeError) as e:
        raise _corrupt(path, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if any(None in r or any(v is None for v in r.values()) for r in rows):
        raise _corrupt(path, "rows do not match the header")
    if rows and "epoch" not in rows[0]:
        raise _corrupt(path, "its header has no 'epoch' column")
    return rows


def _corrupt(path: Path, why: str) -> KdforgeError:
    return KdforgeError(f"metrics file {str(path)!r} is corrupt ({why}); restore it or delete it "
                        "(checkpoints do not depend on it)")
