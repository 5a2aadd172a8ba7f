"""Self-distillation from mixup: MixSKD (Yang et al., ECCV 2022, arXiv 2208.05768) on any staged backbone.

The auxiliary exits, self-teacher and discriminators are built from the backbone's stage taps
(``model.feature_names``) and live beside it in the Method; the deployable model is the plain backbone.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdforge.config import ModelSpec, Strict, validate
from kdforge.distill.adversarial import side_adam
from kdforge.engine.optim import OptimizerSpec
from kdforge.errors import KdforgeError
from kdforge.losses.base import deprecated_key
from kdforge.losses.response import kd_loss
from kdforge.method import DataInfo, Method, build_model
from kdforge.registry import METHODS
from kdforge.taps import FeatureTaps

_POOL_LEAVES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)


# -- helpers ---------------------------------------------------------------------------------------
def sample_mixup(batch_size: int, alpha: float, device: torch.device | str = "cpu") -> tuple[float, Tensor]:
    """One λ ~ Beta(α, α) for the whole batch and a random permutation π of the batch."""
    a = torch.tensor(float(alpha))
    lam = float(torch.distributions.Beta(a, a).sample())
    return lam, torch.randperm(batch_size, device=device)


def interpolate(t: Tensor, lam: float, perm: Tensor) -> Tensor:
    """λ·t + (1−λ)·t[π] along the batch dimension (mixup of inputs, or the interpolation of outputs)."""
    return lam * t + (1.0 - lam) * t[perm]


def mixup_ce(logits: Tensor, y: Tensor, lam: float, perm: Tensor) -> Tensor:
    """Mixup cross-entropy: λ·CE(z, y) + (1−λ)·CE(z, y[π])."""
    return lam * F.cross_entropy(logits, y) + (1.0 - lam) * F.cross_entropy(logits, y[perm])


def kl_t(student: Tensor, target: Tensor, T: float) -> Tensor:
    """T²·KL(p^T(sg target) ‖ p^T(student)), batchmean; the target side gets no gradient."""
    return kd_loss(student, target.detach(), T)


def disc_bce(logits: Tensor, label: int) -> Tensor:
    """BCE-with-logits of 2-way discriminator outputs against the one-hot of ``label`` (mean over elements)."""
    target = torch.zeros_like(logits)
    target[:, label] = 1.0
    return F.binary_cross_entropy_with_logits(logits, target)


def gap(a: Tensor) -> Tensor:
    """Global average pool of a B×C×H×W map to B×C."""
    return a.mean((2, 3))


# -- exits built from stage taps -------------------------------------------------------------------
@dataclass
class StagePlan:
    """The backbone's stages and the chain of modules that runs from the first stage to the last."""

    stages: list[str]
    chain: list[str]
    channels: int
    head_pool: str | None = None  # the backbone's pooling module right after the last stage, if any
    map_size: tuple[int, int] = (4, 4)  # H×W of the last stage's map for the example input

    def tail(self, stage: str) -> list[str]:
        """Module names that follow ``stage`` up to and including the last stage."""
        return self.chain[self.chain.index(stage) + 1:]


def _is_pool(module: nn.Module) -> bool:
    """A global-pool tap: only pooling / flatten / identity leaves, at least one pool."""
    leaves = [m for m in module.modules() if not list(m.children())]
    return all(isinstance(m, _POOL_LEAVES) for m in leaves) and any("Pool" in type(m).__name__ for m in leaves)


def _units(model: nn.Module, taps: list[str]) -> list[str]:
    """Top-level children, expanded where a tap lies inside one, so that every tap is a unit."""
    units = [n for n, _ in model.named_children()]
    while True:
        parent = next((u for u in units if any(t.startswith(u + ".") for t in taps)), None)
        if parent is None:
            return units
        kids = [f"{parent}.{n}" for n, _ in model.get_submodule(parent).named_children()]
        i = units.index(parent)
        units[i:i + 1] = kids


@torch.no_grad()
def plan_stages(model: nn.Module, example: Tensor, stages: list[str] | None = None) -> StagePlan:
    """Find the stage taps and check that they form a plain chain (each unit feeds the next one)."""
    names = list(stages or getattr(model, "feature_names", None) or [])
    if not names:
        raise KdforgeError(f"{type(model).__name__} has no feature_names: give method.stages (module names)")
    modules = dict(model.named_modules())
    for n in names:
        if n not in modules:
            raise KdforgeError(f"no module named {n!r} in {type(model).__name__} (method.stages)")
    units = _units(model, names)
    calls: list[tuple[str, Any, Any]] = []
    handles = [model.get_submodule(u).register_forward_hook(
        lambda m, args, out, u=u: calls.append((u, args[0] if args else None, out))) for u in units]
    was = model.training
    model.eval()
    try:
        model(example[:2])
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    order = [c[0] for c in calls]
    outputs = {c[0]: c[2] for c in calls}
    if stages is None:  # feature_names = stem, stages..., pool-like taps: keep the 4-D non-pool ones after the stem
        names = [n for n in names[1:] if isinstance(outputs.get(n), Tensor) and outputs[n].ndim == 4
                 and not _is_pool(modules[n])]
    if len(names) < 2:
        raise KdforgeError(f"{type(model).__name__}: need at least two stages with 4-D maps, got {names}")
    for n in names:
        if order.count(n) != 1:
            raise KdforgeError(f"stage {n!r} runs {order.count(n)} times per forward; stages must run once")
    pos = [order.index(n) for n in names]
    if pos != sorted(pos):
        raise KdforgeError(f"stages {names} do not run in this order")
    chain = order[pos[0]:pos[-1] + 1]
    for (_, _, prev_out), (u, inp, _) in zip(calls[pos[0]:pos[-1]], calls[pos[0] + 1:pos[-1] + 1], strict=True):
        if inp is not prev_out:
            raise KdforgeError(f"{u!r} does not take the previous module's output: the stages are not a plain "
                               "chain, so exits cannot be built from copies of the later stages")
    last = outputs[names[-1]]
    for n in names:
        if outputs[n].ndim != 4:
            raise KdforgeError(f"stage {n!r} gives a {outputs[n].ndim}-D output; exits need B×C×H×W maps")
    after = order[pos[-1] + 1:pos[-1] + 2]
    head_pool = after[0] if after and _is_pool(modules[after[0]]) else None
    return StagePlan(names, chain, int(last.shape[1]), head_pool, (int(last.shape[2]), int(last.shape[3])))


def fresh_copy(module: nn.Module) -> nn.Module:
    """A deep copy of a module definition with fresh weights (He init for convolutions)."""
    new = copy.deepcopy(module)
    for m in new.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            m.reset_running_stats()
    return new


def pool_like(model: nn.Module, plan: StagePlan) -> nn.Module:
    """The backbone's own pooling after the last stage (a copy), else global average pooling."""
    if plan.head_pool is not None:
        return copy.deepcopy(model.get_submodule(plan.head_pool))
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


class Exits(nn.Module):
    """Auxiliary exits (HSAKD style): for stage k < S, fresh copies of stages k+1..S, the pool, a classifier.

    Every exit's final map therefore has the shape of the last stage's map; the backbone's own
    classifier is the last exit.
    """

    def __init__(self, model: nn.Module, plan: StagePlan, num_classes: int) -> None:
        super().__init__()
        self.stages = list(plan.stages)
        self.branches = nn.ModuleList(
            nn.Sequential(*[fresh_copy(model.get_submodule(u)) for u in plan.tail(s)]) for s in plan.stages[:-1])
        self.pool = pool_like(model, plan)
        dim = self.pool(torch.zeros(1, plan.channels, *plan.map_size)).flatten(1).shape[1]
        self.heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in plan.stages[:-1])

    @property
    def num_exits(self) -> int:
        """K = S: the auxiliary exits and the backbone's own."""
        return len(self.stages)

    def forward(self, model: nn.Module, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Logits and final maps of every exit, shallow to deep (the last pair is the backbone's)."""
        with FeatureTaps(model, self.stages) as taps:
            z_last = model(x)
            feats = taps.get(self.stages)
        logits, maps = [], []
        for branch, head, f in zip(self.branches, self.heads, feats[:-1], strict=True):
            a = branch(f)
            maps.append(a)
            logits.append(head(self.pool(a).flatten(1)))
        return [*logits, z_last], [*maps, feats[-1]]


class SelfTeacher(nn.Module):
    """MixSKD's self-teacher: concat of the exits' maps → 1×1 conv (no bias) → pool (GAP) → linear classifier."""

    def __init__(self, num_exits: int, channels: int, num_classes: int, pool: nn.Module | None = None,
                 map_size: tuple[int, int] = (4, 4)) -> None:
        super().__init__()
        self.fuse = nn.Conv2d(num_exits * channels, channels, 1, bias=False)
        self.pool = pool if pool is not None else nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(self.pool(torch.zeros(1, channels, *map_size)).flatten(1).shape[1], num_classes)

    def forward(self, maps: list[Tensor]) -> Tensor:
        return self.fc(self.pool(self.fuse(torch.cat(maps, 1))).flatten(1))


def discriminator(channels: int, hidden: int = 128) -> nn.Sequential:
    """D_k: Linear(C→hidden) → ReLU → Linear(hidden→2) on a pooled exit map."""
    return nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, 2))


# -- MixSKD ----------------------------------------------------------------------------------------
class MixSKDConfig(Strict):
    """Recipe schema of ``method: {name: mixskd}``."""

    name: str = "mixskd"
    model: ModelSpec
    stages: list[str] | None = None
    alpha: float = Field(0.4, gt=0)
    T: float = Field(3.0, gt=0)
    w_ce: float = Field(1.0, ge=0)
    w_mix: float = Field(1.0, ge=0)
    w_kl: float = Field(1.0, ge=0)
    w_fea: float = Field(1.0, ge=0)
    w_adv: float = Field(1.0, ge=0)
    adv_mode: Literal["minimax", "code", "off"] = "minimax"
    disc_hidden: int = Field(128, ge=1)
    disc_lr: float = Field(1e-3, gt=0)
    #: ``paper`` or ``official`` (SKL's CIFAR script: frozen random discriminators, no mixup-CE)
    compat: Literal["paper", "official"] = "paper"
    code_compat: bool | None = None  # deprecated: compat official


@dataclass
class Views:
    """Per-exit logits and maps of the original, mixup-image and interpolated views, and the self-teacher's."""

    zo: list[Tensor]
    zm: list[Tensor]
    zi: list[Tensor]
    ao: list[Tensor]
    am: list[Tensor]
    ai: list[Tensor]
    hi: Tensor
    hm: Tensor


TERMS = ("ce", "mix", "kl", "fea", "adv")


@METHODS.register("mixskd")
class MixSKD(Method):
    """MixSKD: exits + self-teacher, mixup-linearity KD of maps and logits, adversarial feature term."""

    Config = MixSKDConfig

    def __init__(self, model: nn.Module, num_classes: int, stages: list[str] | None = None, alpha: float = 0.4,
                 T: float = 3.0, weights: dict[str, float] | None = None,
                 adv_mode: Literal["minimax", "code", "off"] = "minimax", disc_hidden: int = 128,
                 disc_lr: float = 1e-3) -> None:
        super().__init__()
        self.model = model
        self.num_classes = num_classes
        self.stage_names = stages
        self.alpha, self.T = alpha, T
        self.weights = {k: 1.0 for k in TERMS} | (weights or {})
        self.adv_mode = adv_mode
        self.disc_hidden, self.disc_lr = disc_hidden, disc_lr
        self.exits: Exits | None = None
        self.self_teacher: SelfTeacher | None = None
        self.discriminators: nn.ModuleList | None = None

    @classmethod
    def from_config(cls, cfg: dict[str, Any], info: DataInfo) -> MixSKD:
        c = validate(MixSKDConfig, cfg, prefix="method")
        weights = {k: getattr(c, f"w_{k}") for k in TERMS}
        adv_mode = c.adv_mode
        official = c.compat == "official"
        if c.code_compat is not None:
            deprecated_key("method.code_compat", "method.compat: official")
            official = c.code_compat
        if official:
            if "adv_mode" in c.model_fields_set and c.adv_mode != "code":
                raise KdforgeError("method.compat official (formerly code_compat) reproduces SKL's frozen random "
                                   "discriminators: leave adv_mode out (or set it to 'code')")
            if "w_mix" in c.model_fields_set and c.w_mix != 0:
                raise KdforgeError("method.compat official (formerly code_compat) drops the mixup-CE as SKL's CIFAR "
                                   "script does: leave w_mix out (or set it to 0)")
            adv_mode, weights["mix"] = "code", 0.0
        return cls(build_model(c.model, info), info.num_classes, c.stages, c.alpha, c.T, weights, adv_mode,
                   c.disc_hidden, c.disc_lr)

    @torch.no_grad()
    def setup(self, batch: tuple[Tensor, Tensor]) -> None:
        if self.exits is not None:
            return
        x = batch[0]
        plan = plan_stages(self.model, x, self.stage_names)
        self.exits = Exits(self.model, plan, self.num_classes).to(x.device)
        k, c = self.exits.num_exits, plan.channels
        self.self_teacher = SelfTeacher(k, c, self.num_classes, pool_like(self.model, plan), plan.map_size)
        self.self_teacher.to(x.device)
        if self.adv_mode != "off":
            self.discriminators = nn.ModuleList(discriminator(c, self.disc_hidden) for _ in range(k)).to(x.device)
            if self.adv_mode == "code":  # SKL's fixed random probes: never trained
                self.discriminators.requires_grad_(False)

    def configure_optimizers(self) -> Sequence[OptimizerSpec]:
        """Backbone, exits and self-teacher in "main"; the discriminators' Adam (β = (0.5, 0.999)) in "disc"."""
        specs = [OptimizerSpec("main")]
        if self.adv_mode == "minimax" and self.discriminators is not None:
            specs.append(OptimizerSpec("disc", self.discriminators, manual=True,
                                       **side_adam(self.disc_lr, (0.5, 0.999))))
        return specs

    def _built(self) -> tuple[Exits, SelfTeacher]:
        if self.exits is None or self.self_teacher is None:
            raise KdforgeError("MixSKD.setup(batch) must run before training (the engine does this)")
        return self.exits, self.self_teacher

    def views(self, x: Tensor, lam: float, perm: Tensor) -> Views:
        """One forward over [x; mixup(x)] (shared BN statistics), split into the three views."""
        exits, teacher = self._built()
        b = len(x)
        logits, maps = exits(self.model, torch.cat([x, interpolate(x, lam, perm)]))
        zo, zm = [z[:b] for z in logits], [z[b:] for z in logits]
        ao, am = [a[:b] for a in maps], [a[b:] for a in maps]
        zi = [interpolate(z, lam, perm) for z in zo]
        ai = [interpolate(a, lam, perm) for a in ao]
        return Views(zo, zm, zi, ao, am, ai, teacher(ai), teacher(am))

    def adversarial(self, v: Views) -> Tensor:
        """The network's adversarial feature term (interpolated = class 0, mixup-image = class 1)."""
        if self.discriminators is None:
            return v.hi.new_zeros(())
        # "code" minimises the discriminators' own BCE (fixed random probes); "minimax" fools trained ones
        real, fake = (0, 1) if self.adv_mode == "code" else (1, 0)
        return sum((disc_bce(d(gap(ai)), real) + disc_bce(d(gap(am)), fake)
                    for d, ai, am in zip(self.discriminators, v.ai, v.am, strict=True)), v.hi.new_zeros(()))

    def discriminator_loss(self, v: Views) -> Tensor:
        """The discriminators' BCE on detached pooled maps with the true view labels."""
        assert self.discriminators is not None
        return sum((disc_bce(d(gap(ai.detach())), 0) + disc_bce(d(gap(am.detach())), 1)
                    for d, ai, am in zip(self.discriminators, v.ai, v.am, strict=True)), v.hi.new_zeros(()))

    def loss_terms(self, v: Views, y: Tensor, lam: float, perm: Tensor) -> dict[str, Tensor]:
        """The unweighted terms L_ce, L_mix, L_kl, L_fea, L_adv of the paper."""
        ce = sum(F.cross_entropy(z, y) for z in v.zo)
        mix = sum(mixup_ce(z, y, lam, perm) for z in [*v.zm, v.hi, v.hm])
        kl = sum(kl_t(zi, zm, self.T) + kl_t(zm, zi, self.T) for zi, zm in zip(v.zi[:-1], v.zm[:-1], strict=True))
        kl = kl + kl_t(v.zi[-1], v.hm, self.T) + kl_t(v.zm[-1], v.hi, self.T)
        fea = sum(F.mse_loss(ai, am) for ai, am in zip(v.ai, v.am, strict=True))
        return {"ce": ce, "mix": mix, "kl": kl, "fea": fea, "adv": self.adversarial(v)}  # type: ignore[dict-item]

    def training_step(self, batch: tuple[Tensor, Tensor], step: int) -> dict[str, Tensor]:
        x, y = batch
        lam, perm = sample_mixup(len(x), self.alpha, x.device)
        v = self.views(x, lam, perm)
        out: dict[str, Tensor] = {}
        if self.adv_mode == "minimax" and self.discriminators is not None and torch.is_grad_enabled():
            out["loss_disc"] = self.optimizer("disc").update(lambda: self.discriminator_loss(v))
        terms = self.loss_terms(v, y, lam, perm)
        total = v.hi.new_zeros(())
        for k, t in terms.items():
            if self.weights[k]:
                total = total + self.weights[k] * t
            out[f"loss_{k}"] = t.detach()
        out["loss"] = total
        out["acc"] = (v.zo[-1].argmax(-1) == y).float().mean().detach()
        for i, z in enumerate(v.zo[:-1]):
            out[f"acc_exit{i + 1}"] = (z.argmax(-1) == y).float().mean().detach()
        major = y if lam >= 0.5 else y[perm]  # the dominant label of each mixup image
        out["acc_self_teacher"] = (v.hm.argmax(-1) == major).float().mean().detach()
        return out

    def deployable(self) -> nn.Module:
        return self.model
