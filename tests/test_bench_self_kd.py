"""The self-KD benchmark runs end to end in quick mode and writes its table, plot and raw numbers."""

from __future__ import annotations

import json
from pathlib import Path

from kdforge.bench import load_benches


def test_quick_self_kd_bench_writes_table_and_plot(tmp_path: Path) -> None:
    md = load_benches().get("self-kd")(out=tmp_path, quick=True)
    assert md == tmp_path / "self-kd.md"
    text = md.read_text()
    for label in ("CE", "label smoothing", "mixup", "Tf-KD", "CS-KD", "PS-KD", "BYOT", "MixSKD"):
        assert f"| {label}" in text, label
    assert "kdforge bench self-kd --quick" in text and "Quick smoke run" in text
    assert (tmp_path / "self-kd.png").stat().st_size > 1000
    raw = json.loads((tmp_path / "self-kd.json").read_text())
    runs = raw["runs"]
    assert runs["MixSKD"]["deploy_params"] == runs["CE"]["deploy_params"] < runs["MixSKD"]["train_params"]
