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
                "teacher_epochs": 3, "teacher_lr": 0.1, "teacher_batch": 64, "fractions": [0.5, 0.25],
                "families": ["uniform", "width"], "seeds": [0, 1], "heal_epochs": {"50": {}, "25": {}},
                "default_heal_epochs": 1, "max_drop": 5.0, "formats": ["onnx", "safetensors"],
                "batch_sizes": [1, 64], "iters": 2, "cache": None, "int8": "static"}
    # sized to the bench's 60 core-minutes: teacher ~5 min; a first run of this bench with the baselines and the
    # 25 % cuts healed 1 epoch took 17.8 CPU-minutes, so every candidate is healed 3 epochs (~27); the 25 %
    # budget's int8 rows are the int8 copies of the original and of the 50 % candidates, judged by their latency
    return {"model": "resnet32", "data": {"name": "fashion_mnist_subset", "batch_size": 128, "val_fraction": 0.1},
            "teacher_epochs": 6, "teacher_lr": 0.05, "teacher_batch": 64, "fractions": [0.5, 0.25],
            "families": ["sglp", "block_influence", "uniform", "random", "width"], "seeds": [0, 1, 2],
            "int8": "static", "heal_epochs": {"50": {}, "25": {}}, "default_heal_epochs": 3, "max_drop": 1.5,
            "formats": ["onnx", "pt2", "safetensors"], "batch_sizes": [1, 64], "iters": 3, "cache": "runs/cache"}


def _epochs(s: dict[str, Any], frac: float, family: str) -> int:
    """Heal epochs of ``family``'s candidate at budget ``frac`` (the page states them per row)."""
    return int(s["heal_epochs"].get(str(round(100 * frac)), {}).get(family, s["default_heal_epochs"]))


def _recipe(s: dict[str, Any], ckpt: Path, frac: float, epochs: int) -> Any:
    from kdforge.compress.recipe import CompressRecipe

    return CompressRecipe.from_dict({
        "name": f"bench-{round(100 * frac)}", "model": {"model": s["model"], "checkpoint": str(ckpt)},
        "data": s["data"], "budget": {"metric": "latency", "fraction": frac, "max_drop": s["max_drop"],
                                      "latency_batch": LATENCY_BATCH},
        "candidates": {"families": s["families"], "max_candidates": 8, "int8": s.get("int8", "none")},
        "export": {"formats": s["formats"]},
        "gate": {"batch_sizes": s["batch_sizes"], "iters": s["iters"], "rounds": 7, "threads": 1},
        "optim": {"name": "sgd", "lr": 0.02, "weight_decay": 5e-4},
        "train": {"epochs": epochs, "progress": "never", "save_checkpoints": False, "threads": 1}})


#: the batch at which every latency budget is judged (float candidates: torch eager in the search; int8
#: copies: onnxruntime, the only runtime they run in, from the gate's interleaved rounds)
LATENCY_BATCH = 64


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


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (the gate's fresh-process loaders)."""
    import resource

    return sum(resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime
               for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


@BENCHES.register("compress")
def run(out: Path | None = None, quick: bool = False) -> dict[str, Any]:
    """Compress a CIFAR-style ResNet to 50 % and 25 % of its latency: every family healed, exported, gated."""
    import tempfile

    from kdforge.compress.budget import int8_parent_fraction, runtime_ratio
    from kdforge.compress.candidates import Skipped, search_candidates, skipped_json
    from kdforge.compress.export import export_all
    from kdforge.compress.gate import check_loads, onnx_runner, verdict
    from kdforge.compress.heal import heal
    from kdforge.compress.pipeline import Evaluated, accuracy, environment, gate_candidate, int8_candidate
    from kdforge.compress.source import load_source, plain_batch
    from kdforge.errors import KdforgeError
    from kdforge.profile import count_flops, count_params

    s = _settings(quick)
    out = bench_dir("compress", out)
    out.mkdir(parents=True, exist_ok=True)
    t_all, cpu0 = time.perf_counter(), _cpu_seconds()
    cache = Path(s["cache"]) if s["cache"] else Path(tempfile.mkdtemp(prefix="compress-cache-"))
    t0 = time.perf_counter()
    ckpt = _teacher(s, cache)
    teacher_s = time.perf_counter() - t0
    teacher_train_s = _train_seconds(ckpt)
    fracs = sorted(s["fractions"], reverse=True)  # loosest first: its int8 copies are offered to tighter budgets
    r0 = _recipe(s, ckpt, fracs[0], s["default_heal_epochs"])
    src = load_source(r0)
    orig = Evaluated("original", "original", count_params(src.model), count_flops(src.model, src.input_shape),
                     accuracy(src.model, src))
    orig.files = export_all(src.model, src.input_shape, out / "runs" / "original", s["formats"], src.spec, {})
    _, _, facts = check_loads(orig.files, plain_batch(src.data.test, 2, 0)[0], 1, max(s["batch_sizes"]))
    orig.info["peak_rss_mb"] = facts.get("onnx", {}).get("peak_rss_mb")
    orig_runner = onnx_runner(orig.files["onnx"], 1)
    orig_row = orig.to_json()
    _log(f"teacher {s['model']}: top-1 {orig.top1:.2f}, {orig.params:,} params ({teacher_s:.0f}s)")
    int8_rows: list[dict[str, Any]] = []  # every int8 copy made so far, each judged against every budget
    gain = None
    if s.get("int8", "none") != "none":
        q = int8_candidate(orig, orig, src, r0, out / "runs" / "original+int8", orig_runner)
        row = q.to_json()
        row.update({"top1_seeds": [q.top1], "heal_s": [], "no_heal_top1": None, "heal_epochs": 0})
        int8_rows.append(row)
        fast = row["gate"].get("faster", {}).get("values")
        gain = 1 / runtime_ratio(fast, LATENCY_BATCH) if fast else None
        _log(f"original+int8: top-1 {q.top1:.2f}; gate " + ("passed" if q.passed else f"FAILED "
                                                            f"{verdict(q.checks).line()}")  # type: ignore[union-attr]
             + (f"; int8 gain at batch {LATENCY_BATCH}: {gain:.2f}x" if gain else ""))
    budgets: list[dict[str, Any]] = []
    for frac in fracs:
        t_b = time.perf_counter()
        r = _recipe(s, ckpt, frac, s["default_heal_epochs"])
        folder = out / "runs" / r.name
        try:
            original_value, cands, skipped = search_candidates(src, r, _log)
        except KdforgeError as err:  # no family reaches this budget: the page says so, the other budgets stand
            original_value, cands, skipped = 1.0, [], [Skipped("every family", str(err))]
        rows = []
        for c in cands:
            epochs = _epochs(s, frac, c.family)
            rc = _recipe(s, ckpt, frac, epochs)
            accs, heal_s, models = [], [], []
            for seed in s["seeds"]:
                m, info = heal(c.model, src.model, src.data, rc, seed=seed)
                accs.append(accuracy(m, src))
                heal_s.append(info.get("train_time_s", 0.0))
                models.append(m)
            healed = models[0]
            e = Evaluated(c.name, c.family, count_params(healed), count_flops(healed, src.input_shape), accs[0],
                          info={"budget_fraction": c.budget_fraction, "search_seconds": c.search_seconds,
                                **c.info})
            e.files = export_all(healed, src.input_shape, folder / c.name, s["formats"], src.spec, c.plan)
            e.checks, info = gate_candidate(healed, e.files, orig, src, rc, accs[0], orig_runner)
            e.info.update(info)
            row = e.to_json()
            row.update({"top1_seeds": accs, "heal_s": heal_s, "no_heal_top1": accuracy(c.model, src),
                        "heal_epochs": epochs, "budget": {"runtime": "torch eager", "batch": LATENCY_BATCH,
                                                          "ratio": c.budget_fraction, "fits": True}})
            rows.append(row)
            failed = verdict(e.checks)
            _log(f"{frac:.0%} {c.name}: healed top-1 {fmt_mean_std(accs)} over {len(accs)} seeds ({epochs} "
                 "epochs); gate " + ("passed" if failed is None else f"FAILED {failed.line()}"))
            # int8 copies of the float candidates that passed (a copy of a rejected one only loses more)
            if s.get("int8", "none") != "none" and e.passed:
                q = _int8_row(e, models, orig, src, r, folder, orig_runner)
                q["heal_epochs"] = epochs
                int8_rows.append(q)
                _log(f"{frac:.0%} {q['name']}: top-1 {fmt_mean_std(q['top1_seeds'])} in onnxruntime; gate "
                     + ("passed" if q["passed"] else "FAILED"))
        out_of_budget = []
        for q in int8_rows:
            fast = q["gate"].get("faster", {}).get("values")
            ratio = runtime_ratio(fast, LATENCY_BATCH) if fast else None
            qb = dict(q, budget={"runtime": "onnxruntime", "batch": LATENCY_BATCH, "ratio": ratio,
                                 "fits": ratio is not None and ratio <= frac})
            (rows if qb["budget"]["fits"] else out_of_budget).append(qb)
        budgets.append({"fraction": frac, "original_budget_value": original_value, "rows": rows,
                        "int8_parent_fraction": int8_parent_fraction(frac, gain) if gain else None,
                        "out_of_budget": [{"name": q["name"], "ratio": q["budget"]["ratio"]} for q in out_of_budget],
                        "skipped": skipped_json(skipped), "seconds": time.perf_counter() - t_b})
    result = {"settings": s, "original": orig_row, "budgets": budgets, "environment": environment(1),
              "int8_gain": gain, "int8_rows": int8_rows, "machine": machine_note(),
              "timing": {"teacher_s": teacher_s, "teacher_train_s": teacher_train_s,
                         "total_s": time.perf_counter() - t_all, "cpu_s": _cpu_seconds() - cpu0}}
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
    row.update({"top1_seeds": accs, "heal_s": [], "no_heal_top1": None})
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
    b = c.get("budget", {})
    runtime = "ort" if b.get("runtime") == "onnxruntime" else "eager"
    budget = "—" if b.get("ratio") is None else f"{b['ratio']:.2f} {runtime}"
    healed = f"{m:.2f} (not healed)" if c["heal_epochs"] == 0 else f"{m:.2f} ± {sd:.2f}"
    return [c["name"], str(c["heal_epochs"]), budget, f"{c['bytes'].get('onnx', 0) / 1e6:.3f}", f"{c['params']:,}",
            f"{c.get('peak_rss_mb') or 0:.0f}", *lat, *spd, *gain, cut, healed,
            f"{c['top1']:.2f}", f"{o['top1'] - m:+.2f}", f"{o['top1'] - c['top1']:+.2f}",
            "pass" if c["passed"] else f"**rejected: {failed}**"]


def _heal_note(s: dict[str, Any]) -> str:
    """Which rows were healed how long (the page says it before the table)."""
    every = {_epochs(s, f, fam) for f in s["fractions"] for fam in s["families"]}
    if len(every) == 1:
        return f"{every.pop()} for every family at every budget"
    parts = []
    for f in sorted(s["fractions"], reverse=True):
        by = {fam: _epochs(s, f, fam) for fam in s["families"]}
        parts.append(f"at {f:.0%}: " + ", ".join(f"{fam} {n}" for fam, n in by.items()))
    return "; ".join(parts).replace("%", " %")


def _write_md(path: Path, res: dict[str, Any], quick: bool) -> None:
    s, o, env = res["settings"], res["original"], res["environment"]
    bs = s["batch_sizes"]
    head = (["model", "heal epochs", f"budget ratio (b{LATENCY_BATCH})", "ONNX MB", "params", "peak RSS MB"]
            + [f"ms b{b}" for b in bs] + [f"speed-up b{b}" for b in bs] + [f"int8 vs float b{b}" for b in bs]
            + ["top-1 cut", f"top-1 healed ({len(s['seeds'])} seeds)", "gated top-1 (seed 0)", "mean drop",
               "gated drop", "gate"])
    fracs = " and ".join(f"{f:.0%}".replace("%", " %") for f in sorted(s["fractions"], reverse=True))
    int8 = s.get("int8", "none")
    gain = res.get("int8_gain")
    t = res["timing"]
    lines = [f"# Benchmark: compress ({s['model']} on {s['data']['name']})", "",
             f"Command: `OMP_NUM_THREADS=1 taskset -c 0 kdforge bench compress{' --quick' if quick else ''} "
             "--publish` (one pinned core, one thread; rerun it to reproduce).", "",
             f"A CIFAR-style {s['model']} teacher trained by the bench ({s['teacher_epochs']} epochs, "
             + _teacher_time(t) + f"), compressed to at most {fracs} of its latency. Families: "
             f"{', '.join(s['families'])}. Each float candidate is healed by KD from the teacher with seeds "
             f"{s['seeds']} (mean ± sample std), exported and gated (seed 0's model). Heal epochs, "
             f"fixed before the run to fit the bench's core-minute budget: {_heal_note(s)} (the `heal epochs` "
             "column repeats them). Allowed drop, fixed before the run: "
             f"{s['max_drop']:g} points of test top-1 (the test split is never read by the search or the healing); "
             "the gate judges seed 0's model (`gated drop`), `mean drop` is that of the seeds' mean. Latency "
             "columns: onnxruntime, 1 thread, median of 7 rounds interleaved with the original.", "",
             "**How the latency budget is judged.** Latency at batch "
             f"{LATENCY_BATCH} on this machine, as a ratio to the original's measured in the same runtime and "
             "interleaved with it (`budget ratio`): a float candidate in torch eager, during the search "
             "(`eager`); an int8 copy in onnxruntime, the only runtime it runs in, from its gate's rounds "
             "(`ort`)."]
    if int8 != "none":
        lines[-1] += (
            f" int8 copies are made by onnxruntime's own quantizer ({int8}: QDQ, per-channel int8 weights, "
            "uint8 activations calibrated on 256 training images) of the original and of every float candidate "
            "that passed the gate (copies of rejected ones are not made, to save the bench's core-minutes), and each "
            "copy is offered to every "
            "budget its measured ratio fits: an int8 copy of a 50 % candidate is a 25 % candidate when it runs "
            "at 25 % of the original's latency or less. "
            + (f"The original's own int8 copy runs {gain:.2f}× faster than the original at batch "
               f"{LATENCY_BATCH} in onnxruntime, so an int8 copy is expected to fit a budget f when its float "
               "parent runs at about f × that gain (" + ", ".join(
                   f"{b['fraction']:.0%} → {b['int8_parent_fraction']:.2f}" for b in res["budgets"]
                   if b.get("int8_parent_fraction")).replace("%", " %")
               + "); `kdforge compress` searches parents there, this bench reuses its 50 % candidates as parents "
               "(no extra healing) and lets the measured ratio decide. " if gain else "")
            + "For int8 rows, `matches` compares the fresh process with the in-process quantized session, "
            "`smaller` asks for fewer bytes (the parameter count is the parent's), quality is the int8 session's "
            "test top-1 (every seed's model quantized alike), and `int8 vs float` is the speed-up over the float "
            "parent timed in the same rounds.")
    lines.append("")
    o_cells = ["original", "—", "1.00", f"{o['bytes'].get('onnx', 0) / 1e6:.3f}", f"{o['params']:,}",
               f"{o.get('peak_rss_mb') or 0:.0f}"]
    for b in res["budgets"]:
        lines += [f"## Budget: {b['fraction']:.0%} of the original's latency".replace("%", " %"), "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        first = next((c["gate"]["faster"]["values"] for c in b["rows"] if c["gate"].get("faster")), {})
        olat = [f"{first['latency'][str(x)]['original']['median_ms']:.2f}" if first else "—" for x in bs]
        lines.append("| " + " | ".join(o_cells + olat + ["1.00×"] * len(bs) + ["—"] * len(bs)
                                       + [f"{o['top1']:.2f}", f"{o['top1']:.2f}", f"{o['top1']:.2f}", "—", "—",
                                          "—"]) + " |")
        lines += ["| " + " | ".join(_row_cells(o, c, bs)) + " |" for c in b["rows"] if c["passed"]]
        lines.append("")
        passed = sum(c["passed"] for c in b["rows"])
        lines.append(f"{passed} of {len(b['rows'])} candidates within this budget passed all five checks (the "
                     "rows above); the rejected ones follow with their numbers.")
        lines.append("")
        rejected = [c for c in b["rows"] if not c["passed"]]
        if rejected:
            lines += ["Rejected by the gate:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(_row_cells(o, c, bs)) + " |" for c in rejected]
            lines.append("")
        for c in rejected:
            fail = next(v for v in c["gate"].values() if not v["ok"])
            lines.append(f"- gate rejected **{c['name']}**: {fail['name']}: {fail['detail']}")
        for q in b.get("out_of_budget", []):
            ratio = "not timed (its gate stopped before `faster`)" if q["ratio"] is None else \
                f"runs at {q['ratio']:.2f} of the original's latency in onnxruntime"
            lines.append(f"- not a candidate here: **{q['name']}** {ratio}")
        for sk in b["skipped"]:
            lines.append(f"- no candidate from **{sk['family']}**: {sk['reason']}")
        lines.append("")
    cpu = f", {t['cpu_s'] / 60:.1f} CPU-minutes" if t.get("cpu_s") else ""
    lines += [f"*2-core x86-64 VM, one pinned core: {env['cpu']}, onnxruntime {env['onnxruntime']} and torch "
              f"{env['torch']} on 1 thread, "
              f"{env['date']}; {res['machine']}. Whole bench: {t['total_s'] / 60:.1f} min wall{cpu} "
              "(including the teacher when trained here; the 2-core x86-64 VM is shared, so absolute "
              "milliseconds are noisy; the gate compares original and candidate interleaved, so read the "
              "speed-up columns).*", "",
              "![pareto](compress.png)", "",
              "Language half (SmolLM2-135M, about 70 % and 50 % of its layers): "
              "`OMP_NUM_THREADS=1 taskset -c 0 kdforge bench compress-llm --publish`, its own page: "
              "[compress-llm.md](compress-llm.md).", ""]
    path.write_text("\n".join(lines))


def _plot(path: Path, res: dict[str, Any]) -> None:
    """Quality vs latency relative to the original (onnxruntime, interleaved, so a shared core cancels out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    o = res["original"]
    b = str(LATENCY_BATCH if LATENCY_BATCH in res["settings"]["batch_sizes"] else res["settings"]["batch_sizes"][-1])
    ax.scatter(1.0, o["top1"], marker="*", s=200, color="k", label="original", zorder=3)
    seen: set[str] = set()
    # every gated model once, also an int8 copy that fits no budget (it was measured all the same)
    for c in [c for bud in res["budgets"] for c in bud["rows"]] + res.get("int8_rows", []):
        fast = c["gate"].get("faster", {}).get("values")
        if not fast or c["name"] in seen:
            continue
        seen.add(c["name"])
        m, sd = mean_std(c["top1_seeds"])
        ax.errorbar(1 / fast["speedup"][b], m, yerr=sd, marker="s" if "int8" in c["family"] else "o", capsize=3,
                    mfc="none" if not c["passed"] else None, label=c["name"])
    ax.axhline(o["top1"] - res["settings"]["max_drop"], color="grey", lw=0.8, ls="--")
    for bud in res["budgets"]:
        ax.axvline(bud["fraction"], color="grey", lw=0.8, ls=":")
    ax.set_xlabel(f"latency / original's at batch {b} (onnxruntime, 1 thread, interleaved; dotted: budgets)")
    ax.set_ylabel("test top-1 (%), mean ± std over heal seeds")
    ax.set_title("compress: quality vs latency (hollow: rejected by the gate; dashed: allowed drop; "
                 "squares: int8)", fontsize=8)
    ax.legend(fontsize=5.5, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
