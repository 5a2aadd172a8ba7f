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
    """What ``kdforge cache list`` shows of one cache (``damaged``: why its meta.json cannot be read)."""

    path: Path
    meta: dict[str, Any]
    bytes: int
    damaged: str | None = None

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete")) and self.damaged is None


#: keys every meta.json holds, and those a complete cache's adds
_META_KEYS = ("format", "key", "identity")
_COMPLETE_KEYS = ("n", "chunk", "n_chunks")


def read_meta(path: Path) -> dict[str, Any] | None:
    """A cache folder's meta.json, or None if it has none (not a cache); a damaged one is a one-line error."""
    p = Path(path) / META
    if not p.is_file():
        return None
    clear = f"clear it: kdforge cache clear {Path(path).name} --dir {Path(path).parent}"
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise KdforgeError(f"teacher cache {str(path)!r} has a damaged meta.json ({str(e).splitlines()[0]}); "
                           f"{clear}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise KdforgeError(f"teacher cache {str(path)!r} has an unknown format; {clear}, then build it again")
    missing = [k for k in (*_META_KEYS, *(_COMPLETE_KEYS if meta.get("complete") else ())) if k not in meta]
    if not missing and not isinstance(meta["identity"], dict):
        missing = ["identity"]
    if missing:
        raise KdforgeError(f"teacher cache {str(path)!r} has a damaged meta.json (no valid {missing[0]!r}); {clear}")
    return meta


def is_cache(path: Path) -> bool:
    """Whether a folder is a teacher cache (its meta.json may be damaged): its marker, or meta.json with chunks."""
    from kdforge.engine.run_dir import run_kind

    return Path(path).is_dir() and (run_kind(path) == "cache" or (Path(path) / META).is_file())


def folder_bytes(path: Path) -> int:
    """Bytes of the files under a folder."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def list_caches(root: str | Path) -> list[CacheInfo]:
    """Every cache under ``root`` (folders with a meta.json), by name; a damaged one is listed with the reason."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if not is_cache(d):
            continue
        try:
            meta = read_meta(d) or {}
            why = None if meta else "no meta.json (its first build stopped early)"
        except KdforgeError as e:
            meta, why = {}, str(e).split("(", 1)[-1].split(")")[0] if "(" in str(e) else str(e)
        out.append(CacheInfo(d, meta, folder_bytes(d), why))
    return out


def chunk_path(path: Path, i: int) -> Path:
    return Path(path) / CHUNKS / f"{i:06d}.safetensors"


def chunk_done(path: Path, i: int, key: str | None = None, start: int | None = None, stop: int | None = None
               ) -> bool:
    """Whether chunk ``i`` was written completely (its checksum file exists and matches) for this cache's
    ``key`` and sample range [start, stop): a chunk of another identity or chunk size is redone."""
    f, s = chunk_path(path, i), chunk_path(path, i).with_suffix(".sha256")
    if not (f.is_file() and s.is_file()):
        return False
    if s.read_text().strip() != file_sha256(f):
        return False
    if key is None:
        return True
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(f), "pt") as g:
            m = chunk_meta(g.metadata())
    except (SafetensorError, OSError):
        return False
    return m.get("key") == key and m.get("start") == str(start) and m.get("stop") == str(stop)


def write_chunk(path: Path, i: int, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write chunk ``i`` atomically, then its checksum file (the marker that it is complete)."""
    from safetensors.torch import save_file

    f = chunk_path(path, i)
    f.parent.mkdir(parents=True, exist_ok=True)
    try:
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
        try:
            with os.fdopen(fd, "w") as out:
                out.write(file_sha256(f) + "\n")
            os.replace(tmp, f.with_suffix(".sha256"))
        finally:
            Path(tmp).unlink(missing_ok=True)
    except (OSError, RuntimeError) as e:  # safetensors reports a full disk as a RuntimeError / SafetensorError
        from kdforge.engine.checkpoint import _disk_full

        if not isinstance(e, OSError) and not _disk_full(e):
            raise
        why = "disk full" if _disk_full(e) else (e.strerror or str(e)) if isinstance(e, OSError) else str(e)
        raise KdforgeError(f"{why} while writing chunk {f.name} of teacher cache {str(path)!r}: the chunks written "
                           "so far are kept; free some space, then resume: kdforge cache build RECIPE") from None


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
        self.views: int = int(meta.get("views", 1))
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
            if not chunk_done(path, i):
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
        if set(parts) != {"params", *(("logits",) if meta["identity"].get("storage", {}).get("store") == "full"
                                      else ("values", "indices", "rest"))}:
            raise KdforgeError(f"teacher cache {str(path)!r} is damaged: its chunks hold {sorted(parts)}; rebuild it: "
                               "kdforge cache build RECIPE --overwrite")
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
