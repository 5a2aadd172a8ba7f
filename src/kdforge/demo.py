"""The first-run demo: the shipped teacher, a data-limited student alone and the same student with KD.

The teacher (``recipes/demo/teacher.safetensors``, cnn_small width 16, 88.5 % test top-1) ships with the package;
``scripts/make_demo_teacher.py`` re-creates it. Each seed trains the student alone and the KD student with the
same seed; the demo reports the paired per-seed differences and their 95 % t-interval.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from kdforge.config import Recipe, load_yaml
from kdforge.engine.run_dir import prepare_run_dir, read_csv
from kdforge.evaluate import load_deployable
from kdforge.profile import profile
from kdforge.run import train

DEFAULT_SEEDS = 5
QUICK = ["train.epochs=1", "train.eval_every=1", "data.limit_train=128"]


def demo_recipe(name: str, overrides: list[str] | None = None) -> Recipe:
    """One of the packaged demo recipes (teacher, student, kd); kd's teacher checkpoint is the shipped one."""
    with resources.as_file(resources.files("kdforge") / "recipes" / "demo" / f"{name}.yaml") as p:
        data = load_yaml(p)
    if name == "kd":
        data["method"]["teacher"]["checkpoint"] = str(teacher_checkpoint())
    return Recipe.from_dict(data, overrides)


def teacher_checkpoint() -> Path:
    """Path of the teacher weights shipped inside the package."""
    return Path(str(resources.files("kdforge") / "recipes" / "demo" / "teacher.safetensors"))


def paired_interval(kd: Sequence[float], alone: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Per-seed differences ``kd - alone``, their mean, sample std and two-sided t-interval (n - 1 dof)."""
    diffs = [a - b for a, b in zip(kd, alone, strict=True)]
    n = len(diffs)
    if n == 0:
        raise ValueError("paired_interval needs at least one pair")
    mean = statistics.fmean(diffs)
    if n == 1:
        return {"diffs": diffs, "n": 1, "mean": mean, "sd": math.nan, "lo": math.nan, "hi": math.nan,
                "t": math.nan, "confidence": confidence, "excludes_zero": False}
    from scipy.stats import t as student_t

    sd = statistics.stdev(diffs)
    tq = float(student_t.ppf(0.5 + confidence / 2, n - 1))
    half = tq * sd / math.sqrt(n)
    lo, hi = mean - half, mean + half
    return {"diffs": diffs, "n": n, "mean": mean, "sd": sd, "lo": lo, "hi": hi, "t": tq,
            "confidence": confidence, "excludes_zero": bool(lo > 0 or hi < 0)}


def format_interval(p: dict[str, Any]) -> str:
    """'+2.10 [+1.05, +3.15]' for a paired_interval result (the 95 % CI in brackets)."""
    if p["n"] < 2:
        return f"{p['mean']:+.2f} (one seed: no interval)"
    return f"{p['mean']:+.2f} [{p['lo']:+.2f}, {p['hi']:+.2f}]"


def run_demo(out: Path, seeds: int = DEFAULT_SEEDS, overwrite: bool = False, quick: bool = False,
             threads: int | None = None) -> dict[str, Any]:
    """Evaluate the teacher, train student alone and KD student per seed; print the table and the paired gain."""
    prepare_run_dir(out, overwrite=overwrite, kind="demo")
    # the demo prints its own lines and table: its runs print nothing
    common = ["train.progress=silent", *(QUICK if quick else []), *([f"train.threads={threads}"] if threads else [])]
    t0 = time.perf_counter()
    _say(f"[1/3] teacher: shipped {teacher_checkpoint().name} (scripts/make_demo_teacher.py re-creates it)")
    teacher_acc = _teacher_accuracy()
    results: dict[str, list[Any]] = {"student": [], "kd": []}
    for s in range(seeds):
        _say(f"[2/3] student alone, seed {s}")
        results["student"].append(train(demo_recipe("student", [*common, f"seed={s}"]), out / f"student-seed{s}"))
        _say(f"[3/3] KD student, seed {s}")
        results["kd"].append(train(demo_recipe("kd", [*common, f"seed={s}"]), out / f"kd-seed{s}"))
    alone = [f.test_last["top1"] for f in results["student"]]
    kd = [f.test_last["top1"] for f in results["kd"]]
    paired = paired_interval(kd, alone)
    rows = [_row("teacher (cnn_small w16, shipped)", [teacher_acc], _teacher_model()),
            _row("student alone (cnn_small w8)", alone, load_deployable(out / "student-seed0", "last")[0]),
            _row("KD student (cnn_small w8)", kd, load_deployable(out / "kd-seed0", "last")[0])]
    elapsed = time.perf_counter() - t0
    _print_table(rows, paired, seeds, elapsed)
    if quick:
        print("smoke run (--quick): a tiny training budget, so these numbers say nothing about KD; "
              "'kdforge demo' without --quick gives the table of docs/demo.md")
    _write_report(out, rows, paired, seeds, elapsed, quick)
    summary = {"rows": rows, "paired": paired, "seeds": seeds, "threads": threads, "elapsed_s": elapsed,
               "quick": quick}
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    return summary


def _teacher_accuracy() -> float:
    """Test top-1 (%) of the shipped teacher on the embedded test split."""
    import torch

    from kdforge.data import load_data, make_loader

    data = load_data(demo_recipe("teacher").data)
    model, correct = _teacher_model(), 0
    with torch.no_grad():
        for x, y in make_loader(data.test, 500, train=False):
            correct += int((model(x).argmax(-1) == y).sum())
    return 100.0 * correct / len(data.test)


def _row(label: str, accs: list[float], model: Any) -> dict[str, Any]:
    prof = profile(model, (1, 28, 28), batch_size=1, repeats=50)
    return {"model": label, "runs": len(accs), "accs": accs, "mean": statistics.fmean(accs),
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "params": prof.params,
            "mflops": prof.flops / 1e6, "latency_ms": prof.latency_ms}


def _teacher_model() -> Any:
    """The shipped teacher, built from the teacher recipe's model spec."""
    from kdforge.models import create_model

    spec = demo_recipe("teacher").method.model_extra["model"]
    return create_model(spec["model"], num_classes=10, in_chans=1, image_size=28, checkpoint=teacher_checkpoint(),
                        **spec.get("kwargs", {})).eval()


def _acc_cell(r: dict[str, Any]) -> str:
    return f"{r['mean']:.2f} ± {r['std']:.2f}" if r["runs"] > 1 else f"{r['mean']:.2f}"


def _print_table(rows: list[dict[str, Any]], paired: dict[str, Any], seeds: int, elapsed: float) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"kdforge demo: Fashion-MNIST subset (student: 512 labelled images; test: 1,000), "
                    f"{seeds} seeds")
    for c in ("model", "test top-1 (%)", "per seed", "params", "MFLOPs", "CPU latency, batch 1 (ms)"):
        t.add_column(c, justify="left" if c in ("model", "per seed") else "right")
    for r in rows:
        per_seed = ", ".join(f"{a:.1f}" for a in r["accs"]) if r["runs"] > 1 else "shipped"
        t.add_row(r["model"], _acc_cell(r), per_seed, f"{r['params']:,}", f"{r['mflops']:.2f}",
                  f"{r['latency_ms']:.3f}")
    t.add_row("KD − alone, paired", f"{format_interval(paired)}", ", ".join(f"{d:+.1f}" for d in paired["diffs"]),
              "", "", "")
    Console(width=160).print(t)
    ci = (f"95 % t-interval [{paired['lo']:+.2f}, {paired['hi']:+.2f}] ({paired['n'] - 1} dof)" if paired["n"] > 1
          else "no interval with one seed")
    print(f"KD gain over the student alone: {paired['mean']:+.2f} points, mean of {paired['n']} paired seeds "
          f"(per seed {', '.join(f'{d:+.1f}' for d in paired['diffs'])}); {ci}; "
          f"finished in {elapsed / 60:.1f} min", flush=True)


def _write_report(out: Path, rows: list[dict[str, Any]], paired: dict[str, Any], seeds: int, elapsed: float,
                  quick: bool) -> None:
    from kdforge.bench.common import machine_note
    from kdforge.report.run_report import plot_curves

    curves = {f"{kind} (seed 0)": read_csv(out / f"{kind}-seed0" / "metrics.csv") for kind in ("student", "kd")}
    plot_curves(curves, out / "curves.png", title="kdforge demo")
    lines = ["# kdforge demo", "", f"Command: `kdforge demo{' --quick' if quick else ''}` "
             f"({seeds} seeds; {machine_note()}; {elapsed / 60:.1f} min).", "",
             "| model | test top-1 (%) | per seed | params | MFLOPs | CPU latency, batch 1 (ms) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        per_seed = ", ".join(f"{a:.1f}" for a in r["accs"]) if r["runs"] > 1 else "shipped"
        lines.append(f"| {r['model']} | {_acc_cell(r)} | {per_seed} | {r['params']:,} | {r['mflops']:.2f} | "
                     f"{r['latency_ms']:.3f} |")
    lines += ["", f"KD − alone, paired by seed: {', '.join(f'{d:+.1f}' for d in paired['diffs'])}; "
              f"mean {format_interval(paired)} (95 % t-interval, {paired['n'] - 1} dof).", "",
              "Accuracy: last epoch on the 1,000 test images, mean ± sample std over seeds. CPU runs repeat "
              "exactly on one machine, not across machines.", "", "![learning curves](curves.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
