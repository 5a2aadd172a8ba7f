"""Multi-stage runs: one sub-run folder per stage, resume across stages.

Continual tasks, diffusion rounds, audio stages and two-stage distillation are sequences of engine
fits. A :class:`StagedRun` gives each stage its own run folder ``RUN/stages/NN-name/`` (config,
metrics, checkpoints, resumable state) and records finished stages in ``RUN/stages.json``; a resumed
run skips the finished stages (the driver restores their outputs) and resumes the one in progress.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdforge.engine.checkpoint import atomic_write_text
from kdforge.errors import KdforgeError


class StagedRun:
    """The stage bookkeeping of a run folder (or of nothing, when ``root`` is ``None``)."""

    def __init__(self, root: str | Path | None, config: dict[str, Any], resume: bool = False) -> None:
        self.root = Path(root) if root is not None else None
        self.config = json.loads(json.dumps(config))
        self.finished: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        if self.root is None:
            return
        index = self.root / "stages.json"
        if resume and index.is_file():
            try:
                saved = json.loads(index.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise KdforgeError(f"{str(index)!r} is damaged ({type(e).__name__}); cannot resume") from None
            if saved.get("config") != self.config:
                raise KdforgeError(f"run folder {str(self.root)!r} holds a different staged run; "
                                   "use another folder or start it again with --overwrite")
            self.finished = dict(saved.get("finished", {}))
            self.order = list(saved.get("order", []))
        self.root.mkdir(parents=True, exist_ok=True)

    def dir(self, name: str) -> Path | None:
        """The run folder of stage ``name`` (numbered in the order stages are first asked for)."""
        if name not in self.order:
            self.order.append(name)
        if self.root is None:
            return None
        return self.root / "stages" / f"{self.order.index(name):02d}-{name}"

    def done(self, name: str) -> dict[str, Any] | None:
        """The recorded result of a finished stage, or ``None``."""
        return self.finished.get(name)

    def in_progress(self, name: str) -> bool:
        """Whether stage ``name`` has a resumable state from an interrupted fit."""
        d = self.dir(name)
        return d is not None and (d / "checkpoints" / "state" / "trainer.pt").is_file()

    def finish(self, name: str, result: dict[str, Any]) -> None:
        """Record stage ``name`` as finished with its result (written atomically)."""
        self.dir(name)
        self.finished[name] = json.loads(json.dumps(result))
        if self.root is not None:
            atomic_write_text(self.root / "stages.json", json.dumps(
                {"config": self.config, "order": self.order, "finished": self.finished}, indent=1))
