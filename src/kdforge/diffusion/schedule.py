"""The cosine noise schedule on a discrete grid, prediction types, DDIM steps and the PD target."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from kdforge.errors import KdforgeError

Prediction = Literal["x", "eps", "v"]
PREDICTIONS = ("x", "eps", "v")


class CosineGrid:
    """The cosine schedule on grid indices 0..G (s = 0.008): z_i = α_i x + σ_i ε.

    ᾱ comes from β_i = 1 − ᾱ_i/ᾱ_{i−1} clamped to ≤ 0.999, so ᾱ_G ≈ 10⁻³·ᾱ_{G−1} > 0 (the code's
    construction on G+1 points). Values are held in float64; lookups return the dtype asked for.
    """

    def __init__(self, grid: int, s: float = 0.008, max_beta: float = 0.999) -> None:
        if grid < 1:
            raise KdforgeError(f"grid must be a positive number of steps, got {grid}")
        self.grid = grid
        u = torch.arange(1, grid + 2, dtype=torch.float64) / (grid + 1)  # (i+1)/(G+1), i = 0..G
        f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        raw = f / math.cos(s / (1 + s) * math.pi / 2) ** 2
        beta = torch.empty_like(raw)
        beta[0] = 1 - raw[0]
        beta[1:] = 1 - raw[1:] / raw[:-1]
        self.beta = beta.clamp(max=max_beta)
        self.alpha_bar = torch.cumprod(1 - self.beta, 0)
        self.alpha = self.alpha_bar.sqrt()
        self.sigma = (1 - self.alpha_bar).sqrt()

    def _at(self, table: Tensor, i: Tensor | int, like: Tensor) -> Tensor:
        idx = torch.as_tensor(i, device=table.device).long()
        v = table[idx].to(device=like.device, dtype=like.dtype)
        return v.view(-1, *([1] * (like.ndim - 1))) if v.ndim else v

    def alpha_at(self, i: Tensor | int, like: Tensor) -> Tensor:
        """α_i broadcast over ``like`` (a batch)."""
        return self._at(self.alpha, i, like)

    def sigma_at(self, i: Tensor | int, like: Tensor) -> Tensor:
        """σ_i broadcast over ``like`` (a batch)."""
        return self._at(self.sigma, i, like)

    def noise(self, x: Tensor, eps: Tensor, i: Tensor | int) -> Tensor:
        """z_i = α_i x + σ_i ε."""
        return self.alpha_at(i, x) * x + self.sigma_at(i, x) * eps

    def to_x(self, out: Tensor, z: Tensor, i: Tensor | int, prediction: Prediction) -> Tensor:
        """The x̂ a network output means under ``prediction`` (x, ε or v = α ε − σ x)."""
        if prediction == "x":
            return out
        a, s = self.alpha_at(i, z), self.sigma_at(i, z)
        if prediction == "eps":
            return (z - s * out) / a
        return a * z - s * out

    def eps_from_x(self, x_hat: Tensor, z: Tensor, i: Tensor | int) -> Tensor:
        """ε̂ = (z − α x̂)/σ."""
        return (z - self.alpha_at(i, z) * x_hat) / self.sigma_at(i, z)

    def ddim_step(self, z: Tensor, x_hat: Tensor, a: Tensor | int, b: Tensor | int) -> Tensor:
        """One deterministic DDIM step (η = 0) from grid a to grid b: z_b = α_b x̂ + σ_b ε̂."""
        eps = self.eps_from_x(x_hat, z, a)
        return self.alpha_at(b, z) * x_hat + self.sigma_at(b, z) * eps

    def pd_target(self, z: Tensor, z2: Tensor, a: Tensor | int, a2: Tensor | int) -> Tensor:
        """The x̃ whose single DDIM step a→a2 from z lands on z2 (the teacher's two-step result)."""
        ratio = self.sigma_at(a2, z) / self.sigma_at(a, z)
        return (z2 - ratio * z) / (self.alpha_at(a2, z) - ratio * self.alpha_at(a, z))


def sampling_grid(grid: int, steps: int) -> list[int]:
    """The grid indices a DDIM sampler with ``steps`` steps visits, from G down to 0."""
    if steps < 1 or steps > grid:
        raise KdforgeError(f"steps must be in 1..{grid} (the grid), got {steps}")
    return [round(grid * k / steps) for k in range(steps, -1, -1)]
