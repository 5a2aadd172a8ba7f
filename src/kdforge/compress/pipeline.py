"""``kdforge compress``: search candidates against the budget, heal each by KD, export, gate, report."""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdforge.compress.candidates import Candidate, Skipped, search_candidates, skipped_json
from kdforge.compress.export import FILES, export_all
from kdforge.compress.gate import (
    Check,
    GateFailed,
    check_faster,
    check_loads,
    check_matches,
    check_quality,
    check_smaller,
    checks_json,
    onnx_runner,
    torch_runner,
    verdict,
)
from kdforge.compress.recipe import CompressRecipe
from kdforge.compress.source import Source, load_source, plain_batch
from kdforge.engine.run_dir import KINDS, register_kind
from kdforge.errors import KdforgeError
from kdforge.profile import count_flops, count_params

if "compress" not in KINDS:
    register_kind("compress", "a 'kdforge compress' folder", "read {dir}/report.md; the chosen model is "
                  "{dir}/model.onnx (onnxruntime), model.pt2 (torch.export.load), model.safetensors")


@dataclass
class Evaluated:
    """A model's row: how it was made, its size, speed, quality and the gate's verdict."""

    name: str
    family: str
    params: int
    flops: int
    top1: float
    files: dict[str, Path] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and verdict(self.checks) is None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "params": self.params, "flops": self.flops,
                "top1": self.top1, "files": {k: str(v) for k, v in self.files.items()},
                "bytes": {k: v.stat().st_size for k, v in self.files.items() if v.exists()},
                "passed": self.passed, "gate": checks_json(self.checks), **self.info}


@dataclass
class CompressResult:
    """What a compress run produced: the original's row, every candidate's row, the chosen one."""

    recipe: CompressRecipe
    original: Evaluated
    candidates: list[Evaluated]
    skipped: list[Skipped]
    chosen: Evaluated | None
    out: Path
    environment: dict[str, Any]
    seconds: float

    def pareto(self) -> list[str]:
        """Names of candidates no other candidate beats on quality, latency (batch 1) and size at once."""
        rows = [(c.name, c.top1, _lat(c, 1), c.params) for c in self.candidates]
        front = []
        for n, q, lat, p in rows:
            dominated = any(q2 >= q and l2 <= lat and p2 <= p and (q2, l2, p2) != (q, lat, p)
                            for _, q2, l2, p2 in rows)
            if not dominated:
                front.append(n)
        return front

    def to_json(self) -> dict[str, Any]:
        return {"format": "kdforge-compress-report/1", "name": self.recipe.name, "environment": self.environment,
                "budget": self.recipe.budget.model_dump(), "original": self.original.to_json(),
                "candidates": [c.to_json() for c in self.candidates], "skipped": skipped_json(self.skipped),
                "pareto": self.pareto(), "chosen": self.chosen.name if self.chosen else None,
                "seconds": self.seconds, "recipe": self.recipe.model_dump(mode="json")}


def _lat(e: Evaluated, batch: int) -> float:
    """The compressed (or, for the original, the original) median latency at ``batch`` from the gate."""
    fast = next((c for c in e.checks if c.name == "faster"), None)
    if fast is None or str(batch) not in fast.values.get("latency", {}):
        return float(e.info.get("latency_ms", {}).get(str(batch), float("nan")))
    return float(fast.values["latency"][str(batch)]["compressed"]["median_ms"])


@torch.no_grad()
def accuracy(model: nn.Module, src: Source) -> float:
    """Top-1 (%) on the test split."""
    from kdforge.data import make_loader
    from kdforge.metrics import evaluate

    return float(evaluate(model.eval(), make_loader(src.data.test, 512, False), "cpu")["top1"])


def environment(threads: int) -> dict[str, Any]:
    """The machine and versions a report's caption names."""
    import datetime
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except ImportError:
        ort = None
    import os

    return {"cpu": cpu, "cores_visible": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "threads": threads, "torch": torch.__version__, "onnxruntime": ort, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def gate_candidate(cand: nn.Module, files: dict[str, Path], orig: Evaluated, src: Source, r: CompressRecipe,
                   top1: float, original_runner: Any = None) -> tuple[list[Check], dict[str, Any]]:
    """Run the five checks on an exported candidate (stops at the first failure; what failed is kept)."""
    g = r.gate
    x, _ = plain_batch(src.data.test, g.held_out, r.seed + 1)
    checks: list[Check] = []
    loads, outs, facts = check_loads(files, x, g.threads, max(g.batch_sizes))
    checks.append(loads)
    info = {"peak_rss_mb": facts.get("onnx", {}).get("peak_rss_mb")}
    if not loads.ok:
        return checks, info
    with torch.no_grad():
        ref = cand.eval()(x)
    checks.append(check_matches(ref, outs, g.atol))
    sizes = {f: (orig.files[f].stat().st_size, files[f].stat().st_size) for f in files if f in orig.files}
    checks.append(check_smaller((orig.params, count_params(cand)), sizes))
    if "onnx" in files and "onnx" in orig.files:
        o = original_runner or onnx_runner(orig.files["onnx"], g.threads)
        c, rt = onnx_runner(files["onnx"], g.threads), f"onnxruntime {g.threads} thread(s)"
    else:
        o, c, rt = torch_runner(src.model), torch_runner(cand), f"torch eager {torch.get_num_threads()} thread(s)"
    checks.append(check_faster(o, c, src.input_shape, g.batch_sizes, g.rounds, g.iters, rt))
    checks.append(check_quality(orig.top1, top1, r.budget.max_drop))
    return checks, info


def run_compress(r: CompressRecipe, out: str | Path, overwrite: bool = False, verbose: bool = True
                 ) -> CompressResult:
    """Compress the recipe's model into ``out``; raises :class:`GateFailed` when no candidate passes the gate."""
    from kdforge.engine.checkpoint import atomic_write_text
    from kdforge.engine.run_dir import open_run
    from kdforge.engine.trainer import seed_everything

    def log(msg: str) -> None:
        if verbose:
            print(msg, file=sys.stderr, flush=True)

    out = Path(out)
    t_start = time.perf_counter()
    if r.llm is not None:
        return _run_lm(r, out, overwrite, log)  # type: ignore[return-value]
    with open_run(out, "compress", overwrite=overwrite) as lease:
        atomic_write_text(out / "config.yaml", r.to_yaml())
        seed_everything(r.seed)
        src = load_source(r)
        log(f"compress: {type(src.model).__name__} from {src.where}, {count_params(src.model):,} params; "
            f"budget {r.budget.metric} <= {r.budget.fraction:g}x, accuracy drop <= {r.budget.max_drop:g} points")
        # the original is exported first: an op the exporter or runtime lacks fails in seconds, not after healing
        orig = Evaluated("original", "original", count_params(src.model),
                         count_flops(src.model, src.input_shape), accuracy(src.model, src))
        orig.files = export_all(src.model, src.input_shape, out / "original", r.export.formats, src.spec, {},
                                 r.data.model_dump(mode="json"))
        original_value, cands, skipped = search_candidates(src, r, log)
        loads, _, facts = check_loads(orig.files, plain_batch(src.data.test, 2, 0)[0], r.gate.threads,
                                      max(r.gate.batch_sizes))
        if not loads.ok:
            raise KdforgeError(f"the original model's own export fails to load: {loads.detail}")
        orig.info["peak_rss_mb"] = facts.get("onnx", {}).get("peak_rss_mb")
        orig.info["budget_value"] = original_value
        from kdforge.compress.heal import build_heal_cache

        if build_heal_cache(src.model, src.spec, src.data, r, out) is not None:
            log(f"compress: the original's logits on the training views cached in {out / 'teacher-cache'}")
        rows = [_evaluate_candidate(c, src, r, orig, out, log) for c in cands]
        for e, c in zip(rows, cands, strict=True):
            e.info["budget"] = _budget_row(r, c.budget_fraction, "torch eager")
        if r.candidates.int8 != "none":
            rows += int8_rows(rows, orig, src, r, out, log)
        fast = next((ch for e in rows for ch in e.checks if ch.name == "faster"), None)
        if fast is not None:
            orig.info["latency_ms"] = {b: v["original"]["median_ms"] for b, v in fast.values["latency"].items()}
        passed = [e for e in rows if e.passed and within_budget(e)]
        chosen = max(passed, key=lambda e: (e.top1, -_lat(e, 1))) if passed else None
        if chosen is not None:
            for f, p in chosen.files.items():
                shutil.copy2(p, out / FILES[f])
        res = CompressResult(r, orig, rows, skipped, chosen, out, environment(r.gate.threads),
                             time.perf_counter() - t_start)
        from kdforge.compress.report import write_report

        atomic_write_text(out / "compress.json", json.dumps(res.to_json(), indent=2, default=str))
        write_report(res)
        lease.commit()  # the report is written: a gate failure below keeps every artifact for inspection
    if chosen is None:
        first = max((e for e in rows if within_budget(e)), key=lambda e: e.top1)
        failed = verdict(first.checks)
        assert failed is not None
        raise GateFailed(f"gate check '{failed.name}' failed for every candidate (best by accuracy: {first.name}: "
                         f"{failed.detail}); artifacts kept in {out}")
    log(f"compress: chosen {chosen.name}: " + "; ".join(c.line() for c in chosen.checks))
    return res


def _run_lm(r: CompressRecipe, out: Path, overwrite: bool, log: Any) -> dict[str, Any]:
    """The language-model path: same folder rules, same gate verdict and exit."""
    from kdforge.compress.llm import run_compress_lm
    from kdforge.engine.checkpoint import atomic_write_text
    from kdforge.engine.run_dir import open_run
    from kdforge.engine.trainer import seed_everything

    with open_run(out, "compress", overwrite=overwrite) as lease:
        atomic_write_text(out / "config.yaml", r.to_yaml())
        seed_everything(r.seed)
        res = run_compress_lm(r, out, log)
        lease.commit()
    if res["chosen"] is None:
        first = min(res["candidates"], key=lambda c: c["ppl"])
        failed = next(v for v in first["gate"].values() if not v["ok"])
        raise GateFailed(f"gate check '{failed['name']}' failed for every candidate (best by perplexity: "
                         f"{first['name']}: {failed['detail']}); artifacts kept in {out}")
    return res


def _evaluate_candidate(c: Candidate, src: Source, r: CompressRecipe, orig: Evaluated, out: Path,
                        log: Any) -> Evaluated:
    """Heal, measure, export and gate one candidate."""
    healed, heal_info = heal_candidate(c, src, r, out)
    top1 = accuracy(healed, src)
    e = Evaluated(c.name, c.family, count_params(healed), count_flops(healed, src.input_shape), top1,
                  info={"budget_value": c.budget_value, "budget_fraction": c.budget_fraction,
                        "search_seconds": c.search_seconds, "heal": heal_info, **c.info})
    e.files = export_all(healed, src.input_shape, out / "candidates" / c.name, r.export.formats, src.spec, c.plan,
                             r.data.model_dump(mode="json"))
    e.checks, info = gate_candidate(healed, e.files, orig, src, r, top1)
    e.info.update(info)
    return _log_row(e, orig, log)


def _log_row(e: Evaluated, orig: Evaluated, log: Any) -> Evaluated:
    """One line per gated candidate: its accuracy and the gate's verdict."""
    failed = verdict(e.checks)
    log(f"compress: {e.name}: top-1 {e.top1:.2f} (original {orig.top1:.2f}), "
        + ("gate passed" if failed is None else f"gate FAILED {failed.line()}"))
    return e


def within_budget(e: Evaluated) -> bool:
    """Whether a row is a candidate for the recipe's budget (float candidates are by their search)."""
    return bool(e.info.get("budget", {}).get("fits", True))


def _budget_row(r: CompressRecipe, ratio: float | None, runtime: str | None) -> dict[str, Any]:
    """How a row measures against the budget: its ratio to the original, where it was measured, and the verdict."""
    b = r.budget
    return {"metric": b.metric, "fraction": b.fraction, "ratio": ratio,
            "runtime": runtime if b.metric == "latency" else None,
            "batch": b.latency_batch if b.metric == "latency" else None,
            "fits": ratio is not None and ratio <= b.fraction + 1e-12}


def int8_budget(q: Evaluated, r: CompressRecipe, parent_ratio: float) -> dict[str, Any]:
    """An int8 copy against the budget: a latency budget judged by its own onnxruntime timing in the gate (the
    only runtime it runs in) at ``budget.latency_batch``; params, FLOPs and layers are its parent's."""
    from kdforge.compress.budget import runtime_ratio

    if r.budget.metric != "latency":
        return _budget_row(r, parent_ratio, None)
    fast = next((c for c in q.checks if c.name == "faster"), None)
    return _budget_row(r, runtime_ratio(fast.values, r.budget.latency_batch) if fast else None, "onnxruntime")


def int8_rows(floats: list[Evaluated], orig: Evaluated, src: Source, r: CompressRecipe, out: Path, log: Any
              ) -> list[Evaluated]:
    """int8 copies offered to the budget, each judged by its own measurement (:func:`int8_budget`).

    Copies are made of the original, of every float candidate whose export loads and, with ``int8_parents:
    scaled`` and a latency budget, of float parents searched at the budget times the original's measured int8
    speed-up: the largest parents whose int8 copy should fit. Those parents are healed and gated like
    candidates, and listed as outside the budget.
    """
    from kdforge.compress.budget import int8_parent_fraction, runtime_ratio

    cdir = out / "candidates"
    q0 = _log_row(int8_candidate(orig, orig, src, r, cdir / "original+int8"), orig, log)
    q0.info["budget"] = int8_budget(q0, r, 1.0)
    extra: list[Evaluated] = []
    parents = [e for e in floats if e.checks and e.checks[0].ok]
    fast = next((c for c in q0.checks if c.name == "faster"), None)
    if r.candidates.int8_parents == "scaled" and r.budget.metric == "latency" and fast is not None:
        gain = 1 / runtime_ratio(fast.values, r.budget.latency_batch)
        pf = int8_parent_fraction(r.budget.fraction, gain)
        q0.info["int8_gain"], q0.info["int8_parent_fraction"] = gain, pf
        if r.budget.fraction < pf < 1:
            log(f"compress: int8 runs the original {gain:.2f}x faster at batch {r.budget.latency_batch}: "
                f"searching int8 parents at latency <= {pf:.2f}x")
            rp = CompressRecipe.from_dict(r.model_dump(mode="json"), [f"budget.fraction={pf}"])
            known = {e.name for e in floats}
            _, pcands, _ = search_candidates(src, rp, log)
            for c in pcands:
                if c.name in known:
                    continue
                e = _evaluate_candidate(c, src, rp, orig, out, log)
                e.info["budget"] = _budget_row(r, c.budget_fraction, "torch eager")
                e.info["int8_parent_only"] = True
                extra.append(e)
                if e.checks[0].ok:
                    parents.append(e)
    copies = [q0]
    for p in parents:
        if "onnx" not in p.files:
            continue
        q = _log_row(int8_candidate(p, orig, src, r, cdir / f"{p.name}+int8"), orig, log)
        q.info["budget"] = int8_budget(q, r, p.info["budget"]["ratio"])
        copies.append(q)
    for q in copies:
        b = q.info["budget"]
        if not b["fits"] and b["ratio"] is not None:
            log(f"compress: {q.name}: outside the budget ({b['metric']} {b['ratio']:.2f}x > {b['fraction']:g}x"
                + (f", {b['runtime']} at batch {b['batch']})" if b["runtime"] else ")"))
    return extra + copies


def int8_candidate(parent: Evaluated, orig: Evaluated, src: Source, r: CompressRecipe, folder: Path,
                   original_runner: Any = None) -> Evaluated:
    """An int8 copy of ``parent``'s ONNX export (onnxruntime's quantizer), gated against the original.

    ``matches`` compares the fresh-process outputs with the in-process quantized session (the reference an int8
    model has); ``faster`` also times the float parent in the same rounds, so the row shows what int8 itself gains.
    """
    from kdforge.compress.quant import INT8_FILE, onnx_accuracy, quantize_onnx

    g, mode = r.gate, r.candidates.int8
    calib = plain_batch(src.data.train, r.candidates.int8_calib_samples, r.candidates.seed)[0].numpy()
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    path = quantize_onnx(parent.files["onnx"], folder / INT8_FILE, mode, calib.astype("float32"))
    top1 = onnx_accuracy(path, src.data.test, g.threads)
    e = Evaluated(f"{parent.name}+int8", f"{parent.family}+int8", parent.params, parent.flops, top1,
                  files={"onnx": path}, info={"int8": mode, "parent": parent.name, "budget_fraction":
                                              parent.info.get("budget_fraction"),
                                              "quantize_seconds": time.perf_counter() - t0})
    x, _ = plain_batch(src.data.test, g.held_out, r.seed + 1)
    loads, outs, facts = check_loads(e.files, x, g.threads, max(g.batch_sizes))
    e.checks.append(loads)
    e.info["peak_rss_mb"] = facts.get("onnx", {}).get("peak_rss_mb")
    if not loads.ok:
        return e
    runner = onnx_runner(path, g.threads)
    e.checks.append(check_matches(torch.from_numpy(runner(x.numpy())), outs, g.atol))
    e.checks.append(check_smaller((orig.params, e.params), {"onnx": (orig.files["onnx"].stat().st_size,
                                                                     path.stat().st_size)}, quantized=True))
    e.info["bytes_vs_parent"] = path.stat().st_size / parent.files["onnx"].stat().st_size
    # the original's own int8 copy: its float parent is the original, already timed in the same rounds
    also = None if parent is orig else {"float": onnx_runner(parent.files["onnx"], g.threads)}
    e.checks.append(check_faster(original_runner or onnx_runner(orig.files["onnx"], g.threads), runner,
                                 src.input_shape, g.batch_sizes, g.rounds, g.iters,
                                 f"onnxruntime {g.threads} thread(s)", also=also))
    e.checks.append(check_quality(orig.top1, top1, r.budget.max_drop))
    return e


def heal_candidate(c: Candidate, src: Source, r: CompressRecipe, out: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The candidate healed by KD from the original (live, or its logits cached in ``out``; or as cut, with
    heal.mode none)."""
    from kdforge.compress.heal import cache_config, heal

    if r.heal.mode == "kd" and r.heal.teacher == "cache":
        return heal(c.model, src.model, src.data, r, cache=cache_config(out), teacher_spec=src.spec)
    return heal(c.model, src.model, src.data, r)


def compress(recipe: CompressRecipe | str | Path | dict[str, Any], out: str | Path, overwrite: bool = False,
             overrides: list[str] | None = None, verbose: bool = True) -> CompressResult:
    """Compress a model by a recipe (object, YAML path or dict) into ``out``: the Python twin of the command."""
    if isinstance(recipe, CompressRecipe):
        r = recipe if not overrides else CompressRecipe.from_dict(recipe.model_dump(mode="json"), overrides)
    elif isinstance(recipe, dict):
        r = CompressRecipe.from_dict(recipe, overrides)
    else:
        r = CompressRecipe.from_yaml(recipe, overrides)
    return run_compress(r, out, overwrite, verbose)
