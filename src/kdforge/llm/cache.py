"""Top-k token distributions of a causal-LM teacher, cached per sequence, for distillation and healing.

Each token position keeps the teacher's ``k`` largest next-token logits (before the temperature), their
token ids and the logsumexp of the rest (:mod:`kdforge.cache.topk`): ``k·(2 + 4) + 4`` bytes per token
in fp16, against ``2·V`` for the full distribution (98,304 bytes for SmolLM2's 49,152 tokens).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.cache.store import (
    FORMAT,
    META,
    chunk_done,
    chunk_path,
    describe_change,
    file_sha256,
    folder_bytes,
    identity_key,
    read_meta,
    teacher_hash,
    write_chunk,
)
from kdforge.cache.topk import bytes_per_row, compress_topk, expand_topk
from kdforge.errors import KdforgeError
from kdforge.llm.heal import with_ce
from kdforge.llm.text import Packed
from kdforge.method import Method

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def blocks_fingerprint(blocks: Tensor | Packed) -> str:
    """sha256 of the token-id rows (int64, row order); of packed rows, their ids, positions and documents."""
    if isinstance(blocks, Packed):
        return hashlib.sha256(b"".join(blocks_fingerprint(t).encode()
                                       for t in (blocks.ids, blocks.positions, blocks.doc))).hexdigest()
    b = blocks.long().contiguous()
    return hashlib.sha256(str(tuple(b.shape)).encode() + b.numpy().tobytes()).hexdigest()


def _rows(blocks: Tensor | Packed, start: int, stop: int) -> Tensor | dict[str, Tensor]:
    if isinstance(blocks, Packed):
        return blocks.rows(torch.arange(start, min(stop, len(blocks))))
    return blocks[start:stop]


def _ids(blocks: Tensor | Packed) -> Tensor:
    return blocks.ids if isinstance(blocks, Packed) else blocks


def lm_identity(teacher: nn.Module, blocks: Tensor | Packed, k: int, dtype: str, vocab: int) -> dict[str, Any]:
    """What an LM cache depends on: the teacher's weights, the token rows, k, dtype, vocabulary size."""
    return {"teacher": {"weights_sha256": teacher_hash(teacher), "model": type(teacher).__name__, "mode": "eval"},
            "preprocessing": {"seq_len": int(_ids(blocks).shape[1]), "kind": "lm-next-token"},
            "data": {"samples": int(_ids(blocks).shape[0]), "fingerprint": blocks_fingerprint(blocks)},
            "storage": {"store": "topk", "k": k, "dtype": dtype}, "classes": vocab}


class LMTopKCache:
    """A verified top-k cache of a causal LM on token rows: full-vocabulary logits rebuilt per row."""

    def __init__(self, path: Path, meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        self.path, self.meta, self.t = Path(path), meta, tensors
        self.k = int(meta["identity"]["storage"]["k"])
        self.vocab = int(meta["identity"]["classes"])

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token position takes on disk (values, ids, rest)."""
        return bytes_per_row(self.k, 2 if self.meta["identity"]["storage"]["dtype"] == "fp16" else 4)

    @classmethod
    def build(cls, teacher: nn.Module, blocks: Tensor | Packed, path: str | Path, k: int = 32, dtype: str = "fp16",
              batch_size: int = 4, chunk: int = 16, overwrite: bool = False) -> LMTopKCache:
        """Run the teacher over rows ``blocks`` (n, L) or packed rows once and keep its top-k per token (resumable)."""
        from kdforge.llm.metrics import lm_logits

        path = Path(path)
        teacher = teacher.eval()
        with torch.no_grad():
            vocab = int(lm_logits(teacher, _ids(blocks)[:1, :2]).shape[-1])
        ident = lm_identity(teacher, blocks, k, dtype, vocab)
        meta = read_meta(path) if path.is_dir() else None
        if meta is not None and describe_change(meta["identity"], ident) is not None:
            if not overwrite:
                raise KdforgeError(f"LM teacher cache {str(path)!r} was built differently: "
                                   f"{describe_change(meta['identity'], ident)}; rebuild it with overwrite")
            import shutil

            shutil.rmtree(path / "chunks", ignore_errors=True)
            meta = None
        key = identity_key(ident)
        if meta is None:
            path.mkdir(parents=True, exist_ok=True)
            _write_meta(path, {"format": FORMAT, "key": key, "identity": ident, "complete": False})
        n = len(blocks)
        n_chunks = (n + chunk - 1) // chunk
        t0 = time.perf_counter()
        for i in range(n_chunks):
            if chunk_done(path, i):
                continue
            lo, hi = i * chunk, min((i + 1) * chunk, n)
            parts = []
            with torch.no_grad():
                for j in range(lo, hi, batch_size):
                    logits = lm_logits(teacher, _rows(blocks, j, min(j + batch_size, hi)))
                    parts.append(compress_topk(logits.float(), k))
            values, indices, rest = (torch.cat([p[m] for p in parts]) for m in range(3))
            write_chunk(path, i, {"values": values.to(DTYPES[dtype]), "indices": indices, "rest": rest},
                        {"key": key, "chunk": str(i)})
        _write_meta(path, {"format": FORMAT, "key": key, "identity": ident, "complete": True, "n": n,
                           "n_chunks": n_chunks, "chunk": chunk, "bytes_per_token": bytes_per_row(
                               k, 2 if dtype == "fp16" else 4), "build": {"seconds_last_run": time.perf_counter() - t0},
                           "bytes": folder_bytes(path / "chunks")})
        return cls.open(path, teacher, blocks, k, dtype)

    @classmethod
    def open(cls, path: str | Path, teacher: nn.Module, blocks: Tensor | Packed, k: int = 32, dtype: str = "fp16"
             ) -> LMTopKCache:
        """Load and verify: refused in one line if missing, incomplete, damaged or built for other rows/teacher."""
        from safetensors.torch import load_file

        path = Path(path)
        meta = read_meta(path)
        if meta is None or not meta.get("complete"):
            raise KdforgeError(f"no complete LM teacher cache in {str(path)!r}; build it with LMTopKCache.build")
        ident = lm_identity(teacher, blocks, k, dtype, int(meta["identity"]["classes"]))
        change = describe_change(meta["identity"], ident)
        if change is not None:
            raise KdforgeError(f"LM teacher cache {str(path)!r} is stale: {change}; rebuild it")
        parts: dict[str, list[Tensor]] = {}
        for i in range(int(meta["n_chunks"])):
            f = chunk_path(path, i)
            sha = f.with_suffix(".sha256")
            if not f.is_file() or not sha.is_file() or sha.read_text().strip() != file_sha256(f):
                raise KdforgeError(f"LM teacher cache {str(path)!r} is damaged: chunk {f.name} fails its checksum")
            for name, t in load_file(str(f)).items():
                parts.setdefault(name, []).append(t)
        return cls(path, meta, {name: torch.cat(v) for name, v in parts.items()})

    def logits(self, rows: Tensor) -> Tensor:
        """Float32 teacher logits (B, L, V) of token rows ``rows``, rebuilt from the top-k (the rest spread evenly)."""
        r = rows.long().cpu()
        return expand_topk(self.t["values"][r], self.t["indices"][r], self.t["rest"][r], self.vocab)

    def bucket_log_probs(self, rows: Tensor, T: float = 1.0) -> tuple[Tensor, Tensor]:
        """(ids (B, L, k), teacher log-probabilities (B, L, k + 1) over the top-k tokens and one bucket of the rest).

        At ``T = 1`` the bucket holds the exact remaining mass; at another T its mass is that of the
        evenly spread rest (the rule of :func:`kdforge.cache.topk.expand_topk`).
        """
        r = rows.long().cpu()
        v, ids, rest = self.t["values"][r].float(), self.t["indices"][r].long(), self.t["rest"][r].float()
        n_rest = max(self.vocab - self.k, 1)
        tail = (rest - math.log(n_rest)) / T + math.log(n_rest)
        return ids, torch.cat([v / T, tail.unsqueeze(-1)], -1).log_softmax(-1)

    def heal_parts(self, student: nn.Module, blocks: Tensor, batch_size: int, seed: int, T: float = 1.0,
                   ce_weight: float = 0.0, tail: str = "bucket") -> tuple[Method, CachedBlocks]:
        """The method and step source :func:`kdforge.llm.heal.heal_kd` trains with when it reads this cache."""
        if blocks_fingerprint(blocks) != self.meta["identity"]["data"]["fingerprint"]:
            raise KdforgeError(f"LM teacher cache {str(self.path)!r} was built on other token rows than the ones "
                               "to heal on; rebuild it on these rows")
        return CachedLogitDistill(student, self, T, ce_weight, tail), CachedBlocks(blocks, batch_size, seed)


def _write_meta(path: Path, meta: dict[str, Any]) -> None:
    from kdforge.engine.checkpoint import atomic_write_text

    atomic_write_text(path / META, json.dumps(meta, indent=2) + "\n")


class CachedBlocks:
    """The calibration rows of :class:`kdforge.llm.heal.CalibrationBlocks` (the same draws), with their row ids."""

    def __init__(self, blocks: Tensor, batch_size: int, seed: int = 0) -> None:
        from kdforge.llm.heal import CalibrationBlocks

        self.inner = CalibrationBlocks(blocks, batch_size, seed)
        self.steps_per_epoch = self.inner.steps_per_epoch

    def batch(self, step: int) -> dict[str, Tensor]:
        rows = self.inner.rows(step)
        return {"ids": self.inner.blocks[rows], "rows": rows}


def bucket_kd(s_logits: Tensor, ids: Tensor, t_log_probs: Tensor, T: float = 1.0) -> Tensor:
    """T² · KL(teacher ‖ student) over k + 1 bins: the teacher's top-k tokens and one bucket of all others.

    The student's bucket is its own probability of every token outside the teacher's top-k, so the loss
    moves the student's tail mass, not the shape of its tail. Mean over positions.
    """
    s = (s_logits.float() / T).log_softmax(-1)
    top = s.gather(-1, ids)
    rest = s.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    s_bins = torch.cat([top, rest], -1)
    # an empty bucket (k = vocabulary) contributes 0, not 0 · (-inf - -inf)
    terms = torch.where(t_log_probs > float("-inf"), t_log_probs.exp() * (t_log_probs - s_bins), 0.0)
    kl = terms.sum(-1)
    return kl.mean() * T * T


class CachedLogitDistill(Method):
    """Logit distillation of a causal LM from a cached top-k teacher.

    ``tail``: ``bucket`` (default) matches the teacher's top-k tokens and the total mass of the rest
    (:func:`bucket_kd`); ``uniform`` takes the KL to the full distribution rebuilt with the rest spread
    evenly over the other tokens (:meth:`LMTopKCache.logits`), which also flattens the student's tail.
    """

    def __init__(self, student: nn.Module, cache: LMTopKCache, T: float = 1.0, ce_weight: float = 0.0,
                 tail: str = "bucket") -> None:
        super().__init__()
        if tail not in ("bucket", "uniform"):
            raise KdforgeError(f"tail must be 'bucket' or 'uniform', got {tail!r}")
        self.student, self.T, self.ce_weight, self.tail = student, T, ce_weight, tail
        object.__setattr__(self, "cache", cache)  # not a module: nothing of it is saved or moved
        self._no_split_modules = getattr(student, "_no_split_modules", None)

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        from kdforge.llm.metrics import lm_logits
        from kdforge.losses import kd_loss

        ids = batch["ids"]
        s_logits = lm_logits(self.student, ids).float()
        v = s_logits.shape[-1]
        if self.tail == "bucket":
            ids, t_lp = self.cache.bucket_log_probs(batch["rows"], self.T)
            out = {"kd": bucket_kd(s_logits, ids.to(s_logits.device), t_lp.to(s_logits.device), self.T)}
        else:
            t_logits = self.cache.logits(batch["rows"]).to(s_logits.device)
            out = {"kd": kd_loss(s_logits.reshape(-1, v), t_logits.reshape(-1, v), self.T)}
        return with_ce(out, s_logits, ids, self.ce_weight)

    def deployable(self) -> nn.Module:
        return self.student
