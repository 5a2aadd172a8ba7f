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


@torch.no_grad()
def latency_ratio(model: nn.Module, reference: nn.Module, shape: tuple[int, ...], batch: int, rounds: int = 7
                  ) -> float:
    """Median eager latency of ``model`` over ``reference``'s, measured interleaved (A B, B A, ...)."""
    x = torch.randn(batch, *shape)
    pair = [model.eval(), reference.eval()]
    for m in pair:
        m(x)
    times: list[list[float]] = [[], []]
    for r in range(rounds):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            pair[i](x)
            times[i].append(time.perf_counter() - t0)
    return statistics.median(times[0]) / statistics.median(times[1])


def measure(model: nn.Module, metric: str, shape: tuple[int, ...], layers: int | None = None,
            latency_batch: int = 64, reference: nn.Module | None = None) -> float:
    """The model's size by ``metric``; ``layers`` is the count of prunable units it holds (depth candidates).

    ``latency`` with a ``reference`` is the ratio to the reference's latency, measured interleaved with it
    (a one-off measurement of the original would carry the machine's drift into every comparison).
    """
    if metric == "params":
        return float(count_params(model))
    if metric == "flops":
        return float(count_flops(model, shape))
    if metric == "layers":
        if layers is None:
            raise ValueError("layers needs the unit count")
        return float(layers)
    if reference is not None:
        return latency_ratio(model, reference, shape, latency_batch)
    return torch_latency_ms(model, shape, latency_batch)
