"""`kdforge bench llm-kd --quick` on a tiny random Llama: every row, the page, the step-cost table."""

from __future__ import annotations

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
    assert set(res["perf"]["peak_mb"]) == {"sft_hf", "sft_chunked", "kd_live_plain", "kd_live", "kd_cached"}
    text = (tmp_path / "llm-kd.md").read_text()
    assert "on-policy GKD" in text and "## Step cost" in text
