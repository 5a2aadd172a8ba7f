"""The demo end to end on a tiny budget; its recipes are valid and consistent; the paired interval is right."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from kdforge.demo import demo_recipe, format_interval, paired_interval, run_demo, teacher_checkpoint
from kdforge.errors import KdforgeError


def test_demo_recipes_agree() -> None:
    t, s, k = demo_recipe("teacher"), demo_recipe("student"), demo_recipe("kd")
    assert k.method.model_extra["student"] == s.method.model_extra["model"]
    assert k.method.model_extra["teacher"]["model"] == t.method.model_extra["model"]["model"]
    assert k.method.model_extra["teacher"]["kwargs"] == t.method.model_extra["model"]["kwargs"]
    assert k.method.model_extra["teacher"]["checkpoint"] == str(teacher_checkpoint())
    assert teacher_checkpoint().is_file()
    assert s.data == k.data and s.optim == k.optim and s.train == k.train
    # the student sees a labelled subset; the teacher saw the whole training split
    assert s.data.limit_train == 512 and t.data.limit_train is None


def test_paired_interval_matches_t_table() -> None:
    # differences 1..5: mean 3, sample sd sqrt(2.5); t(0.975, 4 dof) = 2.776 (printed t tables)
    p = paired_interval([11.0, 12.0, 13.0, 14.0, 15.0], [10.0] * 5)
    assert p["diffs"] == [1.0, 2.0, 3.0, 4.0, 5.0] and p["n"] == 5
    assert p["mean"] == pytest.approx(3.0) and p["sd"] == pytest.approx(math.sqrt(2.5))
    assert p["t"] == pytest.approx(2.776, abs=1e-3)
    half = 2.7764 * math.sqrt(2.5) / math.sqrt(5)
    assert p["lo"] == pytest.approx(3.0 - half, abs=1e-3) and p["hi"] == pytest.approx(3.0 + half, abs=1e-3)
    assert p["excludes_zero"] and format_interval(p) == "+3.00 [+1.04, +4.96]"
    # a mean gain with a spread that reaches zero is not an effect
    q = paired_interval([2.0, -1.0, 3.0], [0.0, 0.0, 0.0])
    assert q["t"] == pytest.approx(4.303, abs=1e-3) and q["lo"] < 0 < q["hi"] and not q["excludes_zero"]
    one = paired_interval([80.0], [79.0])
    assert one["mean"] == 1.0 and math.isnan(one["lo"]) and "no interval" in format_interval(one)
    with pytest.raises(ValueError):
        paired_interval([1.0, 2.0], [1.0])


def test_quick_demo_writes_table_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = run_demo(tmp_path / "demo", seeds=2, quick=True, threads=1)
    rows = summary["rows"]
    assert [r["runs"] for r in rows] == [1, 2, 2]
    assert rows[0]["mean"] > 85.0  # the shipped teacher (88.5 % on the development VM)
    assert rows[0]["params"] > 3 * rows[1]["params"] and rows[1]["params"] == rows[2]["params"]
    assert all(r["mflops"] > 0 and r["latency_ms"] > 0 for r in rows)
    p = summary["paired"]
    assert p["n"] == 2
    assert p["diffs"] == pytest.approx([k - a for k, a in zip(rows[2]["accs"], rows[1]["accs"], strict=True)])
    out = capsys.readouterr().out
    assert "KD gain over the student alone" in out and "95 % t-interval" in out and "paired" in out
    for f in ("report.md", "curves.png", "demo.json", "kd-seed1/report.md", "kd-seed0/checkpoints/last.safetensors"):
        assert (tmp_path / "demo" / f).is_file(), f
    assert "KD − alone, paired by seed" in (tmp_path / "demo" / "report.md").read_text()
    with pytest.raises(KdforgeError, match="already exists"):
        run_demo(tmp_path / "demo", seeds=1, quick=True)
