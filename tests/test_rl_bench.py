"""``kdforge bench opd-da --quick``: the smoke run writes the table, the curves and the raw JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("gymnasium")


def test_bench_opd_da_quick(tmp_path: Path) -> None:
    from kdforge.bench.common import run_bench

    out = run_bench("opd-da", out=tmp_path / "b", quick=True)
    page = (out / "opd-da.md").read_text()
    assert page.startswith("# OPD-DA") and "(smoke run)" in page.splitlines()[0]
    for label in ("independent", "OPD-mean", "OPD-DA"):
        assert f"| {label} |" in page
    assert (out / "opd-da-return.png").is_file() and (out / "opd-da-js.png").is_file()
    raw = json.loads((out / "opd-da.json").read_text())
    summary = raw["runs"]["OPD-DA"]["summary"][0]
    assert math.isfinite(summary["final"]) and summary["js"] >= 0
    assert len(raw["runs"]["independent"]["curves"][0]) == raw["updates"]


def test_summary_steps_to_threshold() -> None:
    from kdforge.bench.opd_da import summarise

    curve = [{"env_steps": 512.0 * (i + 1), "ret0": r, "ret1": r, "ret2": float("nan"), "js": 0.1}
             for i, r in enumerate([100.0, 500.0, 700.0, 800.0])]
    s = summarise({"curve": curve, "final": {"return": 1.0, "return_best": 2.0}, "time_s": 0.0})
    # group mean counts the policy without an episode as 0: 66.7, 333.3, 466.7, 533.3
    assert s["steps_to_threshold"] == 2048.0 and s["steps_to_lower"] == 1536.0
    assert s["auc"] == pytest.approx((200 + 1000 + 1400 + 1600) / 3 / 4)
