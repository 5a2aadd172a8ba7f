"""What a metric's number means: its unit, whether higher is better, and how to print it."""

from __future__ import annotations

import re

#: metrics in percent (accuracy-like, higher is better unless listed in LOWER_IS_BETTER)
PERCENT = re.compile(r"^(top\d+|acc\w*|\w*_acc|\w*_acc_\w+|rank\d+|map|minp|mca|accuracy|forgetting|bwt|fwt|ece"
                     r"|indoor_\w+|\w*top1\w*|\w*top5\w*)$", re.I)
#: metrics where lower is better
LOWER_IS_BETTER = re.compile(r"^(loss|\w*_loss|ppl|perplexity|\w*ppl|forgetting|ece|fid|\w*_ms|\w*_s|latency\w*"
                             r"|bytes|params|flops)$", re.I)
#: metric name -> words a person reads
READABLE = {"avg_inc_acc": "average incremental accuracy", "last_acc": "last accuracy", "bwt": "backward transfer",
            "avg_inc_acc_task_mean": "average incremental accuracy (tasks weighted equally)",
            "fwt": "forward transfer", "ppl": "perplexity", "mca": "mean class accuracy", "ece": "calibration error",
            "mAP": "mAP", "mINP": "mINP"}


def unit(metric: str) -> str:
    """``%`` for accuracy-like metrics, ``s``/``ms`` for times, ``""`` for the rest (loss, perplexity, return)."""
    name = metric.rsplit("/", 1)[-1]
    if PERCENT.match(name):
        return "%"
    if name.endswith("_ms"):
        return "ms"
    if name.endswith("_s"):
        return "s"
    return ""


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of the metric is the better one."""
    return not LOWER_IS_BETTER.match(metric.rsplit("/", 1)[-1])


def readable(metric: str) -> str:
    """A metric's name as a person reads it (``avg_inc_acc`` -> ``average incremental accuracy``)."""
    return READABLE.get(metric, metric.replace("_", " "))


def format_metric(metric: str, value: float) -> str:
    """``top1 61.67 %``, ``loss 0.9006``, ``ppl 24.31``."""
    u = unit(metric)
    digits = 2 if u in ("%", "ms", "s") or abs(value) >= 10 else 4
    return f"{metric} {value:.{digits}f}" + (f" {u}" if u else "")
