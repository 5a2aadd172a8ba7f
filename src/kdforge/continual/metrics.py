"""Class-incremental metrics over the accuracy matrix A[t][j] (accuracy on task j's classes after task t)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Matrix = Sequence[Sequence[float]] | np.ndarray


def _lower(acc: Matrix) -> np.ndarray:
    a = np.asarray(acc, dtype=float)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"accuracy matrix must be square (T+1)×(T+1), got shape {a.shape}")
    return a


def step_accuracies(acc: Matrix, sizes: Sequence[int] | None = None) -> np.ndarray:
    """A_t: accuracy on all classes seen after task t, weighting task j by its test size (equal if None)."""
    a = _lower(acc)
    w = np.ones(a.shape[0]) if sizes is None else np.asarray(sizes, dtype=float)
    return np.array([np.dot(a[t, :t + 1], w[:t + 1]) / w[:t + 1].sum() for t in range(a.shape[0])])


def average_incremental_accuracy(acc: Matrix, sizes: Sequence[int] | None = None) -> float:
    """Ā = mean over t of A_t (class-weighted with ``sizes``; the task-mean variant without)."""
    return float(step_accuracies(acc, sizes).mean())


def last_accuracy(acc: Matrix, sizes: Sequence[int] | None = None) -> float:
    """A_T: accuracy on all classes after the last task."""
    return float(step_accuracies(acc, sizes)[-1])


def average_forgetting(acc: Matrix) -> float:
    """F = mean over k < T of max_{t∈[k,T−1]} a[t,k] − a[T,k] (Chaudhry et al. 2018); 0 for one task."""
    a = _lower(acc)
    last = a.shape[0] - 1
    if last == 0:
        return 0.0
    return float(np.mean([a[k:last, k].max() - a[last, k] for k in range(last)]))


def backward_transfer(acc: Matrix) -> float:
    """BWT = mean over k < T of a[T,k] − a[k,k] (Lopez-Paz & Ranzato 2017); negative means forgetting."""
    a = _lower(acc)
    last = a.shape[0] - 1
    if last == 0:
        return 0.0
    return float(np.mean([a[last, k] - a[k, k] for k in range(last)]))


def summarize(acc: Matrix, sizes: Sequence[int] | None = None) -> dict[str, float]:
    """All scalar metrics of one run (accuracies in the matrix's unit, usually %)."""
    return {"avg_inc_acc": average_incremental_accuracy(acc, sizes),
            "avg_inc_acc_task_mean": average_incremental_accuracy(acc),
            "last_acc": last_accuracy(acc, sizes), "forgetting": average_forgetting(acc),
            "bwt": backward_transfer(acc)}
