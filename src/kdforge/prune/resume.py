"""What lets ``kdforge prune --resume`` continue at the heal: the finished analysis, kept in the run folder.

The stages before the heal (calibration, CKA, segmentation, selection, the before/after evaluation) end in
``analysis.json``; a resumed run reads it instead of redoing them, cuts the same units and resumes the heal, an
engine run in ``RUN/heal`` with its own checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdforge.errors import KdforgeError

if TYPE_CHECKING:
    from kdforge.prune.importance import Selection
    from kdforge.prune.sglp import Analysis, PruneRecipe
    from kdforge.prune.surgery import UnitSpec

STAGE = "analysis.json"


def check_same_recipe(out: Path, recipe: PruneRecipe) -> None:
    """Refuse in one line to resume a prune folder that another recipe started (a folder without config is new)."""
    from kdforge.prune.sglp import PruneRecipe

    cfg = out / "config.yaml"
    if not cfg.is_file():
        return
    try:
        have = PruneRecipe.from_yaml(cfg).identity()
    except KdforgeError as e:
        raise KdforgeError(f"cannot resume {str(out)!r}: its config.yaml is unreadable ({e}); start it again "
                           "with --overwrite") from None
    diff = _first_difference(have, recipe.identity())
    if diff is not None:
        raise KdforgeError(f"cannot resume {str(out)!r}: it was started with another recipe ({diff} differs); "
                           "resume it with the same recipe, or start it again with --overwrite")


def _first_difference(a: Any, b: Any, where: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else k)
            if d is not None:
                return d
        return None
    return None if a == b else (where or "the recipe")


def save_stage(out: Path, recipe: PruneRecipe, analysis: Analysis, sel: Selection, pinned: set[int],
               per_seg: list[int], before: dict[str, float], after: dict[str, float]) -> None:
    """Write ``analysis.json``: everything the pipeline computed before the heal."""
    from kdforge.engine.checkpoint import atomic_write_text

    seg = analysis.segmentation
    atomic_write_text(out / STAGE, json.dumps({
        "identity": recipe.identity(), "units": [u.name for u in analysis.units],
        "cka": analysis.cka.tolist(), "cka_dtype": str(analysis.cka.dtype),
        "segmentation": {**seg.to_json(), "starts": seg.starts},
        "cka_seconds": analysis.cka_seconds, "segment_seconds": analysis.segment_seconds,
        "selection": {"method": sel.method, "kept": sel.kept, "n_units": sel.n_units,
                      "unit_scores": [[k, v] for k, v in sel.unit_scores.items()], "n_evals": sel.n_evals,
                      "seconds": sel.seconds, "details": sel.details},
        "pinned": sorted(pinned), "keep_per_segment": per_seg, "before": before, "after": after}))


def load_stage(out: Path, recipe: PruneRecipe, units: list[UnitSpec]
               ) -> tuple[Analysis, Selection, list[int], dict[str, float], dict[str, float]] | None:
    """(analysis, selection, kept per segment, before, after) of ``analysis.json``; None if absent or not this run's."""
    from kdforge.prune.importance import Selection
    from kdforge.prune.segment import Segmentation
    from kdforge.prune.sglp import Analysis

    path = out / STAGE
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        if d["identity"] != recipe.identity() or d["units"] != [u.name for u in units]:
            return None  # another recipe's (check_same_recipe refuses it first) or other units: redo the analysis
        s, g = d["selection"], d["segmentation"]
        seg = Segmentation(g["segments"], g["k"], g["losses"], g["loss"], g["backtrack"], g["descriptor"], g["starts"])
        analysis = Analysis(units, np.asarray(d["cka"], dtype=d["cka_dtype"]), seg, d["cka_seconds"],
                            d["segment_seconds"])
        sel = Selection(s["method"], s["kept"], s["n_units"], {int(k): v for k, v in s["unit_scores"]},
                        s["n_evals"], s["seconds"], s["details"])
        return analysis, sel, d["keep_per_segment"], d["before"], d["after"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # damaged (a kill while writing is ruled out by the atomic write): redo the analysis
