"""The kd-zoo benchmark's quick mode, its coverage of the zoo, and the CIFAR-100 paper-scale recipes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import kdforge as kd
from kdforge.bench import load_benches
from kdforge.bench.kd_zoo import STUDENT, methods
from kdforge.method import DataInfo, build_method

ROOT = Path(__file__).resolve().parent.parent
CIFAR_RECIPES = sorted(p for p in (ROOT / "recipes" / "cifar100").glob("*.yaml")
                       if p.name.startswith(("teacher_", "kd_", "dkd_")))
PAIRS = [("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"),
         ("wrn_40_2", "wrn_40_1"), ("vgg13", "vgg8"), ("vgg13", "mobilenetv2"), ("resnet32x4", "shufflenetv2")]


def test_bench_covers_every_zoo_loss_and_scheme() -> None:
    rows = methods("t.safetensors", "t2.safetensors")
    names = {m["name"] for _, _, m, _ in rows}
    losses = {t["loss"] for _, _, m, _ in rows for t in m.get("terms", [])}
    assert {"supervised", "distill", "at", "dml", "kdcl", "multi_teacher", "aekd", "cross_modal", "adversarial",
            "dafl", "deepinversion"} <= names
    assert {"kd", "dkd", "dist", "fitnet", "nst", "ft", "ab", "fsp", "vid", "ofd", "reviewkd", "rkd", "sp", "cc",
            "pkt", "crd"} <= losses
    assert all(_deployed(m) == STUDENT for _, _, m, _ in rows)  # one fixed student


def _deployed(m: dict) -> dict:
    """The deployed model spec of a bench row."""
    return m["peers"][m.get("deploy", 0)] if "peers" in m else m.get("student") or m["model"]


def test_quick_bench_writes_table_and_chart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the cached teachers go to ./runs/cache
    out = tmp_path / "out"
    path = load_benches().get("kd-zoo")(out=out, quick=True)
    assert path == out / "kd-zoo.md"
    md = path.read_text()
    for label, _, _, _ in methods("a", "b"):
        assert f"| {label} |" in md
    assert "kdforge bench kd-zoo --quick" in md and "±" in md and "CPU cores" in md
    assert (out / "kd-zoo.png").stat().st_size > 1000
    assert (out / "kd-zoo.json").is_file()
    assert not (tmp_path / "docs").exists()  # quick with --out never touches docs/
    assert any((tmp_path / "runs" / "cache").iterdir())


def test_cifar100_recipe_set_is_complete() -> None:
    names = {p.name for p in CIFAR_RECIPES}
    for t in {"resnet56", "resnet110", "resnet32x4", "wrn_40_2", "vgg13"}:
        assert f"teacher_{t}.yaml" in names
    for t, s in PAIRS:
        assert f"kd_{t}_{s}.yaml" in names and f"dkd_{t}_{s}.yaml" in names


@pytest.mark.parametrize("path", CIFAR_RECIPES, ids=[p.stem for p in CIFAR_RECIPES])
def test_cifar100_recipe_validates_and_runs_one_step(path: Path) -> None:
    r = kd.Recipe.from_yaml(path)
    assert (r.data.name, r.data.root, r.data.download, r.data.batch_size) == ("cifar100", "data", True, 64)
    assert (r.train.epochs, r.sched.name, r.sched.milestones, r.sched.gamma) == (240, "multistep", [150, 180, 210], 0.1)
    assert (r.optim.name, r.optim.momentum, r.optim.weight_decay) == ("sgd", 0.9, 5e-4)
    cfg = r.method.model_dump()
    student = (cfg.get("student") or cfg["model"])["model"]
    assert r.optim.lr == (0.01 if student in ("mobilenetv2", "shufflenetv2") else 0.05)
    if "teacher" in cfg:
        assert cfg["teacher"]["checkpoint"] == f"runs/cifar100-{cfg['teacher']['model']}/checkpoints/best.safetensors"
        terms = {t["loss"]: t for t in cfg["terms"]}
        if path.name.startswith("kd_"):
            assert terms["ce"]["weight"] == 0.1 and terms["kd"]["weight"] == 0.9 and terms["kd"]["T"] == 4
        cfg["teacher"]["checkpoint"] = None  # no CIFAR teacher here: a random one runs the same code
    torch.manual_seed(0)
    method = build_method(cfg, DataInfo(100, 3, 32))
    batch = (torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,)))
    method.setup(batch)
    method.train()
    out = method.training_step(batch, 0)
    assert math.isfinite(float(out["loss"].detach()))
    out["loss"].backward()
    assert any(p.grad is not None for p in method.deployable().parameters())


def _drawn_axes(monkeypatch: pytest.MonkeyPatch) -> list:
    """Collect the figures that charts save, to read their axes back."""
    import matplotlib.figure

    saved: list = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: (saved.append(fig), real(fig, *a, **k))[1])
    return saved


def test_chart_axis_is_fitted_to_the_stored_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from kdforge.bench.kd_zoo import chart

    results = json.loads((ROOT / "docs" / "benchmarks" / "kd-zoo.json").read_text())["results"]
    means = {k: sum(r["last"] for r in v) / len(v) for k, v in results.items()}
    saved = _drawn_axes(monkeypatch)
    chart(results, tmp_path / "kd-zoo.png")
    (fig,) = saved
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    # the 3.6-point DKD gain must take a visible part of the axis: a 0–100 (or 0–85) axis fails here
    gain = means["dkd"] - means["student alone"]
    assert 3 < gain < 4 and gain / (hi - lo) > 0.25, (lo, hi)
    assert lo > 60 and all(lo < m < hi for k, m in means.items() if k not in ("dafl", "deepinversion"))
    # the two data-free rows, ~56 points below, are marked at the edge with their value instead
    texts = [t.get_text() for t in ax.texts]
    assert texts == [f"{means['dafl']:.1f}\n± 16.6", f"{means['deepinversion']:.1f}\n± 6.9"]
    assert sum(a.get_legend() is not None for a in fig.axes) + len(fig.legends) == 1  # one legend


def test_chart_range_keeps_every_row_without_a_clear_outlier() -> None:
    from kdforge.bench.common import chart_range

    lo, hi, off = chart_range([82.9, 83.3, 82.6, 82.5], [0.9, 0.1, 0.7, 1.2], baseline=82.9)
    assert off == [] and 80.5 < lo < 81.3 and 84.0 < hi < 84.8  # min−std 81.3, max+std 83.8, 0.5-point margins
    assert chart_range([10.0, 90.0], [1.0, 1.0])[2] == []  # two far-apart rows: neither is "the outlier"


def test_a_quick_bench_says_it_is_a_smoke_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import kdforge.bench
    from kdforge.bench.common import run_bench

    def fake(out: Path, quick: bool) -> Path:
        print("fake: top-1 10.00 ± 0.00")  # a chance-level number, as a 1-step run prints
        (out / "fake.md").write_text("# Fake bench\n\n| row | top-1 |\n")
        return out / "fake.md"

    monkeypatch.setattr(kdforge.bench, "load_benches", lambda: {"fake": fake})
    run_bench("fake", tmp_path / "b", quick=True)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("smoke run (--quick)") and out[1] == "fake: top-1 10.00 ± 0.00"
    assert out[2].startswith("smoke run (--quick)") and "say nothing" in out[2]
    assert (tmp_path / "b" / "fake.md").read_text().startswith("# Fake bench (smoke run)")
    run_bench("fake", tmp_path / "c")
    assert "smoke run" not in capsys.readouterr().out
