"""A teacher cache on disk: identity, chunk files with checksums, verified loading, look-up by (sample, view).

Layout of one cache ``DIR/NAME/``::

    meta.json                 format, identity (teacher, preprocessing, data, storage), sizes, complete flag
    chunks/000000.safetensors samples [0, chunk) × K views: logits (or top-k values, ids, rest) and params
    chunks/000000.sha256      the chunk file's sha256, written after the file (a chunk without it is redone)

Chunks cover fixed sample ranges whatever the number of processes that build them, so a cache built by
N processes is byte-identical to one built by one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.cache.topk import expand_topk
from kdforge.errors import KdforgeError

FORMAT = 1
META = "meta.json"
CHUNKS = "chunks"


class StaleCache(KdforgeError):
    """The cache was built for another teacher, preprocessing, data or storage than the recipe's."""


def teacher_hash(model: nn.Module) -> str:
    """sha256 of a model's state (names, dtypes, shapes and bytes of every tensor, in name order)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def identity_key(identity: dict[str, Any]) -> str:
    """A stable short hash of an identity dict."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# identity sections in the order a mismatch is reported, with what each one means to a user
_SECTIONS = (("teacher", "teacher"), ("preprocessing", "preprocessing / augmentation"), ("data", "training data"),
             ("storage", "storage"), ("classes", "class count"))


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return s[:12] + "…" if len(s) > 16 and all(c in "0123456789abcdef" for c in s) else s[:80]


def describe_change(built: dict[str, Any], now: dict[str, Any]) -> str | None:
    """The first difference between two identities, in words ('' parts omitted); None if equal."""
    for key, words in _SECTIONS:
        a, b = built.get(key), now.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            k = diff[0]
            return f"the {words} changed ({k}: {_short(a.get(k))} when built, {_short(b.get(k))} now)"
        return f"the {words} changed ({_short(a)} when built, {_short(b)} now)"
    return None


@dataclass
class CacheInfo:
    """What ``kdforge cache list`` shows of one cache."""

    path: Path
    meta: dict[str, Any]
    bytes: int

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))


def read_meta(path: Path) -> dict[str, Any] | None:
    """A cache folder's meta.json, or None if it has none (not a cache)."""
    p = Path(path) / META
    if not p.is_file():
        return None
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise KdforgeError(f"teacher cache {str(path)!r} has a damaged meta.json ({e}); clear it: "
                           f"kdforge cache clear {Path(path).name}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise KdforgeError(f"teacher cache {str(path)!r} has an unknown format; clear it and build it again")
    return meta


def folder_bytes(path: Path) -> int:
    """Bytes of the files under a folder."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def list_caches(root: str | Path) -> list[CacheInfo]:
    """Every cache under ``root`` (folders with a meta.json), by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        meta = read_meta(d)
        if meta is not None:
            out.append(CacheInfo(d, meta, folder_bytes(d)))
    return out


def chunk_path(path: Path, i: int) -> Path:
    return Path(path) / CHUNKS / f"{i:06d}.safetensors"


def chunk_done(path: Path, i: int) -> bool:
    """Whether chunk ``i`` was written completely (its checksum file exists and matches)."""
    f, s = chunk_path(path, i), chunk_path(path, i).with_suffix(".sha256")
    if not (f.is_file() and s.is_file()):
        return False
    return s.read_text().strip() == file_sha256(f)


def write_chunk(path: Path, i: int, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write chunk ``i`` atomically, then its checksum file (the marker that it is complete)."""
    from safetensors.torch import save_file

    f = chunk_path(path, i)
    f.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=f.parent, prefix=f".{f.name}.")
    os.close(fd)
    try:
        # one metadata entry: safetensors writes a map's entries in no fixed order, which would make
        # otherwise identical chunks differ byte for byte
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                  metadata={"kdforge": json.dumps(metadata, sort_keys=True)})
        os.replace(tmp, f)
    finally:
        Path(tmp).unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=f.parent, prefix=f".{f.stem}.sha.")
    with os.fdopen(fd, "w") as out:
        out.write(file_sha256(f) + "\n")
    os.replace(tmp, f.with_suffix(".sha256"))


def chunk_meta(metadata: dict[str, str] | None) -> dict[str, Any]:
    """The metadata :func:`write_chunk` stored in a chunk file."""
    try:
        return json.loads((metadata or {}).get("kdforge", "{}"))
    except ValueError:
        return {}


class TeacherCache:
    """A complete, verified cache held in memory: teacher logits by (sample index, view)."""

    def __init__(self, path: Path, meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        self.path, self.meta = Path(path), meta
        self.store: str = meta["identity"]["storage"]["store"]
        self.num_classes: int = int(meta["identity"]["classes"])
        self.views: int = int(meta["views"])
        self.t = tensors

    @classmethod
    def open(cls, path: str | Path, identity: dict[str, Any], params: Tensor | None = None) -> TeacherCache:
        """Load and verify a cache: refused in one line if missing, incomplete, stale or damaged.

        ``identity`` is the recipe's (see :func:`kdforge.cache.build.recipe_identity`); ``params`` the
        (N, K, 3) augmentation parameters the training set replays, checked against the recorded ones.
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        hint = "build it: kdforge cache build RECIPE"
        meta = read_meta(path)
        if meta is None:
            raise KdforgeError(f"no teacher cache in {str(path)!r}; {hint}")
        change = describe_change(meta["identity"], identity)
        if change is not None:
            raise StaleCache(f"teacher cache {str(path)!r} is stale: {change}; rebuild it: "
                             "kdforge cache build RECIPE --overwrite")
        if not meta.get("complete"):
            raise KdforgeError(f"teacher cache {str(path)!r} is incomplete (its build stopped); resume it: "
                               "kdforge cache build RECIPE")
        parts: dict[str, list[Tensor]] = {}
        for i in range(int(meta["n_chunks"])):
            f = chunk_path(path, i)
            sha = f.with_suffix(".sha256")
            if not f.is_file() or not sha.is_file() or sha.read_text().strip() != file_sha256(f):
                raise KdforgeError(f"teacher cache {str(path)!r} is damaged: chunk {f.name} is missing or fails its "
                                   "checksum; resume the build to redo it: kdforge cache build RECIPE")
            try:
                with safe_open(str(f), "pt") as g:
                    if chunk_meta(g.metadata()).get("key") != meta["key"]:
                        raise KdforgeError(f"teacher cache {str(path)!r}: chunk {f.name} belongs to another cache; "
                                           "rebuild it: kdforge cache build RECIPE --overwrite")
                    for k in g.keys():
                        parts.setdefault(k, []).append(g.get_tensor(k))
            except SafetensorError as e:
                raise KdforgeError(f"teacher cache {str(path)!r}: chunk {f.name} is unreadable ({e})") from None
        tensors = {k: torch.cat(v) for k, v in parts.items()}
        n = int(meta["n"])
        if len(tensors["params"]) != n:
            raise KdforgeError(f"teacher cache {str(path)!r} holds {len(tensors['params'])} samples, meta says {n}")
        if params is not None and not torch.equal(tensors["params"], params.to(torch.int16)):
            raise StaleCache(f"teacher cache {str(path)!r} is stale: its recorded augmentation parameters differ "
                             "from the ones the training set replays; rebuild it: kdforge cache build RECIPE "
                             "--overwrite")
        return cls(path, meta, tensors)

    def logits(self, index: Tensor, view: Tensor) -> Tensor:
        """Float32 teacher logits (B, C), before the temperature, of views ``view`` of samples ``index``."""
        index, view = index.long().cpu(), view.long().cpu()
        if self.store == "full":
            return self.t["logits"][index, view].float()
        return expand_topk(self.t["values"][index, view], self.t["indices"][index, view],
                           self.t["rest"][index, view], self.num_classes)

    def recorded_params(self, index: int, view: int) -> tuple[int, int, int]:
        """The augmentation parameters recorded for one view."""
        return tuple(int(v) for v in self.t["params"][index, view])  # type: ignore[return-value]
