"""``kdforge bench compress``: a CIFAR-style ResNet trained here, compressed to 50 % and 25 % of its latency.

Every candidate family (depth: SGLP, block influence, uniform, random; width: Torch-Pruning) is searched
against each latency budget, healed by KD from the teacher with several seeds, exported (ONNX, torch.export,
safetensors) and put through the gate (seed 0's model); the page lists what the gate rejected and why.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from kdforge.bench import BENCHES
from kdforge.bench.common import bench_dir, fmt_mean_std, machine_note, mean_std, write_json


def _log(msg: str) -> None:
    print(f"[compress] {msg}", file=sys.stderr, flush=True)


def _settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"model": "resnet8", "data": {"name": "digits", "batch_size": 64, "val_fraction": 0.1,
                                             "augment": False},
                "teacher_epochs": 3, "teacher_lr": 0.1, "teacher_batch": 64, "fractions": [0.5],
                "families": ["uniform", "width"], "seeds": [0], "heal_epochs": 1, "max_drop": 5.0,
                "formats": ["onnx", "safetensors"], "batch_sizes": [1, 64], "iters": 2, "cache": None,
                "int8": "static"}
    # sized to ~20 core-minutes (teacher ~6.5 min + 2 candidates x 3 seeds x 3 heal epochs + gates); what a
    # fuller run would add is named on the page (CUT)
    return {"model": "resnet32", "data": {"name": "fashion_mnist_subset", "batch_size": 128, "val_fraction": 0.1},
            "teacher_epochs": 6, "teacher_lr": 0.05, "teacher_batch": 64, "fractions": [0.5],
            "families": ["block_influence", "width"], "seeds": [0, 1, 2], "int8": "static",
            "heal_epochs": 3, "max_drop": 1.5, "formats": ["onnx", "pt2", "safetensors"], "batch_sizes": [1, 64],
            "iters": 3, "cache": "runs/cache"}


#: what the full bench leaves out to fit its core-minute budget (said on the page)
CUT = ("the 25 % latency budget and the sglp, uniform and random depth families (a 1-epoch run of all five "
       "families at 50 % and 25 % took 30.6 core-minutes, and its 25 % candidates lost 10-11 points after one "
       "heal epoch); only block influence (depth) and Torch-Pruning (width) are searched, at 50 %")


def _teacher(s: dict[str, Any], cache: Path) -> Path:
    from kdforge.bench.common import cached_run
    from kdforge.config import Recipe

    recipe = Recipe.from_dict({
        "name": f"compress-teacher-{s['model']}", "seed": 0,
        "data": dict(s["data"], batch_size=s["teacher_batch"]),
        "method": {"name": "supervised", "model": {"model": s["model"]}},
        "optim": {"lr": s["teacher_lr"], "weight_decay": 5e-4},
        "sched": {"name": "cosine", "warmup_epochs": 1},
        "train": {"epochs": s["teacher_epochs"], "progress": "never", "threads": 1}})
    return cached_run(recipe, cache) / "checkpoints" / "last.safetensors"


def _train_seconds(ckpt: Path) -> float | None:
    """The teacher run's recorded training time (also when this bench found it cached)."""
    import json

    try:
        return float(json.loads((ckpt.parent.parent / "results.json").read_text())["train_time_s"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


@BENCHES.register("compress")
def run(out: Path | None = None, quick: bool = False) -> dict[str, Any]:
    """Compress a CIFAR-style ResNet to 50 % and 25 % of its latency: every family healed, exported, gated."""
    import tempfile

    from kdforge.compress.candidates import search_candidates, skipped_json
    from kdforge.compress.export import export_all
    from kdforge.compress.gate import check_loads, onnx_runner, verdict
    from kdforge.compress.heal import heal
    from kdforge.compress.pipeline import Evaluated, accuracy, environment, gate_candidate
    from kdforge.compress.recipe import CompressRecipe
    from kdforge.compress.source import load_source, plain_batch
    from kdforge.profile import count_flops, count_params

    s = _settings(quick)
    out = bench_dir("compress", out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    cache = Path(s["cache"]) if s["cache"] else Path(tempfile.mkdtemp(prefix="compress-cache-"))
    t0 = time.perf_counter()
    ckpt = _teacher(s, cache)
    teacher_s = time.perf_counter() - t0
    teacher_train_s = _train_seconds(ckpt)
    budgets: list[dict[str, Any]] = []
    orig_row: dict[str, Any] = {}
    for frac in s["fractions"]:
        r = CompressRecipe.from_dict({
            "name": f"bench-{int(100 * frac)}", "model": {"model": s["model"], "checkpoint": str(ckpt)},
            "data": s["data"], "budget": {"metric": "latency", "fraction": frac, "max_drop": s["max_drop"],
                                          "latency_batch": 64},
            "candidates": {"families": s["families"], "max_candidates": 8, "int8": s.get("int8", "none")},
            "export": {"formats": s["formats"]},
            "gate": {"batch_sizes": s["batch_sizes"], "iters": s["iters"], "rounds": 7, "threads": 1},
            "optim": {"name": "sgd", "lr": 0.02, "weight_decay": 5e-4},
            "train": {"epochs": s["heal_epochs"], "progress": "never", "save_checkpoints": False, "threads": 1}})
        src = load_source(r)
        folder = out / "runs" / r.name
        if not orig_row:
            orig = Evaluated("original", "original", count_params(src.model), count_flops(src.model, src.input_shape),
                             accuracy(src.model, src))
            orig.files = export_all(src.model, src.input_shape, out / "runs" / "original", s["formats"], src.spec, {})
            _, _, facts = check_loads(orig.files, plain_batch(src.data.test, 2, 0)[0], 1, max(s["batch_sizes"]))
            orig.info["peak_rss_mb"] = facts.get("onnx", {}).get("peak_rss_mb")
            orig_runner = onnx_runner(orig.files["onnx"], 1)
            orig_row = orig.to_json()
            _log(f"teacher {s['model']}: top-1 {orig.top1:.2f}, {orig.params:,} params ({teacher_s:.0f}s)")
        t_b = time.perf_counter()
        original_value, cands, skipped = search_candidates(src, r, _log)
        rows = []
        for c in cands:
            healed, accs, heal_s, models = None, [], [], []
            for seed in s["seeds"]:
                m, info = heal(c.model, src.model, src.data, r, seed=seed)
                accs.append(accuracy(m, src))
                heal_s.append(info.get("train_time_s", 0.0))
                healed = healed or m
                models.append(m)
            assert healed is not None
            e = Evaluated(c.name, c.family, count_params(healed), count_flops(healed, src.input_shape), accs[0],
                          info={"budget_fraction": c.budget_fraction, "search_seconds": c.search_seconds,
                                **c.info})
            e.files = export_all(healed, src.input_shape, folder / c.name, s["formats"], src.spec, c.plan)
            e.checks, info = gate_candidate(healed, e.files, orig, src, r, accs[0], orig_runner)
            e.info.update(info)
            row = e.to_json()
            row.update({"top1_seeds": accs, "heal_s": heal_s, "no_heal_top1": accuracy(c.model, src)})
            rows.append(row)
            failed = verdict(e.checks)
            _log(f"{frac:.0%} {c.name}: healed top-1 {fmt_mean_std(accs)} over {len(accs)} seeds; gate "
                 + ("passed" if failed is None else f"FAILED {failed.line()}"))
            if s.get("int8", "none") != "none" and e.checks and e.checks[0].ok:
                rows.append(_int8_row(e, models, orig, src, r, folder, orig_runner))
                failed = verdict(rows[-1]["checks"])
                _log(f"{frac:.0%} {rows[-1]['name']}: top-1 {fmt_mean_std(rows[-1]['top1_seeds'])} in onnxruntime; "
                     "gate " + ("passed" if failed is None else f"FAILED {failed.line()}"))
                rows[-1].pop("checks")
        budgets.append({"fraction": frac, "original_budget_value": original_value, "rows": rows,
                        "skipped": skipped_json(skipped), "seconds": time.perf_counter() - t_b})
    result = {"settings": s, "original": orig_row, "budgets": budgets, "environment": environment(1),
              "machine": machine_note(), "timing": {"teacher_s": teacher_s, "teacher_train_s": teacher_train_s,
                                                   "total_s": time.perf_counter() - t_all}}
    write_json(out / "compress.json", result)
    _write_md(out / "compress.md", result, quick)
    _plot(out / "compress.png", result)
    return result


def _int8_row(parent: Any, models: list[Any], orig: Any, src: Any, r: Any, folder: Path, orig_runner: Any
              ) -> dict[str, Any]:
    """The int8 copy of a healed candidate: seed 0's gated, every seed's accuracy in onnxruntime."""
    from kdforge.compress.export import export_onnx
    from kdforge.compress.pipeline import int8_candidate
    from kdforge.compress.quant import onnx_accuracy, quantize_onnx
    from kdforge.compress.source import plain_batch

    e = int8_candidate(parent, orig, src, r, folder / f"{parent.name}+int8", orig_runner)
    accs = [e.top1]
    calib = plain_batch(src.data.train, r.candidates.int8_calib_samples, r.candidates.seed)[0].numpy()
    for k, m in enumerate(models[1:], 1):  # the other seeds' healed models, quantized the same way
        d = folder / f"{parent.name}+int8" / f"seed{k}"
        d.mkdir(parents=True, exist_ok=True)
        q = quantize_onnx(export_onnx(m, src.input_shape, d / "model.onnx"), d / "model.int8.onnx",
                          r.candidates.int8, calib)
        accs.append(onnx_accuracy(q, src.data.test, r.gate.threads))
    row = e.to_json()
    row.update({"top1_seeds": accs, "heal_s": [], "no_heal_top1": None, "checks": e.checks})
    return row


def _teacher_time(t: dict[str, Any]) -> str:
    """How long the teacher took: trained in this run, or cached by an earlier run of the same recipe."""
    train = t.get("teacher_train_s")
    if t["teacher_s"] > 5 or train is None:
        return f"{t['teacher_s'] / 60:.1f} min on one core"
    return f"{train / 60:.1f} min on one core when trained; cached in runs/cache, where this run found it"


def _row_cells(o: dict[str, Any], c: dict[str, Any], bs: list[int]) -> list[str]:
    fast = c["gate"].get("faster", {}).get("values", {})
    lat = [f"{fast['latency'][str(b)]['compressed']['median_ms']:.2f}" if fast else "—" for b in bs]
    spd = [f"{fast['speedup'][str(b)]:.2f}×" if fast else "—" for b in bs]
    m, sd = mean_std(c["top1_seeds"])
    failed = next((k for k, v in c["gate"].items() if not v["ok"]), None)
    over = fast.get("speedup_over", {}).get("float", {}) if fast else {}
    gain = [f"{over[str(b)]:.2f}×" if over else "—" for b in bs]
    cut = "—" if c["no_heal_top1"] is None else f"{c['no_heal_top1']:.2f}"
    return [c["name"], f"{c['bytes'].get('onnx', 0) / 1e6:.3f}", f"{c['params']:,}",
            f"{c.get('peak_rss_mb') or 0:.0f}", *lat, *spd, *gain, cut, f"{m:.2f} ± {sd:.2f}",
            f"{c['top1']:.2f}", f"{o['top1'] - m:+.2f}", f"{o['top1'] - c['top1']:+.2f}",
            "pass" if c["passed"] else f"**rejected: {failed}**"]


def _write_md(path: Path, res: dict[str, Any], quick: bool) -> None:
    s, o, env = res["settings"], res["original"], res["environment"]
    bs = s["batch_sizes"]
    head = (["model", "ONNX MB", "params", "peak RSS MB"] + [f"ms b{b}" for b in bs] + [f"speed-up b{b}" for b in bs]
            + [f"int8 vs float b{b}" for b in bs]
            + ["top-1 cut", f"top-1 healed ({len(s['seeds'])} seeds)", "gated top-1 (seed 0)", "mean drop",
               "gated drop", "gate"])
    fracs = " and ".join(f"{f:.0%}".replace("%", " %") for f in s["fractions"])
    int8 = s.get("int8", "none")
    lines = [f"# Benchmark: compress ({s['model']} on {s['data']['name']})", "",
             f"Command: `OMP_NUM_THREADS=1 taskset -c 0 kdforge bench compress{' --quick' if quick else ''} "
             "--publish` (one pinned core, one thread; rerun it to reproduce).", "",
             f"A CIFAR-style {s['model']} teacher trained by the bench ({s['teacher_epochs']} epochs, "
             + _teacher_time(res["timing"]) + f"), compressed to at most {fracs} of its latency "
             "(eager, batch 64, each candidate timed interleaved with the original during the search). Families: "
             f"{', '.join(s['families'])}. Each candidate is healed by KD from the teacher ({s['heal_epochs']} "
             f"epochs, seeds {s['seeds']}; mean ± sample std), exported and gated (seed 0's model). "
             + (f"Each healed candidate that loads is also quantized to int8 by onnxruntime's own quantizer "
                f"({int8}: QDQ, per-channel int8 weights, uint8 activations calibrated on "
                "256 training images) and gated as its own row: `matches` compares the fresh process with the "
                "in-process quantized session, quality is the int8 session's test top-1 (every seed's model "
                "quantized alike), and `int8 vs float` is its speed-up over its float parent timed in the same "
                "rounds. " if int8 != "none" else "")
             + f"Allowed drop: {s['max_drop']:g} points of test top-1 (the test split is never "
             "read by the search or the healing); the gate judges seed 0's model (`gated drop`), `mean drop` is "
             "that of the seeds' mean. Latency: onnxruntime, 1 thread, median of 7 interleaved "
             "rounds with the original.", ""]
    if not quick:
        lines += [f"Cut to fit the bench's core-minute budget: {CUT}.", ""]
    o_cells = ["original", f"{o['bytes'].get('onnx', 0) / 1e6:.3f}", f"{o['params']:,}",
               f"{o.get('peak_rss_mb') or 0:.0f}"]
    for b in res["budgets"]:
        lines += [f"## Budget: {b['fraction']:.0%} of the original's latency", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        first = b["rows"][0]["gate"].get("faster", {}).get("values", {}) if b["rows"] else {}
        olat = [f"{first['latency'][str(x)]['original']['median_ms']:.2f}" if first else "—" for x in bs]
        lines.append("| " + " | ".join(o_cells + olat + ["1.00×"] * len(bs) + ["—"] * len(bs)
                                       + [f"{o['top1']:.2f}", f"{o['top1']:.2f}", f"{o['top1']:.2f}", "—", "—",
                                          "—"]) + " |")
        lines += ["| " + " | ".join(_row_cells(o, c, bs)) + " |" for c in b["rows"] if c["passed"]]
        lines.append("")
        lines.append("Rows above passed all five checks; rejected candidates are listed below with their numbers.")
        lines.append("")
        rejected = [c for c in b["rows"] if not c["passed"]]
        if rejected:
            lines += ["", "Rejected by the gate:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(_row_cells(o, c, bs)) + " |" for c in rejected]
            lines.append("")
        for c in rejected:
            fail = next(v for v in c["gate"].values() if not v["ok"])
            lines.append(f"- gate rejected **{c['name']}**: {fail['name']}: {fail['detail']}")
        for sk in b["skipped"]:
            lines.append(f"- no candidate from **{sk['family']}**: {sk['reason']}")
        lines.append("")
    lines += [f"*2-core x86-64 VM, one pinned core: {env['cpu']}, onnxruntime {env['onnxruntime']} and torch "
              f"{env['torch']} on 1 thread, "
              f"{env['date']}; {res['machine']}. Whole bench: {res['timing']['total_s'] / 60:.1f} min on one core "
              "(the 2-core x86-64 VM is shared, so absolute milliseconds are noisy; the gate compares original "
              "and candidate interleaved, so read the speed-up columns).*", "",
              "![pareto](compress.png)", "",
              "Language half (SmolLM2-135M, about 70 % and 50 % of its layers): "
              "`OMP_NUM_THREADS=1 taskset -c 0 kdforge bench compress-llm --publish`, its own page: "
              "[compress-llm.md](compress-llm.md).", ""]
    path.write_text("\n".join(lines))


def _plot(path: Path, res: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    o = res["original"]
    bs = str(res["settings"]["batch_sizes"][0])
    first = next((c for b in res["budgets"] for c in b["rows"]), None)
    if first is not None and first["gate"].get("faster"):
        ax.scatter(first["gate"]["faster"]["values"]["latency"][bs]["original"]["median_ms"], o["top1"], marker="*",
                   s=200, color="k", label="original")
    for b, mk in zip(res["budgets"], ("o", "s"), strict=False):
        for c in b["rows"]:
            fast = c["gate"].get("faster", {}).get("values")
            if not fast:
                continue
            m, sd = mean_std(c["top1_seeds"])
            ax.errorbar(fast["latency"][bs]["compressed"]["median_ms"], m, yerr=sd, marker=mk, capsize=3,
                        mfc="none" if not c["passed"] else None, label=f"{c['family']} ({b['fraction']:.0%})")
    ax.set_xlabel(f"onnxruntime latency at batch {bs} (ms, 1 thread)")
    ax.set_ylabel("test top-1 (%) healed, mean ± std")
    ax.set_title("compress: quality vs latency (hollow: rejected by the gate)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
