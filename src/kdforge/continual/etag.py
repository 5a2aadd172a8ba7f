"""eTag (Huang et al., AAAI 2024): embedding distillation with auxiliary heads + task-oriented feature generation."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.continual.ir import REDUCTIONS, space_maintenance
from kdforge.continual.learner import (
    LEARNERS,
    Learner,
    Stage,
    TaskInfo,
    TaskMethod,
    TrainCfg,
    frozen_copy,
    kd_loss,
    rotate_batch,
)
from kdforge.continual.protocol import CILSplit
from kdforge.errors import KdforgeError
from kdforge.taps import FeatureTaps


class CVAE(nn.Module):
    """A conditional VAE on embeddings; the decoder ends in ReLU because real embeddings are non-negative."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 64, latent: int = 16) -> None:
        super().__init__()
        self.num_classes, self.latent = num_classes, latent
        self.enc = nn.Sequential(nn.Linear(dim + num_classes, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.mu, self.logvar = nn.Linear(hidden, latent), nn.Linear(hidden, latent)
        self.dec = nn.Sequential(nn.Linear(latent + num_classes, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, dim), nn.ReLU())

    def onehot(self, y: Tensor) -> Tensor:
        return F.one_hot(y, self.num_classes).float()

    def encode(self, e: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        h = self.enc(torch.cat([e, self.onehot(y)], -1))
        return self.mu(h), self.logvar(h)

    def decode(self, z: Tensor, y: Tensor) -> Tensor:
        return self.dec(torch.cat([z, self.onehot(y)], -1))

    def forward(self, e: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(e, y)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.decode(z, y), mu, logvar

    def sample(self, y: Tensor) -> Tensor:
        """Features of classes ``y`` from z ~ N(0, I)."""
        return self.decode(torch.randn(len(y), self.latent, device=y.device), y)


def kl_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) summed over latents, averaged over the batch."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum() / len(mu)


def aux_head(feat: Tensor, width: int, out: int) -> nn.Module:
    """An auxiliary head on an intermediate feature: conv-BN-ReLU-GAP-linear (maps) or MLP (vectors)."""
    if feat.dim() == 4:
        return nn.Sequential(nn.Conv2d(feat.shape[1], width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, out))
    return nn.Sequential(nn.Flatten(), nn.Linear(feat[0].numel(), width), nn.ReLU(), nn.Linear(width, out))


class Solver(nn.Module):
    """Backbone + unified classifier + auxiliary heads on tapped blocks (the last head sits on the embedding)."""

    def __init__(self, net: nn.Module, classifier: nn.Linear, heads: nn.ModuleList, taps: Sequence[str]) -> None:
        super().__init__()
        self.net, self.classifier, self.heads, self.taps = net, classifier, heads, list(taps)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        # hooks live only for this call, so deep copies of the solver never share them
        with FeatureTaps(self.net, self.taps) as taps:
            e = self.net(x)
        feats = [taps[n] for n in self.taps] + [e]
        return e, [h(f) for h, f in zip(self.heads, feats, strict=True)]


def balance(f: float) -> tuple[float, float]:
    """eTag's weights 1/(f+1) for current and f/(f+1) for old classes."""
    return 1.0 / (f + 1.0), f / (f + 1.0)


class SolverStep(TaskMethod):
    """Stage A: CE + rotation-SS (base task); balanced CE on real and generated features + L_ed + L_e later."""

    def __init__(self, solver: Solver, task: TaskInfo, old: Solver | None, gen: CVAE | None, tau: float,
                 reduction: str, tradeoff: float, freeze_bn: bool, distill_heads: int) -> None:
        super().__init__()
        self.solver, self.old, self.gen, self.tau, self.reduction = solver, old, gen, tau, reduction
        self.f, self.lo, self.tradeoff, self.distill_heads = task.old_units, task.lo, tradeoff, distill_heads
        if old is not None:
            self.freeze(old)
            if freeze_bn:  # eTag trains with the whole solver in eval mode: heads' BN too
                self.freeze_bn(solver)
        if gen is not None:
            self.freeze(gen)

    def training_step(self, batch: tuple[Tensor, Tensor], step: int) -> dict[str, Tensor]:
        x, y = batch
        xr, yr = rotate_batch(x, y)
        e, s = self.solver(xr)
        logits = self.solver.classifier(e[0::4])
        if self.old is None:
            out = {"ce": F.cross_entropy(logits, y), "ss": sum(F.cross_entropy(sk, yr) for sk in s)}
        else:
            w_cur, w_old = balance(self.f)
            with torch.no_grad():
                e_old, s_old = self.old(xr)
                c = torch.randint(0, self.lo, (len(y),), device=y.device)
                h = self.gen.sample(c)  # type: ignore[union-attr]
            ed = sum(kd_loss(s[k], s_old[k], self.tau) for k in range(self.distill_heads))
            out = {"ce_cur": w_cur * F.cross_entropy(logits, y),
                   "ce_old": w_old * F.cross_entropy(self.solver.classifier(h), c),
                   "ed": self.tradeoff * self.f * ed,
                   "e": self.tradeoff * self.f * space_maintenance(e, e_old, self.reduction)}
        out["loss"] = sum(out.values())  # type: ignore[assignment]
        return out

    def deployable(self) -> nn.Module:
        return nn.Sequential(self.solver.net, self.solver.classifier)


class GeneratorStep(TaskMethod):
    """Stage B: fit G_t to the frozen F_t and C (task-oriented CE) and to G_{t−1} on old classes (self-distillation)."""

    def __init__(self, gen: CVAE, net: nn.Module, classifier: nn.Module, task: TaskInfo, gen_old: CVAE | None,
                 tradeoff: float, vae_tradeoff: float, task_oriented: bool) -> None:
        super().__init__()
        self.gen, self.net, self.classifier, self.gen_old = gen, net, classifier, gen_old
        self.f, self.lo, self.tradeoff, self.vae_tradeoff = task.old_units, task.lo, tradeoff, vae_tradeoff
        self.task_oriented = task_oriented
        self.freeze(net, classifier)
        if gen_old is not None:
            self.freeze(gen_old)

    def training_step(self, batch: tuple[Tensor, Tensor], step: int) -> dict[str, Tensor]:
        x, y = batch
        with torch.no_grad():
            e = self.net(x)
        rec, mu, logvar = self.gen(e, y)
        n = len(y)
        out = {"rec": (e - rec).pow(2).sum() / n, "kl": kl_normal(mu, logvar)}
        w_cur, w_old = balance(self.f)
        if self.task_oriented:
            out["tc"] = self.tradeoff * w_cur * F.cross_entropy(self.classifier(rec), y)
        if self.gen_old is not None:
            c = torch.randint(0, self.lo, (n,), device=y.device)
            z = torch.randn(n, self.gen.latent, device=y.device)
            h = self.gen.decode(z, c)
            with torch.no_grad():
                h_old = self.gen_old.decode(z, c)
            if self.task_oriented:
                out["to"] = self.tradeoff * w_old * F.cross_entropy(self.classifier(h), c)
            out["gd"] = self.vae_tradeoff * self.f * (h - h_old).pow(2).sum()
        out["loss"] = sum(out.values())  # type: ignore[assignment]
        return out

    def deployable(self) -> nn.Module:
        return self.gen


@LEARNERS.register("etag")
class ETag(Learner):
    """eTag: carries F (with auxiliary heads), the unified classifier C and the generator G; never samples."""

    def __init__(self, backbone: nn.Module, dim: int, split: CILSplit, cfg: TrainCfg, taps: Sequence[str] | None = None,
                 aux_width: int = 64, tau: float = 3.0, e_reduction: str = "frobenius", tradeoff: float = 1.0,
                 vae_tradeoff: float = 1e-3, gen_hidden: int = 64, gen_latent: int = 16, gen_epochs: int | None = None,
                 gen_lr: float = 1e-3, freeze_bn_stats: bool = True, mask_unseen: bool = True,
                 task_oriented: bool = True) -> None:
        super().__init__(backbone, dim, split, cfg)
        if e_reduction not in REDUCTIONS:
            raise KdforgeError(f"unknown e_reduction {e_reduction!r}; valid: {', '.join(REDUCTIONS)}")
        names = list(getattr(backbone, "feature_names", []))
        self.taps = list(taps) if taps is not None else [n for n in names[1:] if n != "pool"] or names[:1]
        self.aux_width, self.tau, self.e_reduction, self.tradeoff = aux_width, tau, e_reduction, tradeoff
        self.vae_tradeoff, self.gen_epochs, self.gen_lr = vae_tradeoff, gen_epochs, gen_lr
        self.freeze_bn_stats, self.mask_unseen, self.task_oriented = freeze_bn_stats, mask_unseen, task_oriented
        self.classifier = nn.Linear(dim, self.num_classes)
        self.heads = nn.ModuleList()
        self.gen = CVAE(dim, self.num_classes, gen_hidden, gen_latent)

    def setup(self, x: Tensor) -> None:
        """Build the auxiliary heads from one example batch (their input shapes depend on the data)."""
        with torch.no_grad(), FeatureTaps(self.net, self.taps) as taps:
            e = self.net.eval()(x)
        feats = [taps[n] for n in self.taps] + [e]
        self.heads.extend(aux_head(f, self.aux_width, 4 * self.num_classes) for f in feats)

    @property
    def solver(self) -> Solver:
        return Solver(self.net, self.classifier, self.heads, self.taps)

    def stages(self, task: TaskInfo) -> Iterator[Stage]:
        old = frozen_copy(self.solver) if task.t > 0 else None
        gen_prev = frozen_copy(self.gen) if task.t > 0 else None
        step = SolverStep(self.solver, task, old, gen_prev, self.tau, self.e_reduction, self.tradeoff,  # type: ignore[arg-type]
                          self.freeze_bn_stats, len(self.heads) - 1)
        yield Stage(step, self.cfg.epochs_for(task.t), self.cfg.lr)
        if task.t < self.split.tasks:  # no generator is needed after the final task
            gen_step = GeneratorStep(self.gen, frozen_copy(self.net), frozen_copy(self.classifier), task,
                                     gen_prev, self.tradeoff, self.vae_tradeoff, self.task_oriented)  # type: ignore[arg-type]
            yield Stage(gen_step, self.gen_epochs or self.cfg.epochs_for(task.t), self.gen_lr)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        self.eval()
        logits = self.classifier(self.net(x))
        return (logits[:, :int(self.seen)] if self.mask_unseen else logits).argmax(-1)
