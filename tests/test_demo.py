"""The demo end to end on a tiny budget; its recipes are valid and consistent."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdforge.demo import demo_recipe, run_demo
from kdforge.errors import KdforgeError


def test_demo_recipes_agree() -> None:
    t, s, k = demo_recipe("teacher"), demo_recipe("student"), demo_recipe("kd")
    assert k.method.model_extra["student"] == s.method.model_extra["model"]
    assert k.method.model_extra["teacher"]["model"] == t.method.model_extra["model"]["model"]
    assert s.data == k.data == t.data and s.optim == k.optim and s.train == k.train


def test_quick_demo_writes_table_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = run_demo(tmp_path / "demo", seeds=1, quick=True)
    rows = summary["rows"]
    assert [r["runs"] for r in rows] == [1, 1, 1]
    assert rows[0]["params"] > 40 * rows[1]["params"] and rows[1]["params"] == rows[2]["params"]
    assert all(r["mflops"] > 0 and r["latency_ms"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "KD gain over the student alone" in out and "test top-1" in out
    for f in ("report.md", "curves.png", "demo.json", "teacher/report.md", "kd-seed0/checkpoints/last.safetensors"):
        assert (tmp_path / "demo" / f).is_file(), f
    with pytest.raises(KdforgeError, match="already exists"):
        run_demo(tmp_path / "demo", seeds=1, quick=True)
