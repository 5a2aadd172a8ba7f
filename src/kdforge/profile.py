"""Parameters, FLOPs and CPU latency of a model."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class Profile:
    """Size and speed of a model for one input shape."""

    params: int
    flops: int
    latency_ms: float
    batch_size: int

    def row(self) -> dict[str, float]:
        return {"params_M": self.params / 1e6, "MFLOPs": self.flops / 1e6, "latency_ms": self.latency_ms}


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        if not trainable_only or p.requires_grad:
            seen[id(p)] = p.numel()
    return sum(seen.values())


@torch.no_grad()
def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass (torch's flop counter: a multiply-add counts 2) for one sample."""
    was = model.training
    model.eval()
    x = torch.zeros(1, *input_shape, device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as fc:
        model(x)
    model.train(was)
    return int(fc.get_total_flops())


@torch.no_grad()
def measure_latency(model: nn.Module, input_shape: tuple[int, ...], batch_size: int = 1,
                    warmup: int = 5, repeats: int = 30) -> float:
    """Median wall time (ms) of a forward pass at ``batch_size`` on the model's device."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    x = torch.randn(batch_size, *input_shape, device=dev)
    times = []
    for i in range(warmup + repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    model.train(was)
    return 1000 * statistics.median(times)


def profile(model: nn.Module, input_shape: tuple[int, ...], batch_size: int = 1, repeats: int = 30) -> Profile:
    """Params, FLOPs per sample and median latency at ``batch_size``."""
    return Profile(count_params(model), count_flops(model, input_shape),
                   measure_latency(model, input_shape, batch_size, repeats=repeats), batch_size)
