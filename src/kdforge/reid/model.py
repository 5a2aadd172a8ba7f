"""The PDM two-stream network: modality-specific stems, shared stages with MFA blocks, MFGM, PLM and BNNeck heads.

Backbones: ``resnet50`` (torchvision's, three copies as in the official code: two stems and the shared
layers, layer4 at stride 1; ImageNet weights from a local file) and ``small`` (a 4-stage CNN of the
same topology for CPU recipes). The modules that PDM adds are switches, so the same class is the
plain two-stream baseline (``mfa/sna/mfgm/plm`` off, ``phase_alpha`` 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.errors import KdforgeError
from kdforge.reid.modules import MFA, MFGM, PLM, phase_perturb, sna

VISIBLE, INFRARED = 0, 1
BACKBONES = ("small", "resnet50")
RESNET50_HINT = ("torchvision's ResNet-50 ImageNet weights, e.g. resnet50-0676ba61.pth or resnet50-11ad3fa6.pth "
                 "(download them where you have network and give the path as method.model.pretrained)")


class BasicBlock(nn.Module):
    """Two 3×3 conv–BN layers with a projected shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.short(x) + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


def _small_backbone(width: int) -> tuple[nn.Module, nn.Module, list[nn.Module], list[int]]:
    """Stems conv3×3/2 (3 → w) and four stages (w, 2w, 4w, 8w) at strides 1, 2, 2, 1: a 64×32 input gives 8×4."""
    def stem() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))

    chans = [width, width, 2 * width, 4 * width, 8 * width]
    layers = [BasicBlock(chans[i], chans[i + 1], s) for i, s in enumerate((1, 2, 2, 1))]
    return stem(), stem(), layers, chans


def load_resnet50_weights(path: str | None) -> dict[str, Tensor] | None:
    """The state dict of torchvision's ResNet-50 at ``path`` (.pth or .safetensors); ``None`` without a path."""
    if not path:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        raise KdforgeError(f"ResNet-50 weights not found at {str(p)!r}: give {RESNET50_HINT}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file: one line, not a traceback
        raise KdforgeError(f"cannot read ResNet-50 weights {str(p)!r} ({type(e).__name__}); give {RESNET50_HINT}"
                           ) from None
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or "conv1.weight" not in sd or "layer4.2.conv3.weight" not in sd:
        raise KdforgeError(f"{str(p)!r} is not a torchvision ResNet-50 state dict; give {RESNET50_HINT}")
    return sd


def _resnet50_backbone(pretrained: str | None) -> tuple[nn.Module, nn.Module, list[nn.Module], list[int]]:
    """Three torchvision ResNet-50s: conv1–maxpool of two as the stems, layer1–4 of the third (layer4 stride 1)."""
    from torchvision.models import resnet50

    sd = load_resnet50_weights(pretrained)
    nets = []
    for _ in range(3):
        m = resnet50(weights=None)
        if sd is not None:
            m.load_state_dict(sd)
        nets.append(m)
    stems = [nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool) for m in nets[:2]]
    base = nets[2]
    base.layer4[0].conv2.stride = (1, 1)  # last_conv_stride = 1
    base.layer4[0].downsample[0].stride = (1, 1)
    return stems[0], stems[1], [base.layer1, base.layer2, base.layer3, base.layer4], [64, 256, 512, 1024, 2048]


class BNNeck(nn.Module):
    """BN1d (bias frozen at 0, γ ~ N(1, 0.01)) then a bias-free classifier (weights ~ N(0, 0.001))."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        nn.init.normal_(self.bn.weight, 1.0, 0.01)
        nn.init.zeros_(self.bn.bias)
        self.bn.bias.requires_grad_(False)
        self.fc = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.fc.weight, 0.0, 0.001)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.bn(x)
        return f, self.fc(f)


class TwoStreamNet(nn.Module):
    """PDM's network (or the two-stream baseline with its switches off).

    ``depth`` 4: MFGM on the stage-3 output, layer4 applied to every generated map (SYSU/LLCM); 3: the
    RegDB variant (no layer4, MFGM after MFA2, PLM on layer3).
    """

    def __init__(self, num_classes: int, image_size: tuple[int, int] = (64, 32), backbone: str = "small",
                 width: int = 16, pretrained: str | None = None, depth: int = 4, mfa: bool = True,
                 sna: bool = True, mfgm: bool = True, plm: bool = True, prototypes: int = 4,
                 phase_alpha: float = 0.8, raw_pnl: bool = False, cbam_kernel: int = 49) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise KdforgeError(f"unknown ReID backbone {backbone!r} (valid: {', '.join(BACKBONES)})")
        if depth not in (3, 4):
            raise KdforgeError(f"bad ReID depth {depth} (valid: 4, or 3 for the RegDB variant)")
        stem_v, stem_i, layers, chans = (_small_backbone(width) if backbone == "small"
                                         else _resnet50_backbone(pretrained))
        self.stem_v, self.stem_i = stem_v, stem_i
        self.layers = nn.ModuleList(layers[:depth])
        self.use_sna, self.phase_alpha = sna, phase_alpha
        strides = (1, 2, 2)
        self.mfa = nn.ModuleList([MFA(chans[k + 1], chans[k], strides[k], raw_pnl) for k in range(depth - 1)]) \
            if mfa else None
        c_gen = chans[depth - 1]
        self.mfgm = MFGM(c_gen, kernel=cbam_kernel) if mfgm else None
        self.blocks = 6 if mfgm else 2
        self.dim = chans[depth]
        self.head = BNNeck(self.dim, num_classes)
        hw = self._map_size(image_size)
        self.map_hw = hw
        self.plm = PLM(self.dim, hw[0] * hw[1], prototypes) if plm else None
        self.head_s = BNNeck(self.dim * (prototypes + 1), num_classes) if plm else None
        self.prototypes = prototypes if plm else 0

    @torch.no_grad()
    def _map_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        was = self.training
        self.eval()
        x = self.stem_v(torch.zeros(1, 3, *image_size))
        for layer in self.layers:
            x = layer(x)
        self.train(was)
        return int(x.shape[-2]), int(x.shape[-1])

    # -- trunk --------------------------------------------------------------------------------
    def _trunk(self, x: Tensor) -> Tensor:
        """Shared stages from the stem output to the final map (MFGM stacks its branches along the batch)."""
        a = sna(x) if self.use_sna else x
        for k, layer in enumerate(self.layers[:-1]):
            h = layer(a)
            a = self.mfa[k](h, a) if self.mfa is not None else h
        if self.mfgm is not None:
            a = self.mfgm(a)
        return self.layers[-1](a)

    def _heads(self, fmap: Tensor) -> dict[str, Tensor]:
        pool = fmap.mean(dim=(-2, -1))
        f, logits = self.head(pool)
        out = {"pool": pool, "f": f, "logits": logits}
        if self.plm is not None and self.head_s is not None:
            z, s = self.plm(fmap)
            feats = torch.cat([z, pool], 1)
            bn_feats, logits_s = self.head_s(feats)
            out.update(feats=feats, bn_feats=bn_feats, logits_s=logits_s, maps=s)
        return out

    def forward_train(self, xv: Tensor, xi: Tensor) -> dict[str, Tensor]:
        """Training forward of B visible and B infrared images; batch order [V, I, G1V, G1I, G2V, G2I]."""
        if self.training and self.phase_alpha > 0:
            xv, xi = phase_perturb(xv, self.phase_alpha), phase_perturb(xi, self.phase_alpha)
        x = torch.cat([self.stem_v(xv), self.stem_i(xi)], 0)
        return self._heads(self._trunk(x))

    def embed(self, x: Tensor, modal: int) -> Tensor:
        """Test embedding of one modality: per MFGM branch l2norm(f) (and l2norm(BN(feats)) with PLM), concatenated.

        The dot product of two such embeddings is the official fused similarity Σ_b (⟨f_b, f'_b⟩ + ⟨s_b, s'_b⟩).
        """
        stem = self.stem_v if modal == VISIBLE else self.stem_i
        out = self._heads(self._trunk(stem(x)))
        n, k = len(x), self.blocks // 2
        parts = []
        for b in range(k):
            parts.append(F.normalize(out["f"][b * n:(b + 1) * n], dim=1))
            if "bn_feats" in out:
                parts.append(F.normalize(out["bn_feats"][b * n:(b + 1) * n], dim=1))
        return torch.cat(parts, 1)

    def embed_flip(self, x: Tensor, modal: int, flip: bool = True) -> Tensor:
        """:meth:`embed` of the image plus that of its horizontal flip (summed, not re-normalised)."""
        e = self.embed(x, modal)
        return e + self.embed(x.flip(-1), modal) if flip else e

    def forward(self, x: Tensor, modal: int = VISIBLE) -> Tensor:
        return self.embed(x, modal)


def build_reid(num_classes: int, **kwargs: Any) -> TwoStreamNet:
    """A :class:`TwoStreamNet` that remembers the spec that rebuilds it (ImageNet weights are not part of it)."""
    model = TwoStreamNet(num_classes, **kwargs)
    spec_kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items() if k != "pretrained"}
    model.kdforge_spec = {"builder": "reid", "num_classes": num_classes, "kwargs": spec_kwargs,
                          "image_size": int(kwargs.get("image_size", (64, 32))[0])}
    return model


def rebuild_reid(spec: dict[str, Any]) -> TwoStreamNet:
    """The (untrained) network a ``kdforge_spec`` of builder ``reid`` describes."""
    kw = dict(spec.get("kwargs", {}))
    if "image_size" in kw:
        kw["image_size"] = tuple(kw["image_size"])
    model = build_reid(int(spec["num_classes"]), **kw)
    model.kdforge_spec = dict(spec)
    return model


def param_count(m: nn.Module) -> int:
    """Trainable parameter count."""
    return sum(p.numel() for p in m.parameters() if p.requires_grad)

