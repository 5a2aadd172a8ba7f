"""KD heal of a pruned causal LM from its unpruned teacher, as an engine fit on calibration rows."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.config import Recipe
from kdforge.errors import KdforgeError
from kdforge.llm.metrics import lm_logits
from kdforge.method import Method


def with_ce(out: dict[str, Tensor], s_logits: Tensor, ids: Tensor, ce_weight: float) -> dict[str, Tensor]:
    """``out`` plus the weighted next-token CE on ``ids`` (when ``ce_weight``) and ``loss``, the sum of all terms."""
    if ce_weight:
        v = s_logits.shape[-1]
        out["ce"] = ce_weight * F.cross_entropy(s_logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1))
    out["loss"] = sum(out.values())  # type: ignore[assignment]
    return out


class CalibrationBlocks:
    """A step source of random calibration rows: step ``s`` draws from its own seed, so a resumed run is exact."""

    def __init__(self, blocks: Tensor, batch_size: int, seed: int = 0) -> None:
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        self.steps_per_epoch = max(1, len(blocks) // batch_size)

    def rows(self, step: int) -> Tensor:
        """Which rows engine step ``step`` draws (different on every process)."""
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1_009 + rank)
        return torch.randint(0, len(self.blocks), (self.batch_size,), generator=g)

    def batch(self, step: int) -> Tensor:
        """The rows of engine step ``step`` (different on every process)."""
        return self.blocks[self.rows(step)]


class LogitDistill(Method):
    """Heal a pruned causal LM: KL to the frozen unpruned teacher's next-token distribution (+ optional CE)."""

    frozen_prefixes = ("teacher.",)

    def __init__(self, student: nn.Module, teacher: nn.Module, T: float = 1.0, ce_weight: float = 0.0) -> None:
        super().__init__()
        self.student, self.teacher, self.T, self.ce_weight = student, teacher, T, ce_weight
        # FSDP's transformer auto-wrap reads the decoder-layer classes from the wrapped module
        self._no_split_modules = getattr(student, "_no_split_modules", None)

    def train(self, mode: bool = True) -> LogitDistill:
        super().train(mode)
        self.teacher.eval()
        return self

    def training_step(self, ids: Tensor, step: int) -> dict[str, Tensor]:
        from kdforge.losses import kd_loss

        with torch.no_grad():
            t_logits = lm_logits(self.teacher, ids).float()
        s_logits = lm_logits(self.student, ids).float()
        v = s_logits.shape[-1]
        return with_ce({"kd": kd_loss(s_logits.reshape(-1, v), t_logits.reshape(-1, v), self.T)},
                       s_logits, ids, self.ce_weight)

    def deployable(self) -> nn.Module:
        return self.student


def heal_recipe(steps: int = 50, lr: float = 5e-5, batch_size: int = 2, seed: int = 0, **train: Any) -> Recipe:
    """The engine recipe of a KD heal in keyword form: AdamW, constant lr, grad clip 1.0, ``steps`` steps."""
    from kdforge.config import MethodConfig, validate

    return validate(Recipe, {"name": "heal", "seed": seed, "data": {"batch_size": batch_size},
                             "method": MethodConfig(name="llm-kd").model_dump(),
                             "optim": {"name": "adamw", "lr": lr, "weight_decay": 0.0}, "sched": {"name": "constant"},
                             "train": {"max_steps": steps, "grad_clip": 1.0, "progress": "silent",
                                       "save_checkpoints": False, **train}})


def heal_kd(student: nn.Module, teacher: nn.Module, blocks: Tensor, steps: int = 50, lr: float = 5e-5,
            batch_size: int = 2, T: float = 1.0, ce_weight: float = 0.0, train_embeddings: bool = False,
            seed: int = 0, log: Any = None, recipe: Recipe | None = None, run_dir: str | Path | None = None,
            resume: bool = False, callbacks: Sequence[Any] = (), teacher_cache: Any = None,
            cache_tail: str | None = None) -> list[float]:
    """Logit distillation from the unpruned teacher on calibration text, as an engine fit; the loss per step run.

    ``recipe`` (an engine recipe: ``train.max_steps``, ``optim``, ``sched``, ``train.grad_clip``, precision,
    DDP/FSDP, ``data.batch_size`` rows per step) replaces ``steps``/``lr``/``batch_size``/``seed``; without it
    AdamW at ``lr`` with grad clip 1.0 runs ``steps`` steps. ``run_dir``: a run folder (checkpoints, logs,
    ``resume``). Embeddings stay frozen unless ``train_embeddings``. ``teacher_cache``: a
    :class:`kdforge.llm.cache.LMTopKCache` of the teacher on ``blocks``, read instead of running the teacher
    (``cache_tail``: how the rest of a top-k distribution is matched, ``bucket`` by default or ``uniform``).
    """
    from kdforge.engine.callbacks import Callback
    from kdforge.engine.trainer import Trainer

    r = recipe or heal_recipe(steps, lr, batch_size, seed)
    if r.train.max_steps is None:
        raise KdforgeError("LLM healing is step-based: set train.max_steps")
    losses: list[float] = []

    class _Losses(Callback):
        def on_step_end(self, trainer: Any, out: dict[str, Tensor]) -> None:
            losses.append(float(out["loss"].detach()))
            if log is not None:
                log(trainer.global_step - 1, losses[-1])

    t_flags = [p.requires_grad for p in teacher.parameters()]
    s_flags = [p.requires_grad for p in student.parameters()]
    emb = {id(p) for m in student.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    out_emb = student.get_output_embeddings() if hasattr(student, "get_output_embeddings") else None
    if out_emb is not None:
        emb |= {id(p) for p in out_emb.parameters()}
    try:
        for p in teacher.parameters():
            p.requires_grad_(False)
        for p in student.parameters():
            p.requires_grad_(id(p) not in emb or train_embeddings)
        method: Method = LogitDistill(student, teacher, T, ce_weight)
        source: Any = CalibrationBlocks(blocks, r.data.batch_size, r.seed)
        if teacher_cache is not None:
            method, source = teacher_cache.heal_parts(student, blocks, r.data.batch_size, r.seed, T, ce_weight,
                                                      **({"tail": cache_tail} if cache_tail else {}))
        Trainer(method, None, r, run_dir=run_dir, resume=resume, source=source,
                callbacks=[_Losses(), *callbacks]).fit()
    finally:
        student.eval()
        teacher.eval()
        for p, f in zip(student.parameters(), s_flags, strict=True):
            p.requires_grad_(f)
        for p, f in zip(teacher.parameters(), t_flags, strict=True):
            p.requires_grad_(f)
    return losses
