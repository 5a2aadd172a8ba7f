"""Data-free KD: DAFL (a generator trained against the frozen teacher) and DeepInversion (pixel synthesis).

The student never sees a real training image: ``setup`` and ``training_step`` ignore their ``batch``
argument entirely (it may be ``None``); every image the student or teacher gets during training is
synthesised from noise. The engine still iterates its training loader (that only sets the number of
steps per epoch: use ``data.limit_train`` to choose it); evaluation uses the real test set. Set
``data.val_fraction: 0`` so that no training image is used even for model selection.

Side optimizers are manual engine optimizers, stepped inside ``training_step`` through their handles:
DAFL's generator ("generator", Adam) and DeepInversion's pixels ("pixels", Adam β = (0.5, 0.9), a
parameter of the batch's shape re-initialised and its optimizer state reset before each synthesis).
The engine saves and resumes them with the student's optimizer ("main").
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdforge.config import ModelSpec, Strict, validate
from kdforge.distill.adversarial import freeze, side_adam
from kdforge.engine.optim import OptimizerSpec
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
        self.lr_g = lr_g
        self.generator = Generator(latent_dim, info.in_chans, info.image_size, gen_width)
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

    def configure_optimizers(self) -> Sequence[OptimizerSpec]:
        """The student in "main"; the generator's Adam (β = (0.9, 0.999), constant lr ``lr_g``), stepped manually."""
        return [OptimizerSpec("main"), OptimizerSpec("generator", self.generator, manual=True,
                                                     **side_adam(self.lr_g, (0.9, 0.999)))]

    def synthesize(self, n: int | None = None) -> Tensor:
        """A batch of generated images (no grad)."""
        z = torch.randn(n or self.batch_size, self.latent_dim, device=self.generator.fc.weight.device)
        with torch.no_grad():
            return self.generator(z)

    def training_step(self, batch: Any, step: int) -> dict[str, Tensor]:
        del batch  # data-free: the real batch is never looked at
        device = self.generator.fc.weight.device
        z = torch.randn(self.batch_size, self.latent_dim, device=device)
        parts: dict[str, Tensor] = {}

        def generator_loss() -> Tensor:
            parts["images"] = images = self.generator(z)
            parts["t_logits"] = t_logits = self.teacher(images)
            feats = self.t_taps[self.t_feature].flatten(1)
            parts["oh"], parts["a"], parts["ie"] = one_hot_loss(t_logits), activation_loss(feats), \
                info_entropy_loss(t_logits)
            return self.oh * parts["oh"] + self.a * parts["a"] + self.ie * parts["ie"]

        loss_g = self.optimizer("generator").update(generator_loss)
        # the images of the generator before its step, as DAFL's loop trains the student on them
        images, t_logits = parts["images"].detach(), parts["t_logits"].detach()
        l_oh, l_a, l_ie = parts["oh"], parts["a"], parts["ie"]
        s_logits = self.student(images)
        loss = kd_loss(s_logits, t_logits, self.T)
        agree = (s_logits.argmax(-1) == t_logits.argmax(-1)).float().mean()
        return {"loss": loss, "loss_g": loss_g, "loss_oh": l_oh.detach(), "loss_a": l_a.detach(),
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


@contextmanager
def _out_of_autograd(module: nn.Module) -> Iterator[None]:
    """Parameters of ``module`` that require grad stop doing so inside the block."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


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

    Every ``synth_every`` steps a new batch is synthesised (``synth_iters`` Adam steps on the pixels, the
    manual optimizer "pixels", reset each time) into a pool of the last ``pool_batches`` batches; each student
    step uses a random pooled batch with fresh jitter. The pool is part of the resumable state.
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
        #: the images being synthesised: a parameter of the manual optimizer "pixels"
        self.pixels = nn.Parameter(torch.zeros(shape[1:]))
        self.register_buffer("pool", torch.zeros(shape))
        self.register_buffer("pool_y", torch.zeros(shape[:2], dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("next_slot", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_parts", torch.zeros(2))  # CE and BN terms at the last synthesis step

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

    def configure_optimizers(self) -> Sequence[OptimizerSpec]:
        """The student in "main"; the pixels' Adam (β = (0.5, 0.9), constant ``synth_lr``), stepped manually."""
        return [OptimizerSpec("main"), OptimizerSpec("pixels", [self.pixels], manual=True,
                                                     **side_adam(self.synth_lr, (0.5, 0.9)))]

    def _augment(self, x: Tensor) -> Tensor:
        if self.jitter:
            dx, dy = torch.randint(-self.jitter, self.jitter + 1, (2,)).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(3)
        return x

    def synthesize(self, iters: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Optimise a batch of images from N(0, 1) for the teacher: (images, labels, last CE and BN terms)."""
        h = self.optimizer("pixels")
        x = self.pixels
        with torch.no_grad():
            x.copy_(torch.randn(x.shape, device=x.device))
        y = torch.randint(0, self.info.num_classes, (len(x),), device=x.device)
        h.reset()  # a fresh Adam for every synthesised batch
        was = self.student.training
        self.student.eval()
        parts = x.new_zeros(2)

        def loss_fn() -> Tensor:
            xa = self._augment(x)
            t_logits = self.teacher(xa)
            ce = F.cross_entropy(t_logits, y)
            bn = sum((hk.loss for hk in self.hooks if hk.loss is not None), x.new_zeros(()))
            loss = ce + self.bn_weight * bn + self.tv_weight * tv_l2(xa) + self.l2_weight * xa.pow(2).sum()
            if self.adi_weight:
                loss = loss + self.adi_weight * (1 - js_divergence(t_logits, self.student(xa)))
            parts.copy_(torch.stack([ce.detach(), bn.detach()]))
            return loss

        for hook in self.hooks:
            hook.active = True
        try:
            # gradients reach the pixels only: the student's (engine-stepped) gradients must stay untouched
            with _out_of_autograd(self.student):
                for _ in range(iters or self.synth_iters):
                    h.update(loss_fn)
        finally:
            for hook in self.hooks:
                hook.active = False
                hook.loss = None
            self.student.train(was)
        return x.detach().clone(), y, parts

    def training_step(self, batch: Any, step: int) -> dict[str, Tensor]:
        del batch  # data-free: the real batch is never looked at
        if int(self.filled) == 0 or step % self.synth_every == 0:
            images, labels, parts = self.synthesize()
            slot = int(self.next_slot)
            self.pool[slot] = images
            self.pool_y[slot] = labels
            self.last_parts.copy_(parts)
            self.next_slot.fill_((slot + 1) % self.pool.shape[0])
            self.filled.fill_(min(int(self.filled) + 1, self.pool.shape[0]))
        i = int(torch.randint(0, int(self.filled), ()))
        x = self._augment(self.pool[i])
        with torch.no_grad():
            t_logits = self.teacher(x)
        s_logits = self.student(x)
        loss = kd_loss(s_logits, t_logits, self.T)
        return {"loss": loss, "synth_ce": self.last_parts[0].clone(), "synth_bn": self.last_parts[1].clone(),
                "agree": (s_logits.argmax(-1) == t_logits.argmax(-1)).float().mean().detach()}

    def deployable(self) -> nn.Module:
        return self.student
