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
                "formats": ["onnx", "safetensors"], "batch_sizes": [1, 64], "iters": 2, "cache": None}
    return {"model": "resnet32", "data": {"name": "fashion_mnist_subset", "batch_size": 128, "val_fraction": 0.1},
            "teacher_epochs": 6, "teacher_lr": 0.05, "teacher_batch": 64, "fractions": [0.5, 0.25],
            "families": ["sglp", "block_influence", "uniform", "random", "width"], "seeds": [0, 1, 2],
            "heal_epochs": 1, "max_drop": 1.5, "formats": ["onnx", "pt2", "safetensors"], "batch_sizes": [1, 64],
            "iters": 3, "cache": "runs/cache"}


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
    budgets: list[dict[str, Any]] = []
    orig_row: dict[str, Any] = {}
    for frac in s["fractions"]:
        r = CompressRecipe.from_dict({
            "name": f"bench-{int(100 * frac)}", "model": {"model": s["model"], "checkpoint": str(ckpt)},
            "data": s["data"], "budget": {"metric": "latency", "fraction": frac, "max_drop": s["max_drop"],
                                          "latency_batch": 64},
            "candidates": {"families": s["families"], "max_candidates": 8}, "export": {"formats": s["formats"]},
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
            healed, accs, heal_s = None, [], []
            for seed in s["seeds"]:
                m, info = heal(c.model, src.model, src.data, r, seed=seed)
                accs.append(accuracy(m, src))
                heal_s.append(info.get("train_time_s", 0.0))
                healed = healed or m
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
        budgets.append({"fraction": frac, "original_budget_value": original_value, "rows": rows,
                        "skipped": skipped_json(skipped), "seconds": time.perf_counter() - t_b})
    result = {"settings": s, "original": orig_row, "budgets": budgets, "environment": environment(1),
              "machine": machine_note(), "timing": {"teacher_s": teacher_s, "total_s": time.perf_counter() - t_all}}
    write_json(out / "compress.json", result)
    _write_md(out / "compress.md", result, quick)
    _plot(out / "compress.png", result)
    return result


def _row_cells(o: dict[str, Any], c: dict[str, Any], bs: list[int]) -> list[str]:
    fast = c["gate"].get("faster", {}).get("values", {})
    lat = [f"{fast['latency'][str(b)]['compressed']['median_ms']:.2f}" if fast else "—" for b in bs]
    spd = [f"{fast['speedup'][str(b)]:.2f}×" if fast else "—" for b in bs]
    m, sd = mean_std(c["top1_seeds"])
    failed = next((k for k, v in c["gate"].items() if not v["ok"]), None)
    return [c["name"], f"{c['bytes'].get('onnx', 0) / 1e6:.3f}", f"{c['params']:,}",
            f"{c.get('peak_rss_mb') or 0:.0f}", *lat, *spd, f"{c['no_heal_top1']:.2f}", f"{m:.2f} ± {sd:.2f}",
            f"{o['top1'] - m:+.2f}", "pass" if c["passed"] else f"**rejected: {failed}**"]


def _write_md(path: Path, res: dict[str, Any], quick: bool) -> None:
    s, o, env = res["settings"], res["original"], res["environment"]
    bs = s["batch_sizes"]
    head = (["model", "ONNX MB", "params", "peak RSS MB"] + [f"ms b{b}" for b in bs] + [f"speed-up b{b}" for b in bs]
            + ["top-1 cut", f"top-1 healed ({len(s['seeds'])} seeds)", "drop", "gate"])
    lines = [f"# Benchmark: compress ({s['model']} on {s['data']['name']})", "",
             f"Command: `kdforge bench compress{' --quick' if quick else ''} --publish` (rerun it to reproduce; "
             "pinned as `OMP_NUM_THREADS=1 taskset -c 0 kdforge bench compress`).", "",
             f"A CIFAR-style {s['model']} teacher trained by the bench ({s['teacher_epochs']} epochs, "
             f"{res['timing']['teacher_s'] / 60:.1f} min), compressed to at most 50 % and 25 % of its latency "
             "(eager, batch 64, measured during the search). Each family's candidate is healed by KD from the "
             f"teacher ({s['heal_epochs']} epochs, seeds {s['seeds']}; mean ± sample std), exported and gated "
             f"(seed 0's model). Allowed drop: {s['max_drop']:g} points of test top-1 (the test split is never "
             "read by the search or the healing). Latency: onnxruntime, 1 thread, median of 7 interleaved "
             "rounds with the original.", ""]
    o_cells = ["original", f"{o['bytes'].get('onnx', 0) / 1e6:.3f}", f"{o['params']:,}",
               f"{o.get('peak_rss_mb') or 0:.0f}"]
    for b in res["budgets"]:
        lines += [f"## Budget: {b['fraction']:.0%} of the original's latency", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        first = b["rows"][0]["gate"].get("faster", {}).get("values", {}) if b["rows"] else {}
        olat = [f"{first['latency'][str(x)]['original']['median_ms']:.2f}" if first else "—" for x in bs]
        lines.append("| " + " | ".join(o_cells + olat + ["1.00×"] * len(bs) + [f"{o['top1']:.2f}", f"{o['top1']:.2f}",
                                                                             "—", "—"]) + " |")
        lines += ["| " + " | ".join(_row_cells(o, c, bs)) + " |" for c in b["rows"]]
        lines.append("")
        rejected = [c for c in b["rows"] if not c["passed"]]
        for c in rejected:
            fail = next(v for v in c["gate"].values() if not v["ok"])
            lines.append(f"- gate rejected **{c['name']}**: {fail['name']}: {fail['detail']}")
        for sk in b["skipped"]:
            lines.append(f"- no candidate from **{sk['family']}**: {sk['reason']}")
        lines.append("")
    lines += [f"*{env['cpu']}, onnxruntime {env['onnxruntime']} and torch {env['torch']} on 1 thread, "
              f"{env['date']}; {res['machine']}. Whole bench: {res['timing']['total_s'] / 60:.1f} min on one core "
              "(budget: about 40 core-minutes; the core was shared with at most one other job of the session, "
              "so absolute milliseconds are noisy; the gate compares original and candidate interleaved).*", "",
              "![pareto](compress.png)", "",
              "Language half (SmolLM2-135M, about 70 % and 50 % of its layers): "
              "`kdforge bench compress-llm --publish` (its own page, compress-llm.md).", ""]
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
