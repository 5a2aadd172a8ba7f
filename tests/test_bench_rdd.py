"""The rdd benchmark's quick mode writes its table, chart and sample grids (a smoke run, marked slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdforge.bench import load_benches


@pytest.mark.slow
def test_quick_rdd_bench_writes_table_chart_and_grids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the cached runs go to ./runs/cache
    md = load_benches().get("rdd")(out=tmp_path / "out", quick=True)
    text = md.read_text()
    assert "teacher DDIM, 64 steps" in text and "RDD student, 1 steps" in text and "speed-up" in text
    raw = json.loads((tmp_path / "out" / "rdd.json").read_text())
    assert set(raw["scores"]) >= {"teacher/64", "teacher/1", "pd-chain/8", "pd/1", "cfd/1", "rdd/1"}
    assert raw["scores"]["teacher/1"][0]["ms_per_image"] < raw["scores"]["teacher/64"][0]["ms_per_image"]
    assert (tmp_path / "out" / "rdd.png").is_file() and (tmp_path / "out" / "rdd-samples.png").is_file()
    assert len(raw["scores"]["rdd/1"][0]["fd_noise"]) == len(raw["noise_seeds"]) and raw["reference_images"] == 1797
