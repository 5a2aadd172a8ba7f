"""RegDB's protocol: one training run per official split (trials 1–10), each tested in both directions, averaged.

RegDB publishes ten random train/test identity splits (``idx/*_{trial}.txt``); a reported number is the
mean over all ten, visible→thermal (the headline keys) and thermal→visible (``i2v_*``). :func:`run_trials`
trains the recipe once per trial (``data.split_seed`` = trial) into ``OUT/trial-N``, reuses a trial whose
run folder already holds ``results.json``, and writes ``OUT/regdb.json`` and ``OUT/regdb.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from kdforge.config import Recipe
from kdforge.errors import KdforgeError

TRIALS = tuple(range(1, 11))
KEYS = ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP")
DIRECTIONS = (("", "visible → thermal"), ("i2v_", "thermal → visible"))


def parse_trials(text: str) -> tuple[int, ...]:
    """``1-10``, ``1,3,5`` or ``4`` → the trial numbers (each 1..10)."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise KdforgeError(f"bad --trials {text!r} (valid: 1-10, 1,3,5 or one number)") from None
    bad = [t for t in out if not 1 <= t <= 10]
    if not out or bad:
        raise KdforgeError(f"bad --trials {text!r}: RegDB has trials 1..10")
    return tuple(dict.fromkeys(out))


def trial_recipe(recipe: Recipe, trial: int) -> Recipe:
    """The recipe of one trial: the same recipe on RegDB split ``trial``."""
    if recipe.data.name != "regdb":
        raise KdforgeError(f"the RegDB driver needs a recipe with data.name: regdb (got {recipe.data.name!r})")
    return Recipe.from_dict(recipe.model_dump(mode="json"),
                            [f"data.split_seed={trial}", f"name={recipe.name}-trial{trial}"])


def average(per_trial: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and sample std over trials of every metric of both directions."""
    out = {}
    for prefix, _ in DIRECTIONS:
        for k in KEYS:
            vals = [m[prefix + k] for m in per_trial.values() if prefix + k in m]
            if vals:
                out[prefix + k] = {"mean": float(np.mean(vals)),
                                   "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}
    return out


def _test_metrics(res: dict[str, Any]) -> dict[str, float]:
    return dict(res.get("test_best") or res["test_last"])


def run_trials(recipe: Recipe, out: Path, trials: tuple[int, ...] = TRIALS, overwrite: bool = False
               ) -> dict[str, Any]:
    """Train (or reuse) every trial, average both directions; writes ``regdb.json`` and ``regdb.md`` in ``out``."""
    from kdforge.run import train

    per: dict[int, dict[str, float]] = {}
    for t in trials:
        r = trial_recipe(recipe, t)
        run_dir = out / f"trial-{t}"
        done = run_dir / "results.json"
        if done.is_file() and not overwrite:
            per[t] = _test_metrics(json.loads(done.read_text()))
            continue
        res = train(r, run_dir, overwrite=overwrite)
        per[t] = dict(res.test_best or res.test_last)
    summary = {"recipe": recipe.name, "trials": list(trials), "per_trial": {str(t): m for t, m in per.items()},
               "mean": average(per)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "regdb.json").write_text(json.dumps(summary, indent=2))
    (out / "regdb.md").write_text(report(summary))
    return summary


def report(summary: dict[str, Any]) -> str:
    """A Markdown table: one row per direction, mean ± std over the trials (metrics in %)."""
    n = len(summary["trials"])
    lines = [f"# RegDB: {summary['recipe']}, {n} trial(s) ({', '.join(map(str, summary['trials']))})", "",
             "| direction | " + " | ".join(KEYS) + " |", "|---" * (len(KEYS) + 1) + "|"]
    for prefix, label in DIRECTIONS:
        cells = []
        for k in KEYS:
            m = summary["mean"].get(prefix + k)
            cells.append(f"{m['mean']:.2f} ± {m['std']:.2f}" if m else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Mean ± sample std over the trials; CMC is RegDB's raw-ranking CMC (the official `eval_regdb`).",
              "Each trial's test metrics come from its best-by-validation checkpoint where it kept one.", ""]
    return "\n".join(lines)
