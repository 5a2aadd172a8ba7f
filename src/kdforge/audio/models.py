"""Auditory SlowFast (Kazakos et al., ICASSP 2021) as 2-D convolutions over (time, frequency).

Input: the fast pathway's log-mel ``[B, 1, T, F]``; the slow pathway is taken inside at
``linspace(0, T-1, T // alpha)``. Slow: wide, temporal kernel 1 in the stem and early stages, 3 later;
fast: ``1/beta_inv`` of the channels, full time resolution, temporal kernels 5 (stem) and 3. Lateral
fast->slow fusion (conv ``[7, 1]``, time stride alpha, 2x fast channels, BN, ReLU, concatenated) after the
stem and each stage but the last. The stem downsamples time and frequency (conv stride 2x2, then a 3x3
max-pool with stride 2), so a 400-frame input reaches every stage and the head at 25 (slow) / 100 (fast)
frames; the stages after the first halve frequency only (128 mel bins reach the head as 4).
Head: per-pathway global average pooling, concatenation, dropout, ``head.projection``.
Official ``.pyth`` checkpoints load through :func:`convert_official` (module names ``s1.pathway0_stem...``).

``audio_slowfast`` is the paper's ResNet-50 size (64 stem channels, blocks 3-4-6-3, 2048 at res5);
``audio_slowfast_lite`` the small one of the quick recipes (16/2 channels, 2 stages, one fusion).

BatchNorm policy of the official fine-tuning (``set_bn_policy(frozen=True)``): every BN except the two
stem BNs and the first fusion BN keeps its affine parameters and running statistics frozen (eval mode);
those three keep adapting. :func:`freeze_backbone` trains only parameters with ``head`` in their name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from kdforge.audio.frontend import slow_indices
from kdforge.registry import MODELS


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)


class Bottleneck(nn.Module):
    """ResNet bottleneck with separable kernels: ``[t_k, 1]`` over time, ``[1, 3]`` over frequency, 1x1."""

    def __init__(self, cin: int, cout: int, inner: int, t_k: int, f_stride: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(cin, inner, (t_k, 1), padding=(t_k // 2, 0), bias=False)
        self.a_bn = _bn(inner)
        self.b = nn.Conv2d(inner, inner, (1, 3), stride=(1, f_stride), padding=(0, 1), bias=False)
        self.b_bn = _bn(inner)
        self.c = nn.Conv2d(inner, cout, 1, bias=False)
        self.c_bn = _bn(cout)
        self.relu = nn.ReLU(inplace=True)
        self.short: nn.Module | None = None
        if cin != cout or f_stride != 1:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=(1, f_stride), bias=False), _bn(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.a_bn(self.a(x)))
        y = self.relu(self.b_bn(self.b(y)))
        y = self.c_bn(self.c(y))
        return self.relu(y + (x if self.short is None else self.short(x)))


class Fuse(nn.Module):
    """Fast -> slow lateral connection: conv ``[7, 1]`` with time stride alpha, BN, ReLU, concatenated."""

    def __init__(self, fast: int, alpha: int, ratio: int = 2, kernel: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(fast, fast * ratio, (kernel, 1), stride=(alpha, 1), padding=(kernel // 2, 0),
                              bias=False)
        self.bn = _bn(fast * ratio)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, slow: Tensor, fast: Tensor) -> Tensor:
        f = self.relu(self.bn(self.conv(fast)))
        t = slow.shape[2]
        if f.shape[2] != t:  # T not divisible by alpha: match the slow pathway's frames
            f = torch.nn.functional.interpolate(f, size=(t, f.shape[3]), mode="nearest")
        return torch.cat([slow, f], dim=1)


class AudioSlowFast(nn.Module):
    """Two-pathway CNN on log-mel spectrograms ``[B, 1, T, F]`` -> logits."""

    def __init__(self, num_classes: int, in_chans: int = 1, width: int = 64, beta_inv: int = 8, alpha: int = 4,
                 depth: Sequence[int] = (3, 4, 6, 3), expansion: int = 4, slow_t_kernels: Sequence[int] | None = None,
                 fusions: int | None = None, dropout: float = 0.5) -> None:
        super().__init__()
        n = len(depth)
        slow_k = list(slow_t_kernels) if slow_t_kernels is not None else [1 if i < n // 2 else 3 for i in range(n)]
        fusions = n if fusions is None else fusions  # after the stem and the first n - 1 stages
        self.alpha = alpha
        fw = max(1, width // beta_inv)
        self.slow_stem = nn.Conv2d(in_chans, width, (1, 7), stride=2, padding=(0, 3), bias=False)
        self.slow_stem_bn = _bn(width)
        self.fast_stem = nn.Conv2d(in_chans, fw, (5, 7), stride=2, padding=(2, 3), bias=False)
        self.fast_stem_bn = _bn(fw)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fuse = nn.ModuleList()
        self.slow_stages, self.fast_stages = nn.ModuleList(), nn.ModuleList()
        s_in, f_in = width, fw
        if fusions > 0:
            self.fuse.append(Fuse(fw, alpha))
            s_in += 2 * fw
        for i, blocks in enumerate(depth):
            s_out, f_out = width * expansion * 2**i, fw * expansion * 2**i
            stride = 1 if i == 0 else 2
            self.slow_stages.append(nn.Sequential(*[
                Bottleneck(s_in if b == 0 else s_out, s_out, width * 2**i, slow_k[i], stride if b == 0 else 1)
                for b in range(blocks)]))
            self.fast_stages.append(nn.Sequential(*[
                Bottleneck(f_in if b == 0 else f_out, f_out, fw * 2**i, 3, stride if b == 0 else 1)
                for b in range(blocks)]))
            s_in, f_in = s_out, f_out
            if i < n - 1 and len(self.fuse) < fusions:
                self.fuse.append(Fuse(f_out, alpha))
                s_in += 2 * f_out
        self.num_features = s_in + f_in
        self.head = nn.Module()
        self.head.dropout = nn.Dropout(dropout)
        self.head.projection = nn.Linear(self.num_features, num_classes)
        # the BNs that keep adapting under the official fine-tuning policy
        self.adapting_bn = [self.slow_stem_bn, self.fast_stem_bn] + ([self.fuse[0].bn] if len(self.fuse) else [])
        self.bn_frozen = False
        self.feature_names = ["slow_stages." + str(i) for i in range(n)]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: Tensor) -> Tensor:
        """Pooled, concatenated slow and fast features ``[B, num_features]``."""
        idx = slow_indices(x.shape[2], self.alpha).to(x.device)
        slow = self.pool(self.relu(self.slow_stem_bn(self.slow_stem(x.index_select(2, idx)))))
        fast = self.pool(self.relu(self.fast_stem_bn(self.fast_stem(x))))
        k = 0
        if len(self.fuse):
            slow, k = self.fuse[0](slow, fast), 1
        for i, (s_stage, f_stage) in enumerate(zip(self.slow_stages, self.fast_stages, strict=True)):
            slow, fast = s_stage(slow), f_stage(fast)
            if i < len(self.slow_stages) - 1 and k < len(self.fuse):
                slow, k = self.fuse[k](slow, fast), k + 1
        return torch.cat([slow.mean((2, 3)), fast.mean((2, 3))], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head.projection(self.head.dropout(self.features(x)))

    def set_bn_policy(self, frozen: bool) -> None:
        """Official fine-tuning BN policy (``frozen=True``): every BN but the stem/first-fusion ones is frozen."""
        self.bn_frozen = frozen
        keep = {id(m) for m in self.adapting_bn}
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d) and id(m) not in keep:
                m.weight.requires_grad_(not frozen)
                m.bias.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> AudioSlowFast:
        super().train(mode)
        if mode and self.bn_frozen:
            keep = {id(m) for m in self.adapting_bn}
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d) and id(m) not in keep:
                    m.eval()
        return self


@MODELS.register("audio_slowfast")
def audio_slowfast(num_classes: int, in_chans: int = 1, width: int = 64, beta_inv: int = 8, alpha: int = 4,
                   depth: Sequence[int] = (3, 4, 6, 3), dropout: float = 0.5) -> AudioSlowFast:
    """Auditory SlowFast, ResNet-50 depth (the paper's size; ~26 M parameters)."""
    return AudioSlowFast(num_classes, in_chans, width, beta_inv, alpha, depth, dropout=dropout)


@MODELS.register("audio_slowfast_lite")
def audio_slowfast_lite(num_classes: int, in_chans: int = 1, width: int = 16, beta_inv: int = 8, alpha: int = 4,
                        depth: Sequence[int] = (1, 1), expansion: int = 2, fusions: int = 1,
                        dropout: float = 0.5) -> AudioSlowFast:
    """A small Auditory SlowFast (slow 16 / fast 2 channels, 2 stages, one lateral fusion) for CPU recipes."""
    return AudioSlowFast(num_classes, in_chans, width, beta_inv, alpha, depth, expansion, None, fusions, dropout)


def head_names(model: nn.Module) -> tuple[str, ...]:
    """Name parts that mark the classifier: ``head`` (the official rule), else the last Linear's name."""
    if any("head" in n for n, _ in model.named_parameters()):
        return ("head",)
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return (last[-1],) if last else ("head",)


def freeze_backbone(model: nn.Module, freeze_bn_stats: bool = False) -> list[str]:
    """Train only parameters whose name contains the head's name (official: ``head``); return their names.

    The official code leaves the stem and first-fusion BNs in train mode, so their running statistics keep
    adapting; ``freeze_bn_stats=True`` puts every BN in eval mode (features bit-identical to the checkpoint).
    """
    heads = head_names(model)
    trained = []
    for n, p in model.named_parameters():
        keep = any(h in n for h in heads)
        p.requires_grad_(keep)
        if keep:
            trained.append(n)
    if isinstance(model, AudioSlowFast):
        model.set_bn_policy(True)
        if freeze_bn_stats:
            model.adapting_bn = []
            model.train(model.training)
    elif freeze_bn_stats:
        model.kdforge_bn_eval = True  # read by the audio method's train()
    return trained


def set_generic_bn_policy(model: nn.Module) -> None:
    """The official fine-tuning BN policy for a non-SlowFast (e.g. timm) model: only the first (stem) BN adapts.

    Every other BN keeps its affine parameters and running statistics frozen (eval mode under ``train()``),
    as the official code freezes every BN of Auditory SlowFast but its stem (and first-fusion) ones.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns[1:]:
        for p in (m.weight, m.bias):
            if p is not None:
                p.requires_grad_(False)
    object.__setattr__(model, "kdforge_bn_keep", bns[:1])  # a plain list: not registered as submodules


def apply_bn_eval(model: nn.Module) -> None:
    """Put the frozen BatchNorms of a (non-SlowFast) model in eval mode (all of them when its statistics are frozen)."""
    keep = [] if getattr(model, "kdforge_bn_eval", False) else getattr(model, "kdforge_bn_keep", None)
    if keep is None:
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(m is k for k in keep):
            m.eval()


# -- official checkpoints ----------------------------------------------------------------------------------

_OFFICIAL_BLOCK = {"branch2.a": "a", "branch2.a_bn": "a_bn", "branch2.b": "b", "branch2.b_bn": "b_bn",
                   "branch2.c": "c", "branch2.c_bn": "c_bn", "branch1": "short.0", "branch1_bn": "short.1"}


def official_name(name: str) -> str | None:
    """The :class:`AudioSlowFast` name of an official Auditory SlowFast parameter (None: not part of the model).

    Official layout: ``s1.pathway{0,1}_stem.{conv,bn}``, ``s{1..4}_fuse.{conv_f2s,bn}``,
    ``s{2..5}.pathway{0,1}_res{b}.{branch1,branch1_bn,branch2.{a,b,c}[_bn]}``, ``head.projection``.
    """
    import re

    m = re.fullmatch(r"s1\.pathway([01])_stem\.(conv|bn)\.(\w+)", name)
    if m:
        path = ("slow", "fast")[int(m[1])]
        return f"{path}_stem{'' if m[2] == 'conv' else '_bn'}.{m[3]}"
    m = re.fullmatch(r"s([1-4])_fuse\.(conv_f2s|bn)\.(\w+)", name)
    if m:
        return f"fuse.{int(m[1]) - 1}.{'conv' if m[2] == 'conv_f2s' else 'bn'}.{m[3]}"
    m = re.fullmatch(r"s([2-5])\.pathway([01])_res(\d+)\.(branch1_bn|branch1|branch2\.[abc](?:_bn)?)\.(\w+)", name)
    if m:
        path = ("slow", "fast")[int(m[2])]
        return f"{path}_stages.{int(m[1]) - 2}.{int(m[3])}.{_OFFICIAL_BLOCK[m[4]]}.{m[5]}"
    if name.startswith("head.projection."):
        return name
    return None


def convert_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official Auditory SlowFast state dict (``module.`` prefixes allowed) with :class:`AudioSlowFast` names.

    Refuses a state dict with a tensor it cannot place, naming it, so a wrong file never loads half-way.
    """
    from kdforge.errors import KdforgeError

    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        k = k.removeprefix("module.")
        new = official_name(k)
        if new is None:
            raise KdforgeError(f"{k!r} is not a tensor of the official Auditory SlowFast (expected names like "
                               "'s1.pathway0_stem.conv.weight', 's2.pathway1_res0.branch2.a.weight', "
                               "'s1_fuse.conv_f2s.weight', 'head.projection.weight')")
        out[new] = v
    return out


def load_official(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an official ``.pyth`` checkpoint (its ``model_state``) and convert its names."""
    from kdforge.errors import KdforgeError

    p = Path(path)
    if not p.is_file():
        raise KdforgeError(f"official checkpoint not found: {str(p)!r} (e.g. SLOWFAST_EPIC_SOUNDS.pyth)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files
        raise KdforgeError(f"cannot read {str(p)!r} as a torch checkpoint ({type(e).__name__})") from None
    state = obj.get("model_state", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KdforgeError(f"{str(p)!r} holds no 'model_state' dict of tensors: is it an official .pyth checkpoint?")
    return convert_official(state)


def main(argv: list[str] | None = None) -> int:
    """``python -m kdforge.audio.models IN.pyth OUT.safetensors``: convert an official checkpoint."""
    import sys

    from safetensors.torch import save_file

    from kdforge.errors import KdforgeError

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m kdforge.audio.models OFFICIAL.pyth OUT.safetensors", file=sys.stderr)
        return 2
    try:
        state = load_official(args[0])
    except KdforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_file({k: v.contiguous() for k, v in state.items()}, args[1])
    print(f"wrote {args[1]} ({len(state)} tensors)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
