"""One ``compat`` key per method: SGLP, CLIP-KD and MixSKD fold their old spellings into it."""

from __future__ import annotations

from typing import Any

import pytest

from kdforge.errors import KdforgeError
from kdforge.method import DataInfo, build_method
from kdforge.prune.sglp import PruneRecipe, default_select


def _prune(**kw: Any) -> PruneRecipe:
    return PruneRecipe.model_validate({"model": {"model": "resnet8"}, **kw})


def test_sglp_select_default_follows_the_candidate_mode() -> None:
    assert default_select("subnet") == "min"
    assert default_select("hybrid") == "max" and default_select("hybrid_code_compat") == "max"
    r = _prune()
    assert r.selection.select is None
    assert r.candidate_mode("hybrid") == "hybrid" and r.candidate_mode("subnet") == "subnet"
    assert r.analysis_config().backtrack == "exact" and r.quirks() == frozenset()


@pytest.mark.parametrize(("compat", "quirks"), [("paper", set()), ("official", {"backtrack", "hybrid"}),
                                                (["backtrack"], {"backtrack"}), (["hybrid"], {"hybrid"})])
def test_sglp_compat_turns_on_the_official_quirks(compat: Any, quirks: set[str]) -> None:
    r = _prune(compat=compat)
    assert r.quirks() == quirks
    assert r.analysis_config().backtrack == ("code_compat" if "backtrack" in quirks else "exact")
    assert r.candidate_mode("hybrid") == ("hybrid_code_compat" if "hybrid" in quirks else "hybrid")
    assert r.candidate_mode("subnet") == "subnet"  # a method choice, not a convention
    assert r.analysis.backtrack == "exact"  # the recipe as written is left alone


def test_sglp_old_spellings_still_work_with_a_note() -> None:
    with pytest.warns(FutureWarning, match="backtrack: code_compat is deprecated"):
        r = _prune(analysis={"backtrack": "code_compat"})
    assert r.quirks() == {"backtrack"}
    with pytest.warns(FutureWarning, match="hybrid_code_compat is deprecated"):
        r = _prune(selection={"candidate_mode": "hybrid_code_compat"})
    assert r.candidate_mode("subnet") == "hybrid_code_compat"
    with pytest.raises(ValueError, match="compat must be one of paper, official, backtrack, hybrid"):
        _prune(compat="torchdistill")


INFO = DataInfo(10, 1, 28)
SMALL = {"model": "cnn_small", "kwargs": {"width": 4}}


def test_mixskd_compat_official_is_the_old_code_compat() -> None:
    m = build_method({"name": "mixskd", "model": SMALL, "compat": "official"}, INFO)
    assert m.adv_mode == "code" and m.weights["mix"] == 0.0
    paper = build_method({"name": "mixskd", "model": SMALL}, INFO)
    assert paper.adv_mode == "minimax" and paper.weights["mix"] == 1.0
    with pytest.warns(FutureWarning, match="method.code_compat is deprecated; use method.compat: official"):
        old = build_method({"name": "mixskd", "model": SMALL, "code_compat": True}, INFO)
    assert old.adv_mode == "code" and old.weights["mix"] == 0.0
    with pytest.raises(KdforgeError, match="compat official"):
        build_method({"name": "mixskd", "model": SMALL, "compat": "official", "w_mix": 1.0}, INFO)


@pytest.mark.parametrize(("cfg", "mfd", "gd"), [({}, False, False), ({"compat": "official"}, True, True),
                                                ({"compat": ["mfd"]}, True, False),
                                                ({"compat": ["gd"]}, False, True)])
def test_clip_kd_compat_list(monkeypatch: pytest.MonkeyPatch, cfg: dict[str, Any], mfd: bool, gd: bool) -> None:
    import kdforge.clip.method as cm
    from kdforge.clip.model import build_clip

    tower = {"embed_dim": 8, "image": {"model": "vit", "kwargs": {"patch": 7, "width": 16, "depth": 1, "heads": 2}},
             "text": {"width": 16, "layers": 1, "heads": 2, "context": 16}}
    monkeypatch.setattr(cm, "load_clip", lambda spec, info: build_clip(tower))
    m = build_method({"name": "clip_kd", "teacher": {"checkpoint": "t.safetensors"}, "student": {},
                      "weights": {"mfd": 1.0, "gd": 1.0}, **cfg}, INFO)
    assert (m.mask_ratio == 0.0) is mfd
    assert m.kd.gd_compat is gd


def test_clip_kd_old_keys_warn_and_bad_values_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    import kdforge.clip.method as cm
    from kdforge.clip.model import build_clip

    tower = {"embed_dim": 8, "image": {"model": "vit", "kwargs": {"patch": 7, "width": 16, "depth": 1, "heads": 2}},
             "text": {"width": 16, "layers": 1, "heads": 2, "context": 16}}
    monkeypatch.setattr(cm, "load_clip", lambda spec, info: build_clip(tower))
    base = {"name": "clip_kd", "teacher": {"checkpoint": "t.safetensors"}, "student": {},
            "weights": {"mfd": 1.0, "gd": 1.0}}
    with pytest.warns(FutureWarning, match="method.mfd_compat is deprecated"):
        m = build_method({**base, "mfd_compat": True}, INFO)
    assert m.mask_ratio == 0.0 and not m.kd.gd_compat
    with pytest.raises(KdforgeError, match="compat must be one of paper, official, mfd, gd"):
        build_method({**base, "compat": ["repdistiller"]}, INFO)
