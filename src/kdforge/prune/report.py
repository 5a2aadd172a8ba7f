"""Pruning reports: CKA heatmap with segment boundaries, importance bars, before/after table, trade-off plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cka(cka: np.ndarray, segments: Sequence[Sequence[int]], path: str | Path, labels: Sequence[str] | None = None,
             kept: Sequence[int] | None = None, title: str = "layer CKA") -> Path:
    """Heatmap of the CKA matrix with the segment boundaries drawn (removed units marked with ×)."""
    plt = _plt()
    n = len(cka)
    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    im = ax.imshow(cka, cmap="magma", vmin=0, vmax=1, origin="upper")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="CKA")
    for seg in segments[1:]:
        b = seg[0] - 0.5
        ax.axhline(b, color="cyan", lw=1.2)
        ax.axvline(b, color="cyan", lw=1.2)
    if kept is not None:
        gone = [i for i in range(n) if i not in set(kept)]
        ax.scatter(gone, [-0.9] * len(gone), marker="x", color="red", s=18, clip_on=False, label="removed")
        ax.legend(loc="upper right", fontsize=7, bbox_to_anchor=(1.0, 1.12))
    step = max(1, n // 14)
    ticks = list(range(0, n, step))
    names = labels or [str(i) for i in range(n)]
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90, fontsize=6)
    ax.set_yticks(ticks, [names[i] for i in ticks], fontsize=6)
    ax.set_title(title)
    return _save(fig, path, plt)


def plot_importance(scores: Mapping[int, float], n_units: int, kept: Sequence[int], path: str | Path,
                    labels: Sequence[str] | None = None, ylabel: str = "score", title: str = "") -> Path:
    """Bars of per-unit scores, kept units blue and removed units grey."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * n_units + 2), 3.6))
    keep = set(kept)
    vals = [scores.get(i, np.nan) for i in range(n_units)]
    colors = ["#4C72B0" if i in keep else "#BBBBBB" for i in range(n_units)]
    ax.bar(range(n_units), np.nan_to_num(vals, nan=0.0), color=colors)
    names = labels or [str(i) for i in range(n_units)]
    ax.set_xticks(range(n_units), names, rotation=90, fontsize=6)
    ax.set(ylabel=ylabel, title=title or "unit importance (blue: kept, grey: removed)")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path, plt)


def plot_tradeoff(points: Sequence[Mapping[str, Any]], path: str | Path, x: str = "latency_ratio", y: str = "top1",
                  xlabel: str = "latency (pruned / original)", ylabel: str = "test top-1 (%)",
                  baseline: float | None = None, title: str = "") -> Path:
    """Accuracy vs latency, one line per method across keep ratios (``points``: dicts with method, x, y)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    methods = list(dict.fromkeys(p["method"] for p in points))
    for m in methods:
        pts = sorted((float(p[x]), float(p[y])) for p in points if p["method"] == m)
        ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=m)
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="k", lw=1, label="unpruned")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path, plt)


def _save(fig: Any, path: str | Path, plt: Any) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def _fmt(key: str, v: float) -> str:
    if key == "params":
        return f"{v / 1e6:.3f} M"
    if key == "flops":
        return f"{v / 1e6:.1f} M"
    if key.startswith("latency") or key in ("ppl", "top1", "loss"):
        return f"{v:.2f}"
    if key == "tokens_per_s":
        return f"{v:.0f}"
    return f"{v:.3g}"


def before_after_table(before: Mapping[str, float], after: Mapping[str, float],
                       healed: Mapping[str, float] | None = None) -> str:
    """Markdown table: each metric before and after pruning (and after healing), with the ratio."""
    cols = ["metric", "original", "pruned"] + (["pruned + healed"] if healed else []) + ["pruned / original"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for k, v in before.items():
        row = [k, _fmt(k, v), _fmt(k, after.get(k, float("nan")))]
        if healed:
            row.append(_fmt(k, healed.get(k, float("nan"))))
        row.append(f"{after.get(k, float('nan')) / v:.3f}" if v else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_prune_report(res: Any, out: str | Path) -> Path:
    """Write report.md, cka.png and importance.png of a :class:`~kdforge.prune.sglp.PruneResult`."""
    out = Path(out)
    a, sel = res.analysis, res.selection
    names = [u.name for u in a.units]
    plot_cka(a.cka, a.segmentation.segments, out / "cka.png", names, sel.kept,
             f"CKA ({res.recipe.analysis.kernel}, {res.recipe.analysis.estimator}), {a.segmentation.k} segments")
    if sel.unit_scores:
        plot_importance(sel.unit_scores, len(names), sel.kept, out / "importance.png", names,
                        ylabel=f"{sel.method} score")
    seg_lines = [f"- segment {i + 1}: {', '.join(names[j] for j in s)} → kept {res.keep_per_segment[i]}"
                 for i, s in enumerate(a.segmentation.segments)]
    t = a.cka_seconds + a.segment_seconds + sel.seconds
    text = [f"# Pruning report: {res.recipe.name}", "",
            f"Selection **{sel.method}**: kept {len(sel.kept)} of {len(names)} units "
            f"(pinned: {', '.join(names[i] for i in res.pinned) or 'none'}).", "",
            "Removed: " + (", ".join(names[i] for i in sel.removed) or "nothing"), "",
            "## Before / after", "", before_after_table(res.before, res.after, res.healed), "",
            f"Analysis time: CKA {a.cka_seconds:.1f} s, segmentation {a.segment_seconds:.3f} s, "
            f"selection {sel.seconds:.1f} s ({sel.n_evals} evaluations); total {t:.1f} s.", "",
            f"## Segments (k = {a.segmentation.k}; optimal loss per k: "
            + ", ".join(f"{v:.3g}" for v in a.segmentation.losses) + ")", "", *seg_lines, "",
            "![CKA](cka.png)", ""]
    if sel.unit_scores:
        text += ["![importance](importance.png)", ""]
    if res.heal_info:
        text += ["## Healing", "", ", ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}"
                                             for k, v in res.heal_info.items()), ""]
    p = out / "report.md"
    p.write_text("\n".join(text))
    return p
