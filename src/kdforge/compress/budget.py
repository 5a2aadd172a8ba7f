"""How big a model is by the budget's measure (params, FLOPs, prunable layers, measured latency)."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from kdforge.profile import count_flops, count_params


@torch.no_grad()
def torch_latency_ms(model: nn.Module, shape: tuple[int, ...], batch: int, repeats: int = 7) -> float:
    """Median eager forward time (ms) at ``batch`` (after three warm-up calls)."""
    model.eval()
    x = torch.randn(batch, *shape)
    for _ in range(3):
        model(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def measure(model: nn.Module, metric: str, shape: tuple[int, ...], layers: int | None = None,
            latency_batch: int = 64) -> float:
    """The model's size by ``metric``; ``layers`` is the count of prunable units it holds (depth candidates)."""
    if metric == "params":
        return float(count_params(model))
    if metric == "flops":
        return float(count_flops(model, shape))
    if metric == "layers":
        if layers is None:
            raise ValueError("layers needs the unit count")
        return float(layers)
    return torch_latency_ms(model, shape, latency_batch)
