"""EPIC-SOUNDS challenge metrics on per-segment score vectors, plus calibration.

top-1/top-5 accuracy, mCA (mean recall over classes present in the labels), mAP and mAUC (one-vs-rest per
class, classes present only), ECE (15 equal-width confidence bins) and NLL of the scores normalised to sum 1.
All percentages except mAUC (0-1, as the challenge kit prints it) and NLL.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kdforge.errors import KdforgeError


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(np.int64)
    if s.ndim != 2 or y.ndim != 1 or len(s) != len(y) or len(y) == 0:
        raise KdforgeError(f"scores must be [N, K] and labels [N] with N > 0 (got {s.shape} and {y.shape})")
    return s, y


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Share (%) of rows whose label is among the ``k`` highest scores (ties broken by class index)."""
    s, y = _check(scores, labels)
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return 100.0 * float((top == y[:, None]).any(1).mean())


def per_class_recall(scores: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Recall (%) of every class present in the labels."""
    s, y = _check(scores, labels)
    pred = s.argmax(1)
    return {int(c): 100.0 * float((pred[y == c] == c).mean()) for c in np.unique(y)}


def mean_class_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """mCA (%): the mean of per-class recalls over classes present in the labels."""
    return float(np.mean(list(per_class_recall(scores, labels).values())))


def _present(s: np.ndarray, y: np.ndarray) -> list[int]:
    return [int(c) for c in np.unique(y) if c < s.shape[1]]


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """mAP (%): one-vs-rest average precision per class present, averaged (sklearn's AP)."""
    from sklearn.metrics import average_precision_score

    s, y = _check(scores, labels)
    return 100.0 * float(np.mean([average_precision_score(y == c, s[:, c]) for c in _present(s, y)]))


def mean_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """mAUC (0-1): one-vs-rest ROC AUC per class present (classes that are every row's label are skipped)."""
    from sklearn.metrics import roc_auc_score

    s, y = _check(scores, labels)
    aucs = [roc_auc_score(y == c, s[:, c]) for c in _present(s, y) if (y != c).any()]
    return float(np.mean(aucs)) if aucs else float("nan")


def normalise(scores: np.ndarray) -> np.ndarray:
    """Scores (sums of view probabilities, fused scores) as probabilities: each row divided by its sum."""
    s = np.asarray(scores, dtype=np.float64)
    return s / np.clip(s.sum(1, keepdims=True), 1e-300, None)


def expected_calibration_error(scores: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE (%): sum over equal-width confidence bins of |accuracy - confidence| weighted by the bin's share."""
    s, y = _check(scores, labels)
    p = normalise(s)
    conf, pred = p.max(1), p.argmax(1)
    correct = (pred == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return 100.0 * float(ece)


def nll(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class under the normalised scores."""
    s, y = _check(scores, labels)
    p = normalise(s)[np.arange(len(y)), y]
    return float(-np.log(np.clip(p, 1e-12, None)).mean())


def redact(scores: np.ndarray, labels: np.ndarray, drop: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Remove the rows whose label is in ``drop`` (the challenge redacts "background", id 13) before scoring."""
    s, y = _check(scores, labels)
    keep = ~np.isin(y, np.asarray(list(drop), dtype=np.int64))
    return s[keep], y[keep]


def all_metrics(scores: np.ndarray, labels: np.ndarray, redact_classes: Sequence[int] = ()) -> dict[str, float]:
    """top1, top5, mca, map, mauc, ece, nll of score vectors (after redacting ``redact_classes`` rows)."""
    if redact_classes:
        scores, labels = redact(scores, labels, redact_classes)
    k5 = min(5, np.asarray(scores).shape[1])
    return {"top1": topk_accuracy(scores, labels, 1), "top5": topk_accuracy(scores, labels, k5),
            "mca": mean_class_accuracy(scores, labels), "map": mean_average_precision(scores, labels),
            "mauc": mean_auc(scores, labels), "ece": expected_calibration_error(scores, labels),
            "nll": nll(scores, labels)}
