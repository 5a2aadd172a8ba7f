"""``kdforge cache build RECIPE``: the teacher's outputs on K recorded views of every training sample.

Work is cut into fixed chunks of samples; under DDP (``accelerate launch`` / ``torchrun``) rank ``r`` of ``W``
builds chunks ``r, r + W, ...``. A chunk is written atomically with a checksum file; a build that stopped
resumes with the chunks that are missing, and a finished build marks ``meta.json`` complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.cache.config import TeacherCacheConfig
from kdforge.cache.store import (
    FORMAT,
    META,
    TeacherCache,
    chunk_done,
    describe_change,
    folder_bytes,
    identity_key,
    read_meta,
    teacher_hash,
    write_chunk,
)
from kdforge.cache.topk import compress_topk
from kdforge.config import ModelSpec, Recipe
from kdforge.data.replay import ReplayViews
from kdforge.errors import KdforgeError

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def cache_path(cfg: TeacherCacheConfig) -> Path:
    """The folder of a cache: ``dir/name``."""
    return Path(cfg.dir) / cfg.name


def identity(teacher: nn.Module, teacher_spec: ModelSpec | dict[str, Any], views: ReplayViews,
             cfg: TeacherCacheConfig, num_classes: int) -> dict[str, Any]:
    """What a cache's outputs depend on: teacher (weights hash, model), preprocessing, data, storage."""
    spec = teacher_spec.model_dump() if isinstance(teacher_spec, ModelSpec) else dict(teacher_spec)
    store = cfg.resolved_store(num_classes)
    return {
        "teacher": {"weights_sha256": teacher_hash(teacher), "model": spec.get("model"),
                    "kwargs": json.loads(json.dumps(spec.get("kwargs", {}), sort_keys=True, default=str)),
                    "mode": "eval", "code": model_code_version(teacher), "precision": "fp32"},
        "preprocessing": {**views.identity(), "image_shape": list(views.base.image_shape)},
        "data": {"samples": len(views), "fingerprint": views.fingerprint()},
        "storage": {"store": store, "k": cfg.k if store == "topk" else None, "dtype": cfg.dtype},
        "classes": num_classes,
    }


def model_code_version(model: nn.Module) -> str:
    """What the teacher's outputs depend on besides its weights: the source of the module that defines its
    class (kdforge's own zoo), or the version of the package that does (timm, torchvision, transformers)."""
    import hashlib
    import inspect

    cls = type(model)
    top = cls.__module__.split(".")[0]
    if top != "kdforge":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"{top} {version(top)}"
        except PackageNotFoundError:
            pass
    try:
        src = inspect.getsource(sys.modules[cls.__module__])
    except (OSError, TypeError, KeyError):
        from kdforge import __version__

        return f"kdforge {__version__}"
    return f"{cls.__module__}.{cls.__qualname__} {hashlib.sha256(src.encode()).hexdigest()[:12]}"


def distill_parts(recipe: Recipe) -> tuple[TeacherCacheConfig, ModelSpec]:
    """The cache section and the teacher of a ``distill`` recipe, or a one-line refusal."""
    from kdforge.config import validate

    m = recipe.method.model_dump()
    if m.get("name") != "distill":
        raise KdforgeError(f"kdforge cache build needs a 'distill' recipe (method.name is {m.get('name')!r})")
    if m.get("cache") is None:
        raise KdforgeError("the recipe has no method.cache section; add e.g. cache: {name: my-teacher}")
    if m.get("teacher") is None:
        raise KdforgeError("missing key 'method.teacher'")
    return (validate(TeacherCacheConfig, m["cache"], prefix="method.cache"),
            validate(ModelSpec, m["teacher"], prefix="method.teacher"))


@dataclass
class BuildResult:
    """What a build did."""

    path: Path
    chunks_built: int
    chunks_total: int
    seconds: float
    bytes: int


def _dist() -> tuple[int, int, Callable[[], None]]:
    """(rank, world, barrier) of a launch, initialising gloo through Accelerate when launched."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, lambda: None
    from accelerate import PartialState

    st = PartialState(cpu=not torch.cuda.is_available())
    return st.process_index, st.num_processes, st.wait_for_everyone


def _check(path: Path, ident: dict[str, Any], overwrite: bool) -> None:
    """Refuse a folder that is not a teacher cache, or a cache built differently (read-only: every rank)."""
    from kdforge.cache.store import is_cache
    from kdforge.engine.run_dir import check_writable_dir

    check_writable_dir(path, "cache folder")
    if path.is_dir() and any(path.iterdir()) and not is_cache(path):
        raise KdforgeError(f"cache folder {str(path)!r} exists and is not a teacher cache; choose another "
                           "method.cache.name or dir")
    meta = read_meta(path) if path.is_dir() and not overwrite else None
    if meta is not None:
        change = describe_change(meta["identity"], ident)
        if change is not None:
            raise KdforgeError(f"teacher cache {str(path)!r} was built differently: {change}; "
                               "rebuild it with --overwrite (or clear it: kdforge cache clear "
                               f"{path.name} --dir {path.parent})")


def _start(path: Path, ident: dict[str, Any]) -> None:
    """Start (or continue) the cache folder; rank 0 only, after every rank has checked it."""
    meta = read_meta(path)
    if meta is None or (not meta.get("complete") and meta.get("key") != identity_key(ident)):
        _write_meta(path, {"format": FORMAT, "key": identity_key(ident), "identity": ident, "complete": False})
    elif meta.get("complete"):  # a rebuild (chunk size or code changed): incomplete until it ends
        _write_meta(path, {**meta, "complete": False})
    for tmp in (path / "chunks").glob(".*"):  # half-written chunks of a build that was killed
        tmp.unlink(missing_ok=True)


def _write_meta(path: Path, meta: dict[str, Any]) -> None:
    from kdforge.engine.checkpoint import atomic_write_text

    atomic_write_text(path / META, json.dumps(meta, indent=2) + "\n")


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, views: ReplayViews, start: int, stop: int, batch_size: int) -> Tensor:
    """Logits (n, K, C) of the teacher on every view of samples [start, stop), in eval mode."""
    imgs = torch.stack([views.image(i, v) for i in range(start, stop) for v in range(views.views)])
    out = [teacher(imgs[j: j + batch_size]).float() for j in range(0, len(imgs), batch_size)]
    return torch.cat(out).reshape(stop - start, views.views, -1)


def build(teacher: nn.Module, views: ReplayViews, ident: dict[str, Any], cfg: TeacherCacheConfig,
          overwrite: bool = False, on_chunk: Callable[[int], None] | None = None, log: bool = False,
          resume_cmd: str | None = None) -> BuildResult:
    """Build (or resume) the cache of ``teacher`` on ``views`` in ``cfg``'s folder; this process's chunks only.

    The folder is a run folder of kind ``cache`` (:func:`kdforge.engine.run_dir.open_run`), locked for the
    build; ``overwrite`` replaces it (kept aside until the first new chunk). A chunk counts as done only for
    this identity and sample range (a changed chunk size rebuilds). ``on_chunk(i)`` is called after chunk
    ``i`` is written (progress; tests stop a build there).
    """
    from kdforge.engine.run_dir import open_run

    rank, world, barrier = _dist()
    path = cache_path(cfg)
    _check(path, ident, overwrite)
    barrier()  # every rank has read the folder before rank 0 writes to it: the ranks agree on a refusal
    with contextlib.ExitStack() as held:
        refused: KdforgeError | None = None
        try:  # rank 0 locks the folder for every rank (the others write their chunks under its lock)
            lease = held.enter_context(open_run(path, "cache", resume="auto", overwrite=overwrite, main=rank == 0,
                                                legacy=lambda p: (p / META).is_file(),
                                                resume_cmd=resume_cmd or "kdforge cache build RECIPE"))
        except KdforgeError as e:
            refused = e
        why = _from_rank0(str(refused) if refused is not None else None, world)
        if why is not None:  # e.g. another build holds the lock: every rank stops with rank 0's line
            raise refused or KdforgeError(why)
        if rank == 0:
            _start(path, ident)
        barrier()
        return _build_chunks(teacher, views, ident, cfg, path, lease, rank, world, barrier, on_chunk, log)


def _from_rank0(value: str | None, world: int) -> str | None:
    """Rank 0's ``value`` on every rank of a launch (itself when not launched)."""
    if world <= 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _build_chunks(teacher: nn.Module, views: ReplayViews, ident: dict[str, Any], cfg: TeacherCacheConfig,
                  path: Path, lease: Any, rank: int, world: int, barrier: Callable[[], None],
                  on_chunk: Callable[[int], None] | None, log: bool) -> BuildResult:
    """This rank's missing chunks, then (rank 0) the complete meta.json."""
    teacher = teacher.eval()
    n, chunk = len(views), cfg.chunk
    n_chunks = (n + chunk - 1) // chunk
    storage = ident["storage"]
    key = identity_key(ident)
    t0 = time.perf_counter()
    built = 0

    def span(i: int) -> tuple[int, int]:
        return i * chunk, min(n, (i + 1) * chunk)

    for i in range(rank, n_chunks, world):
        start, stop = span(i)
        if chunk_done(path, i, key, start, stop):
            continue
        logits = teacher_outputs(teacher, views, start, stop, cfg.batch_size)
        params = torch.tensor([[views.params(s, v) for v in range(views.views)] for s in range(start, stop)],
                              dtype=torch.int16).reshape(stop - start, views.views, -1)
        tensors = {"params": params}
        if storage["store"] == "full":
            tensors["logits"] = logits.to(DTYPES[storage["dtype"]])
        else:
            v, idx, rest = compress_topk(logits, int(storage["k"]))
            tensors.update(values=v.to(DTYPES[storage["dtype"]]), indices=idx, rest=rest)
        write_chunk(path, i, tensors, {"key": key, "chunk": str(i), "start": str(start), "stop": str(stop)})
        lease.commit()  # the first durable write: a cache replaced with --overwrite is dropped now
        built += 1
        if log:
            print(f"cache {cfg.name}: chunk {i + 1}/{n_chunks} (samples {start}-{stop - 1})", file=sys.stderr,
                  flush=True)
        if on_chunk is not None:
            on_chunk(i)
    barrier()
    seconds = time.perf_counter() - t0
    if rank == 0:
        missing = [i for i in range(n_chunks) if not chunk_done(path, i, key, *span(i))]
        if missing:
            raise KdforgeError(f"teacher cache {str(path)!r}: chunks {missing[:5]} are missing after the build; "
                               "run kdforge cache build RECIPE again to resume")
        for f in (path / "chunks").glob("*.s*"):  # chunks beyond the end (the chunk size grew)
            if f.stem.isdigit() and int(f.stem) >= n_chunks:
                f.unlink(missing_ok=True)
        meta = read_meta(path) or {}
        meta.update({"format": FORMAT, "key": key, "identity": ident, "complete": True, "n": n,
                     "views": views.views, "chunk": chunk, "n_chunks": n_chunks,
                     "build": {"processes": world, "seconds_last_run": round(seconds, 3)}})
        meta["bytes"] = folder_bytes(path / "chunks")
        _write_meta(path, meta)
    barrier()
    return BuildResult(path, built, n_chunks, seconds, folder_bytes(path))


def build_from_recipe(recipe: Recipe, overwrite: bool = False, on_chunk: Callable[[int], None] | None = None,
                      log: bool = False, resume_cmd: str | None = None) -> BuildResult:
    """``kdforge cache build``: the recipe's data (as recorded views) and teacher, into ``method.cache``."""
    from kdforge.data import load_data
    from kdforge.data.replay import replay_views
    from kdforge.engine.trainer import seed_everything
    from kdforge.method import DataInfo, build_model

    cfg, spec = distill_parts(recipe)
    threads = torch.get_num_threads()
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    try:
        seed_everything(recipe.seed)
        data = load_data(recipe.data)
        views = replay_views(data.train, recipe.data.views, recipe.data.view_seed)
        teacher = build_model(spec, DataInfo(data.num_classes, data.in_chans, data.image_size))
        ident = identity(teacher, spec, views, cfg, data.num_classes)
        return build(teacher, views, ident, cfg, overwrite=overwrite, on_chunk=on_chunk, log=log,
                     resume_cmd=resume_cmd)
    finally:
        torch.set_num_threads(threads)


def open_for(teacher: nn.Module, spec: ModelSpec | dict[str, Any], views: ReplayViews, cfg: TeacherCacheConfig,
             num_classes: int) -> TeacherCache:
    """The verified cache of this teacher on these views (refused in one line when stale or missing)."""
    ident = identity(teacher, spec, views, cfg, num_classes)
    return TeacherCache.open(cache_path(cfg), ident, views.params_table())
