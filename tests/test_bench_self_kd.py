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


def test_quick_self_kd_limited_writes_its_own_page(tmp_path: Path) -> None:
    md = load_benches().get("self-kd-limited")(out=tmp_path, quick=True)
    assert md == tmp_path / "self-kd-limited.md"
    text = md.read_text()
    assert text.startswith("# Self-distillation, data-limited: 128 training images, 1 epochs")
    assert "kdforge bench self-kd-limited --quick" in text and "Quick smoke run" in text
    for label in ("CE", "label smoothing", "mixup", "MixSKD"):
        assert f"| {label} |" in text, label
    raw = json.loads((tmp_path / "self-kd-limited.json").read_text())
    assert set(raw["runs"]) == {"CE", "label smoothing", "mixup", "MixSKD"}
    assert all(0 <= s["train_top1"] <= 100 for v in raw["runs"].values() for s in v["results"])
    assert raw["runs"]["MixSKD"]["paired_vs_ce"]["n"] == 1
    assert (tmp_path / "self-kd-limited.png").stat().st_size > 1000
