"""Data-free KD: DAFL (a generator trained against the frozen teacher) and DeepInversion (pixel synthesis).

The student never sees a real training image: ``setup`` and ``training_step`` ignore their ``batch``
argument entirely (it may be ``None``); every image the student or teacher gets during training is
synthesised from noise. The engine still iterates its training loader (that only sets the number of
steps per epoch: use ``data.limit_train`` to choose it); evaluation uses the real test set. Set
``data.val_fraction: 0`` so that no training image is used even for model selection.

The generator (DAFL) has its own Adam (:class:`BufferAdam`, state in buffers, resumable), stepped
inside ``training_step``; its parameters do not require grad outside that step, so the engine's
optimizer holds only the student.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdforge.config import ModelSpec, Strict, validate
from kdforge.distill.adversarial import BufferAdam, freeze, trainable
from kdforge.errors import KdforgeError
from kdforge.losses.response import kd_loss
from kdforge.method import DataInfo, Method, build_model
from kdforge.registry import METHODS
from kdforge.taps import FeatureTaps


class Generator(nn.Module):
    """DAFL's generator: latent → linear → two (upsample, conv, BN, LeakyReLU) → conv → tanh → BN (no affine)."""

    def __init__(self, latent_dim: int, channels: int, image_size: int, width: int = 128) -> None:
        super().__init__()
        self.latent_dim, self.image_size, self.width = latent_dim, image_size, width
        self.init_size = math.ceil(image_size / 4)
        self.fc = nn.Linear(latent_dim, width * self.init_size**2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(width), nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width, 3, 1, 1), nn.BatchNorm2d(width), nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width // 2, 3, 1, 1), nn.BatchNorm2d(width // 2), nn.LeakyReLU(0.2),
            nn.Conv2d(width // 2, channels, 3, 1, 1), nn.Tanh(), nn.BatchNorm2d(channels, affine=False))

    def forward(self, z: Tensor) -> Tensor:
        x = self.body(self.fc(z).view(len(z), self.width, self.init_size, self.init_size))
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x


def one_hot_loss(teacher_logits: Tensor) -> Tensor:
    """DAFL's one-hot loss: CE of the teacher's logits against its own argmax."""
    return F.cross_entropy(teacher_logits, teacher_logits.argmax(-1))


def activation_loss(features: Tensor) -> Tensor:
    """DAFL's activation loss: −mean |f_T| (large penultimate activations)."""
    return -features.abs().mean()


def info_entropy_loss(teacher_logits: Tensor) -> Tensor:
    """DAFL's information-entropy loss Σ_c p̄_c·log10 p̄_c of the batch-mean softmax (min −log10 C at uniform)."""
    p = F.softmax(teacher_logits, -1).mean(0)
    return (p * torch.log10(p.clamp_min(1e-12))).sum()


def _penultimate_tap(model: nn.Module, tap: str | None, who: str) -> str:
    name = tap or (getattr(model, "feature_names", None) or [None])[-1]
    if name is None:
        raise KdforgeError(f"{who}: give teacher_feature (the teacher has no feature_names)")
    return name


class DataFreeConfig(Strict):
    """Fields shared by the data-free methods."""

    teacher: ModelSpec
    student: ModelSpec
    batch_size: int = Field(128, ge=2)
    T: float = Field(1.0, gt=0)


class DAFLConfig(DataFreeConfig):
    """Recipe schema of ``method: {name: dafl}`` (defaults: DAFL's MNIST setting)."""

    name: str = "dafl"
    latent_dim: int = Field(100, ge=1)
    gen_width: int = Field(128, ge=2)
    lr_g: float = Field(0.2, gt=0)
    oh: float = 1.0
    ie: float = 5.0
    a: float = 0.1
    teacher_feature: str | None = None


@METHODS.register("dafl")
class DAFL(Method):
    """DAFL (Chen et al., ICCV 2019): G makes images the teacher is sure of, in balanced classes; S mimics T on them."""

    Config = DAFLConfig
    frozen_prefixes = ("teacher.",)

    def __init__(self, student: nn.Module, teacher: nn.Module, info: DataInfo, batch_size: int = 128,
                 T: float = 1.0, latent_dim: int = 100, gen_width: int = 128, lr_g: float = 0.2,
                 oh: float = 1.0, ie: float = 5.0, a: float = 0.1, teacher_feature: str | None = None) -> None:
        super().__init__()
        self.student, self.teacher = student, freeze(teacher).eval()
        self.batch_size, self.T, self.latent_dim = batch_size, T, latent_dim
        self.oh, self.ie, self.a = oh, ie, a
        self.generator = freeze(Generator(latent_dim, info.in_chans, info.image_size, gen_width))
        self.opt_g = BufferAdam(list(self.generator.parameters()), lr_g)
        self.t_feature = _penultimate_tap(teacher, teacher_feature, "dafl")
        self.t_taps = FeatureTaps(teacher, [self.t_feature])

    @classmethod
    def from_config(cls, cfg: dict[str, Any], info: DataInfo) -> DAFL:
        c = validate(DAFLConfig, cfg, prefix="method")
        return cls(build_model(c.student, info), build_model(c.teacher, info), info, c.batch_size, c.T,
                   c.latent_dim, c.gen_width, c.lr_g, c.oh, c.ie, c.a, c.teacher_feature)

    def train(self, mode: bool = True) -> DAFL:
        super().train(mode)
        self.teacher.eval()
        return self

    def setup(self, batch: Any = None) -> None:
        """Nothing to build from data: the generator is sized from DataInfo."""

    def synthesize(self, n: int | None = None) -> Tensor:
        """A batch of generated images (no grad)."""
        z = torch.randn(n or self.batch_size, self.latent_dim, device=self.generator.fc.weight.device)
        with torch.no_grad():
            return self.generator(z)

    def training_step(self, batch: Any, step: int) -> dict[str, Tensor]:
        del batch  # data-free: the real batch is never looked at
        device = self.generator.fc.weight.device
        z = torch.randn(self.batch_size, self.latent_dim, device=device)
        with trainable(self.generator):
            self.opt_g.zero_grad()
            images = self.generator(z)
            t_logits = self.teacher(images)
            feats = self.t_taps[self.t_feature].flatten(1)
            l_oh, l_a, l_ie = one_hot_loss(t_logits), activation_loss(feats), info_entropy_loss(t_logits)
            loss_g = self.oh * l_oh + self.a * l_a + self.ie * l_ie
            loss_g.backward()
            self.opt_g.step()
            self.opt_g.zero_grad()
        images, t_logits = images.detach(), t_logits.detach()
        s_logits = self.student(images)
        loss = kd_loss(s_logits, t_logits, self.T)
        agree = (s_logits.argmax(-1) == t_logits.argmax(-1)).float().mean()
        return {"loss": loss, "loss_g": loss_g.detach(), "loss_oh": l_oh.detach(), "loss_a": l_a.detach(),
                "loss_ie": l_ie.detach(), "agree": agree.detach()}

    def deployable(self) -> nn.Module:
        return self.student


class BNStatHook:
    """Forward hook on a BatchNorm2d: ‖μ(x) − μ_run‖₂ + ‖σ²(x) − σ²_run‖₂ of its input, while ``active``."""

    def __init__(self, module: nn.BatchNorm2d) -> None:
        self.handle = module.register_forward_hook(self)
        self.active = False
        self.loss: Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        if not self.active:
            return
        x = args[0]
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        self.loss = bn_stat_loss(mean, var, module.running_mean, module.running_var)  # type: ignore[arg-type]


def bn_stat_loss(mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """DeepInversion's feature-statistics term for one BN layer: ‖μ − μ_run‖₂ + ‖σ² − σ²_run‖₂."""
    return torch.linalg.vector_norm(mean - running_mean) + torch.linalg.vector_norm(var - running_var)


def tv_l2(x: Tensor) -> Tensor:
    """Total variation prior: Σ over 4 neighbour directions of the Frobenius norm of the differences."""
    d1 = x[..., :, :-1] - x[..., :, 1:]
    d2 = x[..., :-1, :] - x[..., 1:, :]
    d3 = x[..., 1:, :-1] - x[..., :-1, 1:]
    d4 = x[..., :-1, :-1] - x[..., 1:, 1:]
    return sum(torch.linalg.vector_norm(d) for d in (d1, d2, d3, d4))  # type: ignore[return-value]


def js_divergence(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Jensen–Shannon divergence between two softmax distributions, batch-mean."""
    p, q = F.softmax(p_logits, -1), F.softmax(q_logits, -1)
    m = (0.5 * (p + q)).clamp_min(1e-12)
    kl = lambda a: (a * (a.clamp_min(1e-12).log() - m.log())).sum(-1)
    return (0.5 * (kl(p) + kl(q))).mean()


class DeepInversionConfig(DataFreeConfig):
    """Recipe schema of ``method: {name: deepinversion}`` (CIFAR-10 prior weights; fewer iterations)."""

    name: str = "deepinversion"
    synth_iters: int = Field(200, ge=1)
    synth_lr: float = Field(0.05, gt=0)
    synth_every: int = Field(10, ge=1)
    pool_batches: int = Field(8, ge=1)
    bn_weight: float = 10.0
    tv_weight: float = 2.5e-5
    l2_weight: float = 0.0
    adi_weight: float = 0.0
    jitter: int = Field(2, ge=0)
    flip: bool = True


@METHODS.register("deepinversion")
class DeepInversion(Method):
    """DeepInversion (Yin et al., CVPR 2020): pixels optimised to match the teacher's BN statistics and labels.

    Every ``synth_every`` steps a new batch is synthesised (``synth_iters`` Adam steps on the pixels) into a
    pool of the last ``pool_batches`` batches; each student step uses a random pooled batch with fresh jitter.
    The pool is not saved (a resumed run synthesises anew).
    """

    Config = DeepInversionConfig
    frozen_prefixes = ("teacher.",)

    def __init__(self, student: nn.Module, teacher: nn.Module, info: DataInfo, batch_size: int = 128,
                 T: float = 1.0, synth_iters: int = 200, synth_lr: float = 0.05, synth_every: int = 10,
                 pool_batches: int = 8, bn_weight: float = 10.0, tv_weight: float = 2.5e-5, l2_weight: float = 0.0,
                 adi_weight: float = 0.0, jitter: int = 2, flip: bool = True) -> None:
        super().__init__()
        self.student, self.teacher = student, freeze(teacher).eval()
        self.info, self.batch_size, self.T = info, batch_size, T
        self.synth_iters, self.synth_lr, self.synth_every = synth_iters, synth_lr, synth_every
        self.bn_weight, self.tv_weight, self.l2_weight, self.adi_weight = bn_weight, tv_weight, l2_weight, adi_weight
        self.jitter, self.flip = jitter, flip
        self.hooks = [BNStatHook(m) for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.hooks and bn_weight:
            raise KdforgeError("deepinversion: the teacher has no BatchNorm2d layers to invert (set bn_weight: 0)")
        shape = (pool_batches, batch_size, info.in_chans, info.image_size, info.image_size)
        self.register_buffer("pool", torch.zeros(shape), persistent=False)
        self.register_buffer("pool_y", torch.zeros(shape[:2], dtype=torch.long), persistent=False)
        self.filled = 0
        self.next_slot = 0
        self.last_parts = {"synth_ce": 0.0, "synth_bn": 0.0}

    @classmethod
    def from_config(cls, cfg: dict[str, Any], info: DataInfo) -> DeepInversion:
        c = validate(DeepInversionConfig, cfg, prefix="method")
        return cls(build_model(c.student, info), build_model(c.teacher, info), info, c.batch_size, c.T,
                   c.synth_iters, c.synth_lr, c.synth_every, c.pool_batches, c.bn_weight,
                   c.tv_weight, c.l2_weight, c.adi_weight, c.jitter, c.flip)

    def train(self, mode: bool = True) -> DeepInversion:
        super().train(mode)
        self.teacher.eval()
        return self

    def setup(self, batch: Any = None) -> None:
        """Nothing to build from data."""

    def _augment(self, x: Tensor) -> Tensor:
        if self.jitter:
            dx, dy = torch.randint(-self.jitter, self.jitter + 1, (2,)).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(3)
        return x

    def synthesize(self, n: int | None = None, iters: int | None = None) -> tuple[Tensor, Tensor, dict[str, float]]:
        """Optimise a batch of images from N(0, 1) for the teacher: (images, labels, last loss parts)."""
        n = n or self.batch_size
        device = self.pool.device
        x = torch.randn(n, self.info.in_chans, self.info.image_size, self.info.image_size, device=device,
                        requires_grad=True)
        y = torch.randint(0, self.info.num_classes, (n,), device=device)
        opt = torch.optim.Adam([x], lr=self.synth_lr, betas=(0.5, 0.9))
        was = self.student.training
        self.student.eval()
        parts: dict[str, float] = {}
        for h in self.hooks:
            h.active = True
        try:
            for _ in range(iters or self.synth_iters):
                opt.zero_grad(set_to_none=True)
                xa = self._augment(x)
                t_logits = self.teacher(xa)
                ce = F.cross_entropy(t_logits, y)
                bn = sum((h.loss for h in self.hooks if h.loss is not None), x.new_zeros(()))
                loss = ce + self.bn_weight * bn + self.tv_weight * tv_l2(xa) + self.l2_weight * xa.pow(2).sum()
                if self.adi_weight:
                    loss = loss + self.adi_weight * (1 - js_divergence(t_logits, self.student(xa)))
                # grad w.r.t. the pixels only: nothing may leak into the student's (engine-stepped) gradients
                (x.grad,) = torch.autograd.grad(loss, [x])
                opt.step()
                parts = {"synth_ce": float(ce.detach()), "synth_bn": float(bn.detach())}
        finally:
            for h in self.hooks:
                h.active = False
                h.loss = None
            self.student.train(was)
        return x.detach(), y, parts

    def training_step(self, batch: Any, step: int) -> dict[str, Tensor]:
        del batch  # data-free: the real batch is never looked at
        if self.filled == 0 or step % self.synth_every == 0:
            images, labels, self.last_parts = self.synthesize()
            self.pool[self.next_slot] = images
            self.pool_y[self.next_slot] = labels
            self.next_slot = (self.next_slot + 1) % self.pool.shape[0]
            self.filled = min(self.filled + 1, self.pool.shape[0])
        i = int(torch.randint(0, self.filled, ()))
        x = self._augment(self.pool[i])
        with torch.no_grad():
            t_logits = self.teacher(x)
        s_logits = self.student(x)
        loss = kd_loss(s_logits, t_logits, self.T)
        out = {k: torch.tensor(v) for k, v in self.last_parts.items()}
        out.update({"loss": loss, "agree": (s_logits.argmax(-1) == t_logits.argmax(-1)).float().mean().detach()})
        return out

    def deployable(self) -> nn.Module:
        return self.student
