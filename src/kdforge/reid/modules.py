"""PDM's building blocks: phase perturbation, SNA, the MFA fusion blocks (CNL + PNL), MFGM (with CBAM) and PLM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def phase_only(x: Tensor) -> Tensor:
    """ph(x) = Re(IFFT2(exp(j·angle(FFT2(x))))): the image with unit amplitude and its own phase, per channel."""
    spec = torch.fft.fft2(x.float())
    return torch.fft.ifft2(torch.exp(1j * torch.angle(spec))).real.to(x.dtype)


def phase_perturb(x: Tensor, alpha: float = 0.8) -> Tensor:
    """x + α·ph(x): the training-time input perturbation (not applied at test, as in the original)."""
    return x + alpha * phase_only(x)


def sna(x: Tensor, lam: float = 1e-4) -> Tensor:
    """Parameter-free SimAM-like attention: x · σ(t² / (4(v + λ)) + ½), t = x − mean_HW, v = Σt²/(HW − 1)."""
    n = x.shape[-2] * x.shape[-1]
    t = (x - x.mean(dim=(-2, -1), keepdim=True)).pow(2)
    v = t.sum(dim=(-2, -1), keepdim=True) / max(n - 1, 1)
    return x * torch.sigmoid(t / (4 * (v + lam)) + 0.5)


class SNA(nn.Module):
    """:func:`sna` as a module (no parameters)."""

    def __init__(self, lam: float = 1e-4) -> None:
        super().__init__()
        self.lam = lam

    def forward(self, x: Tensor) -> Tensor:
        return sna(x, self.lam)


def _zero_bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    nn.init.zeros_(bn.weight)
    nn.init.zeros_(bn.bias)
    return bn


class CNL(nn.Module):
    """Channel non-local: a d×d channel affinity of the high map and the low map, added back (starts as identity)."""

    def __init__(self, high: int, low: int, stride: int) -> None:
        super().__init__()
        self.d = low
        self.theta = nn.Conv2d(high, low, 1)
        self.phi = nn.Conv2d(low, low, 1, stride=stride)
        self.g = nn.Conv2d(low, low, 1)
        self.w = nn.Sequential(nn.Conv2d(low, high, 1, stride=stride), _zero_bn(high))

    def forward(self, h: Tensor, low: Tensor) -> Tensor:
        b = h.shape[0]
        theta = self.theta(h).flatten(2)                        # [B, d, N_h]
        phi = self.phi(low).flatten(2)                          # [B, d, N_h]
        g = self.g(low).flatten(2)                              # [B, d, N_l]
        a = theta @ phi.transpose(1, 2) / self.d                # [B, d, d], no softmax
        y = (a @ g).view(b, self.d, *low.shape[-2:])
        return h + self.w(y)


class PNL(nn.Module):
    """Position non-local (reduction 2). ``raw_reshape``: the released code's [d/2, N] → [d, N/2] reinterpretation."""

    def __init__(self, high: int, low: int, raw_reshape: bool = False) -> None:
        super().__init__()
        self.d = low // 2
        self.raw = raw_reshape
        self.theta = nn.Conv2d(high, self.d, 1)
        self.phi = nn.Conv2d(low, self.d, 1)
        self.g = nn.Conv2d(low, self.d, 1)
        self.w = nn.Sequential(nn.Conv2d(self.d, high, 1), _zero_bn(high))

    def forward(self, z: Tensor, low: Tensor) -> Tensor:
        b, _, hh, wh = z.shape
        theta, phi, g = self.theta(z), self.phi(low), self.g(low)
        if self.raw:
            d2 = 2 * self.d
            theta = theta.reshape(b, d2, -1)                    # [B, d, N_h/2]: merges pairs of positions
            phi = phi.reshape(b, d2, -1)
            g = g.reshape(b, d2, -1)
            a = theta.transpose(1, 2) @ phi / phi.shape[-1]     # [B, N_h/2, N_l/2]
            y = (a @ g.transpose(1, 2)).transpose(1, 2).reshape(b, self.d, hh, wh)
        else:
            theta, phi, g = theta.flatten(2), phi.flatten(2), g.flatten(2)
            a = theta.transpose(1, 2) @ phi / phi.shape[-1]     # [B, N_h, N_l]
            y = (a @ g.transpose(1, 2)).transpose(1, 2).reshape(b, self.d, hh, wh)
        return z + self.w(y)


class MFA(nn.Module):
    """DEEN's fusion block: MFA(h, l) = PNL(CNL(h, l), l)."""

    def __init__(self, high: int, low: int, stride: int, raw_reshape: bool = False) -> None:
        super().__init__()
        self.cnl = CNL(high, low, stride)
        self.pnl = PNL(high, low, raw_reshape)

    def forward(self, h: Tensor, low: Tensor) -> Tensor:
        return self.pnl(self.cnl(h, low), low)


class CBAM(nn.Module):
    """Channel then spatial attention with a residual: CBAM(u) = u·ca·sa + u."""

    def __init__(self, c: int, reduction: int = 16, kernel: int = 49) -> None:
        super().__init__()
        mid = max(c // reduction, 1)
        self.mlp = nn.Sequential(nn.Conv2d(c, mid, 1, bias=False), nn.ReLU(inplace=True),
                                 nn.Conv2d(mid, c, 1, bias=False))
        self.spatial = nn.Conv2d(2, 1, kernel, padding=kernel // 2)

    def forward(self, u: Tensor) -> Tensor:
        ca = torch.sigmoid(self.mlp(F.adaptive_max_pool2d(u, 1)) + self.mlp(F.adaptive_avg_pool2d(u, 1)))
        u2 = u * ca
        sa = torch.sigmoid(self.spatial(torch.cat([u2.amax(1, keepdim=True), u2.mean(1, keepdim=True)], 1)))
        return u2 * sa + u


class Generator(nn.Module):
    """One MFGM branch: mean of three dilated 3×3 convs (C → C/4), CBAM, ReLU, 1×1 conv back to C."""

    def __init__(self, c: int, kernel: int = 49) -> None:
        super().__init__()
        q = max(c // 4, 1)
        self.dil = nn.ModuleList([nn.Conv2d(c, q, 3, padding=r, dilation=r, bias=False) for r in (1, 2, 3)])
        for conv in self.dil:
            nn.init.kaiming_normal_(conv.weight, mode="fan_in")
        self.cbam = CBAM(q, 16, kernel)  # shared MLP C/4 → C/64 → C/4
        self.out = nn.Conv2d(q, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        u = sum(d(x) for d in self.dil) / 3
        return self.out(F.relu(self.cbam(u)))


class MFGM(nn.Module):
    """Multi-feature generation: [x, G1(x), G2(x)] stacked along the batch (3× the input), dropout 0.01."""

    def __init__(self, c: int, branches: int = 2, kernel: int = 49, dropout: float = 0.01) -> None:
        super().__init__()
        self.gens = nn.ModuleList([Generator(c, kernel) for _ in range(branches)])
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(torch.cat([x, *(g(x) for g in self.gens)], 0))


class PLM(nn.Module):
    """Prototype learning: S = σ(Q (X + E)ᵀ) ∈ (0,1)^{P×HW}, Z = S X / HW flattened to P·C."""

    def __init__(self, c: int, hw: int, prototypes: int) -> None:
        super().__init__()
        self.q = nn.Parameter(torch.empty(prototypes, c))
        self.pos = nn.Parameter(torch.empty(hw, c))
        nn.init.kaiming_normal_(self.q)
        nn.init.kaiming_normal_(self.pos)
        self.hw = hw

    def forward(self, f: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (Z [B, P·C], S [B, P, HW]) of a feature map [B, C, H, W]."""
        x = f.flatten(2).transpose(1, 2)                         # [B, HW, C]
        if x.shape[1] != self.hw:
            raise ValueError(f"PLM was built for {self.hw} positions, got a {f.shape[-2]}x{f.shape[-1]} map "
                             "(the positional embedding fixes the input size)")
        s = torch.sigmoid(self.q @ (x + self.pos).transpose(1, 2))  # [B, P, HW]
        z = s @ x / self.hw                                      # [B, P, C]
        return z.flatten(1), s
