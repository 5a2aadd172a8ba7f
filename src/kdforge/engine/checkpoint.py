"""Weights as safetensors, resumable trainer state, and atomic writes."""

from __future__ import annotations

import errno
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_model
from torch import nn

from kdforge.errors import KdforgeError
from kdforge.models.loading import load_weights  # noqa: F401 - the one loader, re-exported for the engine


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file so that readers see the old or the new file, never a partial one."""
    path = Path(path)
    _mkdir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        raise _write_error(path, e) from None
    finally:
        _remove(Path(tmp))


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save a model's state as safetensors (atomically; shared tensors handled)."""
    path = Path(path)
    _mkdir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_model(model, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
        sort_header(Path(tmp))
        os.replace(tmp, path)
    except (OSError, SafetensorError, RuntimeError) as e:
        if isinstance(e, OSError) or _disk_full(e):
            raise _write_error(path, e) from None
        raise
    finally:
        _remove(Path(tmp))


def sort_header(path: Path) -> None:
    """Rewrite a safetensors file's metadata in key order, in place: safetensors writes that map in no fixed
    order, so the same weights would give other bytes each save (and ``sha256sum`` would disagree)."""
    import json

    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        meta = header.get("__metadata__")
        if not meta:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:  # escaped differently from safetensors' own writer: leave the file as written
            return
        f.seek(8)
        f.write(text.ljust(n, b" "))


def _mkdir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KdforgeError(f"cannot create folder {str(directory)!r}: {e.strerror or e}") from None


def _remove(p: Path) -> None:
    """Delete a temp file or folder if it is still there (after a failure, or already renamed)."""
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink(missing_ok=True)


def _disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return any(s in text for s in ("No space left", "StorageFull", "os error 28", "file write failed"))


def _write_error(path: Path, e: BaseException) -> KdforgeError:
    """One line for a failed write; nothing was replaced, so the previous file is intact."""
    if _disk_full(e):
        return KdforgeError(f"disk full while writing {str(path)!r}: nothing was replaced, the previous checkpoint "
                            "is intact; free some space, then continue with 'kdforge train RUN_DIR --resume'")
    why = e.strerror if isinstance(e, OSError) and e.strerror else _first_line(e)
    return KdforgeError(f"cannot write {str(path)!r}: {why} (the previous file is intact)")


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a safetensors header."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise KdforgeError(f"cannot read checkpoint {str(path)!r}: {e}") from None


def save_state(directory: Path, method_state: dict[str, torch.Tensor], trainer_state: dict[str, Any]) -> None:
    """Write the resumable state folder atomically (write aside, then swap)."""
    from safetensors.torch import save_file

    _mkdir(directory.parent)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in method_state.items()}
        save_file(_unshare(tensors), str(tmp / "method.safetensors"))
        save_torch(tmp / "trainer.pt", trainer_state)
        atomic_dir_swap(tmp, directory)
    except (OSError, SafetensorError, RuntimeError) as e:
        if isinstance(e, OSError) or _disk_full(e):
            raise _write_error(directory, e) from None
        raise
    finally:
        _remove(tmp)


def save_torch(path: Path, obj: Any) -> None:
    """``torch.save`` through memory, so that a full disk surfaces as an OSError, not torch's own error."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    Path(path).write_bytes(buf.getbuffer())


def atomic_dir_swap(tmp: Path, directory: Path) -> None:
    """Put the finished folder ``tmp`` in place of ``directory`` (the old one is dropped once the new one is in)."""
    old = directory.with_name(f".{directory.name}.old")
    if directory.exists():
        _remove(old)
        os.replace(directory, old)
    os.replace(tmp, directory)  # a kill between the two renames is repaired by recover_state()
    _remove(old)
    from kdforge.engine.run_dir import commit_pending

    commit_pending(under=directory)  # a run replacing an older one (--overwrite) now works: drop the old one


def recover_state(directory: Path) -> None:
    """Repair what a kill during a checkpoint write leaves: temp files, and the state-swap window."""
    from kdforge.engine.run_dir import remove_temp_files

    directory = Path(directory)
    remove_temp_files(directory.parent)
    old = directory.with_name(f".{directory.name}.old")
    if not old.exists():
        return
    if directory.exists() and _state_complete(directory):
        _remove(old)
    elif _state_complete(old):
        _remove(directory)
        os.replace(old, directory)
    elif not directory.exists():
        _remove(old)


def _state_complete(directory: Path) -> bool:
    """Both state files present and readable to the end (headers and zip directory intact)."""
    import zipfile

    tensors, trainer = directory / "method.safetensors", directory / "trainer.pt"
    if not (trainer.is_file() and zipfile.is_zipfile(trainer)):
        return False
    if (directory / "dcp").is_dir():  # a sharded (FSDP) state: DCP writes its .metadata last
        return (directory / "dcp" / ".metadata").is_file()
    if not tensors.is_file():
        return False
    try:
        with safe_open(str(tensors), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError):
        return False
    return True


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clone tensors that share storage, which safetensors refuses."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone() if ptr in seen else v
        if ptr != -1:
            seen.add(ptr)
    return out


def load_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a state folder written by :func:`save_state`; a missing or damaged file is a one-line error."""
    from safetensors.torch import load_file

    if not directory.is_dir():
        raise KdforgeError(f"no resumable state in {str(directory)!r} (the run saved no checkpoint yet); "
                           "start it again with --overwrite")
    tensors, trainer = directory / "method.safetensors", directory / "trainer.pt"
    for f in (tensors, trainer):
        if not f.is_file():
            raise _damaged(f, "it is missing")
        if f.stat().st_size == 0:
            raise _damaged(f, "it is empty")
    try:
        method_state = load_file(str(tensors))
    except Exception as e:  # safetensors raises several types for a cut file
        raise _damaged(tensors, _first_line(e)) from None
    return method_state, load_torch(trainer)


def load_torch(path: Path) -> dict[str, Any]:
    """A dict saved by :func:`save_torch` (``weights_only``); a missing or damaged file is a one-line error."""
    if not path.is_file():
        raise _damaged(path, "it is missing")
    try:
        st = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # EOFError would otherwise read as Ctrl-C ("aborted") in the CLI
        raise _damaged(path, _first_line(e)) from None
    if not isinstance(st, dict):
        raise _damaged(path, f"it holds a {type(st).__name__}, not the trainer state")
    return st


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


def _damaged(path: Path, why: str) -> KdforgeError:
    return KdforgeError(f"resumable state file {str(path)!r} is truncated or damaged ({why}); the run cannot "
                        "continue from it (checkpoints/last.safetensors keeps the last weights); start it again "
                        "with --overwrite")
