"""How big a model is by the budget's measure (params, FLOPs, prunable layers, measured latency)."""

from __future__ import annotations

import statistics
import time
from typing import Any

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


def int8_parent_fraction(fraction: float, gain: float) -> float:
    """The latency fraction a float parent may have so that its int8 copy is expected to fit ``fraction``.

    ``gain`` is the measured speed-up of the original's own int8 copy over the original (same runtime, same
    batch); the int8 copy of a parent at ``fraction * gain`` is expected at ``fraction``. Only an estimate for
    choosing parents: every int8 copy is judged by its own measured latency (:func:`runtime_ratio`).
    """
    if gain <= 0:
        raise ValueError(f"int8 gain must be positive, got {gain}")
    return min(1.0, fraction * gain)


def runtime_ratio(faster_values: dict[str, Any], batch: int) -> float:
    """A gated model's latency over the original's at ``batch``, from its ``faster`` check (same runtime,
    interleaved rounds): how a latency budget is judged for a model that only runs in that runtime (int8)."""
    speed = faster_values.get("speedup", {})
    if str(batch) not in speed:
        raise ValueError(f"the gate timed batch sizes {sorted(speed, key=int)}, not the budget's batch {batch}")
    return 1.0 / float(speed[str(batch)])
