"""Measure candidate demo settings: paired KD gain (KD student − student alone, same seed) over seeds.

One call measures one condition (thread count, and whatever ``ATEN_CPU_CAPABILITY`` says) and merges it into
the JSON file, e.g. on the 2-core VM, pinned to one core::

    taskset -c 1 env OMP_NUM_THREADS=1 python scripts/demo_setting_search.py --threads 1
    taskset -c 1 python scripts/demo_setting_search.py --threads 2
    taskset -c 1 env OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=default python scripts/demo_setting_search.py --threads 1

Every candidate starts from the packaged demo recipes (``recipes/demo/student.yaml`` and ``kd.yaml``, the shipped
teacher) and changes them by ``--set``-style overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from kdforge.bench.common import machine_note
from kdforge.demo import demo_recipe, format_interval, paired_interval
from kdforge.run import train

HINTON = "[{loss: ce, weight: 0.1}, {loss: kd, weight: 0.9, T: 4}]"
# name -> (student overrides, both student and KD student; KD-only overrides; description)
CANDIDATES: dict[str, tuple[list[str], list[str], str]] = {
    "kd": ([], [f"method.terms={HINTON}"],
           "cnn_small w8 on 512 un-augmented images, 40 epochs; Hinton KD 0.1·CE + 0.9·KD, T 4"),
    "dkd": ([], [], "same student; CE + DKD (α 1, β 1, T 4, warm-up 5 epochs): recipes/demo/kd.yaml"),
}


def condition_label(threads: int) -> str:
    """'threads=1' or 'threads=1, ATEN_CPU_CAPABILITY=default'."""
    cap = os.environ.get("ATEN_CPU_CAPABILITY")
    return f"threads={threads}" + (f", ATEN_CPU_CAPABILITY={cap}" if cap else "")


def measure(name: str, seeds: int, threads: int, quick: bool) -> dict[str, Any]:
    """Train student alone and KD student for each seed of one candidate; return accuracies and the interval."""
    student_set, kd_set, desc = CANDIDATES[name]
    common = [f"train.threads={threads}", *(["train.epochs=1", "data.limit_train=128"] if quick else [])]
    alone, kd, times = [], [], []
    for s in range(seeds):
        t0 = time.perf_counter()
        alone.append(train(demo_recipe("student", [*common, *student_set, f"seed={s}"])).test_last["top1"])
        t1 = time.perf_counter()
        kd.append(train(demo_recipe("kd", [*common, *kd_set, f"seed={s}"])).test_last["top1"])
        times.append([t1 - t0, time.perf_counter() - t1])
        print(f"[{name}] seed {s}: alone {alone[-1]:.1f} kd {kd[-1]:.1f} ({times[-1][0]:.0f} s + {times[-1][1]:.0f} s)",
              flush=True)
    p = paired_interval(kd, alone)
    print(f"[{name}] paired gain {format_interval(p)}", flush=True)
    return {"description": desc, "student_overrides": student_set, "kd_overrides": kd_set, "alone": alone, "kd": kd,
            "paired": p, "run_s": times}


def report(data: dict[str, Any]) -> str:
    """Markdown tables of a search file: one row per (candidate, condition)."""
    lines = ["| candidate | condition | student alone (%) | KD student (%) | paired gain per seed | "
             "mean gain [95 % CI] | passes |", "| --- | --- | --- | --- | --- | --- | --- |"]
    names = sorted({n for c in data["conditions"].values() for n in c["candidates"]})
    for name in names:
        for label, cond in data["conditions"].items():
            c = cond["candidates"].get(name)
            if c is None:
                continue
            p = c["paired"]
            ok = p["mean"] >= 1.5 and p["excludes_zero"] and p["n"] >= 5
            lines.append(f"| {name} | {label} | {mean_std_text(c['alone'])} | {mean_std_text(c['kd'])} | "
                         f"{', '.join(f'{d:+.1f}' for d in p['diffs'])} | {format_interval(p)} | "
                         f"{'yes' if ok else 'no'} |")
    return "\n".join(lines)


def mean_std_text(values: list[float]) -> str:
    """'77.80 ± 1.20'."""
    import statistics

    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]}"


def main() -> None:
    """Measure the chosen candidates under one condition and merge them into the JSON file."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="train.threads of every run")
    ap.add_argument("--out", type=Path, default=Path("docs/demo-setting-search.json"))
    ap.add_argument("--quick", action="store_true", help="1 epoch on 128 images: a smoke test, not a result")
    ap.add_argument("--report", action="store_true", help="print the markdown table of --out and exit")
    args = ap.parse_args()
    data = json.loads(args.out.read_text()) if args.out.is_file() else {"conditions": {}}
    if args.report:
        print(report(data))
        return
    label = condition_label(args.threads)
    cond = data["conditions"].setdefault(label, {"candidates": {}})
    torch.set_num_threads(args.threads)  # so that machine_note names the condition's thread count
    cond.update({"threads": args.threads, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                 "machine": machine_note()})
    for name in args.candidates:
        cond["candidates"][name] = measure(name, args.seeds, args.threads, args.quick)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1))
    print(f"wrote {args.out} ({label})")


if __name__ == "__main__":
    main()
