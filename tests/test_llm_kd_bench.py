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
def test_quick_llm_kd_austen_bench_trains_its_rows_on_other_rows_than_it_measures(tmp_path: Path) -> None:
    from kdforge.bench import load_benches

    res = load_benches().get("llm-kd-austen")(out=tmp_path, quick=True)
    assert [r["kind"] for r in res["runs"]][::2] == ["sft", "fkl", "rkl", "jsd", "cached"]  # 2 seeds a row
    assert res["settings"]["domain"] == "austen" and res["pool"] == 2 * res["settings"]["pool_rows"]
    text = (tmp_path / "llm-kd-austen.md").read_text()
    assert text.startswith("# Benchmark: llm-kd-austen") and "skew KL" not in text and "(llm-kd.md)" in text
    assert not (tmp_path / "llm-kd.md").exists()


@pytest.mark.slow
def test_quick_llm_kd_step_bench(tmp_path: Path) -> None:
    from kdforge.bench import load_benches

    res = load_benches().get("llm-kd-step")(out=tmp_path, quick=True)
    assert set(res["peak_mb"]) == {"sft_hf", "kd_cached", "kd_live", "kd_live_plain"}
    assert all(math.isfinite(v) for v in res["peak_mb"].values())
    assert all(len(v) == 4 and min(v) > 0 for v in res["step_s"].values())  # 2 rounds × (3 steps − the first)
    text = (tmp_path / "llm-kd-step.md").read_text()
    assert "KD, live teacher (fused" in text and "≤ 1.05" in text


def test_llm_kd_student_is_the_recommended_selections_published_choice() -> None:
    """llm-kd's student comes from the published row of LLM_RECOMMENDED_SELECTION's method (sleb_pick: the pick
    row of sglp-llm-pick.json, the one that records what it picked), not from a second copy of the criterion."""
    import json

    from kdforge.bench.common import PUBLISHED
    from kdforge.bench.sglp import published_choice
    from kdforge.prune.sglp import LLM_RECOMMENDED_SELECTION

    assert LLM_RECOMMENDED_SELECTION["method"] == "sleb_pick"
    f = PUBLISHED / "sglp-llm-pick.json"
    if not f.is_file():
        pytest.skip("not run from a kdforge checkout")
    res = json.loads(f.read_text())
    picked = [r for r in res["rows"] if "picked" in r and r["n_removed"] == 8]
    removed, seconds, label = published_choice("sleb_pick", 8, res["n_layers"])
    assert removed == picked[0]["removed"] and seconds > 0 and label == picked[0]["label"]
    sleb = next(r for r in json.loads((PUBLISHED / "sglp-llm.json").read_text())["rows"]
                if r["n_removed"] == 8 and r["label"].startswith("SLEB") and "heal" not in r["label"])
    assert published_choice("sleb", 8, res["n_layers"])[0] == sleb["removed"]
    assert published_choice("sleb_pick", 8, res["n_layers"] + 1) is None  # another depth: select afresh
    assert published_choice("taylor", 8, res["n_layers"]) is None
