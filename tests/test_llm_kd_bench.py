"""`kdforge bench llm-kd --quick` and `llm-kd-step --quick` on a tiny random Llama: every row and the pages."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")


@pytest.mark.slow
def test_quick_llm_kd_bench(tmp_path: Path) -> None:
    from kdforge.bench import load_benches

    res = load_benches().get("llm-kd")(out=tmp_path, quick=True)
    kinds = {r["kind"] for r in res["runs"]}
    assert kinds == {"sft", "fkl", "rkl", "jsd", "skl", "gkd", "cached"}
    assert all(r["ppl"] > 1 and 0 <= r["agree"] <= 1 for r in res["runs"])
    text = (tmp_path / "llm-kd.md").read_text()
    assert "on-policy GKD" in text and "llm-kd-step.md" in text


@pytest.mark.slow
def test_quick_llm_kd_step_bench(tmp_path: Path) -> None:
    from kdforge.bench import load_benches

    res = load_benches().get("llm-kd-step")(out=tmp_path, quick=True)
    assert set(res["peak_mb"]) == {"sft_hf", "kd_cached", "kd_live", "kd_live_plain"}
    assert all(math.isfinite(v) for v in res["peak_mb"].values())
    assert all(len(v) == 4 and min(v) > 0 for v in res["step_s"].values())  # 2 rounds × (3 steps − the first)
    text = (tmp_path / "llm-kd-step.md").read_text()
    assert "KD, live teacher (fused" in text and "≤ 1.05" in text
