"""Offline distillation: a frozen teacher teaches a student through a weighted list of loss terms."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import ConfigDict, Field
from torch import Tensor, nn
from torch.utils.data import Dataset

from kdforge.config import ModelSpec, Strict, validate
from kdforge.errors import KdforgeError
from kdforge.losses.base import DistillLoss, build_loss
from kdforge.method import DataInfo, Method, build_model
from kdforge.registry import METHODS
from kdforge.taps import FeatureTaps


class TermConfig(Strict):
    """One loss term of a recipe: ``{loss: kd, weight: 0.9, T: 4}``; extra keys go to the loss."""

    model_config = ConfigDict(extra="allow")
    loss: str
    weight: float = 1.0
    student_tap: str | list[str] | None = None
    teacher_tap: str | list[str] | None = None


def _as_list(tap: str | list[str] | None) -> list[str]:
    return [] if tap is None else [tap] if isinstance(tap, str) else list(tap)


class Term(nn.Module):
    """A weighted loss with the taps its inputs come from."""

    def __init__(self, loss: DistillLoss, weight: float = 1.0, student_tap: str | list[str] | None = None,
                 teacher_tap: str | list[str] | None = None, name: str | None = None) -> None:
        super().__init__()
        self.loss = loss
        self.weight = weight
        self.name = name or getattr(loss, "registry_name", type(loss).__name__.lower())
        self.student_taps = _as_list(student_tap)
        self.teacher_taps = _as_list(teacher_tap) or self.student_taps
        if loss.inputs == "features":
            if not self.student_taps:
                raise KdforgeError(f"loss {self.name!r} reads features: give student_tap (and teacher_tap)")
            if len(self.student_taps) != len(self.teacher_taps):
                raise KdforgeError(f"loss {self.name!r}: student_tap and teacher_tap need the same length, "
                                   f"got {len(self.student_taps)} and {len(self.teacher_taps)}")

    @property
    def needs_indices(self) -> bool:
        """Whether the loss reads the batch's sample indices (CRD's keyed memory)."""
        return bool(getattr(self.loss, "needs_indices", False))

    def inputs(self, s_logits: Tensor, t_logits: Tensor | None, targets: Tensor,
               s_feats: FeatureTaps, t_feats: FeatureTaps,
               indices: Tensor | None = None) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The positional and keyword arguments this term's loss takes."""
        kind = self.loss.inputs
        kw: dict[str, Any] = {"targets": targets} if self.loss.needs_targets else {}
        if self.needs_indices:
            kw["indices"] = indices
        if kind == "labels":
            return (s_logits, targets), {}
        if kind == "logits":
            return (s_logits, t_logits), kw
        return (s_feats.get(self.student_taps), t_feats.get(self.teacher_taps)), kw

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.loss(*args, **kwargs)


def unpack(batch: tuple[Tensor, Tensor] | dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
    """Images, labels and (dict batches with ``batch_fields``) sample indices of a batch."""
    if isinstance(batch, dict):
        return batch["x"], batch["y"], batch.get("index")
    return batch[0], batch[1], None


class DistillConfig(Strict):
    """Recipe schema of ``method: {name: distill}``."""

    name: str = "distill"
    teacher: ModelSpec
    student: ModelSpec
    terms: list[TermConfig] = Field(default_factory=lambda: [TermConfig(loss="ce", weight=0.1),
                                                             TermConfig(loss="kd", weight=0.9)])


@METHODS.register("distill")
class Distill(Method):
    """Offline KD: ``loss = Σ_i w_i · term_i(student, frozen teacher)``."""

    Config = DistillConfig
    frozen_prefixes = ("teacher.",)

    def __init__(self, student: nn.Module, teacher: nn.Module, terms: list[Term]) -> None:
        super().__init__()
        if not terms:
            raise KdforgeError("distill needs at least one loss term")
        self.student = student
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.terms = nn.ModuleList(terms)
        s_names = sorted({n for t in terms for n in t.student_taps})
        t_names = sorted({n for t in terms for n in t.teacher_taps})
        self.s_taps = FeatureTaps(student, s_names)
        self.t_taps = FeatureTaps(teacher, t_names)
        self._needs_teacher = any(t.loss.inputs != "labels" for t in terms)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], info: DataInfo) -> Distill:
        c = validate(DistillConfig, cfg, prefix="method")
        terms = []
        for i, t in enumerate(c.terms):
            try:
                loss = build_loss(t.loss, **(t.model_extra or {}))
            except KdforgeError as e:
                raise KdforgeError(f"method.terms.{i}: {e}") from None
            terms.append(Term(loss, t.weight, t.student_tap, t.teacher_tap, name=t.loss))
        return cls(build_model(c.student, info), build_model(c.teacher, info), terms)

    @property
    def batch_fields(self) -> tuple[str, ...]:  # type: ignore[override]
        """Sample indices in every batch when a term needs them (CRD's keyed memory)."""
        return ("index",) if any(t.needs_indices for t in self.terms) else ()

    def wrap_train_data(self, dataset: Dataset) -> Dataset:
        """Size per-sample state (CRD's keyed memory: one row per training sample)."""
        for t in self.terms:
            if hasattr(t.loss, "set_num_data"):
                t.loss.set_num_data(len(dataset))  # type: ignore[arg-type]
        return dataset

    def train(self, mode: bool = True) -> Distill:
        super().train(mode)
        self.teacher.eval()
        return self

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        for t in self.terms:
            t.loss.total_epochs = self.total_epochs
            t.loss.set_epoch(epoch)

    @torch.no_grad()
    def setup(self, batch: tuple[Tensor, Tensor] | dict[str, Tensor]) -> None:
        x, y, _ = unpack(batch)
        was = self.student.training
        self.student.eval()
        s_logits, t_logits = self.student(x), self.teacher(x)
        self.student.train(was)
        for t in self.terms:
            t.loss.bind(self.student, self.teacher, t.student_taps, t.teacher_taps)
            args, _ = t.inputs(s_logits, t_logits, y, self.s_taps, self.t_taps)
            t.loss.setup(*args) if t.loss.inputs == "features" else t.loss.setup([args[0]], [args[1]])

    def training_step(self, batch: tuple[Tensor, Tensor] | dict[str, Tensor], step: int) -> dict[str, Tensor]:
        x, y, idx = unpack(batch)
        t_logits = None
        if self._needs_teacher:
            with torch.no_grad():
                t_logits = self.teacher(x)
        s_logits = self.student(x)
        out: dict[str, Tensor] = {}
        total = s_logits.new_zeros(())
        for t in self.terms:
            args, kw = t.inputs(s_logits, t_logits, y, self.s_taps, self.t_taps, idx)
            value = t(*args, **kw)
            out[f"loss_{t.name}"] = value.detach()
            total = total + t.weight * value
        out["loss"] = total
        out["acc"] = (s_logits.argmax(-1) == y).float().mean().detach()
        return out

    def deployable(self) -> nn.Module:
        return self.student
