"""Diffusion training and distillation as rounds of one engine: DDPM base, PD, CFD and RDD.

``method: {name: diffusion}`` lists rounds. A ``ddpm`` round trains the denoiser at its full grid (the
engine's ``train.ema`` keeps its EMA, which becomes the weights the next round distils). Every other
round halves the steps: the student starts as a copy of the teacher (the previous round's result) and
learns in one DDIM step what the teacher does in two — with the PD MSE (``pd``), the classifier
feature-distribution KL (``cfd``) or CFD plus the two relational terms (``rdd``). Each round is a stage
of a :class:`~kdforge.engine.stages.StagedRun` (``RUN/stages/NN-<kind>-<steps>/``), so a run resumes
inside a round and across rounds.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.utils.data import DataLoader

from kdforge.config import ModelSpec, Strict, validate
from kdforge.diffusion.losses import PixelMemory, ProjectionHead, cfd_loss, is_p2p_loss, memory_p2p_loss
from kdforge.diffusion.schedule import CosineGrid
from kdforge.diffusion.unet import Denoiser
from kdforge.engine.gather import gather_no_grad
from kdforge.engine.optim import OptimizerSpec
from kdforge.errors import KdforgeError
from kdforge.method import DataInfo, Method, MethodStage, build_model
from kdforge.registry import METHODS

Kind = Literal["ddpm", "pd", "cfd", "rdd"]


class RoundConfig(Strict):
    """One round: ``ddpm`` (base training at the full grid) or a halving round (``pd``, ``cfd``, ``rdd``)."""

    kind: Kind
    epochs: int = Field(ge=1)
    lr: float | None = Field(None, gt=0)  # None: the recipe's optim.lr
    grad_clip: float | None = Field(1.0, gt=0)  # halving rounds: the student's clip (the head is never clipped)


class RddConfig(Strict):
    """Weights and temperatures of CFD/RDD (defaults: the official train_rdd.sh)."""

    cfd_weight: float = Field(1.0, ge=0)
    tau_c: float = Field(0.9, gt=0)
    is_weight: float = Field(1.0, ge=0)
    tau_is: float = Field(1.0, gt=0)
    pairs: Literal["all", "self"] = "all"
    m_weight: float = Field(0.1, ge=0)
    tau_m: float = Field(0.1, gt=0)
    tau_kd: float = Field(1.0, gt=0)
    queue: int = Field(20000, ge=1)
    per_step: int = Field(128, ge=1)
    contrast: int = Field(4096, ge=1)
    pd_mse_weight: float = Field(0.0, ge=0)
    enqueue_compat: bool = False
    clip_target: bool = False


class DiffusionConfig(Strict):
    """Recipe schema of ``method: {name: diffusion}``."""

    name: str = "diffusion"
    model: ModelSpec  # the denoiser; its checkpoint (with its level) starts the first round
    rounds: list[RoundConfig] = Field(min_length=1)
    loss: Literal["both", "x", "eps"] = "both"  # DDPM and PD weighting: "both" = max(x-MSE, ε-MSE)
    features: ModelSpec | None = None  # the frozen classifier of cfd/rdd rounds (with its checkpoint)
    rdd: RddConfig = Field(default_factory=RddConfig)


def pd_loss(x_hat: Tensor, x_tgt: Tensor, eps_hat: Tensor, eps_tgt: Tensor, kind: str) -> Tensor:
    """Per-sample max(‖x̂−x̃‖², ‖ε̂−ε̃‖²) (``both``), or one of them, batch mean."""
    lx = (x_hat - x_tgt).pow(2).flatten(1).mean(1)
    le = (eps_hat - eps_tgt).pow(2).flatten(1).mean(1)
    per = {"both": torch.maximum(lx, le), "x": lx, "eps": le}[kind]
    return per.mean()


def round_names(start_steps: int, grid: int, rounds: list[RoundConfig]) -> list[tuple[str, int, int]]:
    """(stage name, teacher steps, student steps) of every round; one clear line if the halving cannot work."""
    out, steps = [], start_steps
    for i, r in enumerate(rounds):
        if r.kind == "ddpm":
            if steps != grid:
                raise KdforgeError(f"method.rounds.{i}: a ddpm round trains the full grid ({grid} steps) but the "
                                   f"model is at {steps} steps here (ddpm rounds come first)")
            out.append((f"ddpm-{grid}", grid, grid))
            continue
        if steps < 2 or steps % 2:
            raise KdforgeError(f"method.rounds.{i}: a {r.kind} round halves the steps, but the model is at {steps} "
                               "steps (an even number >= 2 is needed)")
        out.append((f"{r.kind}-{steps // 2}", steps, steps // 2))
        steps //= 2
    return out


@METHODS.register("diffusion")
class Diffusion(Method):
    """DDPM training and progressive distillation rounds (PD, CFD, RDD) of one denoiser, through the engine."""

    Config = DiffusionConfig
    frozen_prefixes = ("teacher.", "features.")
    monitor = ("x_mse", "min")

    def __init__(self, student: Denoiser, rounds: list[RoundConfig], loss: str = "both",
                 features: nn.Module | None = None, rdd: RddConfig | None = None) -> None:
        super().__init__()
        if not isinstance(student, Denoiser):
            raise KdforgeError(f"method.model must be a denoiser (diffusion_unet, ddpm_unet, diffusers_unet), "
                               f"got {type(student).__name__}")
        self.student = student
        self.rounds = rounds
        self.loss_kind = loss
        self.rdd = rdd or RddConfig()
        self.sched = CosineGrid(int(student.grid))
        self.plan = round_names(int(student.steps), int(student.grid), rounds)
        if any(r.kind in ("cfd", "rdd") for r in rounds) and features is None:
            raise KdforgeError("cfd and rdd rounds need method.features: a trained classifier "
                               "(e.g. {model: diffusion_featnet, checkpoint: ...})")
        if features is not None:
            features = features.eval().requires_grad_(False)
            if not hasattr(features, "features"):
                raise KdforgeError(f"method.features must have features(x) -> (map, vector); "
                                   f"{type(features).__name__} has not")
        self.features = features
        self.teacher: Denoiser | None = None
        self.head: nn.Module | None = None
        self.memory: PixelMemory | None = None
        self.current: int = -1
        self.enter_stage(self.plan[0][0])

    @classmethod
    def from_config(cls, cfg: dict[str, Any], info: DataInfo) -> Diffusion:
        c = validate(DiffusionConfig, cfg, prefix="method")
        student = build_model(c.model, info)
        feats = build_model(c.features, info) if c.features is not None else None
        if feats is not None and c.features.checkpoint is None:  # type: ignore[union-attr]
            raise KdforgeError("method.features needs a checkpoint: the classifier is frozen, so it must be trained")
        return cls(student, c.rounds, c.loss, feats, c.rdd)  # type: ignore[arg-type]

    # -- rounds --------------------------------------------------------------------------------------
    def stages(self, epochs: int) -> list[MethodStage]:
        out = []
        for (name, _, _), r in zip(self.plan, self.rounds, strict=True):
            train = None if r.kind == "ddpm" else {"ema": None, "grad_clip": None}
            out.append(MethodStage(name, r.epochs, train))
        return out

    def enter_stage(self, name: str | None) -> None:
        """Round ``name``: the teacher is a frozen copy of the current student, which moves to the next level."""
        super().enter_stage(name)
        names = [n for n, _, _ in self.plan]
        if name not in names:
            raise KdforgeError(f"no round {name!r} (this run's rounds: {', '.join(names)})")
        i = names.index(name)
        _, t_steps, s_steps = self.plan[i]
        kind = self.rounds[i].kind
        self.current = i
        self.student.steps.fill_(t_steps)
        if kind == "ddpm":
            self.teacher, self.head, self.memory = None, None, None
            return
        self.teacher = copy.deepcopy(self.student).eval().requires_grad_(False)
        self.student.steps.fill_(s_steps)
        if kind == "rdd":
            ch = int(self.features.channels) if hasattr(self.features, "channels") else self._map_channels()
            self.head = ProjectionHead(ch).to(self.student.grid.device)
            r = self.rdd
            memory = PixelMemory(ch, r.queue, r.per_step, r.contrast, r.enqueue_compat)
            self.memory = memory.to(self.student.grid.device)
        else:
            self.head, self.memory = None, None

    def _map_channels(self) -> int:
        c, h = self._example_shape()
        with torch.no_grad():
            a, _ = self.features.features(torch.zeros(1, c, h, h, device=self.student.grid.device))  # type: ignore[union-attr]
        return int(a.shape[1])

    def _example_shape(self) -> tuple[int, int]:
        spec = getattr(self.student, "kdforge_spec", {}) or {}
        return int(spec.get("in_chans", 1)), int(spec.get("image_size", 8))

    @property
    def kind(self) -> Kind:
        """The kind of the current round."""
        return self.rounds[self.current].kind

    def train(self, mode: bool = True) -> Diffusion:
        super().train(mode)
        for m in (self.teacher, self.features):
            if m is not None:
                m.eval()
        return self

    def configure_optimizers(self) -> list[OptimizerSpec]:
        r = self.rounds[self.current]
        opt = {"lr": r.lr} if r.lr is not None else None
        clip = None if r.kind == "ddpm" else (r.grad_clip or 0.0)
        specs = [OptimizerSpec("student", self.student, optim=opt, clip=clip)]
        if self.head is not None:  # its own Adam, same lr and wd, constant lr, never clipped
            specs.append(OptimizerSpec("head", self.head, optim=opt, sched={"name": "constant", "warmup_epochs": 0},
                                       clip=0.0))
        return specs

    def on_fit_end(self, trainer: Any) -> None:
        # the base's EMA weights are what the next round distils (and what is evaluated and saved)
        if self.kind == "ddpm" and getattr(trainer, "ema", None) is not None:
            self.student.load_state_dict(trainer.ema.model.state_dict())

    # -- steps ---------------------------------------------------------------------------------------
    def x_of(self, model: Denoiser, z: Tensor, i: Tensor) -> Tensor:
        """x̂ of a denoiser at grid indices ``i``."""
        return self.sched.to_x(model(z, i), z, i, model.prediction)  # type: ignore[arg-type]

    def training_step(self, batch: Any, step: int) -> dict[str, Tensor]:
        x = batch["x"] if isinstance(batch, dict) else batch[0]
        if self.kind == "ddpm":
            return self._ddpm_step(x)
        return self._distill_step(x)

    def _ddpm_step(self, x: Tensor) -> dict[str, Tensor]:
        g = int(self.student.grid)
        i = torch.randint(0, g + 1, (len(x),), device=x.device)
        eps = torch.randn_like(x)
        z = self.sched.noise(x, eps, i)
        x_hat = self.x_of(self.student, z, i)
        loss = pd_loss(x_hat, x, self.sched.eps_from_x(x_hat, z, i), eps, self.loss_kind)
        return {"loss": loss}

    def pd_targets(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(z, a, x̃): noised inputs at the teacher's even steps and the two-step PD target (no grad)."""
        assert self.teacher is not None
        t_steps, ts = self.teacher.level
        k = torch.randint(1, t_steps // 2 + 1, (len(x),), device=x.device)
        t = 2 * k
        a, a1, a2 = t * ts, (t - 1) * ts, (t - 2) * ts
        z = self.sched.noise(x, torch.randn_like(x), a)
        with torch.no_grad():
            z1 = self.sched.ddim_step(z, self.x_of(self.teacher, z, a), a, a1)
            z2 = self.sched.ddim_step(z1, self.x_of(self.teacher, z1, a1), a1, a2)
            x_tgt = self.sched.pd_target(z, z2, a, a2)
            if self.rdd.clip_target:
                x_tgt = x_tgt.clamp(-1, 1)
        return z, a, x_tgt

    def _distill_step(self, x: Tensor) -> dict[str, Tensor]:
        z, a, x_tgt = self.pd_targets(x)
        x_s = self.x_of(self.student, z, a)  # the student's step k sits at grid index a = t·ts = k·(2ts)
        eps_s, eps_t = self.sched.eps_from_x(x_s, z, a), self.sched.eps_from_x(x_tgt, z, a)
        if self.kind == "pd":
            loss = pd_loss(x_s, x_tgt, eps_s, eps_t, self.loss_kind)
            return {"loss": loss}
        r, out = self.rdd, {}
        feats = self.features.features  # type: ignore[union-attr]
        with torch.no_grad():
            a_t, v_t = feats(x_tgt)
        a_s, v_s = feats(x_s)
        out["cfd"] = cfd_loss(v_s, v_t, r.tau_c)
        loss = r.cfd_weight * out["cfd"]
        if self.kind == "rdd":
            out["is"] = is_p2p_loss(a_s, a_t, r.tau_is, r.pairs)
            assert self.memory is not None and self.head is not None
            self.memory.enqueue(gather_no_grad(a_t))  # every process's teacher maps; enqueue first (as the code)
            out["mem"] = memory_p2p_loss(self.head(a_s), a_t, self.memory.contrast(), r.tau_m, r.tau_kd)
            loss = loss + r.is_weight * out["is"] + r.m_weight * out["mem"]
        if r.pd_mse_weight > 0:
            out["pd"] = pd_loss(x_s, x_tgt, eps_s, eps_t, self.loss_kind)
            loss = loss + r.pd_mse_weight * out["pd"]
        return {"loss": loss, **{k: v.detach() for k, v in out.items()}}

    # -- evaluation ----------------------------------------------------------------------------------
    def evaluate(self, loader: DataLoader | None, trainer: Any, model: nn.Module) -> dict[str, float]:
        """x_mse: the denoiser's x̂ error at its own sampling steps, fixed noise (seed 0), on ``loader``."""
        if loader is None:
            return {}
        return {"x_mse": denoise_error(model, loader)}

    def deployable(self) -> nn.Module:
        return self.student


@torch.no_grad()
def denoise_error(model: nn.Module, loader: DataLoader, seed: int = 0) -> float:
    """Mean squared x̂ error of a denoiser at its own steps' grid indices, with seeded noise and indices."""
    assert isinstance(model, Denoiser)
    sched = CosineGrid(int(model.grid))
    steps, ts = model.level
    dev = model.grid.device
    gen = torch.Generator().manual_seed(seed)
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for batch in loader:
        x = (batch["x"] if isinstance(batch, dict) else batch[0]).to(dev)
        i = (torch.randint(1, steps + 1, (len(x),), generator=gen) * ts).to(dev)
        eps = torch.randn(x.shape, generator=gen).to(dev)
        z = sched.noise(x, eps, i)
        x_hat = sched.to_x(model(z, i), z, i, model.prediction)  # type: ignore[arg-type]
        total += float((x_hat - x).pow(2).flatten(1).mean(1).sum())
        n += len(x)
    model.train(was)
    return total / max(n, 1)
