"""What benchmarks share: cached teacher runs, seeds, mean ± std tables, charts fitted to the data."""

from __future__ import annotations

import functools
import hashlib
import json
import os
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


#: a mean this many robust spreads (1.4826 · MAD of the means, at least the median std) from the median is off scale
OFF_SCALE = 8.0


def chart_range(means: Sequence[float], stds: Sequence[float],
                baseline: float | None = None) -> tuple[float, float, list[int]]:
    """The value axis of a chart of means ± stds, fitted to the data (never from 0): ``(lo, hi, off)``.

    Entries whose mean lies far from the rest (``off``, e.g. a data-free method 56 points below every other row)
    are left off the axis, so that they do not squeeze the differences between the others into a line; the chart
    marks them at its edge with their value.
    """
    med = statistics.median(means)
    mad = statistics.median(abs(m - med) for m in means) * 1.4826
    spread = max(mad, statistics.median(stds), 1e-9)
    off = [i for i, m in enumerate(means) if abs(m - med) > OFF_SCALE * spread]
    if len(off) * 2 >= len(means):  # no clear majority: show everything
        off = []
    keep = [i for i in range(len(means)) if i not in off]
    lows = [means[i] - stds[i] for i in keep] + ([baseline] if baseline is not None else [])
    highs = [means[i] + stds[i] for i in keep] + ([baseline] if baseline is not None else [])
    lo, hi = min(lows), max(highs)
    pad = max(0.12 * (hi - lo), 0.5)
    return lo - pad, hi + pad, off


def bar_chart(labels: Sequence[str], means: Sequence[float], stds: Sequence[float], path: str | Path,
              ylabel: str = "test top-1 (%)", title: str = "", baseline: float | None = None) -> Path:
    """Means ± stds as points with error bars on an axis fitted to the data (:func:`chart_range`), with an
    optional dashed baseline and, beside it, a second axis of the gain over the baseline; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi, off = chart_range(means, stds, baseline)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(labels) + 2), 4.2))
    keep = [i for i in range(len(labels)) if i not in off]
    # points, not bars: the axis does not start at 0, so a bar's length would mislead
    ax.errorbar(keep, [means[i] for i in keep], yerr=[stds[i] for i in keep], fmt="o", capsize=3,
                color="#4C72B0", label="mean ± std")
    for i in off:  # far off the scale: a marker at the edge, with the value written
        below = means[i] < lo
        edge = lo + 0.03 * (hi - lo) if below else hi - 0.03 * (hi - lo)
        ax.plot([i], [edge], marker="v" if below else "^", ls="none", color="#C44E52", ms=8,
                label="off scale (value written)" if i == off[0] else None)
        ax.annotate(f"{means[i]:.1f}\n± {stds[i]:.1f}", (i, edge), textcoords="offset points",
                    xytext=(0, 8 if below else -22), ha="center", fontsize=7, color="#C44E52")
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="k", lw=1, label=f"baseline ({baseline:.2f})")
        gain = ax.secondary_yaxis("right", functions=(lambda y: y - baseline, lambda d: d + baseline))
        gain.set_ylabel("Δ vs baseline (points)")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_ylim(lo, hi)  # fitted to the data: the differences show, not the distance from 0
    ax.set(ylabel=ylabel + " (axis not from 0)", title=title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")  # the chart's one legend
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
    n = torch.get_num_threads()
    return (f"{platform.processor() or platform.machine()}, {cores} CPU cores{pinned}, "
            f"torch {torch.__version__}, {n} thread{'' if n == 1 else 's'}")


def write_json(path: str | Path, data: Any) -> None:
    """Write raw benchmark results next to the table, for re-plotting."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2))


BENCH_ROOT = Path("runs/bench")
PUBLISHED = Path("docs/benchmarks")
ANALYSIS_START, ANALYSIS_END = "<!-- analysis:start -->", "<!-- analysis:end -->"


def bench_dir(name: str, out: str | Path | None = None) -> Path:
    """Where a bench writes: ``out`` if given, else ``runs/bench/<name>`` (never the published docs)."""
    return Path(out) if out is not None else BENCH_ROOT / name


def prepare_bench_dir(dest: Path) -> Path:
    """Create ``dest`` and prove it writable, so that a bad ``--out`` fails before hours of benchmarking."""
    from kdforge.engine.run_dir import check_writable_dir
    from kdforge.errors import KdforgeError

    check_writable_dir(dest, "bench output folder")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        probe = dest / f".kdforge-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise KdforgeError(f"bench output folder {str(dest)!r} is not writable ({e.strerror or e}); "
                           "choose another with --out") from None
    return dest


#: what a ``--quick`` bench says in the terminal, before and after its numbers
SMOKE_NOTE = ("smoke run (--quick): a tiny budget, so its numbers (often at chance level) say nothing about the "
              "methods; the page and charts are marked as such. Drop --quick for the real benchmark.")


def run_bench(name: str, out: str | Path | None = None, quick: bool = False, publish: bool = False,
              overwrite: bool = False) -> Path:
    """The one rule for every bench: write to ``runs/bench/NAME`` (or ``out``); ``publish`` updates the docs.

    The folder is a run folder of kind ``bench`` (:func:`kdforge.engine.run_dir.open_run`), locked while the
    bench runs: a bench folder is rerun in place; any other existing folder is refused unless ``overwrite``.
    """
    from kdforge.bench import load_benches
    from kdforge.engine.run_dir import open_run
    from kdforge.errors import KdforgeError

    fn = load_benches().get(name)
    if quick and publish:
        raise KdforgeError("--quick is a smoke run and is never published; drop --quick to publish, "
                           "or drop --publish to keep the smoke run in runs/bench")
    if publish and not PUBLISHED.is_dir():
        raise KdforgeError(f"--publish updates {str(PUBLISHED)!r} of a kdforge checkout, which is not here; "
                           "run it from the repository root")
    dest = bench_dir(name, out)
    flags = " --quick" if quick else " --publish" if publish else ""
    with open_run(dest, "bench", resume="auto", overwrite=overwrite, legacy=lambda p: bool(bench_files(name, p)),
                  resume_cmd=f"kdforge bench {name}{flags}" + (f" -o {out}" if out is not None else "")):
        prepare_bench_dir(dest)
        if quick:
            print(SMOKE_NOTE, flush=True)
        fn(out=dest, quick=quick)
        if quick:
            label_smoke_run(dest, name)
            print(SMOKE_NOTE, flush=True)  # again below the numbers it qualifies
        if publish:
            publish_bench(name, dest)
    return dest


def bench_files(name: str, directory: Path) -> list[Path]:
    """A bench's outputs in ``directory``: NAME.md, NAME.json, NAME.png and NAME-*.png."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and (
        p.name in (f"{name}.md", f"{name}.json", f"{name}.png")
        or (p.name.startswith(f"{name}-") and p.suffix == ".png")))


def label_smoke_run(directory: Path, name: str) -> None:
    """Mark a quick run's table title and charts as a smoke run, so that nobody mistakes them for results."""
    md = directory / f"{name}.md"
    if md.is_file():
        lines = md.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("# ") and "smoke run" not in line.lower():
                lines[i] = f"{line} (smoke run)"
                break
        md.write_text("\n".join(lines) + "\n")
    for png in (p for p in bench_files(name, directory) if p.suffix == ".png"):
        _stamp(png, "smoke run (--quick): not a result")


def _stamp(png: Path, text: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = plt.imread(png)
    h, w = img.shape[:2]
    fig = plt.figure(figsize=(w / 100, h / 100), dpi=100)
    fig.figimage(img, 0, 0)
    fig.text(0.01, 0.99, text, color="#C00000", fontsize=10, fontweight="bold", va="top", ha="left",
             bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "#C00000"})
    fig.savefig(png, dpi=100)
    plt.close(fig)


def analysis_block(text: str) -> str | None:
    """The hand-written block between the analysis markers of a page (markers included), if any."""
    a, b = text.find(ANALYSIS_START), text.find(ANALYSIS_END)
    if a < 0 or b < a:
        return None
    return text[a: b + len(ANALYSIS_END)]


def merge_analysis(new: str, old: str | None) -> str:
    """The new generated page with the old page's analysis block kept (an empty block if there was none)."""
    keep = analysis_block(old or "") or f"{ANALYSIS_START}\n{ANALYSIS_END}"
    cur = analysis_block(new)
    if cur is not None:
        return new.replace(cur, keep)
    return new.rstrip("\n") + "\n\n" + keep + "\n"


def publish_bench(name: str, source: Path, docs: Path | None = None) -> list[Path]:
    """Copy a finished bench's outputs into the docs; the page's analysis block is never overwritten."""
    import shutil

    from kdforge.errors import KdforgeError

    docs = docs or PUBLISHED
    files = bench_files(name, source)
    if not any(p.suffix == ".md" for p in files):
        raise KdforgeError(f"nothing to publish: {str(source / (name + '.md'))!r} was not written")
    out = []
    for p in files:
        target = docs / p.name
        if p.suffix == ".md":
            old = target.read_text() if target.is_file() else None
            target.write_text(merge_analysis(p.read_text(), old))
        else:
            shutil.copyfile(p, target)
        out.append(target)
    return out
