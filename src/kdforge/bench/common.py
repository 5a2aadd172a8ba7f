"""What benchmarks share: cached teacher runs, seeds, mean ± std tables, bar charts."""

from __future__ import annotations

import functools
import hashlib
import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from kdforge.config import Recipe
from kdforge.engine.trainer import FitResult

F = TypeVar("F", bound=Callable[..., Any])


def restores_threads(fn: F) -> F:
    """Decorate a bench: torch's thread count is put back afterwards (runs inside may set it per process)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        threads = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper  # type: ignore[return-value]


def recipe_hash(recipe: Recipe) -> str:
    """A short stable hash of a resolved recipe (what a cached run is keyed by)."""
    return hashlib.sha256(recipe.model_dump_json().encode()).hexdigest()[:12]


def cached_run(recipe: Recipe, cache_root: str | Path = "runs/cache") -> Path:
    """Train ``recipe`` once into ``cache_root/<name>-<hash>``; later calls reuse the finished run."""
    from kdforge.run import train

    run = Path(cache_root) / f"{recipe.name}-{recipe_hash(recipe)}"
    if not (run / "results.json").is_file():
        train(recipe, run, overwrite=True)
    return run


def cached_teacher(recipe: Recipe, cache_root: str | Path = "runs/cache") -> Path:
    """Checkpoint path (last epoch) of a teacher trained once per recipe hash."""
    return cached_run(recipe, cache_root) / "checkpoints" / "last.safetensors"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    vals = list(values)
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def fmt_mean_std(values: Sequence[float], digits: int = 2) -> str:
    """'mean ± std' of a list of numbers."""
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of dict rows (columns default to the first row's keys)."""
    cols = list(columns or (rows[0].keys() if rows else []))
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def _cell(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def bar_chart(labels: Sequence[str], means: Sequence[float], stds: Sequence[float], path: str | Path,
              ylabel: str = "test top-1 (%)", title: str = "", baseline: float | None = None) -> Path:
    """A bar chart with error bars (and an optional dashed baseline), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(labels) + 2), 4))
    ax.bar(range(len(labels)), means, yerr=stds, capsize=3, color="#4C72B0")
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="k", lw=1, label="baseline")
        ax.legend()
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    lo = min(m - s for m, s in zip(means, stds, strict=True))
    hi = max(m + s for m, s in zip(means, stds, strict=True))
    ax.set_ylim(lo - 0.15 * (hi - lo + 1), hi + 0.15 * (hi - lo + 1))
    ax.set(ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def result_summary(res: FitResult) -> dict[str, float]:
    """Best-by-val and last-epoch test top-1 of one run, and its mean epoch time."""
    times = [h["epoch_time_s"] for h in res.history if "epoch_time_s" in h]
    return {"best": res.test_best["top1"], "last": res.test_last["top1"],
            "epoch_s": statistics.fmean(times) if times else 0.0}


def machine_note() -> str:
    """One line naming the machine a benchmark ran on."""
    import os
    import platform

    import torch

    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    pinned = f" ({usable} usable by this process)" if usable != cores else ""
    return (f"{platform.processor() or platform.machine()}, {cores} CPU cores{pinned}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def write_json(path: str | Path, data: Any) -> None:
    """Write raw benchmark results next to the table, for re-plotting."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2))
