"""The run-folder format: what ``metrics.csv`` and ``results.json`` mean, and how older folders are read.

Format 2 (this version): epochs are counted from 1 (``epoch`` in metrics.csv, ``best_epoch`` in
results.json; ``best_epoch`` is -1 when no validation split picked a best); every accuracy is in %
(training-step outputs named ``acc``, ``acc_*``, ``*_acc`` are fractions that the engine logs x100).
results.json carries ``"format": 2``.

Format 1 (before): epochs counted from 0, training accuracies as fractions, no ``format`` key. A
metrics.csv is format 1 when its first row is epoch 0 (format 2 starts at 1). Readers upgrade on read;
resuming a format-1 folder rewrites its metrics.csv in format 2 first.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

RUN_FORMAT = 2

_ACC = re.compile(r"(^|_)acc($|_)")


def is_accuracy(key: str) -> bool:
    """Whether a training-step output (or its ``train_`` column) is an accuracy (a fraction in a step's dict)."""
    return bool(_ACC.search(key.removeprefix("train_")))


def _num(v: Any) -> float | None:
    if v is None or v == "":
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def rows_format(rows: list[dict[str, Any]]) -> int:
    """The format of metrics rows: 1 when the first epoch is 0."""
    if rows and _num(rows[0].get("epoch")) == 0.0:
        return 1
    return RUN_FORMAT


def upgrade_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Metrics rows (strings or numbers) in format 2; rows already in format 2 come back unchanged."""
    if rows_format(rows) == RUN_FORMAT:
        return rows
    out = []
    for r in rows:
        r = dict(r)
        ep = _num(r.get("epoch"))
        if ep is not None:
            r["epoch"] = _same_type(r["epoch"], ep + 1)
        for k, v in r.items():
            x = _num(v)
            if k.startswith("train_") and is_accuracy(k) and x is not None:
                r[k] = _same_type(v, round(100.0 * x, 4))
        out.append(r)
    return out


def _same_type(like: Any, x: float) -> Any:
    if isinstance(like, str):
        return str(int(x)) if x == int(x) and "." not in like and "e" not in like else repr(x)
    return x


def upgrade_results(d: dict[str, Any]) -> dict[str, Any]:
    """A results.json dict in format 2 (epochs from 1, accuracies in %)."""
    if int(d.get("format", 1)) >= RUN_FORMAT:
        return d
    d = dict(d)
    be = d.get("best_epoch")
    if isinstance(be, int | float) and be >= 0:
        d["best_epoch"] = int(be) + 1
    if isinstance(d.get("history"), list):
        d["history"] = upgrade_rows(d["history"])
    d["format"] = RUN_FORMAT
    return d


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of a metrics.csv (any format) as numbers, in format 2; empty cells are left out."""
    from kdforge.engine.run_dir import read_csv

    rows = upgrade_rows(read_csv(path))
    return [{k: float(v) for k, v in r.items() if _num(v) is not None} for r in rows]


def read_results(path: Path) -> dict[str, Any]:
    """A results.json (any format) as a dict in format 2."""
    import json

    return upgrade_results(json.loads(Path(path).read_text()))


def rounded(key: str, v: float) -> float:
    """A logged number rounded for reading: times to ms, throughput to 0.1, the rest to 6 significant digits."""
    if not isinstance(v, float) or not math.isfinite(v):
        return v
    if key.endswith("_time_s"):
        return round(v, 3)
    if key == "samples_per_s":
        return round(v, 1)
    return float(f"{v:.6g}")
