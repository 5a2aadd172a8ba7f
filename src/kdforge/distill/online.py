"""Online KD: peers trained together — DML (mutual learning) and KDCL (collaborative ensemble teacher)."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdforge.config import ModelSpec, Strict, validate
from kdforge.errors import KdforgeError
from kdforge.losses.response import kd_loss
from kdforge.method import DataInfo, Method, build_model
from kdforge.registry import METHODS


class PeersMethod(Method):
    """Shared parts of online methods: N peers, a deployable peer, per-peer accuracy logs."""

    def __init__(self, peers: list[nn.Module], deploy: int = 0) -> None:
        super().__init__()
        if len(peers) < 2:
            raise KdforgeError(f"{type(self).__name__.lower()}: needs at least 2 peers, got {len(peers)}")
        if not 0 <= deploy < len(peers):
            raise KdforgeError(f"deploy must name a peer index in 0..{len(peers) - 1}, got {deploy}")
        self.peers = nn.ModuleList(peers)
        self.deploy = deploy

    def logs(self, logits: list[Tensor], losses: list[Tensor | None], y: Tensor) -> dict[str, Tensor]:
        """acc_peerK / loss_peerK for every peer, and acc of the deployed one."""
        out: dict[str, Tensor] = {}
        for k, z in enumerate(logits):
            out[f"acc_peer{k}"] = (z.argmax(-1) == y).float().mean().detach()
            if losses[k] is not None:
                out[f"loss_peer{k}"] = losses[k].detach()  # type: ignore[union-attr]
        out["acc"] = out[f"acc_peer{self.deploy}"]
        return out

    def deployable(self) -> nn.Module:
        return self.peers[self.deploy]


def mutual_kl(logits: list[Tensor], k: int, T: float = 1.0) -> Tensor:
    """DML's distillation term of peer k: mean over l ≠ k of T²·KL(p(sg z_l) ‖ p(z_k))."""
    others = [z for i, z in enumerate(logits) if i != k]
    return sum(kd_loss(logits[k], z.detach(), T) for z in others) / len(others)  # type: ignore[return-value]


class DMLConfig(Strict):
    """Recipe schema of ``method: {name: dml}``."""

    name: str = "dml"
    peers: list[ModelSpec] = Field(min_length=2)
    T: float = Field(1.0, gt=0)
    kl_weight: float = 1.0
    update: Literal["simultaneous", "alternating"] = "simultaneous"
    deploy: int = 0


@METHODS.register("dml")
class DML(PeersMethod):
    """Deep mutual learning (Zhang et al., CVPR 2018): each peer minimises CE + KL to the others.

    ``simultaneous`` updates all peers each step against detached peers; ``alternating`` updates one
    peer per step in turn (step mod N) against the others' current predictions — the paper alternates
    within a batch, which the engine's single optimizer step per batch cannot express.
    """

    Config = DMLConfig

    def __init__(self, peers: list[nn.Module], T: float = 1.0, kl_weight: float = 1.0,
                 update: str = "simultaneous", deploy: int = 0) -> None:
        super().__init__(peers, deploy)
        self.T, self.kl_weight, self.update = T, kl_weight, update

    @classmethod
    def from_config(cls, cfg: dict[str, Any], info: DataInfo) -> DML:
        c = validate(DMLConfig, cfg, prefix="method")
        return cls([build_model(p, info) for p in c.peers], c.T, c.kl_weight, c.update, c.deploy)

    def training_step(self, batch: tuple[Tensor, Tensor], step: int) -> dict[str, Tensor]:
        x, y = batch
        n = len(self.peers)
        active = list(range(n)) if self.update == "simultaneous" else [step % n]
        logits = []
        for k, peer in enumerate(self.peers):
            with torch.set_grad_enabled(k in active and torch.is_grad_enabled()):
                logits.append(peer(x))
        losses: list[Tensor | None] = [None] * n
        for k in active:
            losses[k] = F.cross_entropy(logits[k], y) + self.kl_weight * mutual_kl(logits, k, self.T)
        out = self.logs(logits, losses, y)
        out["loss"] = sum(losses[k] for k in active)  # type: ignore[misc]
        return out


def minlogit_teacher(logits: list[Tensor], y: Tensor) -> Tensor:
    """KDCL-MinLogit: shift each peer's logits so the target is 0, take the class-wise minimum (detached)."""
    z = torch.stack([t.detach() for t in logits])
    z = z - z.gather(2, y.view(1, -1, 1).expand(z.shape[0], -1, 1))
    return z.min(0).values


def random_shift(x: Tensor, shift: int) -> Tensor:
    """Per-sample random translation by up to ``shift`` pixels (zero padding)."""
    if shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    off = torch.randint(0, 2 * shift + 1, (b, 2), device=x.device)
    rows = (torch.arange(h, device=x.device)[None] + off[:, :1])[:, :, None]
    cols = (torch.arange(w, device=x.device)[None] + off[:, 1:])[:, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


class KDCLConfig(Strict):
    """Recipe schema of ``method: {name: kdcl}``."""

    name: str = "kdcl"
    peers: list[ModelSpec] = Field(min_length=2)
    T: float = Field(2.0, gt=0)
    kd_weight: float = 1.0
    ensemble: Literal["minlogit", "naive"] = "minlogit"
    view_shift: int = Field(2, ge=0)
    deploy: int = 0


@METHODS.register("kdcl")
class KDCL(PeersMethod):
    """KDCL (Guo et al., CVPR 2020): peers see their own view; an ensemble of their logits teaches all.

    Each peer gets an extra random shift of up to ``view_shift`` pixels on top of the data augmentation.
    """

    Config = KDCLConfig

    def __init__(self, peers: list[nn.Module], T: float = 2.0, kd_weight: float = 1.0, ensemble: str = "minlogit",
                 view_shift: int = 2, deploy: int = 0) -> None:
        super().__init__(peers, deploy)
        self.T, self.kd_weight, self.ensemble, self.view_shift = T, kd_weight, ensemble, view_shift

    @classmethod
    def from_config(cls, cfg: dict[str, Any], info: DataInfo) -> KDCL:
        c = validate(KDCLConfig, cfg, prefix="method")
        return cls([build_model(p, info) for p in c.peers], c.T, c.kd_weight, c.ensemble, c.view_shift, c.deploy)

    def teacher_logits(self, logits: list[Tensor], y: Tensor) -> Tensor:
        """The detached ensemble target."""
        if self.ensemble == "minlogit":
            return minlogit_teacher(logits, y)
        return torch.stack([z.detach() for z in logits]).mean(0)

    def training_step(self, batch: tuple[Tensor, Tensor], step: int) -> dict[str, Tensor]:
        x, y = batch
        logits = [peer(random_shift(x, self.view_shift)) for peer in self.peers]
        t = self.teacher_logits(logits, y)
        losses: list[Tensor | None] = [F.cross_entropy(z, y) + self.kd_weight * kd_loss(z, t, self.T) for z in logits]
        out = self.logs(logits, losses, y)
        out["loss"] = sum(losses)  # type: ignore[arg-type]
        out["acc_ensemble"] = (t.argmax(-1) == y).float().mean()
        return out
