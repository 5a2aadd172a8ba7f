"""EMA weights as an engine option (``train.ema``): diffusion teachers and many recipes evaluate them."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from kdforge.config import EmaConfig


class Ema:
    """An exponential moving average of a model's parameters and floating buffers: ema ← d·ema + (1−d)·w.

    With ``warmup`` the decay of update n (from 0) is ``min(d, (1 + n) / (10 + n))`` (TensorFlow's
    ``num_updates`` rule), so the first updates mostly copy the weights instead of keeping the random start.
    """

    def __init__(self, model: nn.Module, cfg: EmaConfig) -> None:
        self.cfg = cfg
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights."""
        d = self.decay(self.updates)
        for e, w in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
            if e.dtype.is_floating_point:
                e.lerp_(w.detach(), 1 - d)
            else:
                e.copy_(w)
        self.updates += 1

    def decay(self, n: int) -> float:
        """The decay used at update ``n`` (counted from 0)."""
        d = self.cfg.decay
        return min(d, (1 + n) / (10 + n)) if getattr(self.cfg, "warmup", False) else d

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights and the update count."""
        return {"weights": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                "updates": self.updates}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.model.load_state_dict(st["weights"])
        self.updates = int(st["updates"])
