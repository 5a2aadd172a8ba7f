"""``kdforge bench audio --quick``: the smoke run writes a labelled page with every row and the published table."""

from __future__ import annotations

import json

from kdforge.bench.common import run_bench


def test_bench_audio_quick_writes_the_page(tmp_path) -> None:
    out = run_bench("audio", tmp_path / "audio", quick=True)
    md = (out / "audio.md").read_text()
    assert md.splitlines()[0].endswith("(smoke run)")
    for row in ("M1: CE", "M2: M1 + LS", "M3: M1 frozen", "M4: M1 frozen + LS + focal", "fused, uniform weights",
                "fused, published", "fused, weights searched on val", "ablation: M3 with freeze_bn_stats=True",
                "TCL AI Lab AudioInceptionNeXt, 1st place | test | 55.43", "unknown"):
        assert row in md, row
    raw = json.loads((out / "audio.json").read_text())
    run = raw["runs"]["0"]
    assert set(run["stages"]) == {"pretrain", "m1", "m2", "m3", "m4", "m2_ce", "m3_bnstats", "m4_std_focal"}
    assert run["fusion"]["models"] == ["m1", "m2", "m3", "m4"] and raw["cpu_s"] > 0
    assert (out / "audio.png").is_file()
