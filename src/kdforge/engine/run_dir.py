"""The run folder: where a run writes its recipe, metrics, checkpoints and report."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

from kdforge.errors import KdforgeError


def prepare_run_dir(path: Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Create (or check) a run folder; never writes into an existing one without a flag."""
    if resume and overwrite:
        raise KdforgeError("--resume and --overwrite exclude each other: choose one")
    if resume:
        if not (path / "checkpoints" / "state").is_dir():
            raise KdforgeError(f"cannot resume: {str(path)!r} holds no resumable state "
                               "(checkpoints/state); start it without --resume")
        return path
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise KdforgeError(f"run folder {str(path)!r} already exists; pass --resume to continue it "
                               "or --overwrite to replace it")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


class CsvLog:
    """Append-only metrics.csv; the header grows if a new key appears (the file is rewritten)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = read_csv(path) if path.is_file() else []

    def truncate_after(self, epoch: int) -> None:
        """Drop rows of epochs after ``epoch`` (written by a run that was killed later)."""
        self.rows = [r for r in self.rows if int(float(r["epoch"])) <= epoch]
        self._write()

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._write()

    def _write(self) -> None:
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
        tmp.replace(self.path)


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.csv as dicts of strings."""
    with path.open() as f:
        return list(csv.DictReader(f))
