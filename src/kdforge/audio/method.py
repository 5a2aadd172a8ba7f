"""One stage of the audio recipe as an engine Method: a classifier, its loss, its freezing, multi-view eval."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn
from torch.utils.data import DataLoader

from kdforge.audio.losses import stage_loss
from kdforge.audio.metrics import all_metrics
from kdforge.audio.models import AudioSlowFast, apply_bn_eval, freeze_backbone, set_generic_bn_policy
from kdforge.config import ModelSpec, Strict, validate
from kdforge.method import DataInfo, Method, build_model
from kdforge.registry import METHODS

if TYPE_CHECKING:
    from kdforge.engine.trainer import Trainer


class AudioStageConfig(Strict):
    """Recipe schema of ``method: {name: audio_stage}``."""

    name: str = "audio_stage"
    model: ModelSpec
    loss: Literal["ce", "ls", "ls_focal", "focal"] = "ce"
    epsilon: float = Field(0.0, ge=0, le=1)
    gamma: float = Field(0.0, ge=0)
    freeze_backbone: bool = False
    freeze_bn: bool = False
    freeze_bn_stats: bool = False
    precise_bn_batches: int = Field(0, ge=0)
    redact_classes: list[int] = Field(default_factory=list)


@torch.no_grad()
def view_scores(model: nn.Module, loader: DataLoader, device: torch.device | str | None = None) -> tuple[np.ndarray,
                                                                                                       np.ndarray]:
    """Per-segment scores (the sum of the views' softmax probabilities) and labels of an eval loader."""
    device = device or next(model.parameters()).device
    was = model.training
    model.eval()
    scores, labels = [], []
    for batch in loader:
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch[:2]
        x = x.to(device)
        if x.dim() == 4:  # a single view [B, 1, T, F]
            x = x[:, None]
        b, v = x.shape[:2]
        p = model(x.reshape(b * v, *x.shape[2:])).float().softmax(-1).reshape(b, v, -1).sum(1)
        scores.append(p.cpu().numpy().astype(np.float64))
        labels.append(np.asarray(y).reshape(-1))
    model.train(was)
    return np.concatenate(scores), np.concatenate(labels).astype(np.int64)


@torch.no_grad()
def precise_bn(model: nn.Module, loader: DataLoader, batches: int) -> None:
    """Re-estimate the running statistics of the BNs that adapt under the BN policy (cumulative average).

    Frozen BNs (the official policy's, or every BN under ``freeze_bn_stats``) stay in eval mode and untouched.
    """
    was = model.training
    model.train()
    apply_bn_eval(model)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if not bns or batches <= 0:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    device = next(model.parameters()).device
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        x = batch["x"] if isinstance(batch, dict) else batch[0]
        model(x.to(device))
    for m, mom in zip(bns, momenta, strict=True):
        m.momentum = mom
    model.train(was)


@METHODS.register("audio_stage")
class AudioStage(Method):
    """Train an audio classifier for one recipe stage: CE, LS or LS + focal; optionally a frozen backbone."""

    Config = AudioStageConfig

    def __init__(self, model: nn.Module, loss: str = "ce", epsilon: float = 0.0, gamma: float = 0.0,
                 freeze_backbone_: bool = False, freeze_bn: bool = False, freeze_bn_stats: bool = False,
                 precise_bn_batches: int = 0, redact_classes: list[int] | None = None) -> None:
        super().__init__()
        self.model = model
        self.loss_kind, self.epsilon, self.gamma = loss, epsilon, gamma
        self.precise_bn_batches = precise_bn_batches
        self.redact_classes = list(redact_classes or [])
        self.scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._bn_estimated_at: tuple[int, int] | None = None  # (model id, step) of the last precise-BN estimate
        if freeze_bn and isinstance(model, AudioSlowFast):
            model.set_bn_policy(True)
        elif freeze_bn:
            set_generic_bn_policy(model)
        if freeze_backbone_:
            freeze_backbone(model, freeze_bn_stats)
        elif freeze_bn_stats and isinstance(model, AudioSlowFast):
            model.set_bn_policy(True)
            model.adapting_bn = []

    @classmethod
    def from_config(cls, cfg: dict[str, Any], info: DataInfo) -> AudioStage:
        c = validate(AudioStageConfig, cfg, prefix="method")
        return cls(build_model(c.model, info), c.loss, c.epsilon, c.gamma, c.freeze_backbone, c.freeze_bn,
                   c.freeze_bn_stats, c.precise_bn_batches, c.redact_classes)

    def train(self, mode: bool = True) -> AudioStage:
        super().train(mode)
        if mode:
            apply_bn_eval(self.model)
        return self

    def training_step(self, batch: tuple[Tensor, Tensor], step: int) -> dict[str, Tensor]:
        x, y = batch
        logits = self.model(x)
        loss = stage_loss(logits, y, self.loss_kind, self.epsilon, self.gamma)
        return {"loss": loss, "acc": (logits.argmax(-1) == y).float().mean().detach()}

    def evaluate(self, loader: DataLoader | None, trainer: Trainer, model: nn.Module) -> dict[str, float]:
        """Multi-view metrics (top-1/5, mCA, mAP, mAUC, ECE, NLL); the scores are kept in ``self.scores``."""
        if loader is None:
            return {}
        # `kdforge eval` calls this on an instance built by Method.__init__ only: settings default to none
        batches = getattr(self, "precise_bn_batches", 0)
        train_loader = getattr(trainer, "train_loader", None)
        at = (id(model), int(getattr(trainer, "global_step", 0)))
        if batches and train_loader is not None and getattr(self, "_bn_estimated_at", None) != at:
            # once per weights: the val, test and later scores of these weights share one BN estimate
            precise_bn(model, train_loader, batches)
            self._bn_estimated_at = at
        s, y = view_scores(model, loader)
        if hasattr(self, "scores"):
            self.scores[getattr(loader.dataset, "split", "") or "eval"] = (s, y)
        keep = y >= 0
        if not keep.any():
            return {}
        m = all_metrics(s[keep], y[keep], getattr(self, "redact_classes", []))
        p = s[keep] / s[keep].sum(1, keepdims=True)
        m["loss"] = float(-np.log(np.clip(p[np.arange(keep.sum()), y[keep]], 1e-12, None)).mean())
        return m

    def deployable(self) -> nn.Module:
        return self.model
