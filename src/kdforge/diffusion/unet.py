"""Denoisers f(z, i) on grid indices: a small UNet, the pytorch-ddpm UNet layout and a diffusers adapter.

Every denoiser carries its schedule level: ``grid`` (G) and ``steps`` (T, with T·ts = G) are buffers,
so a checkpoint says how it samples; ``prediction`` (x, eps or v) is a constructor argument.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.diffusion.schedule import PREDICTIONS
from kdforge.errors import KdforgeError
from kdforge.registry import MODELS


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) grid indices, shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().view(-1, 1) * freqs.view(1, -1)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class Denoiser(nn.Module):
    """Base of the denoisers: the level buffers and the prediction type."""

    def __init__(self, grid: int, prediction: str) -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise KdforgeError(f"bad prediction {prediction!r} (valid: {', '.join(PREDICTIONS)})")
        self.prediction = prediction
        self.register_buffer("grid", torch.tensor(int(grid)))
        self.register_buffer("steps", torch.tensor(int(grid)))

    @property
    def level(self) -> tuple[int, int]:
        """(T, time scale): T sampling steps, grid index of step k is k·ts."""
        g, t = int(self.grid), int(self.steps)
        return t, g // t


def _groups(ch: int) -> int:
    return math.gcd(ch, 8)


class _Res(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(_groups(cout), cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return h + self.skip(x)


class SmallUNet(Denoiser):
    """A small UNet for 8×8 to 32×32 images: sinusoidal time embedding, 2–3 levels, residual blocks."""

    def __init__(self, in_chans: int = 1, ch: int = 32, mult: Sequence[int] = (1, 2), blocks: int = 1,
                 dropout: float = 0.0, grid: int = 64, prediction: str = "x") -> None:
        super().__init__(grid, prediction)
        if not 1 <= len(mult) <= 4:
            raise KdforgeError(f"mult must list 1 to 4 levels, got {list(mult)}")
        self.ch, tdim = ch, 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.head = nn.Conv2d(in_chans, ch, 3, padding=1)
        self.down = nn.ModuleList()
        chans, cur = [ch], ch
        for lvl, m in enumerate(mult):
            for _ in range(blocks):
                self.down.append(_Res(cur, ch * m, tdim, dropout))
                cur = ch * m
                chans.append(cur)
            if lvl < len(mult) - 1:
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                chans.append(cur)
        self.mid = nn.ModuleList([_Res(cur, cur, tdim, dropout), _Res(cur, cur, tdim, dropout)])
        self.up = nn.ModuleList()
        for lvl, m in reversed(list(enumerate(mult))):
            for _ in range(blocks + 1):
                self.up.append(_Res(cur + chans.pop(), ch * m, tdim, dropout))
                cur = ch * m
            if lvl > 0:
                self.up.append(nn.Conv2d(cur, cur, 3, padding=1))  # after a nearest ×2 upsampling
        self.tail = nn.Sequential(nn.GroupNorm(_groups(cur), cur), nn.SiLU(), nn.Conv2d(cur, in_chans, 3, padding=1))

    def forward(self, z: Tensor, t: Tensor) -> Tensor:
        temb = self.temb(timestep_embedding(t, self.ch).to(z.dtype))
        h = self.head(z)
        hs = [h]
        for layer in self.down:
            h = layer(h, temb) if isinstance(layer, _Res) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, temb)
        for layer in self.up:
            if isinstance(layer, _Res):
                h = layer(torch.cat([h, hs.pop()], 1), temb)
            else:
                h = layer(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.tail(h)


@MODELS.register("diffusion_unet")
def diffusion_unet(num_classes: int = 0, in_chans: int = 1, ch: int = 32, mult: Sequence[int] = (1, 2),
                   blocks: int = 1, dropout: float = 0.0, grid: int = 64, prediction: str = "x") -> SmallUNet:
    """A small denoising UNet (8×8..32×32) on a grid of G indices; ``num_classes`` is unused (unconditional)."""
    return SmallUNet(in_chans, ch, tuple(mult), blocks, dropout, grid, prediction)


# -- the pytorch-ddpm layout ----------------------------------------------------------------------------------
# Module names mirror pytorch-ddpm's UNet (time_embedding.timembedding, head, downblocks, middleblocks,
# upblocks, tail; ResBlock block1/temb_proj/block2/shortcut/attn), so its state dicts (and those of the
# RCFD/RDD checkpoints built on it) load by key.


class _Swish(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x)


class _TimeEmbedding(nn.Module):
    def __init__(self, T: int, d_model: int, dim: int) -> None:
        super().__init__()
        table = timestep_embedding(torch.arange(T), d_model)
        # pytorch-ddpm interleaves sin and cos; the order only matters for its released weights
        table = torch.stack([table[:, : d_model // 2], table[:, d_model // 2:]], dim=-1).reshape(T, d_model)
        self.timembedding = nn.Sequential(nn.Embedding.from_pretrained(table), nn.Linear(d_model, dim), _Swish(),
                                          nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.timembedding(t.long())


class _Down(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.main = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        return self.main(x)


class _Up(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.main = nn.Conv2d(ch, ch, 3, stride=1, padding=1)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        return self.main(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Attn(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(32, ch)
        self.proj_q, self.proj_k = nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1)
        self.proj_v, self.proj = nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = self.group_norm(x)
        q = self.proj_q(n).permute(0, 2, 3, 1).reshape(b, h * w, c)
        k = self.proj_k(n).reshape(b, c, h * w)
        v = self.proj_v(n).permute(0, 2, 3, 1).reshape(b, h * w, c)
        a = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=-1)
        out = torch.bmm(a, v).reshape(b, h, w, c).permute(0, 3, 1, 2)
        return x + self.proj(out)


class _DdpmRes(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int, dropout: float, attn: bool) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.GroupNorm(32, cin), _Swish(), nn.Conv2d(cin, cout, 3, 1, 1))
        self.temb_proj = nn.Sequential(_Swish(), nn.Linear(tdim, cout))
        self.block2 = nn.Sequential(nn.GroupNorm(32, cout), _Swish(), nn.Dropout(dropout),
                                    nn.Conv2d(cout, cout, 3, 1, 1))
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.attn = _Attn(cout) if attn else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.block1(x) + self.temb_proj(temb)[:, :, None, None]
        h = self.block2(h)
        return self.attn(h + self.shortcut(x))


class DdpmUNet(Denoiser):
    """The pytorch-ddpm UNet (CIFAR-10: ch 128, ch_mult (1,2,2,2), attention at level 1, 2 blocks, T = table size).

    ``T`` defaults to ``grid + 1``: the sampler and the DDPM loss look the table up at grid indices 0..G.
    """

    def __init__(self, in_chans: int = 3, T: int | None = None, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 2, 2),
                 attn: Sequence[int] = (1,), num_res_blocks: int = 2, dropout: float = 0.1, grid: int = 1024,
                 prediction: str = "x") -> None:
        super().__init__(grid, prediction)
        if ch % 32:
            raise KdforgeError(f"the pytorch-ddpm UNet uses GroupNorm(32): ch must be a multiple of 32, got {ch}")
        T = grid + 1 if T is None else T  # the embedding table is looked up at grid indices 0..G
        if T < grid + 1:
            raise KdforgeError(f"ddpm_unet: the time-embedding table (T = {T}) must cover the grid indices "
                               f"0..{grid} (T >= {grid + 1}); leave T unset, or set grid <= {T - 1} for a checkpoint "
                               f"with T = {T}")
        tdim = ch * 4
        self.time_embedding = _TimeEmbedding(T, ch, tdim)
        self.head = nn.Conv2d(in_chans, ch, 3, 1, 1)
        self.downblocks = nn.ModuleList()
        chs, now = [ch], ch
        for i, m in enumerate(ch_mult):
            out = ch * m
            for _ in range(num_res_blocks):
                self.downblocks.append(_DdpmRes(now, out, tdim, dropout, i in attn))
                now = out
                chs.append(now)
            if i != len(ch_mult) - 1:
                self.downblocks.append(_Down(now))
                chs.append(now)
        self.middleblocks = nn.ModuleList([_DdpmRes(now, now, tdim, dropout, True),
                                           _DdpmRes(now, now, tdim, dropout, False)])
        self.upblocks = nn.ModuleList()
        for i, m in reversed(list(enumerate(ch_mult))):
            out = ch * m
            for _ in range(num_res_blocks + 1):
                self.upblocks.append(_DdpmRes(chs.pop() + now, out, tdim, dropout, i in attn))
                now = out
            if i != 0:
                self.upblocks.append(_Up(now))
        self.tail = nn.Sequential(nn.GroupNorm(32, now), _Swish(), nn.Conv2d(now, in_chans, 3, 1, 1))

    def forward(self, z: Tensor, t: Tensor) -> Tensor:
        temb = self.time_embedding(t)
        h = self.head(z)
        hs = [h]
        for layer in self.downblocks:
            h = layer(h, temb)
            hs.append(h)
        for layer in self.middleblocks:
            h = layer(h, temb)
        for layer in self.upblocks:
            if isinstance(layer, _DdpmRes):
                h = torch.cat([h, hs.pop()], dim=1)
            h = layer(h, temb)
        return self.tail(h)


@MODELS.register("ddpm_unet")
def ddpm_unet(num_classes: int = 0, in_chans: int = 3, T: int | None = None, ch: int = 128,
              ch_mult: Sequence[int] = (1, 2, 2, 2), attn: Sequence[int] = (1,), num_res_blocks: int = 2,
              dropout: float = 0.1, grid: int = 1024, prediction: str = "x") -> DdpmUNet:
    """The pytorch-ddpm UNet layout (its state-dict keys), e.g. for the RCFD/RDD CIFAR-10 checkpoints.

    ``T`` (the time-embedding table) defaults to ``grid + 1``; unconditional only: ``num_classes`` is unused
    (the class-conditional ImageNet-64 UNet of the paper is not built).
    """
    return DdpmUNet(in_chans, T, ch, tuple(ch_mult), tuple(attn), num_res_blocks, dropout, grid, prediction)


def load_ddpm_checkpoint(path: str, model: DdpmUNet, key: str | None = None, steps: int | None = None) -> DdpmUNet:
    """Load a pytorch-ddpm style checkpoint (``ema_model``/``net_model`` entry or a bare state dict) from a local path.

    ``key`` picks the entry (default: ``ema_model`` if present, else ``net_model``, ``model``, ``state_dict``);
    ``module.`` prefixes (DDP) are dropped; ``steps`` sets the model's level (default: its grid).
    """
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise KdforgeError(f"no checkpoint file at {str(p)!r} (give a local pytorch-ddpm .pt file)")
    try:
        obj: Any = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files
        raise KdforgeError(f"cannot read {str(p)!r} as a torch checkpoint ({type(e).__name__})") from None
    if isinstance(obj, dict) and not all(isinstance(v, Tensor) for v in obj.values()):
        keys = [key] if key else ["ema_model", "net_model", "model", "state_dict"]
        found = next((k for k in keys if k in obj), None)
        if found is None:
            raise KdforgeError(f"{str(p)!r} holds {sorted(obj)[:6]}, none of {keys}; pass key=...")
        obj = obj[found]
    sd = {k.removeprefix("module."): v for k, v in obj.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in sd and k not in ("grid", "steps")]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise KdforgeError(f"{str(p)!r} does not fit this ddpm_unet: missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]} (check ch, ch_mult, attn, num_res_blocks, T)")
    bad = [k for k in sd if sd[k].shape != own[k].shape]
    if bad:
        raise KdforgeError(f"{str(p)!r}: shape of {bad[0]!r} is {tuple(sd[bad[0]].shape)}, this model has "
                           f"{tuple(own[bad[0]].shape)} (check ch, ch_mult, T)")
    model.load_state_dict({**own, **sd})
    if steps is not None:
        model.steps.fill_(steps)
    return model


# -- diffusers ------------------------------------------------------------------------------------------------


class DiffusersDenoiser(Denoiser):
    """A ``diffusers`` UNet2DModel as a kdforge denoiser: f(z, i) = unet(z, i).sample (optional extra)."""

    def __init__(self, unet: nn.Module, grid: int = 1000, prediction: str = "eps") -> None:
        super().__init__(grid, prediction)
        self.unet = unet

    def forward(self, z: Tensor, t: Tensor) -> Tensor:
        return self.unet(z, t).sample


@MODELS.register("diffusers_unet")
def diffusers_unet(num_classes: int = 0, in_chans: int = 3, path: str | None = None, config: dict | None = None,
                   grid: int = 1000, prediction: str = "eps") -> DiffusersDenoiser:
    """A diffusers UNet2DModel from a local folder (``path``) or a config dict (random init); needs ``diffusers``."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise KdforgeError("the diffusers adapter needs the optional extra: pip install 'kdforge[diffusers]'") from None
    if path is not None:
        unet = UNet2DModel.from_pretrained(path, local_files_only=True)
    else:
        unet = UNet2DModel(**{"in_channels": in_chans, "out_channels": in_chans, **(config or {})})
    return DiffusersDenoiser(unet, grid, prediction)
