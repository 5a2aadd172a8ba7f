"""Fisher optimal segmentation of an ordered sequence: exact DP, argmin backtrack, choice of k."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from kdforge.errors import KdforgeError

Descriptor = Literal["colsum", "row"]
Backtrack = Literal["exact", "code_compat"]


def descriptors(sim: np.ndarray, kind: Descriptor = "colsum") -> np.ndarray:
    """Per-unit descriptors of a similarity matrix: the column sum (N,) or the row vector (N, N)."""
    s = np.asarray(sim, dtype=np.float64)
    if kind == "colsum":
        return s.sum(0)
    if kind == "row":
        return s.copy()
    raise KdforgeError(f"unknown descriptor {kind!r} (valid: colsum, row)")


def _as_2d(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x[:, None] if x.ndim == 1 else x


class SegmentCost:
    """Within-segment sum of squares D(i, j) of x[i..j] (0-based, inclusive) in O(1) via prefix sums."""

    def __init__(self, x: np.ndarray) -> None:
        x = _as_2d(x)
        self.n = len(x)
        self.s1 = np.vstack([np.zeros((1, x.shape[1])), np.cumsum(x, 0)])
        self.s2 = np.concatenate([[0.0], np.cumsum((x**2).sum(1))])

    def __call__(self, i: int, j: int) -> float:
        m = j - i + 1
        if m == 1:
            return 0.0
        s = self.s1[j + 1] - self.s1[i]
        return max(0.0, float(self.s2[j + 1] - self.s2[i] - (s @ s) / m))


def direct_cost(x: np.ndarray, i: int, j: int) -> float:
    """D(i, j) computed directly from the segment mean (for checks)."""
    seg = _as_2d(x)[i: j + 1]
    return float(((seg - seg.mean(0)) ** 2).sum())


@dataclass
class DPTables:
    """L[m, k]: least loss of x[0..m-1] in k segments; A[m, k]: 0-based start of the last segment."""

    loss: np.ndarray
    argmin: np.ndarray


def fisher_dp(x: np.ndarray, k_max: int) -> DPTables:
    """Fill the DP tables for 1..k_max segments (O(k_max · N²))."""
    n = len(x)
    if n == 0:
        raise KdforgeError("nothing to segment: the sequence is empty")
    k_max = max(1, min(int(k_max), n))
    cost = SegmentCost(x)
    big = np.inf
    loss = np.full((n + 1, k_max + 1), big)
    arg = np.full((n + 1, k_max + 1), -1, dtype=np.int64)
    loss[0, 0] = 0.0
    for m in range(1, n + 1):
        loss[m, 1] = cost(0, m - 1)
        arg[m, 1] = 0
    for k in range(2, k_max + 1):
        for m in range(k, n + 1):
            best, best_j = big, -1
            for j in range(k - 1, m):  # j = 0-based start of the last segment [j, m-1]
                v = loss[j, k - 1] + cost(j, m - 1)
                if v < best:
                    best, best_j = v, j
            loss[m, k], arg[m, k] = best, best_j
    return DPTables(loss, arg)


def backtrack_exact(tables: DPTables, k: int) -> list[int]:
    """Segment start indices (0-based, first is 0) of the optimal k-partition, by argmin backtrack."""
    n = tables.loss.shape[0] - 1
    starts, m = [], n
    for kk in range(k, 1, -1):
        j = int(tables.argmin[m, kk])
        starts.append(j)
        m = j
    starts.append(0)
    return sorted(starts)


def backtrack_code_compat(tables: DPTables, k: int) -> list[int]:
    """The official code's heuristic backtrack (scan down for the first L*(m, k−1) < ℓ); may be sub-optimal."""
    n = tables.loss.shape[0] - 1
    ell = tables.loss[n, k]
    ends, m = [], n
    for kk in range(k - 1, 0, -1):
        found = None
        for mm in range(m - 1, kk - 1, -1):
            if tables.loss[mm, kk] < ell:
                found = mm
                break
        if found is None:  # keep the partition valid when the heuristic finds no boundary
            found = m - 1
        ends.append(found)
        ell, m = tables.loss[found, kk], found
    return sorted([0, *ends])


def choose_k(losses: list[float] | np.ndarray, tau: float = 0.05) -> int:
    """The code's rule: the largest k whose step from k−1 cut the loss by more than τ (stop when L = 0)."""
    ls = [float(v) for v in losses]
    k_star = 1
    for k in range(2, len(ls) + 1):
        prev, cur = ls[k - 2], ls[k - 1]
        if prev == 0:
            return k - 1
        if (prev - cur) / prev > tau:
            k_star = k
    return k_star


@dataclass
class Segmentation:
    """Contiguous segments of unit indices, the chosen k and the optimal loss for each k."""

    segments: list[list[int]]
    k: int
    losses: list[float]
    loss: float
    backtrack: str = "exact"
    descriptor: str = "colsum"
    starts: list[int] = field(default_factory=list)

    def sizes(self) -> list[int]:
        return [len(s) for s in self.segments]

    def to_json(self) -> dict:
        return {"segments": self.segments, "k": self.k, "losses": self.losses, "loss": self.loss,
                "backtrack": self.backtrack, "descriptor": self.descriptor}


def partition_loss(x: np.ndarray, starts: list[int]) -> float:
    """Loss of the partition whose segments start at ``starts``."""
    cost = SegmentCost(x)
    bounds = [*sorted(starts), len(_as_2d(x))]
    return sum(cost(bounds[i], bounds[i + 1] - 1) for i in range(len(bounds) - 1))


def segment(x: np.ndarray, n_segments: int | Literal["auto"] = "auto", k_max: int = 6, tau: float = 0.05,
            backtrack: Backtrack = "exact", descriptor: str = "") -> Segmentation:
    """Fisher optimal segmentation of ``x`` ((N,) or (N, d)) into ``n_segments`` (or the auto-chosen k)."""
    n = len(x)
    if n_segments == "auto":
        tables = fisher_dp(x, k_max)
        kk = tables.loss.shape[1] - 1
        losses = [float(tables.loss[n, k]) for k in range(1, kk + 1)]
        k = choose_k(losses, tau)
    else:
        k = int(n_segments)
        if not 1 <= k <= n:
            raise KdforgeError(f"n_segments must be between 1 and the number of units ({n}), got {k}")
        tables = fisher_dp(x, k)
        losses = [float(tables.loss[n, kk]) for kk in range(1, k + 1)]
    if backtrack == "exact":
        starts = backtrack_exact(tables, k)
    elif backtrack == "code_compat":
        starts = backtrack_code_compat(tables, k)
    else:
        raise KdforgeError(f"unknown backtrack {backtrack!r} (valid: exact, code_compat)")
    bounds = [*starts, n]
    segs = [list(range(bounds[i], bounds[i + 1])) for i in range(len(starts))]
    return Segmentation(segs, k, losses, partition_loss(x, starts), backtrack, descriptor, starts)
