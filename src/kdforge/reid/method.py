"""``pdm``: visible–infrared ReID with PDM's network and losses (or the two-stream baseline) through the engine.

Loss (the paper's): L = L_id + L_tri + 0.5·L_cpm + L_ort + 0.5·L_ch + L_dcs, with
L_cpm = 0.8·Σ CPM over (x_pool, feats) × (G1, G2) stacks and L_ort = 0.01·Σ⟨g1, g2⟩/(6B).
Terms whose module is off (MFGM: CPM, ort; PLM: L_ch, DCS, the part ID loss) drop out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from kdforge.config import Strict, validate
from kdforge.engine.optim import OptimizerSpec
from kdforge.errors import KdforgeError
from kdforge.losses.base import check_compat
from kdforge.method import DataInfo, Method
from kdforge.registry import METHODS
from kdforge.reid.data import CrossModalPKSampler, CrossModalTrain
from kdforge.reid.losses import (
    PDM_QUIRKS,
    block_labels,
    ch_loss,
    cpm_loss,
    dcs_loss,
    ort_loss,
    triplet_loss,
)
from kdforge.reid.metrics import evaluate_protocol
from kdforge.reid.model import TwoStreamNet, build_reid

if TYPE_CHECKING:
    from kdforge.engine.trainer import Trainer

DEFAULT_WEIGHTS = {"id": 1.0, "tri": 1.0, "cpm": 0.5, "ort": 1.0, "ch": 0.5, "dcs": 1.0}


def pdm_quirks(compat: str | list[str]) -> frozenset[str]:
    """The code quirks a ``compat`` value turns on: ``paper`` none, ``official`` all, or a list of them."""
    q = check_compat("pdm", compat, ("official", *PDM_QUIRKS))
    return frozenset(PDM_QUIRKS) if "official" in q else q


class ReidModelSpec(Strict):
    """The network of a ``pdm`` recipe (switches off = the two-stream baseline)."""

    backbone: Literal["small", "resnet50"] = "small"
    width: int = Field(16, ge=1)
    #: torchvision ResNet-50 ImageNet weights (a local .pth/.safetensors file)
    pretrained: str | None = None
    depth: Literal[3, 4] = 4
    mfa: bool = True
    sna: bool = True
    mfgm: bool = True
    plm: bool = True
    prototypes: int = Field(4, ge=1)
    phase_alpha: float = Field(0.8, ge=0)
    cbam_kernel: int = Field(49, ge=1)


class PDMConfig(Strict):
    """Recipe schema of ``method: {name: pdm}``."""

    name: str = "pdm"
    model: ReidModelSpec = Field(default_factory=ReidModelSpec)
    ids_per_batch: int = Field(8, ge=2)
    num_pos: int = Field(4, ge=1)
    weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    triplet_margin: float = Field(0.3, ge=0)
    cpm_margin: float = Field(0.2, ge=0)
    cpm_scale: float = Field(0.8, ge=0)
    ort_scale: float = Field(0.01, ge=0)
    dcs_m1: float = Field(0.01, ge=0)
    dcs_m2: float = Field(0.7, ge=0)
    ch_form: Literal["rms", "cosine"] = "rms"
    #: the alternative script's second triplet term on the part+global features
    triplet_feats: bool = False
    #: lr of everything but the global BNNeck/classifier, as a factor of optim.lr
    backbone_lr: float = Field(0.1, gt=0)
    test_flip: bool = True
    #: ``paper``, ``official`` (every quirk of the released code) or a list of ``pnl``, ``lch``, ``labels``, ``partlr``
    compat: str | list[str] = "paper"


@METHODS.register("pdm")
class PDM(Method):
    """PDM (Li et al., ICASSP 2025): MFGM-generated features pulled between modalities, PLM prototypes, DEEN's trunk.

    Batches are P identities × K (visible, infrared) pairs from :class:`CrossModalPKSampler`. Evaluation
    embeds every image with its own modality's stem (plus its flip), fuses the MFGM branches and scores
    the data set's protocol; "best" is picked by mAP on validation identities, never on the test gallery.
    """

    Config = PDMConfig
    monitor = ("mAP", "max")

    def __init__(self, net: TwoStreamNet, ids_per_batch: int = 8, num_pos: int = 4,
                 weights: dict[str, float] | None = None, triplet_margin: float = 0.3, cpm_margin: float = 0.2,
                 cpm_scale: float = 0.8, ort_scale: float = 0.01, dcs_m1: float = 0.01, dcs_m2: float = 0.7,
                 ch_form: str = "rms", triplet_feats: bool = False, backbone_lr: float = 0.1,
                 quirks: frozenset[str] = frozenset()) -> None:
        super().__init__()
        w = dict(DEFAULT_WEIGHTS)
        w.update(weights or {})
        bad = sorted(set(w) - set(DEFAULT_WEIGHTS))
        if bad:
            raise KdforgeError(f"unknown PDM loss weight {bad[0]!r} (valid: {', '.join(DEFAULT_WEIGHTS)})")
        self.net = net
        self.p, self.k, self.w = ids_per_batch, num_pos, w
        self.triplet_margin, self.cpm_margin, self.cpm_scale, self.ort_scale = (triplet_margin, cpm_margin,
                                                                                cpm_scale, ort_scale)
        self.dcs_m1, self.dcs_m2, self.ch_form, self.triplet_feats = dcs_m1, dcs_m2, ch_form, triplet_feats
        self.backbone_lr, self.quirks = backbone_lr, quirks

    @classmethod
    def from_config(cls, cfg: dict[str, Any], info: DataInfo) -> PDM:
        c = validate(PDMConfig, cfg, prefix="method")
        try:
            quirks = pdm_quirks(c.compat)
        except ValueError as e:
            raise KdforgeError(f"method: {e}") from None
        m = c.model
        h = info.image_size
        net = build_reid(info.num_classes, image_size=(h, max(h // 2, 1)), backbone=m.backbone, width=m.width,
                         pretrained=m.pretrained, depth=m.depth, mfa=m.mfa, sna=m.sna, mfgm=m.mfgm, plm=m.plm,
                         prototypes=m.prototypes, phase_alpha=m.phase_alpha, raw_pnl="pnl" in quirks,
                         cbam_kernel=m.cbam_kernel)
        net.kdforge_spec["test_flip"] = c.test_flip
        return cls(net, c.ids_per_batch, c.num_pos, c.weights, c.triplet_margin, c.cpm_margin, c.cpm_scale,
                   c.ort_scale, c.dcs_m1, c.dcs_m2, c.ch_form, c.triplet_feats, c.backbone_lr, quirks)

    # -- data --------------------------------------------------------------------------------
    def wrap_train_data(self, dataset: Dataset) -> Dataset:
        self.limit = None
        if isinstance(dataset, Subset) and isinstance(dataset.dataset, CrossModalTrain):
            self.limit = len(dataset)  # data.limit_train: pairs per epoch (the sampler draws them)
            dataset = dataset.dataset
        if not isinstance(dataset, CrossModalTrain):
            raise KdforgeError("method 'pdm' needs a two-modality ReID data set (valid: reid_synthetic, sysu_mm01, "
                               "regdb, llcm)")
        return dataset

    def train_sampler(self, dataset: Dataset, seed: int, rank: int, world: int) -> Sampler[int]:
        assert isinstance(dataset, CrossModalTrain)
        return CrossModalPKSampler(dataset.vis_labels, dataset.ir_labels, self.p, self.k, seed, rank, world,
                                   getattr(self, "limit", None))

    def setup(self, batch: Any) -> None:
        n = len(batch[0])
        if n != self.p * self.k:
            raise KdforgeError(f"data.batch_size must be method.ids_per_batch × method.num_pos = "
                               f"{self.p} × {self.k} = {self.p * self.k} (pairs per batch), got {n}")

    def configure_optimizers(self) -> Sequence[OptimizerSpec]:
        """The global BNNeck + classifier at optim.lr; everything else at ``backbone_lr`` × optim.lr
        (the part head joins the head group, or the backbone's with ``compat: [partlr]``, as the released script)."""
        head: list[nn.Parameter] = [p for p in self.net.head.parameters() if p.requires_grad]
        if self.net.head_s is not None and "partlr" not in self.quirks:
            head += [p for p in self.net.head_s.parameters() if p.requires_grad]
        return [OptimizerSpec("main", lr_scale=self.backbone_lr), OptimizerSpec("head", head)]

    # -- training ----------------------------------------------------------------------------
    def training_step(self, batch: Sequence[Tensor], step: int) -> dict[str, Tensor]:
        xv, xi, yv, yi = batch
        out = self.net.forward_train(xv, xi)
        return self.losses(out, yv, yi)

    def losses(self, out: dict[str, Tensor], yv: Tensor, yi: Tensor) -> dict[str, Tensor]:
        """Every active term (unweighted, for logging) and the weighted total ``loss``."""
        net, w, k = self.net, self.w, self.k
        y = block_labels(yv, yi, net.blocks, "labels" in self.quirks)
        terms: dict[str, Tensor] = {"id": F.cross_entropy(out["logits"], y)}
        if "logits_s" in out:
            terms["id"] = terms["id"] + F.cross_entropy(out["logits_s"], y)
        terms["tri"] = triplet_loss(out["pool"], y, self.triplet_margin)
        if self.triplet_feats and "feats" in out:
            terms["tri"] = terms["tri"] + triplet_loss(out["feats"], y, self.triplet_margin)
        if net.mfgm is not None:
            b = len(yv)
            cpm = out["pool"].new_zeros(())
            for key in ("pool", "feats"):
                if key in out:
                    v, i, g1v, g1i, g2v, g2i = out[key].split(b)
                    cpm = cpm + cpm_loss(v, i, g1v, g1i, k, self.cpm_margin) + cpm_loss(v, i, g2v, g2i, k,
                                                                                         self.cpm_margin)
            terms["cpm"] = self.cpm_scale * cpm
            pool = out["pool"]
            terms["ort"] = self.ort_scale * ort_loss(pool[2 * b:4 * b], pool[4 * b:], len(pool))
        if "maps" in out:
            terms["ch"] = ch_loss(out["maps"], self.ch_form, 288 if "lch" in self.quirks else None)
            terms["dcs"] = dcs_loss(out["feats"], y, k, self.dcs_m1, self.dcs_m2)
        loss = sum(w[name] * v for name, v in terms.items())
        logits = out["logits"]
        return {"loss": loss, **{n: v.detach() for n, v in terms.items()},
                "acc": (logits.argmax(1) == y).float().mean().detach()}

    def deployable(self) -> nn.Module:
        return self.net

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, loader: DataLoader | None, trainer: Trainer, model: nn.Module) -> dict[str, float]:
        """CMC rank-1/5/10/20, mAP, mINP of the data set's protocol (every setting, prefixed)."""
        if loader is None:
            return {}
        ds = loader.dataset
        while not hasattr(ds, "protocol") and hasattr(ds, "dataset"):
            ds = ds.dataset
        if not hasattr(ds, "protocol"):
            raise KdforgeError("ReID evaluation needs a ReID test set (valid: reid_synthetic, sysu_mm01, regdb, llcm)")
        acc = getattr(trainer, "acc", None) if trainer is not None else None
        device = acc.device if acc is not None else next(model.parameters()).device
        flip = bool(getattr(model, "kdforge_spec", {}).get("test_flip", True))
        feats = extract_features(model, ds, loader.batch_size or 256, device, flip)
        return evaluate_protocol(feats, ds.pids, ds.cams, ds.modal, ds.protocol, ds.trials)


@torch.no_grad()
def extract_features(model: nn.Module, ds: Dataset, batch_size: int, device: torch.device, flip: bool = True
                     ) -> np.ndarray:
    """Fused embeddings of every image of a ReID evaluation set, each through its own modality's stem."""
    was = model.training
    model.eval()
    modal = ds.modal  # type: ignore[attr-defined]
    out: np.ndarray | None = None
    for m in (0, 1):
        idx = np.flatnonzero(modal == m)
        if not len(idx):
            continue
        chunks = []
        for xb, _ in DataLoader(Subset(ds, idx.tolist()), batch_size=batch_size, shuffle=False):
            chunks.append(model.embed_flip(xb.to(device), m, flip).float().cpu())  # type: ignore[operator]
        e = torch.cat(chunks).numpy()
        if out is None:
            out = np.zeros((len(modal), e.shape[1]), dtype=np.float32)
        out[idx] = e
    model.train(was)
    assert out is not None
    return out
