"""Offline distillation: a frozen teacher teaches a student through a weighted list of loss terms."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from pydantic import ConfigDict, Field
from torch import Tensor, nn
from torch.utils.data import Dataset

from kdforge.cache.config import TeacherCacheConfig
from kdforge.config import ModelSpec, Strict, validate
from kdforge.engine.optim import OptimizerSpec
from kdforge.errors import KdforgeError
from kdforge.losses.base import DistillLoss, build_loss
from kdforge.losses.feature import TwoStageLoss
from kdforge.method import DataInfo, Method, MethodStage, build_model
from kdforge.registry import METHODS
from kdforge.taps import FeatureTaps

if TYPE_CHECKING:
    from kdforge.cache.method import TeacherSignal


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


def graph_leaves(t: Tensor) -> set[int]:
    """ids of the leaf tensors (parameters) ``t``'s autograd graph reaches: a walk of the graph, no backward."""
    seen, out, todo = set(), set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None:
            out.add(id(var))
        todo.extend(f for f, _ in fn.next_functions)
    return out


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
    #: read the teacher's logits from a cache built by ``kdforge cache build`` (docs/teacher-cache.md)
    cache: TeacherCacheConfig | None = None


@METHODS.register("distill")
class Distill(Method):
    """Offline KD: ``loss = Σ_i w_i · term_i(student, frozen teacher)``.

    Terms with an init stage (FT, AB: :class:`~kdforge.losses.feature.TwoStageLoss` with ``stages: two``)
    make a multi-stage method: one stage ``<term>-init`` per such term, then ``main``
    (:func:`kdforge.run.fit` runs them).

    With ``cache`` (a :class:`~kdforge.cache.config.TeacherCacheConfig`), response terms read the teacher's
    logits of each (sample, view) from a verified teacher cache; feature terms keep the live teacher.
    """

    Config = DistillConfig
    frozen_prefixes = ("teacher.",)

    def __init__(self, student: nn.Module, teacher: nn.Module, terms: list[Term],
                 cache: TeacherCacheConfig | None = None, teacher_spec: ModelSpec | None = None) -> None:
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
        self.cache_cfg, self._teacher_spec = cache, teacher_spec
        self._cache: TeacherSignal | None = None  # the teacher cache's logits (wrap_train_data opens it)
        if cache is not None:
            from kdforge.cache.method import check_terms, num_classes

            check_terms(cache, self._term_inputs(), num_classes(teacher))
        two = [t for t in terms if isinstance(t.loss, TwoStageLoss) and t.loss.two_stage]
        names = [t.name for t in two]
        #: init stage name -> its term
        self._init_terms = {(n if names.count(n) == 1 else f"{n}{i}") + "-init": t
                            for i, (n, t) in enumerate(zip(names, two, strict=True))}
        #: per init term, names of the student parameters its init loss reaches (found in setup)
        self._init_student: dict[str, list[str]] = {}
        self._built = False

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
        return cls(build_model(c.student, info), build_model(c.teacher, info), terms, c.cache, c.teacher)

    def _term_inputs(self) -> list[tuple[str, str]]:
        """(loss name, what it reads) of every term: what the teacher cache checks."""
        return [(getattr(t.loss, "registry_name", t.name), t.loss.inputs) for t in self.terms]

    @property
    def batch_fields(self) -> tuple[str, ...]:  # type: ignore[override]
        """Sample indices in every batch when a term needs them (CRD's keyed memory)."""
        return ("index",) if any(t.needs_indices for t in self.terms) else ()

    def wrap_train_data(self, dataset: Dataset) -> Dataset:
        """Size per-sample state (CRD's keyed memory: one row per training sample); open the teacher cache."""
        if self.cache_cfg is not None:
            from kdforge.cache.method import open_cache

            self._cache, dataset = open_cache(self.cache_cfg, self.teacher, self._teacher_spec, self._term_inputs(),
                                              dataset)
        for t in self.terms:
            if hasattr(t.loss, "set_num_data"):
                t.loss.set_num_data(len(dataset))  # type: ignore[arg-type]
        return dataset

    def train(self, mode: bool = True) -> Distill:
        super().train(mode)
        self.teacher.eval()
        return self

    def stages(self, epochs: int) -> list[MethodStage]:
        """``<term>-init`` for each two-stage term (its init epochs), then ``main``; none without such terms."""
        if not self._init_terms:
            return []
        pre = [MethodStage(n, t.loss.init_stage_epochs(epochs)) for n, t in self._init_terms.items()]  # type: ignore[union-attr]
        return [*pre, MethodStage("main")]

    def enter_stage(self, name: str | None) -> None:
        if name is not None and name != "main" and name not in self._init_terms:
            raise KdforgeError(f"distill has no stage {name!r} (stages: {', '.join([*self._init_terms, 'main'])})")
        super().enter_stage(name)
        for n, t in self._init_terms.items():
            t.loss.set_phase("init" if n == name else "main")  # type: ignore[operator]

    def _init_term(self) -> Term | None:
        return self._init_terms.get(self.stage or "")

    def configure_optimizers(self) -> list[OptimizerSpec]:
        """One optimizer over what the stage trains: an init stage its term's modules (and the student parts
        its loss reaches) at a constant lr; the main stage all but the teacher and the init-trained modules."""
        if not self._init_terms:
            return [OptimizerSpec("main")]
        if self.stage is None:
            raise KdforgeError(f"this distill recipe trains in stages ({', '.join(self._init_terms)}, main): run it "
                               "with kdforge train or kdforge.run.fit, or set the term's stages: one")
        teacher = {id(p) for p in self.teacher.parameters()}
        init = self._init_term()
        if init is None:
            frozen = {id(p) for t in self._init_terms.values() for p in t.loss.init_params()}  # type: ignore[operator]
            for p in self.parameters():
                if id(p) not in teacher:
                    p.requires_grad_(id(p) not in frozen)
            return [OptimizerSpec("main")]
        keep = {id(p) for p in init.loss.init_params()}  # type: ignore[operator]
        reached = set(self._init_student.get(self.stage or "", []))
        keep |= {id(p) for n, p in self.student.named_parameters() if n in reached}
        for p in self.parameters():
            if id(p) not in teacher:
                p.requires_grad_(id(p) in keep)
        lr = init.loss.init_lr  # type: ignore[union-attr]
        return [OptimizerSpec("main", optim={"lr": lr} if lr else {}, sched={"name": "constant", "warmup_epochs": 0})]

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
        if self._built:  # a later stage of a multi-stage run: keep what the earlier stages trained
            return
        for t in self.terms:
            t.loss.bind(self.student, self.teacher, t.student_taps, t.teacher_taps)
            args, _ = t.inputs(s_logits, t_logits, y, self.s_taps, self.t_taps)
            t.loss.setup(*args) if t.loss.inputs == "features" else t.loss.setup([args[0]], [args[1]])
        was = self.training
        self.eval()  # the probe below must not move BatchNorm statistics
        for name, t in self._init_terms.items():
            if t.loss.init_trains_student:  # type: ignore[union-attr]
                with torch.enable_grad():
                    self.student(x)
                    loss = t.loss.init_loss(self.s_taps.get(t.student_taps),  # type: ignore[operator]
                                            self.t_taps.get(t.teacher_taps))
                reached = graph_leaves(loss)
                self._init_student[name] = [n for n, p in self.student.named_parameters() if id(p) in reached]
        self.train(was)
        self._built = True

    def training_step(self, batch: tuple[Tensor, Tensor] | dict[str, Tensor], step: int) -> dict[str, Tensor]:
        x, y, idx = unpack(batch)
        init = self._init_term()
        if init is not None:
            return self._init_step(init, x)
        t_logits = None
        if self._cache is not None:
            t_logits = self._cache.logits(batch["index"], batch["view"]).to(x.device)  # type: ignore[index]
            if self.t_taps.names:  # feature terms keep the live teacher
                with torch.no_grad():
                    self.teacher(x)
        elif self._needs_teacher:
            with torch.no_grad():
                t_logits = self.teacher(x)
        s_logits = self.student(x)
        out: dict[str, Tensor] = {}
        total = s_logits.new_zeros(())
        for t in self.terms:
            if not getattr(t.loss, "in_main_loss", True):
                continue
            args, kw = t.inputs(s_logits, t_logits, y, self.s_taps, self.t_taps, idx)
            value = t(*args, **kw)
            out[f"loss_{t.name}"] = value.detach()
            total = total + t.weight * value
        out["loss"] = total
        out["acc"] = (s_logits.argmax(-1) == y).float().mean().detach()
        return out

    def _init_step(self, t: Term, x: Tensor) -> dict[str, Tensor]:
        """An init stage's step: the term's init loss alone (the student runs only if that loss trains it)."""
        with torch.no_grad():
            self.teacher(x)
        student = None
        if t.loss.init_trains_student:  # type: ignore[union-attr]
            self.student(x)
            student = self.s_taps.get(t.student_taps)
        loss = t.loss.init_loss(student, self.t_taps.get(t.teacher_taps))  # type: ignore[operator]
        return {"loss": loss, f"loss_{t.name}_init": loss.detach()}

    def deployable(self) -> nn.Module:
        return self.student
