"""Adversarial KD: a discriminator tells teacher from student outputs; it and the student train in turn.

The discriminator is a manual engine optimizer ("disc", Adam β = (0.5, 0.999)): ``training_step`` steps it
through ``self.optimizer("disc")`` before the student's loss, which the engine optimizes ("main"). The
engine keeps the discriminator's parameters out of autograd outside that update, saves and resumes its
optimizer state, and averages its gradients across processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdforge.config import ModelSpec, Strict, validate
from kdforge.engine.optim import OptimizerSpec
from kdforge.errors import KdforgeError
from kdforge.losses.response import kd_loss
from kdforge.method import DataInfo, Method, build_model
from kdforge.registry import METHODS
from kdforge.taps import FeatureTaps


def side_adam(lr: float, betas: tuple[float, float]) -> dict[str, Any]:
    """OptimizerSpec keywords of a side network's plain Adam: constant lr, no weight decay, no clipping."""
    return {"optim": {"name": "adam", "lr": lr, "betas": betas, "eps": 1e-8, "weight_decay": 0.0, "no_decay": []},
            "sched": {"name": "constant", "warmup_epochs": 0.0}, "clip": 0.0}


def freeze(module: nn.Module) -> nn.Module:
    """Set requires_grad=False on every parameter of ``module`` and return it."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class Discriminator(nn.Module):
    """An MLP scoring inputs as teacher (logit > 0) or student."""

    def __init__(self, dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                                 nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)


def discriminator_loss(d_teacher: Tensor, d_student: Tensor) -> Tensor:
    """L_D = −log D(sg z_t) − log(1 − D(sg z_s)), from the discriminator's logits."""
    return (F.binary_cross_entropy_with_logits(d_teacher, torch.ones_like(d_teacher))
            + F.binary_cross_entropy_with_logits(d_student, torch.zeros_like(d_student)))


def generator_loss(d_student: Tensor) -> Tensor:
    """The student's adversarial term −log D(z_s) (non-saturating)."""
    return F.binary_cross_entropy_with_logits(d_student, torch.ones_like(d_student))


class AdversarialConfig(Strict):
    """Recipe schema of ``method: {name: adversarial}``."""

    name: str = "adversarial"
    teacher: ModelSpec
    student: ModelSpec
    input: Literal["logits", "probs", "features"] = "logits"
    feature_tap: str | None = None
    T: float = Field(4.0, gt=0)
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    adv_weight: float = 1.0
    hidden: int = Field(64, ge=1)
    lr_d: float = Field(1e-3, gt=0)
    d_steps: int = Field(1, ge=1)


@METHODS.register("adversarial")
class AdversarialKD(Method):
    """Student = CE + KD + λ·(−log D(student)); D learns to tell teacher from student outputs, in alternation."""

    Config = AdversarialConfig
    frozen_prefixes = ("teacher.",)

    def __init__(self, student: nn.Module, teacher: nn.Module, num_classes: int, input: str = "logits",
                 feature_tap: str | None = None, T: float = 4.0, ce_weight: float = 1.0, kd_weight: float = 1.0,
                 adv_weight: float = 1.0, hidden: int = 64, lr_d: float = 1e-3, d_steps: int = 1) -> None:
        super().__init__()
        self.student, self.teacher = student, freeze(teacher).eval()
        self.input, self.T = input, T
        self.ce_weight, self.kd_weight, self.adv_weight = ce_weight, kd_weight, adv_weight
        self.hidden, self.lr_d, self.d_steps = hidden, lr_d, d_steps
        self.s_taps = self.t_taps = None
        if input == "features":
            s_tap = feature_tap or getattr(student, "feature_names", [None])[-1]
            t_tap = feature_tap or getattr(teacher, "feature_names", [None])[-1]
            if s_tap is None or t_tap is None:
                raise KdforgeError("adversarial: input 'features' needs feature_tap (no feature_names on the model)")
            self.s_taps, self.t_taps = FeatureTaps(student, [s_tap]), FeatureTaps(teacher, [t_tap])
            self.s_tap, self.t_tap = s_tap, t_tap
            self.disc: Discriminator | None = None
            self.proj: nn.Module | None = None
        else:
            self.disc = Discriminator(num_classes, hidden)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], info: DataInfo) -> AdversarialKD:
        c = validate(AdversarialConfig, cfg, prefix="method")
        return cls(build_model(c.student, info), build_model(c.teacher, info), info.num_classes, c.input,
                   c.feature_tap, c.T, c.ce_weight, c.kd_weight, c.adv_weight, c.hidden, c.lr_d, c.d_steps)

    def train(self, mode: bool = True) -> AdversarialKD:
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def setup(self, batch: tuple[Tensor, Tensor]) -> None:
        if self.input != "features" or self.disc is not None:
            return
        x, _ = batch
        was = self.student.training
        self.student.eval()
        self.student(x)
        self.teacher(x)
        self.student.train(was)
        ds = self.s_taps[self.s_tap].flatten(1).shape[1]
        dt = self.t_taps[self.t_tap].flatten(1).shape[1]
        # the projection trains with the student ("main"); D in its own manual step ("disc")
        self.proj = nn.Linear(ds, dt).to(x.device)
        self.disc = Discriminator(dt, self.hidden).to(x.device)

    def configure_optimizers(self) -> Sequence[OptimizerSpec]:
        """The student (and projection) in "main"; the discriminator's Adam β = (0.5, 0.999), stepped manually."""
        if self.disc is None:
            raise KdforgeError("adversarial: call setup(batch) first (builds the discriminator for features)")
        return [OptimizerSpec("main"),
                OptimizerSpec("disc", self.disc, manual=True, **side_adam(self.lr_d, (0.5, 0.999)))]

    def _d_input(self, logits: Tensor, student: bool) -> Tensor:
        if self.input == "logits":
            return logits
        if self.input == "probs":
            return F.softmax(logits / self.T, -1)
        taps = self.s_taps if student else self.t_taps
        f = taps[self.s_tap if student else self.t_tap].flatten(1)  # type: ignore[index]
        return self.proj(f) if student else f  # type: ignore[misc]

    def training_step(self, batch: tuple[Tensor, Tensor], step: int) -> dict[str, Tensor]:
        if self.disc is None:
            raise KdforgeError("adversarial: call setup(batch) first (builds the discriminator for features)")
        x, y = batch
        with torch.no_grad():
            t_logits = self.teacher(x)
            t_in = self._d_input(t_logits, student=False)
        s_logits = self.student(x)
        s_in = self._d_input(s_logits, student=True)
        disc, t_d, s_d = self.disc, t_in.detach(), s_in.detach()
        h = self.optimizer("disc")
        for _ in range(self.d_steps):
            d_loss = h.update(lambda: discriminator_loss(disc(t_d), disc(s_d)))
        d_s = self.disc(s_in)  # D is out of autograd again: gradients reach the student only
        adv = generator_loss(d_s)
        ce = F.cross_entropy(s_logits, y)
        kd = kd_loss(s_logits, t_logits, self.T)
        loss = self.ce_weight * ce + self.kd_weight * kd + self.adv_weight * adv
        with torch.no_grad():
            d_acc = 0.5 * ((self.disc(t_in) > 0).float().mean() + (d_s < 0).float().mean())
        return {"loss": loss, "loss_ce": ce.detach(), "loss_kd": kd.detach(), "loss_adv": adv.detach(),
                "loss_d": d_loss.detach(), "d_acc": d_acc, "acc": (s_logits.argmax(-1) == y).float().mean().detach()}

    def deployable(self) -> nn.Module:
        return self.student
