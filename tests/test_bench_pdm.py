"""``kdforge bench pdm --quick``: every row trains through the engine and the page, data and curves are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdforge.bench import load_benches
from kdforge.bench.pdm import VARIANTS

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_bench_writes_the_table_the_curves_and_the_published_column(tmp_path: Path) -> None:
    md = load_benches().get("pdm")(out=tmp_path, quick=True)
    text = md.read_text()
    for label, _ in VARIANTS:
        assert f"| {label} |" in text
    assert "chance (random embeddings)" in text and "| PDM (paper) | SYSU all-search | unknown |" in text
    assert (tmp_path / "pdm-mechanisms.png").is_file()
    data = json.loads((tmp_path / "pdm.json").read_text())
    full = data["runs"]["full PDM"][0]
    assert {"gap", "cpm_ratio", "ort_cos", "proto_rms"} <= set(full["curve"][0])
    assert "cpm_ratio" not in data["runs"][VARIANTS[0][0]][0]["curve"][0]
    assert 0 <= full["test"]["mAP"] <= 100 and data["chance"]["rank1"] < 10
