"""Self-KD baselines beside MixSKD: BYOT, CS-KD, Tf-KD (virtual teacher), PS-KD, plain mixup, label smoothing.

PS-KD keys its previous-epoch predictions by sample index: it declares ``batch_fields = ("index",)``,
so the engine gives it dict batches ``{"x", "y", "index"}`` (see docs/methods/self-kd.md).
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.utils.data import Dataset

from kdforge.config import ModelSpec, Strict, validate
from kdforge.distill.self_kd import Exits, interpolate, kl_t, mixup_ce, plan_stages, sample_mixup
from kdforge.errors import KdforgeError
from kdforge.gather import gather_no_grad
from kdforge.method import DataInfo, Method, Supervised, build_model
from kdforge.registry import METHODS


def _acc(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(-1) == y).float().mean().detach()


def soft_ce(logits: Tensor, target: Tensor) -> Tensor:
    """−Σ target·log softmax(logits), mean over the batch."""
    return -(target * F.log_softmax(logits, -1)).sum(-1).mean()


# -- BYOT ------------------------------------------------------------------------------------------
class BYOTConfig(Strict):
    """Recipe schema of ``method: {name: byot}``."""

    name: str = "byot"
    model: ModelSpec
    stages: list[str] | None = None
    alpha: float = Field(0.3, ge=0, le=1)
    feat_weight: float = Field(0.03, ge=0)
    T: float = Field(3.0, gt=0)


def byot_loss(logits: list[Tensor], maps: list[Tensor], y: Tensor, alpha: float = 0.3, feat_weight: float = 0.03,
              T: float = 3.0) -> dict[str, Tensor]:
    """BYOT: CE on the deepest exit; each shallower exit gets (1−α)·CE + α·softCE_T(sg deepest) + λ·‖A_i − sg A_S‖₂."""
    deep, deep_map = logits[-1].detach(), maps[-1].detach()
    p_t = F.softmax(deep / T, -1)
    ce = F.cross_entropy(logits[-1], y)
    soft, feat = ce.new_zeros(()), ce.new_zeros(())
    for z, a in zip(logits[:-1], maps[:-1], strict=True):
        ce = ce + (1 - alpha) * F.cross_entropy(z, y)
        soft = soft + soft_ce(z / T, p_t)
        feat = feat + (a - deep_map).flatten(1).norm(dim=1).mean()  # plain L2 norm per sample, not squared
    return {"ce": ce, "soft": soft, "feat": feat, "loss": ce + alpha * soft + feat_weight * feat}


@METHODS.register("byot")
class BYOT(Method):
    """Be Your Own Teacher (Zhang et al., ICCV 2019): the deepest exit teaches the shallower exits."""

    Config = BYOTConfig

    def __init__(self, model: nn.Module, num_classes: int, stages: list[str] | None = None, alpha: float = 0.3,
                 feat_weight: float = 0.03, T: float = 3.0) -> None:
        super().__init__()
        self.model = model
        self.num_classes = num_classes
        self.stage_names = stages
        self.alpha, self.feat_weight, self.T = alpha, feat_weight, T
        self.exits: Exits | None = None

    @classmethod
    def from_config(cls, cfg: dict[str, Any], info: DataInfo) -> BYOT:
        c = validate(BYOTConfig, cfg, prefix="method")
        return cls(build_model(c.model, info), info.num_classes, c.stages, c.alpha, c.feat_weight, c.T)

    @torch.no_grad()
    def setup(self, batch: tuple[Tensor, Tensor]) -> None:
        if self.exits is None:
            x = batch[0]
            self.exits = Exits(self.model, plan_stages(self.model, x, self.stage_names), self.num_classes).to(x.device)

    def training_step(self, batch: tuple[Tensor, Tensor], step: int) -> dict[str, Tensor]:
        if self.exits is None:
            raise KdforgeError("BYOT.setup(batch) must run before training (the engine does this)")
        x, y = batch
        logits, maps = self.exits(self.model, x)
        terms = byot_loss(logits, maps, y, self.alpha, self.feat_weight, self.T)
        out = {f"loss_{k}": v.detach() for k, v in terms.items() if k != "loss"}
        out["loss"] = terms["loss"]
        out["acc"] = _acc(logits[-1], y)
        for i, z in enumerate(logits[:-1]):
            out[f"acc_exit{i + 1}"] = _acc(z, y)
        return out

    def deployable(self) -> nn.Module:
        return self.model


# -- CS-KD -----------------------------------------------------------------------------------------
class CSKDConfig(Strict):
    """Recipe schema of ``method: {name: cskd}``."""

    name: str = "cskd"
    model: ModelSpec
    T: float = Field(4.0, gt=0)
    lam: float = Field(1.0, ge=0)


def same_class_partners(y: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """For each item, a random other item of the same class in the batch; and whether one exists."""
    same = (y[:, None] == y[None, :]) & ~torch.eye(len(y), dtype=torch.bool, device=y.device)
    scores = torch.rand(len(y), len(y), generator=generator, device=y.device).masked_fill(~same, -1.0)
    return scores.argmax(1), same.any(1)


def cskd_loss(logits: Tensor, y: Tensor, partner: Tensor, has: Tensor, T: float = 4.0,
              lam: float = 1.0) -> dict[str, Tensor]:
    """CS-KD: CE + λ·T²·KL(p^T(sg z_partner) ‖ p^T(z)) over the items that have a same-class partner."""
    ce = F.cross_entropy(logits, y)
    cls = kl_t(logits[has], logits[partner[has]], T) if bool(has.any()) else ce.new_zeros(())
    return {"ce": ce, "cls": cls, "loss": ce + lam * cls}


@METHODS.register("cskd")
class CSKD(Method):
    """Class-wise self-KD (Yun et al., CVPR 2020), partners drawn within the batch (no class-wise sampler)."""

    Config = CSKDConfig

    def __init__(self, model: nn.Module, T: float = 4.0, lam: float = 1.0) -> None:
        super().__init__()
        self.model, self.T, self.lam = model, T, lam

    @classmethod
    def from_config(cls, cfg: dict[str, Any], info: DataInfo) -> CSKD:
        c = validate(CSKDConfig, cfg, prefix="method")
        return cls(build_model(c.model, info), c.T, c.lam)

    def training_step(self, batch: tuple[Tensor, Tensor], step: int) -> dict[str, Tensor]:
        x, y = batch
        logits = self.model(x)
        partner, has = same_class_partners(y)
        terms = cskd_loss(logits, y, partner, has, self.T, self.lam)
        return {"loss": terms["loss"], "loss_ce": terms["ce"].detach(), "loss_cls": terms["cls"].detach(),
                "paired": has.float().mean(), "acc": _acc(logits, y)}

    def deployable(self) -> nn.Module:
        return self.model


# -- Tf-KD (virtual teacher) -----------------------------------------------------------------------
class TFKDConfig(Strict):
    """Recipe schema of ``method: {name: tfkd}``."""

    name: str = "tfkd"
    model: ModelSpec
    variant: Literal["paper", "code", "skl"] = "paper"
    a: float = Field(0.9, gt=0, lt=1)
    T: float = Field(20.0, gt=0)
    alpha: float = Field(0.1, ge=0, le=1)


def virtual_teacher(y: Tensor, num_classes: int, a: float = 0.9) -> Tensor:
    """Tf-KD's virtual teacher: probability a on the label, (1 − a)/(C − 1) on every other class."""
    p = torch.full((len(y), num_classes), (1 - a) / (num_classes - 1), device=y.device)
    return p.scatter_(1, y[:, None], a)


def tfkd_loss(logits: Tensor, y: Tensor, variant: str = "paper", a: float = 0.9, T: float = 20.0,
              alpha: float = 0.1) -> dict[str, Tensor]:
    """Tf-KD_reg: (1−α)·CE + α·T²·KL(teacher_T ‖ p^T(z)); ``skl``: −Σ p^d·log softmax(z/T) / T alone."""
    p_d = virtual_teacher(y, logits.shape[-1], a)
    if variant == "skl":
        reg = soft_ce(logits / T, p_d) / T
        return {"ce": F.cross_entropy(logits, y).detach(), "reg": reg, "loss": reg}
    # paper: p^d softened like a teacher's logits; code: softmax over the probabilities / T (nearly uniform)
    teacher_logits = p_d.log() if variant == "paper" else p_d
    reg = kl_t(logits, teacher_logits, T)
    ce = F.cross_entropy(logits, y)
    return {"ce": ce, "reg": reg, "loss": (1 - alpha) * ce + alpha * reg}


@METHODS.register("tfkd")
class TFKD(Method):
    """Teacher-free KD, the virtual-teacher regulariser Tf-KD_reg (Yuan et al., CVPR 2020)."""

    Config = TFKDConfig

    def __init__(self, model: nn.Module, variant: str = "paper", a: float = 0.9, T: float = 20.0,
                 alpha: float = 0.1) -> None:
        super().__init__()
        self.model = model
        self.variant, self.a, self.T, self.alpha = variant, a, T, alpha

    @classmethod
    def from_config(cls, cfg: dict[str, Any], info: DataInfo) -> TFKD:
        c = validate(TFKDConfig, cfg, prefix="method")
        return cls(build_model(c.model, info), c.variant, c.a, c.T, c.alpha)

    def training_step(self, batch: tuple[Tensor, Tensor], step: int) -> dict[str, Tensor]:
        x, y = batch
        logits = self.model(x)
        terms = tfkd_loss(logits, y, self.variant, self.a, self.T, self.alpha)
        return {"loss": terms["loss"], "loss_ce": terms["ce"].detach(), "loss_reg": terms["reg"].detach(),
                "acc": _acc(logits, y)}

    def deployable(self) -> nn.Module:
        return self.model


# -- PS-KD -----------------------------------------------------------------------------------------
class PSKDConfig(Strict):
    """Recipe schema of ``method: {name: pskd}``; ``epochs`` (α_t's horizon) defaults to ``train.epochs``."""

    name: str = "pskd"
    model: ModelSpec
    epochs: int | None = Field(None, ge=1)
    alpha_T: float = Field(0.8, ge=0, le=1)
    source: Literal["auto", "indexed", "snapshot"] = "auto"


@METHODS.register("pskd")
class PSKD(Method):
    """Progressive self-KD (Kim et al., ICCV 2021): targets (1−α_t)·onehot + α_t·P_prev, α_t = α_T·(e+1)/E.

    ``indexed``: P_prev[idx] are the softmax outputs recorded for each sample in the previous
    epoch, kept in the buffer ``past_probs`` (N×C, resumable, allocated by ``wrap_train_data``);
    batches then carry sample indices (``batch_fields``). ``snapshot``: P_prev is the softmax of
    a frozen copy of the model taken at the start of the epoch (needs no indices; one extra
    forward). ``auto`` is ``indexed`` once ``wrap_train_data`` has run (the Trainer calls it).
    """

    Config = PSKDConfig
    frozen_prefixes = ("prev.",)  # the snapshot is re-taken from the resumed model at the epoch start

    def __init__(self, model: nn.Module, num_classes: int, epochs: int | None = None, alpha_T: float = 0.8,
                 source: Literal["auto", "indexed", "snapshot"] = "auto") -> None:
        super().__init__()
        self.model = model
        self.num_classes, self.epochs, self.alpha_T, self.source = num_classes, epochs, alpha_T, source
        self.register_buffer("past_probs", None)  # N×C once wrap_train_data has run
        self.past_probs: Tensor | None
        self.prev: nn.Module | None = None

    @classmethod
    def from_config(cls, cfg: dict[str, Any], info: DataInfo) -> PSKD:
        c = validate(PSKDConfig, cfg, prefix="method")
        return cls(build_model(c.model, info), info.num_classes, c.epochs, c.alpha_T, c.source)

    @property
    def batch_fields(self) -> tuple[str, ...]:  # type: ignore[override]
        """Sample indices in every batch, unless the targets come from the snapshot."""
        return () if self.source == "snapshot" else ("index",)

    @property
    def indexed(self) -> bool:
        """Whether targets come from the per-sample buffer (else from the epoch-start snapshot)."""
        return self.past_probs is not None

    def wrap_train_data(self, dataset: Dataset) -> Dataset:
        """Data hook: allocates the N×C buffer of past predictions (indexed targets)."""
        if self.source != "snapshot":
            n = len(dataset)  # type: ignore[arg-type]
            device = next(self.model.parameters()).device
            self.past_probs = torch.zeros(n, self.num_classes, device=device)
        return dataset

    def alpha_t(self, epoch: int | None = None) -> float:
        """α_t = α_T·(epoch + 1)/E, held at α_T past epoch E (the target is one-hot in epoch 0 regardless)."""
        e = self.epoch if epoch is None else epoch
        horizon = self.epochs or self.total_epochs
        if horizon is None:
            raise KdforgeError("pskd: method.epochs is not set and no Trainer has set total_epochs; "
                               "give method.epochs (e.g. equal to train.epochs)")
        return self.alpha_T * min(1.0, (e + 1) / horizon)

    def train(self, mode: bool = True) -> PSKD:
        super().train(mode)
        if self.prev is not None:
            self.prev.eval()
        return self

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        if self.source == "indexed" and not self.indexed:
            raise KdforgeError("pskd source 'indexed' needs its buffer: pass the training set through "
                               "wrap_train_data (kdforge's Trainer does), or use source 'snapshot'")
        if not self.indexed and epoch > 0:
            self.prev = copy.deepcopy(self.model).eval().requires_grad_(False)

    def targets(self, x: Tensor, y: Tensor, idx: Tensor | None) -> Tensor:
        """This epoch's soft targets for a batch."""
        onehot = F.one_hot(y, self.num_classes).float()
        if self.epoch == 0:
            return onehot
        if self.past_probs is not None:
            if idx is None:
                raise KdforgeError("pskd: indexed targets need batches with sample indices (batch_fields)")
            past = self.past_probs[idx]
        elif self.prev is not None:
            with torch.no_grad():
                past = F.softmax(self.prev(x), -1)
        else:
            return onehot
        a = self.alpha_t()
        return (1 - a) * onehot + a * past

    def training_step(self, batch: dict[str, Tensor] | tuple[Tensor, Tensor], step: int) -> dict[str, Tensor]:
        if isinstance(batch, dict):
            x, y, idx = batch["x"], batch["y"], batch.get("index")
        else:
            (x, y), idx = batch, None
        target = self.targets(x, y, idx)
        logits = self.model(x)
        loss = soft_ce(logits, target)
        if self.past_probs is not None and idx is not None:
            # under DDP each rank sees a shard: gather so every rank's buffer holds every sample's row
            self.past_probs[gather_no_grad(idx)] = gather_no_grad(F.softmax(logits.detach().float(), -1))
        return {"loss": loss, "loss_ce": F.cross_entropy(logits.detach(), y),
                "alpha_t": logits.new_tensor(self.alpha_t() if self.epoch else 0.0), "acc": _acc(logits, y)}

    def deployable(self) -> nn.Module:
        return self.model


# -- plain mixup and label smoothing ---------------------------------------------------------------
class MixupConfig(Strict):
    """Recipe schema of ``method: {name: mixup}``."""

    name: str = "mixup"
    model: ModelSpec
    alpha: float = Field(0.4, gt=0)


@METHODS.register("mixup")
class Mixup(Method):
    """Mixup (Zhang et al., ICLR 2018): one λ ~ Beta(α, α) per batch, mixup cross-entropy."""

    Config = MixupConfig

    def __init__(self, model: nn.Module, alpha: float = 0.4) -> None:
        super().__init__()
        self.model, self.alpha = model, alpha

    @classmethod
    def from_config(cls, cfg: dict[str, Any], info: DataInfo) -> Mixup:
        c = validate(MixupConfig, cfg, prefix="method")
        return cls(build_model(c.model, info), c.alpha)

    def training_step(self, batch: tuple[Tensor, Tensor], step: int) -> dict[str, Tensor]:
        x, y = batch
        lam, perm = sample_mixup(len(x), self.alpha, x.device)
        logits = self.model(interpolate(x, lam, perm))
        return {"loss": mixup_ce(logits, y, lam, perm), "acc": _acc(logits, y if lam >= 0.5 else y[perm])}

    def deployable(self) -> nn.Module:
        return self.model


class LabelSmoothingConfig(Strict):
    """Recipe schema of ``method: {name: label_smoothing}``."""

    name: str = "label_smoothing"
    model: ModelSpec
    epsilon: float = Field(0.1, ge=0, lt=1)


@METHODS.register("label_smoothing")
class LabelSmoothing(Supervised):
    """Cross-entropy with label smoothing ε (Szegedy et al., 2016), default ε = 0.1."""

    Config = LabelSmoothingConfig

    @classmethod
    def from_config(cls, cfg: dict[str, Any], info: DataInfo) -> LabelSmoothing:
        c = validate(LabelSmoothingConfig, cfg, prefix="method")
        return cls(build_model(c.model, info), c.epsilon)

    def training_step(self, batch: tuple[Tensor, Tensor], step: int) -> dict[str, Tensor]:
        x, y = batch
        return super().training_step((x, y), step)


__all__ = ["BYOT", "CSKD", "PSKD", "TFKD", "LabelSmoothing", "Mixup", "byot_loss", "cskd_loss",
           "same_class_partners", "soft_ce", "tfkd_loss", "virtual_teacher"]
