"""Weights as safetensors, resumable trainer state, and atomic writes."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from kdforge.errors import KdforgeError


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file so that readers see the old or the new file, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save a model's state as safetensors (atomically; shared tensors handled)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    save_model(model, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a safetensors header."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise KdforgeError(f"cannot read checkpoint {str(path)!r}: {e}") from None


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load safetensors weights into ``model``; a missing file or mismatch is a KdforgeError."""
    p = Path(path)
    if not p.is_file():
        raise KdforgeError(f"checkpoint not found: {str(p)!r} (train one with 'kdforge train' first)")
    try:
        missing, unexpected = load_model(model, str(p), strict=False)
    except (SafetensorError, RuntimeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KdforgeError(f"checkpoint {str(p)!r} does not fit {type(model).__name__}: {first}") from None
    if strict and (missing or unexpected):
        raise KdforgeError(f"checkpoint {str(p)!r} does not fit {type(model).__name__}: "
                           f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    return model


def save_state(directory: Path, method_state: dict[str, torch.Tensor], trainer_state: dict[str, Any]) -> None:
    """Write the resumable state folder atomically (write aside, then swap)."""
    from safetensors.torch import save_file

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    tensors = {k: v.detach().contiguous().cpu() for k, v in method_state.items()}
    save_file(_unshare(tensors), str(tmp / "method.safetensors"))
    torch.save(trainer_state, tmp / "trainer.pt")
    old = directory.with_name(f".{directory.name}.old")
    if directory.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old.exists():
        shutil.rmtree(old)


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
    """Read a state folder written by :func:`save_state`."""
    from safetensors.torch import load_file

    if not (directory / "trainer.pt").is_file():
        raise KdforgeError(f"no resumable state in {str(directory)!r} (the run saved no checkpoint yet)")
    return load_file(str(directory / "method.safetensors")), torch.load(
        directory / "trainer.pt", weights_only=True, map_location="cpu")
