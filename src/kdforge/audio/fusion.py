"""Late (score-level) fusion of several models' per-segment scores, and the search of its weights.

AcieLee fuse ``S = (0.10 P1 + 0.40 P2 + 0.25 P3 + 0.25 P4) / 4`` where ``Pi`` is model i's sum of 5-crop
softmax probabilities: score fusion, not an average of checkpoints' weights. The weights here are
searched on a validation split (never the test split) over a grid on the simplex.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np

from kdforge.audio.metrics import mean_class_accuracy, topk_accuracy
from kdforge.errors import KdforgeError

PUBLISHED_WEIGHTS = (0.10, 0.40, 0.25, 0.25)


def fuse(scores: Sequence[np.ndarray], weights: Sequence[float], scale: float = 1.0) -> np.ndarray:
    """``scale * sum_i w_i scores_i`` (AcieLee's code uses ``scale = 1/4``, which changes no ranking)."""
    if len(scores) != len(weights) or not scores:
        raise KdforgeError(f"fusion needs one weight per model (got {len(weights)} weights for {len(scores)} models)")
    shapes = {np.asarray(s).shape for s in scores}
    if len(shapes) != 1:
        raise KdforgeError(f"fused score arrays must share one shape (got {sorted(shapes)})")
    out = np.zeros_like(np.asarray(scores[0], dtype=np.float64))
    for s, w in zip(scores, weights, strict=True):
        out += float(w) * np.asarray(s, dtype=np.float64)
    return scale * out


def simplex_grid(n: int, step: float = 0.05) -> Iterator[tuple[float, ...]]:
    """Every weight vector of ``n`` non-negative multiples of ``step`` summing to 1."""
    units = round(1 / step)
    if n < 1 or abs(units * step - 1) > 1e-9:
        raise KdforgeError(f"fusion search: step must divide 1 (got {step}) and there must be models (got {n})")
    for cuts in itertools.combinations(range(units + n - 1), n - 1):
        parts, prev = [], -1
        for c in (*cuts, units + n - 1):
            parts.append(c - prev - 1)
            prev = c
        yield tuple(p / units for p in parts)


def search_weights(val_scores: Sequence[np.ndarray], val_labels: np.ndarray, step: float = 0.05,
                   metric: str = "top1") -> tuple[tuple[float, ...], float]:
    """The grid weights with the best validation ``metric`` (``top1`` or ``mca``); ties: the other metric, then
    the weights closest to uniform. Returns (weights, value)."""
    if metric not in ("top1", "mca"):
        raise KdforgeError(f"fusion search metric {metric!r} is unknown (valid: top1, mca)")
    n = len(val_scores)
    stack = np.stack([np.asarray(s, dtype=np.float64) for s in val_scores])  # [n, N, K]
    best: tuple[float, float, float] | None = None
    best_w: tuple[float, ...] = tuple([1.0 / n] * n)
    for w in simplex_grid(n, step):
        fused = np.tensordot(np.asarray(w), stack, axes=1)
        t1, mca = topk_accuracy(fused, val_labels, 1), mean_class_accuracy(fused, val_labels)
        key = (t1, mca) if metric == "top1" else (mca, t1)
        cand = (*key, -float(np.abs(np.asarray(w) - 1.0 / n).sum()))
        if best is None or cand > best:
            best, best_w = cand, w
    assert best is not None
    return best_w, best[0]
