"""The run folder: the one layer through which every command that writes a folder goes.

A folder kdforge creates carries a marker file (``.kdforge-run``) that records the kind of run (``train``,
``prune``, ``cil``, ``audio``, ``cache``, ``sample``, ``report``, ``bench``, ``compress``, ...);
``--overwrite`` replaces only such a folder (of any kind), and only after the new run's first durable write
(the old one waits aside until then). A lock file (``.lock``, ``fcntl.flock``) stops two runs from writing
one folder. :func:`open_run` is the API a command uses; :func:`run_kind` and :func:`describe_folder` are
for readers.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kdforge.errors import KdforgeError

MARKER = ".kdforge-run"
LOCK = ".lock"
# What a run writes into its folder; a folder holding only these (and no state) may start over on resume.
RUN_FILES = frozenset({MARKER, LOCK, "config.yaml", "metrics.csv", "tb", "checkpoints", "report.md", "curves.png"})
# Temp names of atomic writes: ``.NAME.XXXXXXXX`` (tempfile's 8-character suffix) and ``metrics.csv.tmp``.
_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}$")
_ASIDE = re.compile(r"^\.(?P<name>.+)\.old-(?P<pid>\d+)$")
_HELD: dict[str, RunDirLease] = {}
#: kinds whose command continues a folder with ``--resume`` (cil, audio and cache resume by a plain rerun)
RESUMED_BY_FLAG = frozenset({"train", "prune", "llm-distill"})


@dataclass(frozen=True)
class RunKind:
    """A kind of run folder: what it is in words, and which commands read (or resume) it."""

    noun: str
    readers: str


#: every kind of folder kdforge writes; ``{dir}`` in ``readers`` is the folder
KINDS: dict[str, RunKind] = {
    "train": RunKind("a 'kdforge train' run", "evaluate it with 'kdforge eval {dir}', continue it with "
                     "'kdforge train {dir} --resume'"),
    "prune": RunKind("a 'kdforge prune' run",
                     "evaluate its pruned model with 'kdforge eval {dir}/pruned/model.safetensors', continue it "
                     "with 'kdforge prune RECIPE -o {dir} --resume'"),
    "cil": RunKind("a 'kdforge cil' run", "rerun 'kdforge cil RECIPE -r {dir}' to resume it"),
    "audio": RunKind("a 'kdforge audio' run", "classify a file with 'kdforge audio-predict {dir} FILE'"),
    "cache": RunKind("a teacher cache ('kdforge cache build')", "'kdforge train' reads it through method.cache; "
                     "'kdforge cache list' shows it"),
    "sample": RunKind("a folder of 'kdforge sample' grids", "open its .png files"),
    "report": RunKind("a 'kdforge report -o' page", "open its index.html"),
    "bench": RunKind("a 'kdforge bench' output folder", "'kdforge report -o SITE {dir}' shows it"),
    "llm-distill": RunKind("a 'kdforge llm-distill' run", "its student is {dir}/student; continue it with "
                           "'kdforge llm-distill ... -o {dir} --resume' (the same flags)"),
    "demo": RunKind("a 'kdforge demo' folder", "its runs are read with 'kdforge eval {dir}/kd-seed0'"),
}


def register_kind(name: str, noun: str, readers: str) -> None:
    """Add a kind of run folder (a new command's): ``noun`` in words, ``readers`` the commands that read it."""
    KINDS[name] = RunKind(noun, readers)


def marker_text(kind: str) -> str:
    """The marker file's text: a line for people, then ``kind: NAME``."""
    return f"made by kdforge; '--overwrite' of a kdforge command may replace this folder\nkind: {kind}\n"


def run_kind(path: str | Path) -> str | None:
    """The kind of run a kdforge folder holds (``train``, ``prune``, ...), or None if kdforge did not make it.

    A marker without a ``kind:`` line (kdforge before the kinds) is a train run; a teacher cache of that age
    (``meta.json``, no marker) is ``cache``.
    """
    path = Path(path)
    m = path / MARKER
    if not m.is_file():
        return "cache" if (path / "meta.json").is_file() and (path / "chunks").is_dir() else None
    try:
        text = m.read_text(errors="replace")
    except OSError:
        return "train"
    for line in text.splitlines():
        if line.startswith("kind:"):
            return line.split(":", 1)[1].strip() or "train"
    return "train"


def describe_folder(path: str | Path) -> str:
    """``'DIR' is a 'kdforge prune' run (its pruned model is evaluated with ...)`` for a reader's refusal."""
    path = Path(path)
    kind = run_kind(path)
    if kind is None:
        return f"{str(path)!r} was not made by kdforge"
    k = KINDS.get(kind, RunKind(f"a kdforge {kind!r} folder", "see its own command"))
    return f"{str(path)!r} is {k.noun} ({k.readers.format(dir=path)})"


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run with a folder: the message says where, and how to resume."""


@dataclass(eq=False)
class RunDirLease:
    """A run folder held by this process: its lock, and the previous run kept aside until ``commit()``.

    ``fresh`` is True when ``resume`` was asked for a kdforge folder that holds no state yet (the run was
    stopped before its first checkpoint): the caller starts the run over instead of loading state.
    """

    path: Path
    fresh: bool = False
    kind: str = "train"
    committed: bool = False
    resumed: bool = False
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
        self.committed = True

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


def prepare_run_dir(path: Path, resume: bool = False, overwrite: bool = False, kind: str = "train",
                    legacy: Callable[[Path], bool] | None = None) -> RunDirLease:
    """Create (or check) a run folder of ``kind`` and lock it; never writes into an existing one without a flag.

    ``resume``: continue a folder of the same kind (train: from its checkpoint state). ``legacy(path)`` says
    whether a folder without a marker was made by an older kdforge of this kind (it is adopted).
    """
    path = Path(path)
    _release_own(path)
    if not path.exists() and path.parent.is_dir():
        _restore_orphan(path)
    check_run_folder(path, kind, overwrite=overwrite, resume=resume, legacy=legacy)
    if legacy is not None and path.is_dir() and not _is_run(path) and not _is_empty(path) and legacy(path):
        (path / MARKER).write_text(marker_text(kind))  # made by an older kdforge: adopt it
    if resume:
        return _prepare_resume(path) if kind == "train" else _resume_other(path, kind)
    if path.exists() and not _is_empty(path):
        return _prepare_overwrite(path, kind)
    existed = path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KdforgeError(f"cannot create {_word(kind)} folder {str(path)!r}: {e.strerror}") from None
    lease = _lock(RunDirLease(path, kind=kind, created=not existed, adopted=existed and not _is_run(path)))
    (path / MARKER).write_text(marker_text(kind))
    return lease


def check_run_folder(path: str | Path, kind: str, *, overwrite: bool = False, resume: bool | Literal["auto"] = False,
                     legacy: Callable[[Path], bool] | None = None) -> None:
    """What :func:`open_run` would refuse, checked without writing anything (a command calls it before its banner).

    The lock is not tried here: a folder in use is refused when it is opened.
    """
    path = Path(path)
    if resume is True and overwrite:
        raise KdforgeError("--resume and --overwrite exclude each other: choose one")
    check_writable_dir(path, f"{_word(kind)} folder")
    if resume == "auto":
        resume = bool(path.is_dir() and not _is_empty(path) and not overwrite and (run_kind(path) == kind or (
            legacy is not None and not _is_run(path) and legacy(path))))
    if resume:
        _check_kind(path, kind, "resume")
        if kind != "train" and not path.is_dir():
            raise KdforgeError(f"cannot resume: {_word(kind)} folder {str(path)!r} does not exist")
        if kind != "train" and not _is_run(path) and not (legacy is not None and legacy(path)):
            raise KdforgeError(f"cannot resume {str(path)!r}: it was not made by kdforge; choose another folder")
        return
    if path.exists() and not _is_empty(path):
        adopted = legacy is not None and not _is_run(path) and legacy(path)
        have = kind if adopted else run_kind(path)
        if not overwrite:
            if have is None:
                hint = "it was not made by kdforge, so --overwrite will not replace it either; choose another folder"
            elif have == kind and kind in RESUMED_BY_FLAG:
                hint = "pass --resume to continue it or --overwrite to replace it"
            else:
                hint = f"it holds {KINDS[have].noun if have in KINDS else repr(have)}; pass --overwrite to replace it"
            raise KdforgeError(f"{_word(kind)} folder {str(path)!r} already exists; {hint}")
        _refuse_special(path)
        if have is None:
            raise KdforgeError(f"--overwrite refused: {str(path)!r} was not made by kdforge (no {MARKER} file); "
                               "remove it yourself or choose another folder")


def _word(kind: str) -> str:
    return {"train": "run", "cache": "cache", "report": "report", "sample": "sample", "bench": "bench output"}.get(
        kind, f"{kind} run")


def _check_kind(path: Path, kind: str, doing: str) -> None:
    """Refuse to resume (or read) a kdforge folder of another kind, saying what it is and who reads it."""
    have = run_kind(path) if path.is_dir() else None
    if have is not None and have != kind:
        raise KdforgeError(f"cannot {doing} {str(path)!r} as {KINDS[kind].noun if kind in KINDS else kind}: "
                           f"{describe_folder(path).split(' is ', 1)[1]}")


def _resume_other(path: Path, kind: str) -> RunDirLease:
    """Resume a folder of a kind without engine state: lock it and clear temp files; the command continues."""
    lease = _lock(RunDirLease(path, kind=kind, resumed=True, stale=_asides(path)))
    remove_temp_files(path)
    return lease


@contextlib.contextmanager
def open_run(path: str | Path, kind: str, *, overwrite: bool = False, resume: bool | Literal["auto"] = False,
             resume_cmd: str | None = None, legacy: Callable[[Path], bool] | None = None,
             main: bool = True) -> Iterator[RunDirLease]:
    """The run folder of one command, held for the whole run: checked, created or replaced, locked, settled.

    - ``resume``: ``True`` continues a folder of this kind; ``"auto"`` continues one if it exists (cil, audio,
      cache: "a rerun resumes") and starts a new one otherwise; ``False`` needs a new or empty folder.
    - ``overwrite``: replace a kdforge folder of any kind; the old one waits aside until the new run's first
      durable write (:meth:`RunDirLease.commit`, or any checkpoint saved below the folder).
    - On success the lease commits and unlocks. On an error before the first durable write, everything this
      run made is removed and the old folder put back (the corrected retry is not blocked).
    - Ctrl-C becomes :class:`RunInterrupted` with one line ``interrupted ...; resume with: RESUME_CMD``.
    - ``main``: False on the other ranks of a launch (they neither lock nor write the marker).
    """
    path = Path(path)
    if not main:
        yield RunDirLease(path, kind=kind, committed=True)
        return
    if resume == "auto":
        exists = path.is_dir() and not _is_empty(path)
        resume = bool(exists and not overwrite and (run_kind(path) == kind or (
            legacy is not None and not _is_run(path) and legacy(path))))
    lease = prepare_run_dir(path, resume=bool(resume), overwrite=overwrite, kind=kind, legacy=legacy)
    if lease.resumed or lease.fresh or resume:
        lease.committed = True  # nothing of another run to put back: a failure keeps what is there
    try:
        yield lease
    except KeyboardInterrupt as e:
        if not lease.committed and not _has_state(path):
            lease.rollback()
        raise interrupted(e, resume_cmd) from None
    except BaseException:
        if not lease.committed and not _has_state(path):
            lease.rollback()
        raise
    else:
        lease.commit()
    finally:
        lease.release()


def interrupted(e: BaseException | None, resume_cmd: str | None) -> RunInterrupted:
    """The one Ctrl-C line: ``interrupted <where>; resume with: <command>`` (an inner run's place is kept)."""
    where = str(e).split(";")[0].strip() if isinstance(e, RunInterrupted) and str(e) else "interrupted"
    if resume_cmd is None:
        return e if isinstance(e, RunInterrupted) else RunInterrupted(where)
    return RunInterrupted(f"{where}; resume with: {resume_cmd}")


def _has_state(path: Path) -> bool:
    """Whether any engine checkpoint state lies below ``path`` (a durable write of a train-like run)."""
    return (path / "checkpoints" / "state").is_dir() or any(path.glob("**/checkpoints/state"))


def _prepare_resume(path: Path) -> RunDirLease:
    if not path.is_dir():
        raise KdforgeError(f"cannot resume: run folder {str(path)!r} does not exist")
    lease = _lock(RunDirLease(path, resumed=True, stale=_asides(path)))
    from kdforge.engine.checkpoint import recover_state

    remove_temp_files(path)
    recover_state(path / "checkpoints" / "state")
    if (path / "checkpoints" / "state").is_dir() or (path / "stages.json").is_file():
        return lease  # a one-stage run's state, or a staged run (each stage resumes from its own folder)
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


def _prepare_overwrite(path: Path, kind: str = "train") -> RunDirLease:
    _refuse_special(path)
    if not _is_run(path):
        raise KdforgeError(f"--overwrite refused: {str(path)!r} was not made by kdforge (no {MARKER} file); "
                           "remove it yourself or choose another folder")
    old = _lock(RunDirLease(path, kind=run_kind(path) or kind))  # fails if another run is writing it
    aside = path.with_name(f".{path.name}.old-{os.getpid()}")
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(path, aside)
    old.release()
    try:
        path.mkdir()
        lease = _lock(RunDirLease(path, kind=kind, aside=aside, stale=_asides(path, exclude=aside)))
        (path / MARKER).write_text(marker_text(kind))
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(aside, path)
        raise
    return lease


def remove_run(path: str | Path) -> None:
    """Delete a kdforge folder (``kdforge cache clear``): refused in one line while a run holds its lock."""
    path = Path(path)
    _release_own(path)
    lease = _lock(RunDirLease(path, kind=run_kind(path) or "train"))
    try:
        shutil.rmtree(path)
    except OSError as e:
        raise KdforgeError(f"cannot remove {str(path)!r}: {e.strerror or e}") from None
    finally:
        lease.release()


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
        raise KdforgeError(f"{_word(lease.kind)} folder {str(lease.path)!r} is in use by another kdforge run"
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
