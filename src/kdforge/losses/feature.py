"""Feature-based losses: FitNets, AT, NST, FT, AB, FSP, VID, OFD and ReviewKD on tapped feature maps.

Each loss takes lists of tapped tensors (student, teacher) in the order of the term's taps. Trainable
connectors are built in :meth:`setup` from one example of those lists and are never deployed.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.errors import KdforgeError
from kdforge.losses.base import DistillLoss, check_reduction, compat_source
from kdforge.registry import LOSSES


class FeatureLoss(DistillLoss):
    """Shared checks and set-up of feature losses: pair counts, ranks, batch sizes, connector shapes."""

    inputs = "features"
    #: ranks accepted for each tapped tensor (4: maps B×C×H×W, 2: vectors B×D)
    ndims: ClassVar[tuple[int, ...]] = (4,)
    #: whether forward needs :meth:`setup` first (trainable connectors)
    has_connectors: ClassVar[bool] = False
    min_pairs: ClassVar[int] = 1

    def __init__(self) -> None:
        super().__init__()
        self._shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] | None = None

    @property
    def label(self) -> str:
        """The loss's registry name for messages."""
        return getattr(self, "registry_name", type(self).__name__)

    def check(self, student: Sequence[Tensor], teacher: Sequence[Tensor], built: bool = True) -> None:
        """One-line KdforgeError on mismatched lists, wrong ranks, batches or (if ``built``) connector shapes."""
        if len(student) != len(teacher):
            raise KdforgeError(f"{self.label}: got {len(student)} student and {len(teacher)} teacher features")
        if len(student) < self.min_pairs:
            raise KdforgeError(f"{self.label}: needs at least {self.min_pairs} tapped feature(s), got {len(student)}")
        ranks = " or ".join({4: "(B, C, H, W) maps", 2: "(B, D) vectors", 3: "(B, N, D) tokens"}[n]
                            for n in self.ndims)
        for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
            if not isinstance(s, Tensor) or not isinstance(t, Tensor):
                raise KdforgeError(f"{self.label}: feature {i} is not a tensor (check the tap names)")
            if s.ndim not in self.ndims or t.ndim not in self.ndims:
                raise KdforgeError(f"{self.label}: feature {i} must be {ranks}, got student "
                                   f"{tuple(s.shape)} and teacher {tuple(t.shape)}")
            if s.shape[0] != t.shape[0]:
                raise KdforgeError(f"{self.label}: feature {i} has batch {s.shape[0]} (student) vs {t.shape[0]}")
        if self.has_connectors and built:
            if self._shapes is None:
                raise KdforgeError(f"{self.label}: connectors are not built; call setup(student_feats, "
                                   "teacher_feats) on one example first (Distill.setup does)")
            got = [(tuple(s.shape[1:]), tuple(t.shape[1:])) for s, t in zip(student, teacher, strict=True)]
            if got != self._shapes:
                raise KdforgeError(f"{self.label}: features {got} do not fit the connectors built for {self._shapes}")

    def setup(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> None:
        """Check one example and build the connectors (on the example's device)."""
        self.check(student, teacher, built=False)
        self._shapes = [(tuple(s.shape[1:]), tuple(t.shape[1:])) for s, t in zip(student, teacher, strict=True)]
        self.build(student, teacher)
        self.to(student[0].device)

    def build(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> None:
        """Create connectors from example tensors (default: none)."""


def match_spatial(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool the spatially larger of two maps to the other's size."""
    if a.shape[-2:] == b.shape[-2:]:
        return a, b
    if a.shape[-2] * a.shape[-1] > b.shape[-2] * b.shape[-1]:
        return F.adaptive_avg_pool2d(a, b.shape[-2:]), b
    return a, F.adaptive_avg_pool2d(b, a.shape[-2:])


def resize_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bring a map to ``size``: average-pool down, nearest-upsample up."""
    size = tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="nearest")


def regressor(s_shape: Sequence[int], t_shape: Sequence[int], relu: bool = True) -> nn.Module:
    """RepDistiller-style ConvReg: map a student map (C,H,W) or vector (D,) to the teacher's shape."""
    if len(s_shape) == 1:
        return nn.Linear(s_shape[0], t_shape[0])
    (cs, hs, ws), (ct, ht, wt) = s_shape, t_shape
    if hs == 2 * ht and ws == 2 * wt:
        conv: nn.Module = nn.Conv2d(cs, ct, 3, 2, 1)
    elif 2 * hs == ht and 2 * ws == wt:
        conv = nn.ConvTranspose2d(cs, ct, 4, 2, 1)
    elif hs >= ht and ws >= wt:
        conv = nn.Conv2d(cs, ct, (1 + hs - ht, 1 + ws - wt))
    else:
        conv = nn.Sequential(nn.Upsample(size=(ht, wt), mode="nearest"), nn.Conv2d(cs, ct, 3, 1, 1))
    layers = [conv, nn.BatchNorm2d(ct)]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


# -- FitNets -----------------------------------------------------------------------------------------
def fitnet_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], reduction: str = "mean") -> Tensor:
    """Σ_pairs MSE(student_hint, teacher_hint), averaged over elements (``reduction: sum``: summed), hints
    already regressed."""
    return sum(F.mse_loss(s, t.detach(), reduction=reduction)  # type: ignore[return-value]
               for s, t in zip(student, teacher, strict=True))


@LOSSES.register("fitnet")
class FitNetLoss(FeatureLoss):
    """FitNets (Romero et al., ICLR 2015): MSE between a regressed student hint and the teacher's.

    ``reduction``: ``mean`` over elements (default, RepDistiller's) or ``sum`` (torchdistill's MSELoss key).
    """

    ndims = (4, 2)
    has_connectors = True

    def __init__(self, two_stage: bool = False, hint_epochs: int = 0, reduction: str = "mean") -> None:
        super().__init__()
        if two_stage and hint_epochs < 1:
            raise ValueError("two_stage needs hint_epochs >= 1 (epochs of the hint stage)")
        self.reduction = check_reduction("fitnet", reduction, ("mean", "sum"))
        self.two_stage, self.hint_epochs = two_stage, hint_epochs
        self.epoch = 0
        self.regressors = nn.ModuleList()

    def set_epoch(self, epoch: int) -> None:
        """Remember the epoch (the hint term switches off after the hint stage when two_stage)."""
        self.epoch = epoch

    def build(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> None:
        self.regressors = nn.ModuleList(regressor(s.shape[1:], t.shape[1:]) for s, t in zip(student, teacher,
                                                                                            strict=True))

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
        self.check(student, teacher)
        loss = fitnet_loss([r(s) for r, s in zip(self.regressors, student, strict=True)], teacher, self.reduction)
        if self.two_stage and self.epoch >= self.hint_epochs:
            return loss * 0.0
        return loss


# -- AT ----------------------------------------------------------------------------------------------
def at_map(f: Tensor, p: float = 2.0) -> Tensor:
    """Spatial attention: L2-normalised vec(mean_c |F_c|^p), shape (B, H·W)."""
    return F.normalize(f.abs().pow(p).mean(1).flatten(1), dim=1)


def at_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], p: float = 2.0, compat: str = "paper") -> Tensor:
    """Attention transfer: Σ_pairs mean_{b,hw} (A_s − A_t)², the paper's β/(H·W·B) scaling as in the authors' code.

    ``compat="torchdistill"`` is torchdistill's ``mode: paper``: Σ_pairs Σ_b ‖A_s − A_t‖₂ / B (unsquared).
    """
    total = student[0].new_zeros(())
    for s, t in zip(student, teacher, strict=True):
        s, t = match_spatial(s, t.detach())
        diff = at_map(s, p) - at_map(t, p)
        total = total + (diff.norm(dim=1).sum() / len(diff) if compat == "torchdistill" else diff.pow(2).mean())
    return total


@LOSSES.register("at")
class ATLoss(FeatureLoss):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017) on spatial attention maps.

    The default equals RepDistiller's and torchdistill's default ``mode: code``; ``compat: torchdistill``
    reproduces torchdistill's ``mode: paper`` (per-sample unsquared L2 distance, batch mean).
    """

    def __init__(self, p: float = 2.0, compat: str | list[str] = "paper") -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"p must be > 0, got {p}")
        self.source = compat_source("at", compat, ("torchdistill", "repdistiller"))
        self.p, self.compat = p, compat

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
        self.check(student, teacher)
        return at_loss(student, teacher, self.p, self.source)


# -- NST ---------------------------------------------------------------------------------------------
def nst_loss(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """Neuron selectivity transfer: squared MMD with kernel (xᵀy)² between L2-normalised channel maps."""
    total = student[0].new_zeros(())
    for s, t in zip(student, teacher, strict=True):
        s, t = match_spatial(s, t.detach())
        s = F.normalize(s.flatten(2), dim=2)
        t = F.normalize(t.flatten(2), dim=2)
        k_ss = (s @ s.transpose(1, 2)).pow(2).mean()
        k_tt = (t @ t.transpose(1, 2)).pow(2).mean()
        k_st = (s @ t.transpose(1, 2)).pow(2).mean()
        total = total + k_ss + k_tt - 2 * k_st
    return total


@LOSSES.register("nst")
class NSTLoss(FeatureLoss):
    """NST (Huang & Wang, 2017): match the distributions of channel activations by polynomial MMD."""

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
        self.check(student, teacher)
        return nst_loss(student, teacher)


# -- FT ----------------------------------------------------------------------------------------------
def _conv_bn_act(cin: int, cout: int, act: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.LeakyReLU(0.1))
    return layers


def ft_factor_loss(student_factor: Tensor, teacher_factor: Tensor, p: int = 1) -> Tensor:
    """FT: mean |F_s/‖F_s‖ − F_t/‖F_t‖|^p of per-sample flattened, L2-normalised factors."""
    fs = F.normalize(student_factor.flatten(1), dim=1)
    ft = F.normalize(teacher_factor.detach().flatten(1), dim=1)
    return (fs - ft).abs().pow(p).mean()


class Paraphraser(nn.Module):
    """FT's teacher-side autoencoder: the encoder output is the teacher factor."""

    def __init__(self, channels: int, factor_channels: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(*_conv_bn_act(channels, channels), *_conv_bn_act(channels, factor_channels))
        self.decoder = nn.Sequential(*_conv_bn_act(factor_channels, channels), nn.Conv2d(channels, channels, 3, 1, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        factor = self.encoder(x)
        return factor, self.decoder(factor)


class TwoStageLoss(FeatureLoss, ABC):
    """A feature loss with an initialisation stage before the main training (FT's paraphraser, AB's init).

    ``stages: two`` (default, the papers): :class:`~kdforge.distill.Distill` runs an init stage of
    ``init_epochs`` epochs (default RepDistiller's 30 of 240, scaled to the run: round(epochs/8), at
    least 1) that minimises :meth:`init_loss` alone over :meth:`init_params` (and, where
    ``init_trains_student``, the student parameters that loss reaches), with a constant lr
    (``init_lr``, default the recipe's); then the main stage with :meth:`init_params` frozen.
    ``stages: one``: no init stage; the term trains online with the student.
    """

    #: RepDistiller's init stage: 30 epochs before a 240-epoch run
    INIT_SHARE = 30 / 240
    #: whether the init stage also trains the student (AB) or only the loss's own modules (FT)
    init_trains_student: ClassVar[bool] = False

    def __init__(self, stages: str = "two", init_epochs: int | None = None, init_lr: float | None = None) -> None:
        super().__init__()
        if stages not in ("one", "two"):
            raise ValueError(f"stages must be 'one' or 'two', got {stages!r}")
        if init_epochs is not None and init_epochs < 1:
            raise ValueError(f"init_epochs must be >= 1, got {init_epochs}")
        if init_lr is not None and not init_lr > 0:
            raise ValueError(f"init_lr must be > 0, got {init_lr}")
        self.stages, self.init_epochs, self.init_lr = stages, init_epochs, init_lr
        #: "online" (one stage), "init" (the init stage) or "main" (after it)
        self.phase = "online" if stages == "one" else "main"

    @property
    def two_stage(self) -> bool:
        """Whether the term has an init stage."""
        return self.stages == "two"

    def init_stage_epochs(self, epochs: int) -> int:
        """Epochs of the init stage for a run of ``epochs`` epochs."""
        return self.init_epochs if self.init_epochs is not None else max(1, round(epochs * self.INIT_SHARE))

    def set_phase(self, phase: str) -> None:
        """Enter the init or the main stage (two-stage terms only)."""
        if self.two_stage:
            self.phase = phase
            self.train(self.training)

    def init_params(self) -> list[nn.Parameter]:
        """The loss's own parameters trained in the init stage and frozen afterwards."""
        return list(self.parameters())

    @abstractmethod
    def init_loss(self, student: Sequence[Tensor] | None, teacher: Sequence[Tensor]) -> Tensor:
        """The init stage's objective (``student`` is ``None`` unless ``init_trains_student``)."""

    @property
    def in_main_loss(self) -> bool:
        """Whether the term adds to the main stage's loss."""
        return True


@LOSSES.register("ft")
class FTLoss(TwoStageLoss):
    """Factor transfer (Kim et al., NeurIPS 2018): a student translator matches a teacher paraphraser's factor.

    Two stages (default, the paper): the paraphraser is trained first as an autoencoder of the teacher's
    map (MSE reconstruction, teacher and student frozen), then frozen (eval mode) while the student and
    translator learn CE + β·FT. ``stages: one``: the paraphraser learns its reconstruction online
    (``recon_weight``·MSE added to the term); the factor target is detached, so the student side never moves it.
    """

    has_connectors = True

    def __init__(self, rate: float = 0.5, p: int = 1, recon_weight: float = 1.0, stages: str = "two",
                 init_epochs: int | None = None, init_lr: float | None = None) -> None:
        super().__init__(stages, init_epochs, init_lr)
        if not 0 < rate <= 4:
            raise ValueError(f"rate must be in (0, 4], got {rate}")
        self.rate, self.p, self.recon_weight = rate, p, recon_weight
        self.paraphrasers = nn.ModuleList()
        self.translators = nn.ModuleList()

    def build(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> None:
        for s, t in zip(student, teacher, strict=True):
            cs, ct = s.shape[1], t.shape[1]
            k = max(1, round(ct * self.rate))
            self.paraphrasers.append(Paraphraser(ct, k))
            self.translators.append(nn.Sequential(*_conv_bn_act(cs, cs), *_conv_bn_act(cs, k)))

    def train(self, mode: bool = True) -> FTLoss:
        super().train(mode)
        if self.phase == "main":  # the pre-trained paraphraser is frozen, BatchNorm statistics included
            self.paraphrasers.eval()
        return self

    def init_params(self) -> list[nn.Parameter]:
        return list(self.paraphrasers.parameters())

    def init_loss(self, student: Sequence[Tensor] | None, teacher: Sequence[Tensor]) -> Tensor:
        """Σ_pairs MSE(P(F_t), F_t): the paraphraser's reconstruction of the teacher's maps."""
        return sum(F.mse_loss(para(t.detach())[1], t.detach())  # type: ignore[return-value]
                   for para, t in zip(self.paraphrasers, teacher, strict=True))

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
        self.check(student, teacher)
        total = student[0].new_zeros(())
        for para, trans, s, t in zip(self.paraphrasers, self.translators, student, teacher, strict=True):
            t = t.detach()
            if self.phase == "online":
                factor_t, recon = para(t)
                total = total + self.recon_weight * F.mse_loss(recon, t)
            else:
                with torch.no_grad():
                    factor_t = para.encoder(t)
            factor_s, factor_t = match_spatial(trans(s), factor_t)
            total = total + ft_factor_loss(factor_s, factor_t, self.p)
        return total


# -- AB ----------------------------------------------------------------------------------------------
def ab_loss(student: Tensor, teacher: Tensor, margin: float = 1.0) -> Tensor:
    """Activation-boundary loss: hinge-squared penalty where the student's sign (with margin) differs."""
    t_on = teacher.detach() > 0
    s = student
    off_pen = (s + margin).pow(2) * ((s > -margin) & ~t_on)
    on_pen = (s - margin).pow(2) * ((s <= margin) & t_on)
    return (off_pen + on_pen).mean()


@LOSSES.register("ab")
class ABLoss(TwoStageLoss):
    """Activation boundaries (Heo et al., AAAI 2019): a connector's output must switch where the teacher does.

    Two stages (default, the paper and RepDistiller's ``init``): the student's layers up to the tapped
    maps and the connectors are initialised by the AB loss alone (no CE), then the student trains with
    the recipe's other terms (CE, + KD if the recipe has a ``kd`` term) and the AB term is off.
    ``stages: one``: the AB term is added to the others throughout.

    The teacher's neuron is "on" where its tapped value is > 0; tap pre-activation maps where the model
    allows (a post-ReLU map gives the same on/off pattern).
    """

    has_connectors = True
    init_trains_student = True

    def __init__(self, margin: float = 1.0, stages: str = "two", init_epochs: int | None = None,
                 init_lr: float | None = None) -> None:
        super().__init__(stages, init_epochs, init_lr)
        if margin <= 0:
            raise ValueError(f"margin must be > 0, got {margin}")
        self.margin = margin
        self.connectors = nn.ModuleList()

    def build(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> None:
        self.connectors = nn.ModuleList(regressor(s.shape[1:], t.shape[1:], relu=False)
                                        for s, t in zip(student, teacher, strict=True))

    @property
    def in_main_loss(self) -> bool:
        return not self.two_stage

    def init_loss(self, student: Sequence[Tensor] | None, teacher: Sequence[Tensor]) -> Tensor:
        assert student is not None
        return self.forward(student, teacher)

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
        self.check(student, teacher)
        return sum(ab_loss(c(s), t, self.margin)  # type: ignore[return-value]
                   for c, s, t in zip(self.connectors, student, teacher, strict=True))


# -- FSP ---------------------------------------------------------------------------------------------
def fsp_matrix(a: Tensor, b: Tensor, pool: str = "avg") -> Tensor:
    """Flow of solution procedure: (B, C_a, C_b) Gram matrix of two maps over positions.

    The larger map is average-pooled to the smaller (``pool="max"``: max-pooled, torchdistill's choice).
    """
    if pool == "max" and a.shape[-2:] != b.shape[-2:]:
        size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
        a, b = F.adaptive_max_pool2d(a, size), F.adaptive_max_pool2d(b, size)
    a, b = match_spatial(a, b)
    return a.flatten(2) @ b.flatten(2).transpose(1, 2) / (a.shape[-2] * a.shape[-1])


def fsp_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], compat: str = "paper") -> Tensor:
    """FSP: Σ over consecutive tap pairs of mean (G_s − G_t)² (the paper's squared L2, per element).

    ``compat="torchdistill"``: max-pooling, and Σ_{b,j} ‖G_s[b,:,j] − G_t[b,:,j]‖₂ / B (unsquared column norms).
    """
    pool = "max" if compat == "torchdistill" else "avg"
    total = student[0].new_zeros(())
    for i in range(len(student) - 1):
        g_s = fsp_matrix(student[i], student[i + 1], pool)
        g_t = fsp_matrix(teacher[i].detach(), teacher[i + 1].detach(), pool)
        if g_s.shape != g_t.shape:
            raise KdforgeError(f"fsp: FSP matrices differ in shape {tuple(g_s.shape)} vs {tuple(g_t.shape)}")
        if compat == "torchdistill":
            total = total + (g_s - g_t).norm(dim=1).sum() / len(g_s)
        else:
            total = total + (g_s - g_t).pow(2).mean()
    return total


@LOSSES.register("fsp")
class FSPLoss(FeatureLoss):
    """FSP (Yim et al., CVPR 2017): match Gram matrices between consecutive layers.

    ``compat``: ``repdistiller`` is the default form; ``torchdistill`` takes unsquared norms after max-pooling.

    Where student and teacher channel counts differ, a trainable 1×1 conv maps the student's
    channels to the teacher's first.
    """

    has_connectors = True
    min_pairs = 2

    def __init__(self, compat: str | list[str] = "paper") -> None:
        super().__init__()
        self.source = compat_source("fsp", compat, ("torchdistill", "repdistiller"))
        self.compat = compat
        self.connectors = nn.ModuleList()

    def build(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> None:
        self.connectors = nn.ModuleList(
            nn.Identity() if s.shape[1] == t.shape[1] else nn.Conv2d(s.shape[1], t.shape[1], 1, bias=False)
            for s, t in zip(student, teacher, strict=True))

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
        self.check(student, teacher)
        return fsp_loss([c(s) for c, s in zip(self.connectors, student, strict=True)], teacher, self.source)


# -- VID ---------------------------------------------------------------------------------------------
def vid_loss(mu: Tensor, target: Tensor, var: Tensor) -> Tensor:
    """Gaussian NLL (constants dropped): mean ½[(t − μ)²/σ² + log σ²], σ² per channel."""
    var = var.view(1, -1, *([1] * (mu.ndim - 2)))
    return 0.5 * ((target.detach() - mu).pow(2) / var + var.log()).mean()


@LOSSES.register("vid")
class VIDLoss(FeatureLoss):
    """Variational information distillation (Ahn et al., CVPR 2019): a Gaussian q(t | s) per pair."""

    ndims = (4, 2)
    has_connectors = True

    def __init__(self, init_var: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__()
        if init_var <= eps:
            raise ValueError(f"init_var must be > eps, got {init_var}")
        self.init_var, self.eps = init_var, eps
        self.regressors = nn.ModuleList()
        self.log_scales = nn.ParameterList()

    def build(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> None:
        a0 = math.log(math.expm1(self.init_var - self.eps))
        for s, t in zip(student, teacher, strict=True):
            cs, ct = s.shape[1], t.shape[1]
            if s.ndim == 2:
                mu: nn.Module = nn.Sequential(nn.Linear(cs, ct), nn.ReLU(), nn.Linear(ct, ct), nn.ReLU(),
                                              nn.Linear(ct, ct))
            else:
                mu = nn.Sequential(nn.Conv2d(cs, ct, 1), nn.ReLU(), nn.Conv2d(ct, ct, 1), nn.ReLU(),
                                   nn.Conv2d(ct, ct, 1))
            self.regressors.append(mu)
            self.log_scales.append(nn.Parameter(torch.full((ct,), a0)))

    def variances(self) -> list[Tensor]:
        """σ_c² = softplus(a_c) + eps for each pair."""
        return [F.softplus(a) + self.eps for a in self.log_scales]

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
        self.check(student, teacher)
        total = student[0].new_zeros(())
        for mu, var, s, t in zip(self.regressors, self.variances(), student, teacher, strict=True):
            if s.ndim == 4:
                s, t = match_spatial(s, t)
            total = total + vid_loss(mu(s), t, var)
        return total


# -- OFD ---------------------------------------------------------------------------------------------
def bn_margin(weight: Tensor, bias: Tensor, min_prob: float = 1e-3) -> Tensor:
    """OFD's margin E[x | x < 0] for x ~ N(β, γ²) per channel: β − |γ|·φ(β/|γ|)/Φ(−β/|γ|).

    As the official code, a channel whose negative part has probability ≤ ``min_prob`` gets −3|γ|.
    """
    s, m = weight.detach().abs().double().clamp(min=1e-12), bias.detach().double()
    z = m / s
    cdf = 0.5 * torch.erfc(z / math.sqrt(2))  # Φ(−z)
    pdf = torch.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    margin = torch.where(cdf > min_prob, m - s * pdf / cdf.clamp(min=1e-300), -3 * s)
    return margin.float()


def bn_before_relu(model: nn.Module, tap: str) -> nn.BatchNorm2d | None:
    """The BatchNorm whose statistics describe a pre-ReLU tap: the tapped module, or ``model.bn_before_relu``."""
    modules = dict(model.named_modules())
    if isinstance(modules.get(tap), nn.BatchNorm2d):
        return modules[tap]  # type: ignore[return-value]
    name = (getattr(model, "bn_before_relu", None) or {}).get(tap)
    bn = modules.get(name) if name else None
    return bn if isinstance(bn, nn.BatchNorm2d) else None


def ofd_loss(student: Tensor, teacher: Tensor, margin: Tensor) -> Tensor:
    """Overhaul distillation: partial L2 to the margin-ReLU teacher, skipping where both are 'off'."""
    t = torch.maximum(teacher.detach(), margin.view(1, -1, 1, 1))
    mask = (student > t) | (t > 0)
    return ((student - t).pow(2) * mask).mean()


@LOSSES.register("ofd")
class OFDLoss(FeatureLoss):
    """Overhaul of feature distillation (Heo et al., ICCV 2019): margin ReLU + partial L2 + connector.

    Tap pre-ReLU maps (the zoo's ``pre_relu_taps``, e.g. ``layer3.2.preact`` of a CIFAR ResNet or
    ``stage3.1`` of ``cnn_small``). ``margin="bn"`` (the paper) takes the per-channel margin
    E[x | x < 0] of N(β, γ²) from the BatchNorm before the teacher's ReLU (:func:`bn_margin`);
    ``margin="batch"`` estimates it from the teacher maps of the set-up batch. Where no BatchNorm is
    found for a tap, ``bn`` falls back to ``batch`` with a warning. Margins are buffers.
    """

    has_connectors = True

    def __init__(self, margin: str = "bn") -> None:
        super().__init__()
        if margin not in ("bn", "batch"):
            raise ValueError(f"margin must be 'bn' or 'batch', got {margin!r}")
        self.margin = margin
        self.connectors = nn.ModuleList()
        self._bn_margins: list[Tensor | None] = []

    def bind(self, student: nn.Module, teacher: nn.Module, student_taps: Sequence[str],
             teacher_taps: Sequence[str]) -> None:
        """Read the teacher BN (γ, β) before each tapped ReLU."""
        self._bn_margins = []
        if self.margin != "bn":
            return
        for tap in teacher_taps:
            bn = bn_before_relu(teacher, tap)
            if bn is None or bn.weight is None or bn.bias is None:
                warnings.warn(f"ofd: no BatchNorm before the ReLU of teacher tap {tap!r}; margin from the "
                              "set-up batch (tap a pre-ReLU map of the zoo's pre_relu_taps)", stacklevel=2)
                self._bn_margins.append(None)
            else:
                self._bn_margins.append(bn_margin(bn.weight, bn.bias))

    def build(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> None:
        self.connectors = nn.ModuleList(regressor(s.shape[1:], t.shape[1:], relu=False)
                                        for s, t in zip(student, teacher, strict=True))
        for i, t in enumerate(teacher):
            from_bn = self._bn_margins[i] if i < len(self._bn_margins) else None
            if from_bn is not None and from_bn.numel() == t.shape[1]:
                self.register_buffer(f"margin{i}", from_bn.to(t.device))
                continue
            neg = t.detach().clamp(max=0).transpose(0, 1).flatten(1)
            count = (neg < 0).sum(1).clamp(min=1)
            self.register_buffer(f"margin{i}", (neg.sum(1) / count).float())

    def margins(self) -> list[Tensor]:
        """The per-channel margins, one tensor per pair."""
        return [getattr(self, f"margin{i}") for i in range(len(self.connectors))]

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
        self.check(student, teacher)
        return sum(ofd_loss(c(s), t, m)  # type: ignore[return-value]
                   for c, s, t, m in zip(self.connectors, student, teacher, self.margins(), strict=True))


# -- ReviewKD ----------------------------------------------------------------------------------------
def hcl_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], levels: Sequence[int] = (4, 2, 1)) -> Tensor:
    """Hierarchical context loss: MSE plus pyramid-pooled MSEs with halving weights, normalised per pair."""
    total = student[0].new_zeros(())
    for s, t in zip(student, teacher, strict=True):
        t = t.detach()
        loss, w, w_sum = F.mse_loss(s, t), 1.0, 1.0
        for level in levels:
            if level >= s.shape[-2]:
                continue
            w /= 2
            loss = loss + w * F.mse_loss(F.adaptive_avg_pool2d(s, level), F.adaptive_avg_pool2d(t, level))
            w_sum += w
        total = total + loss / w_sum
    return total


class ABF(nn.Module):
    """ReviewKD's attention-based fusion: mix a stage's map with the fused map of the deeper stage."""

    def __init__(self, cin: int, mid: int, cout: int, fuse: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.out = nn.Sequential(nn.Conv2d(mid, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.att = nn.Sequential(nn.Conv2d(2 * mid, 2, 1), nn.Sigmoid()) if fuse else None

    def forward(self, x: Tensor, residual: Tensor | None, out_size: Sequence[int]) -> tuple[Tensor, Tensor]:
        x = self.reduce(x)
        if self.att is not None and residual is not None:
            r = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            w = self.att(torch.cat([x, r], 1))
            x = x * w[:, :1] + r * w[:, 1:]
        return resize_to(self.out(x), out_size), x


@LOSSES.register("reviewkd")
class ReviewKDLoss(FeatureLoss):
    """ReviewKD (Chen et al., CVPR 2021): deep-to-shallow fused student maps vs teacher maps, HCL loss.

    Give taps shallow to deep; (B, D) vectors such as ``pool`` are treated as 1×1 maps.
    The weight ramps linearly over ``warmup`` epochs; by default mdistiller's 20 of 240 epochs,
    scaled to the run's length (``round(epochs / 12)``, at least 1); ``warmup: 0`` switches it off.
    """

    ndims = (4, 2)
    has_connectors = True
    #: mdistiller's ReviewKD warm-up: 20 epochs of a 240-epoch run
    WARMUP_SHARE = 20 / 240

    def __init__(self, mid_channels: int | None = None, levels: tuple[int, ...] = (4, 2, 1),
                 warmup: int | None = None) -> None:
        super().__init__()
        if warmup is not None and warmup < 0:
            raise ValueError(f"warmup must be >= 0 epochs, got {warmup}")
        self.mid_channels, self.levels, self.warmup = mid_channels, tuple(levels), warmup
        self.epoch = 0
        self.abfs = nn.ModuleList()

    def set_epoch(self, epoch: int) -> None:
        """Remember the epoch for the linear warm-up."""
        self.epoch = epoch

    def warmup_epochs(self) -> int:
        """The warm-up length in epochs: the given one, or 1/12 of the run (20 if the run's length is unknown)."""
        if self.warmup is not None:
            return self.warmup
        if self.total_epochs is None:
            return 20
        return max(1, round(self.total_epochs * self.WARMUP_SHARE))

    def warmup_factor(self) -> float:
        """min((epoch + 1) / warm-up, 1), with the epoch counted from 0."""
        w = self.warmup_epochs()
        return 1.0 if w == 0 else min((self.epoch + 1) / w, 1.0)

    def build(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> None:
        mid = self.mid_channels or min(64, max(t.shape[1] for t in teacher))
        n = len(student)
        self.abfs = nn.ModuleList(ABF(s.shape[1], mid, t.shape[1], fuse=i < n - 1)
                                  for i, (s, t) in enumerate(zip(student, teacher, strict=True)))

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
        self.check(student, teacher)
        s_maps = [s.view(*s.shape, 1, 1) if s.ndim == 2 else s for s in student]
        t_maps = [t.view(*t.shape, 1, 1) if t.ndim == 2 else t for t in teacher]
        fused: list[Tensor] = [s_maps[0]] * len(s_maps)
        residual = None
        for i in reversed(range(len(s_maps))):
            fused[i], residual = self.abfs[i](s_maps[i], residual, t_maps[i].shape[-2:])
        return self.warmup_factor() * hcl_loss(fused, t_maps, self.levels)
