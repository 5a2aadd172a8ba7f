"""int8 copies as budget candidates: judged by their own measured latency, parents searched at the scaled budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kdforge.compress.budget import int8_parent_fraction, runtime_ratio
from kdforge.compress.gate import Check, check_smaller
from kdforge.compress.recipe import CompressRecipe
from kdforge.errors import KdforgeError

RECIPE: dict[str, Any] = {"model": {"model": "resnet8", "checkpoint": "w.safetensors"},
                          "budget": {"metric": "latency", "fraction": 0.25, "latency_batch": 64},
                          "candidates": {"families": ["uniform"], "int8": "static"},
                          "export": {"formats": ["onnx"]}, "gate": {"batch_sizes": [1, 64]}}


def _faster(ms_original: float, ms_compressed: float, batch: int = 64) -> Check:
    """A ``faster`` check as the gate writes it, from two medians (speed-up = original / compressed)."""
    return Check("faster", ms_compressed < ms_original, "",
                 {"latency": {str(batch): {"original": {"median_ms": ms_original},
                                           "compressed": {"median_ms": ms_compressed}}},
                  "speedup": {str(batch): ms_original / ms_compressed}})


def test_runtime_ratio_is_compressed_over_original_at_the_budget_batch():
    fast = _faster(120.0, 27.0)
    assert runtime_ratio(fast.values, 64) == pytest.approx(27.0 / 120.0)
    with pytest.raises(ValueError, match="not the budget's batch 32"):
        runtime_ratio(fast.values, 32)


def test_parent_fraction_scales_the_budget_by_the_int8_gain_and_caps_at_the_original():
    assert int8_parent_fraction(0.25, 2.4) == pytest.approx(0.6)
    assert int8_parent_fraction(0.5, 2.4) == 1.0  # the original itself is the parent
    with pytest.raises(ValueError):
        int8_parent_fraction(0.25, 0.0)


def test_an_int8_copy_keeps_its_parameters_but_must_shrink_on_disk():
    same = check_smaller((1000, 1000), {"onnx": (4000, 1100)}, quantized=True)
    assert same.ok
    assert not check_smaller((1000, 1000), {"onnx": (4000, 1100)}).ok  # a float model must lose parameters
    assert not check_smaller((1000, 1001), {"onnx": (4000, 1100)}, quantized=True).ok  # never more
    fat = check_smaller((1000, 1000), {"onnx": (4000, 4000)}, quantized=True)
    assert not fat.ok and "onnx 4,000 B >= original 4,000 B" in fat.detail


def test_latency_batch_outside_the_gate_batches_is_one_line():
    bad = {**RECIPE, "budget": {**RECIPE["budget"], "latency_batch": 32}}
    with pytest.raises(KdforgeError, match=r"budget\.latency_batch 32 must be one of gate\.batch_sizes \[1, 64\]"):
        CompressRecipe.from_dict(bad)
    CompressRecipe.from_dict({**bad, "candidates": {"families": ["uniform"]}})  # float only: eager search, fine


def test_int8_rows_search_scaled_parents_and_judge_each_copy_by_its_own_latency(monkeypatch, tmp_path):
    """Original int8 gain 2.4 at batch 64: parents searched at 0.25 x 2.4 = 0.6; a copy at 0.22 fits, 0.30 not."""
    from kdforge.compress import pipeline
    from kdforge.compress.candidates import Candidate
    from kdforge.compress.pipeline import Evaluated, int8_rows, within_budget

    r = CompressRecipe.from_dict(RECIPE)
    orig = Evaluated("original", "original", 1000, 10, 90.0, files={"onnx": tmp_path / "o.onnx"})
    loads = Check("loads", True, "")
    # measured int8 latency (ms at batch 64) of each copy, by parent; the original runs at 120 ms
    int8_ms = {"original": 50.0, "uniform-3of8": 36.0, "uniform-5of8": 26.4}

    def fake_int8(parent: Evaluated, *a: Any, **k: Any) -> Evaluated:
        q = Evaluated(f"{parent.name}+int8", f"{parent.family}+int8", parent.params, parent.flops, 89.0,
                      files={"onnx": Path("q.onnx")})
        q.checks = [loads, _faster(120.0, int8_ms[parent.name])]
        return q

    searched: list[float] = []

    def fake_search(src: Any, rp: CompressRecipe, log: Any) -> tuple[float, list[Candidate], list[Any]]:
        searched.append(rp.budget.fraction)
        return 1.0, [Candidate("uniform-5of8", "uniform", None, {}, 0.58, 0.58, 0.0)], []  # type: ignore[arg-type]

    def fake_eval(c: Candidate, *a: Any) -> Evaluated:
        e = Evaluated(c.name, c.family, 600, 6, 89.5, files={"onnx": Path("p.onnx")})
        e.checks = [loads]
        return e

    monkeypatch.setattr(pipeline, "int8_candidate", fake_int8)
    monkeypatch.setattr(pipeline, "search_candidates", fake_search)
    monkeypatch.setattr(pipeline, "_evaluate_candidate", fake_eval)
    floats = [Evaluated("uniform-3of8", "uniform", 400, 4, 85.0, files={"onnx": Path("f.onnx")},
                        checks=[loads], info={"budget": {"ratio": 0.24, "fits": True}})]
    rows = {e.name: e for e in int8_rows(floats, orig, None, r, tmp_path, lambda m: None)}  # type: ignore[arg-type]

    assert searched == [pytest.approx(0.25 * 120.0 / 50.0)]  # the parent budget: fraction x measured gain
    assert set(rows) == {"uniform-5of8", "original+int8", "uniform-3of8+int8", "uniform-5of8+int8"}
    # the scaled parent is healed and gated, but it is not a candidate for the 25 % budget itself
    assert not within_budget(rows["uniform-5of8"]) and rows["uniform-5of8"].info["budget"]["ratio"] == 0.58
    assert rows["original+int8"].info["budget"]["ratio"] == pytest.approx(50 / 120)
    assert not within_budget(rows["original+int8"])  # 0.42 > 0.25
    assert within_budget(rows["uniform-5of8+int8"])  # 26.4 / 120 = 0.22
    assert rows["uniform-5of8+int8"].info["budget"]["runtime"] == "onnxruntime"
    assert not within_budget(rows["uniform-3of8+int8"])  # 36 / 120 = 0.30: its small parent does not make it fit


def test_non_latency_budgets_give_an_int8_copy_its_parents_measure(monkeypatch, tmp_path):
    from kdforge.compress import pipeline
    from kdforge.compress.pipeline import Evaluated, int8_rows, within_budget

    r = CompressRecipe.from_dict({**RECIPE, "budget": {"metric": "params", "fraction": 0.5}})
    loads = Check("loads", True, "")

    def fake_int8(parent: Evaluated, *a: Any, **k: Any) -> Evaluated:
        return Evaluated(f"{parent.name}+int8", "x", parent.params, 0, 89.0, checks=[loads, _faster(10.0, 1.0)])

    monkeypatch.setattr(pipeline, "int8_candidate", fake_int8)
    orig = Evaluated("original", "original", 1000, 10, 90.0)
    floats = [Evaluated("w", "width", 450, 4, 85.0, files={"onnx": Path("f.onnx")}, checks=[loads],
                        info={"budget": {"ratio": 0.45, "fits": True}})]
    rows = {e.name: e for e in int8_rows(floats, orig, None, r, tmp_path, lambda m: None)}  # type: ignore[arg-type]
    # ten times faster, yet the original's int8 copy has all of its parameters: outside a params budget
    assert not within_budget(rows["original+int8"]) and rows["original+int8"].info["budget"]["ratio"] == 1.0
    assert within_budget(rows["w+int8"]) and rows["w+int8"].info["budget"]["ratio"] == 0.45
