"""SpecAugment as the EPIC-SOUNDS baseline applies it: time warp, 2 frequency masks, 2 time masks.

Masked cells take the mean of the whole (current) spectrogram. ``faithful=True`` reproduces the baseline's
quirks: the warp *position* is a spectrogram *value* (not an index), a mask's width is a second draw below
the first, and a zero-width draw ends that kind of masking early. ``faithful=False`` fixes all three.
Randomness comes from a ``random.Random`` the caller passes, so a seed makes it deterministic.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor


class SpecAugment:
    """Augment a ``[C, T, F]`` spectrogram (the front end's layout)."""

    def __init__(self, warp: int = 5, freq_width: int = 27, freq_masks: int = 2, time_width: int = 25,
                 time_masks: int = 2, faithful: bool = True) -> None:
        self.warp, self.freq_width, self.freq_masks = warp, freq_width, freq_masks
        self.time_width, self.time_masks, self.faithful = time_width, time_masks, faithful

    def __call__(self, spec: Tensor, rng: random.Random) -> Tensor:
        x = spec.clone()
        if self.warp > 0:
            x = self.time_warp(x, rng)
        x = self._masks(x, rng, axis=-1, width=self.freq_width, count=self.freq_masks)
        return self._masks(x, rng, axis=-2, width=self.time_width, count=self.time_masks)

    def time_warp(self, x: Tensor, rng: random.Random) -> Tensor:
        """Move time position ``p`` to ``p + d`` (``d`` in ``[-W, W)``), stretching both sides linearly."""
        t, w = x.shape[-2], self.warp
        if t <= 2 * w + 2:
            return x
        if self.faithful:
            centre = x[0, :, x.shape[-1] // 2]  # the baseline reads the middle mel band over time ...
            p = float(centre[rng.randrange(w, t - w)])  # ... and uses its value as the position
        else:
            p = float(rng.randrange(w, t - w))
        d = rng.randrange(-w, w)
        p = min(max(p, 1.0), t - 2.0)
        q = min(max(p + d, 1.0), t - 2.0)
        out_t = torch.arange(t, dtype=torch.float64)
        src = torch.where(out_t <= q, out_t * p / q, p + (out_t - q) * (t - 1 - p) / (t - 1 - q))
        lo = src.floor().long().clamp(0, t - 1)
        hi = (lo + 1).clamp(max=t - 1)
        frac = (src - lo.to(torch.float64)).to(x.dtype)[:, None]
        return x[..., lo, :] * (1 - frac) + x[..., hi, :] * frac

    def _masks(self, x: Tensor, rng: random.Random, axis: int, width: int, count: int) -> Tensor:
        size = x.shape[axis]
        for _ in range(count):
            if width < 1 or size < 2:
                return x
            f = rng.randrange(0, min(width, size))
            f0 = rng.randrange(0, size - f)
            if f == 0:
                if self.faithful:
                    return x  # the baseline stops masking at the first zero-width draw
                continue
            end = rng.randrange(f0, f0 + f) if self.faithful else f0 + f
            idx = [slice(None)] * x.dim()
            idx[axis] = slice(f0, end)
            x[tuple(idx)] = x.mean()
        return x
