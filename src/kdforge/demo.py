"""The first-run demo: teacher, student alone and KD student on the embedded Fashion-MNIST subset."""

from __future__ import annotations

import json
import statistics
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

from kdforge.config import Recipe, load_yaml
from kdforge.engine.run_dir import prepare_run_dir, read_csv
from kdforge.evaluate import load_deployable
from kdforge.profile import profile
from kdforge.run import train


def demo_recipe(name: str, overrides: list[str] | None = None) -> Recipe:
    """One of the packaged demo recipes (teacher, student, kd)."""
    with resources.as_file(resources.files("kdforge") / "recipes" / "demo" / f"{name}.yaml") as p:
        return Recipe.from_dict(load_yaml(p), overrides)


def run_demo(out: Path, seeds: int = 3, overwrite: bool = False, quick: bool = False) -> dict[str, Any]:
    """Train the three kinds of model, print the comparison table, write report.md and curves.png."""
    prepare_run_dir(out, overwrite=overwrite)
    quick_set = ["train.epochs=1", "data.limit_train=512"] if quick else []
    common = quick_set
    t0 = time.perf_counter()
    _say(f"[1/3] teacher -> {out / 'teacher'}")
    teacher_res = train(demo_recipe("teacher", common), out / "teacher")
    ck = out / "teacher" / "checkpoints" / "last.safetensors"
    results: dict[str, list[Any]] = {"student": [], "kd": []}
    for s in range(seeds):
        _say(f"[2/3] student alone, seed {s}")
        results["student"].append(train(demo_recipe("student", [*common, f"seed={s}"]), out / f"student-seed{s}"))
        _say(f"[3/3] KD student, seed {s}")
        results["kd"].append(train(demo_recipe("kd", [*common, f"seed={s}", f"method.teacher.checkpoint={ck}"]),
                                   out / f"kd-seed{s}"))
    rows = [_row("teacher (cnn_small w32)", [teacher_res], out / "teacher"),
            _row("student alone (cnn_tiny)", results["student"], out / "student-seed0"),
            _row("KD student (cnn_tiny)", results["kd"], out / "kd-seed0")]
    elapsed = time.perf_counter() - t0
    _print_table(rows, seeds, elapsed)
    _write_report(out, rows, seeds, elapsed, quick)
    summary = {"rows": rows, "seeds": seeds, "elapsed_s": elapsed, "quick": quick}
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    return summary


def _row(label: str, fits: list[Any], run_dir: Path) -> dict[str, Any]:
    accs = [f.test_last["top1"] for f in fits]
    model, meta = load_deployable(run_dir, "last")
    shape = (int(meta["in_chans"]), int(meta["image_size"]), int(meta["image_size"]))
    prof = profile(model, shape, batch_size=1, repeats=50)
    return {"model": label, "runs": len(accs), "accs": accs, "mean": statistics.fmean(accs),
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "params": prof.params,
            "mflops": prof.flops / 1e6, "latency_ms": prof.latency_ms}


def _print_table(rows: list[dict[str, Any]], seeds: int, elapsed: float) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"kdforge demo: Fashion-MNIST subset (5,400 train / 1,000 test), {seeds} student seeds")
    for c in ("model", "test top-1 (%)", "params", "MFLOPs", "CPU latency, batch 1 (ms)"):
        t.add_column(c, justify="right" if c != "model" else "left")
    for r in rows:
        acc = f"{r['mean']:.2f} ± {r['std']:.2f}" if r["runs"] > 1 else f"{r['mean']:.2f}"
        t.add_row(r["model"], acc, f"{r['params']:,}", f"{r['mflops']:.2f}", f"{r['latency_ms']:.3f}")
    Console().print(t)
    gain = rows[2]["mean"] - rows[1]["mean"]
    print(f"KD gain over the student alone: {gain:+.2f} points (mean over {seeds} seeds); "
          f"finished in {elapsed / 60:.1f} min", flush=True)


def _write_report(out: Path, rows: list[dict[str, Any]], seeds: int, elapsed: float, quick: bool) -> None:
    from kdforge.bench.common import machine_note
    from kdforge.report.run_report import plot_curves

    curves = {"teacher": read_csv(out / "teacher" / "metrics.csv")}
    for kind in ("student", "kd"):
        curves[f"{kind} (seed 0)"] = read_csv(out / f"{kind}-seed0" / "metrics.csv")
    plot_curves(curves, out / "curves.png", title="kdforge demo")
    lines = ["# kdforge demo", "", f"Command: `kdforge demo{' --quick' if quick else ''}` "
             f"({seeds} student seeds; {machine_note()}; {elapsed / 60:.1f} min).", "",
             "| model | test top-1 (%) | params | MFLOPs | CPU latency, batch 1 (ms) |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['mean']:.2f} ± {r['std']:.2f} | {r['params']:,} | {r['mflops']:.2f} | "
                     f"{r['latency_ms']:.3f} |")
    lines += ["", "Accuracy: last epoch on the 1,000 test images, mean ± sample std over seeds (the teacher: one run).",
              "", "![learning curves](curves.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
