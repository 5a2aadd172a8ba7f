"""Fisher optimal segmentation: DP equals brute force, backtracking, k-selection, code_compat."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kdforge.errors import KdforgeError
from kdforge.prune.segment import (
    SegmentCost,
    backtrack_code_compat,
    backtrack_exact,
    choose_k,
    descriptors,
    direct_cost,
    fisher_dp,
    partition_loss,
    segment,
)


def _brute(x: np.ndarray, k: int) -> float:
    n = len(x)
    return min(partition_loss(x, [0, *cuts]) for cuts in itertools.combinations(range(1, n), k - 1))


@pytest.mark.parametrize("vector", [False, True])
def test_dp_equals_brute_force(vector: bool) -> None:
    rng = np.random.default_rng(0)
    for _ in range(25):
        n = int(rng.integers(2, 11))
        x = rng.normal(size=(n, 3)) if vector else rng.normal(size=n) * rng.uniform(0.5, 5)
        kmax = min(4, n)
        t = fisher_dp(x, kmax)
        for k in range(1, kmax + 1):
            best = _brute(x, k)
            assert t.loss[n, k] == pytest.approx(best, abs=1e-9)
            starts = backtrack_exact(t, k)
            assert len(starts) == k
            assert partition_loss(x, starts) == pytest.approx(best, abs=1e-9)


def test_dp_table_properties() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=9)
    t = fisher_dp(x, 9)
    assert t.loss[9, 1] == pytest.approx(((x - x.mean()) ** 2).sum())
    assert t.loss[9, 9] == pytest.approx(0.0, abs=1e-12)
    ls = [t.loss[9, k] for k in range(1, 10)]
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(ls))


def test_segments_contiguous_cover() -> None:
    rng = np.random.default_rng(2)
    for k in (1, 2, 3, 5):
        s = segment(rng.normal(size=12), k)
        assert s.k == k and len(s.segments) == k
        assert all(seg for seg in s.segments)
        assert [i for seg in s.segments for i in seg] == list(range(12))
        assert all(seg == list(range(seg[0], seg[-1] + 1)) for seg in s.segments)


def test_prefix_cost_equals_direct() -> None:
    rng = np.random.default_rng(3)
    for x in (rng.normal(size=10), rng.normal(size=(10, 4))):
        c = SegmentCost(x)
        for i in range(10):
            for j in range(i, 10):
                assert c(i, j) == pytest.approx(direct_cost(x, i, j), abs=1e-10)
        assert c(4, 4) == 0.0


@pytest.mark.parametrize(("losses", "tau", "k"), [
    ([10.0, 5.0, 4.0, 3.9], 0.05, 3),        # 50%, 20%, 2.5%: the largest k with a >5% step is 3
    ([10.0, 9.9, 5.0, 4.9], 0.05, 3),        # a small first step does not stop the scan
    ([10.0, 9.0, 8.0, 7.9], 0.3, 1),         # no step above 30%
    ([10.0, 2.0, 0.0, 0.0, 0.0], 0.05, 3),   # L_3 = 0: stop at k-1 = 3 when L_{k-1} = 0
    ([0.0, 0.0], 0.05, 1),                   # a constant sequence: one segment
    ([5.0], 0.05, 1),
])
def test_choose_k(losses: list[float], tau: float, k: int) -> None:
    assert choose_k(losses, tau) == k


def test_auto_segmentation_on_plateaus() -> None:
    x = np.array([1, 1.1, 0.9, 5, 5.2, 4.8, 5.1, 9, 9.2])
    # Steps from k-1 to k cut the loss by 72%, 99%, 18%, 43%, 33%: the rule takes the LARGEST k above tau.
    assert segment(x, "auto", k_max=6, tau=0.5).segments == [[0, 1, 2], [3, 4, 5, 6], [7, 8]]
    assert segment(x, "auto", k_max=6, tau=0.3).k == 6
    assert segment(x, "auto", k_max=6, tau=0.05).k == 6


def test_code_compat_clean_example() -> None:
    x = np.array([1, 1.1, 0.9, 5, 5.2, 4.8, 5.1, 9, 9.2])
    t = fisher_dp(x, 3)
    assert backtrack_code_compat(t, 3) == [0, 3, 7]  # cuts after indices 2 and 6
    assert backtrack_exact(t, 3) == [0, 3, 7]
    assert segment(x, 3, backtrack="code_compat").segments == [[0, 1, 2], [3, 4, 5, 6], [7, 8]]


def test_code_compat_known_difference() -> None:
    # Documented regression: the official heuristic backtrack is sub-optimal here (2.6x the optimal loss).
    x = np.array([-2.1, -3.8, -1.9, 0.1, -7.0, -0.7, -3.7, -2.2])
    t = fisher_dp(x, 3)
    exact, compat = backtrack_exact(t, 3), backtrack_code_compat(t, 3)
    assert exact == [0, 4, 5] and compat == [0, 3, 5]
    assert partition_loss(x, compat) > 2 * partition_loss(x, exact)
    assert partition_loss(x, exact) == pytest.approx(t.loss[8, 3])


def test_descriptors_and_errors() -> None:
    s = np.array([[1.0, 0.5, 0.1], [0.5, 1.0, 0.2], [0.1, 0.2, 1.0]])
    assert np.allclose(descriptors(s), [1.6, 1.7, 1.3])
    assert descriptors(s, "row").shape == (3, 3)
    assert segment(descriptors(s, "row"), 2).k == 2
    with pytest.raises(KdforgeError):
        descriptors(s, "diag")  # type: ignore[arg-type]
    with pytest.raises(KdforgeError):
        segment(np.ones(3), 5)
    with pytest.raises(KdforgeError):
        segment(np.ones(3), 2, backtrack="greedy")  # type: ignore[arg-type]
