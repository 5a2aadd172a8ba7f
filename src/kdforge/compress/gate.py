"""The gate: five checks a compressed model must pass, each its own function returning a :class:`Check`.

1. ``loads``: a fresh Python process that never imports kdforge loads each export with the standard loader
   (onnxruntime, ``torch.export.load``) and runs the held-out inputs;
2. ``matches``: those outputs equal the in-memory model's (max abs diff <= atol for ONNX, exact for .pt2);
3. ``smaller``: fewer parameters and fewer bytes on disk than the original in the same format;
4. ``faster``: lower median latency than the original in the same runtime, interleaved, at every batch size;
5. ``quality``: accuracy drop on the test split (never seen by selection) within the budget.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

CHECKS = ("loads", "matches", "smaller", "faster", "quality")


@dataclass
class Check:
    """One check's verdict, a one-line reason and its numbers."""

    name: str
    ok: bool
    detail: str
    values: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.name}: {'pass' if self.ok else 'FAIL'} ({self.detail})"


class GateFailed(Exception):
    """No candidate passed the gate; the message is one line naming the failed check."""


# The loader run in a fresh interpreter: standard libraries only (numpy, onnxruntime, torch), never kdforge.
LOADER = r"""
import json, sys
import numpy as np
job = json.loads(sys.argv[1])
def peak_mb():  # VmHWM starts afresh at exec (ru_maxrss would carry the parent's high-water mark)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None
x = np.load(job["inputs"])["x"]
fmt, path = job["format"], job["path"]
if fmt == "onnx":
    import onnxruntime as ort
    so = ort.SessionOptions(); so.intra_op_num_threads = job["threads"]; so.inter_op_num_threads = 1
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    run = lambda a: s.run(None, {s.get_inputs()[0].name: a})[0]
else:
    import torch
    torch.set_num_threads(job["threads"])
    m = torch.export.load(path).module()
    def run(a):
        with torch.no_grad():
            return m(torch.from_numpy(a)).numpy()
y = run(x)
if job.get("peak_batch"):
    run(np.zeros((job["peak_batch"],) + x.shape[1:], dtype=x.dtype))
np.save(job["out"], y)
print(json.dumps({"kdforge_imported": any(k == "kdforge" or k.startswith("kdforge.") for k in sys.modules),
                  "peak_rss_mb": peak_mb()}))
"""


def load_fresh(fmt: str, path: Path, x: Tensor, threads: int = 1, peak_batch: int | None = None,
               timeout: float = 300) -> tuple[np.ndarray | None, dict[str, Any], str]:
    """Load and run an export in a fresh process without kdforge: (outputs or None, facts, error line)."""
    with tempfile.TemporaryDirectory(prefix="kdforge-gate-") as tmp:
        inp, out = Path(tmp) / "x.npz", Path(tmp) / "y.npy"
        np.savez(inp, x=x.numpy())
        job = {"format": fmt, "path": str(Path(path).resolve()), "inputs": str(inp), "out": str(out),
               "threads": threads, "peak_batch": peak_batch}
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        p = subprocess.run([sys.executable, "-c", LOADER, json.dumps(job)], capture_output=True, text=True,
                           timeout=timeout, env=env, cwd=tmp)
        if p.returncode != 0:
            err = [line for line in p.stderr.strip().splitlines() if line.strip()]
            return None, {}, (err[-1] if err else f"exit code {p.returncode}")[:200]
        facts = json.loads(p.stdout.strip().splitlines()[-1])
        return np.load(out), facts, ""


def check_loads(artifacts: dict[str, Path], x: Tensor, threads: int = 1, peak_batch: int | None = None
                ) -> tuple[Check, dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """Check 1: every export (ONNX, .pt2) loads and runs in a fresh process that does not import kdforge."""
    outs: dict[str, np.ndarray] = {}
    facts: dict[str, dict[str, Any]] = {}
    for fmt in ("onnx", "pt2"):
        if fmt not in artifacts:
            continue
        y, f, err = load_fresh(fmt, artifacts[fmt], x, threads, peak_batch if fmt == "onnx" else None)
        loader = "onnxruntime" if fmt == "onnx" else "torch.export.load"
        if y is None:
            return Check("loads", False, f"{artifacts[fmt].name} does not load with {loader}: {err}"), outs, facts
        if f.get("kdforge_imported"):
            return Check("loads", False, f"loading {artifacts[fmt].name} imported kdforge"), outs, facts
        outs[fmt], facts[fmt] = y, f
    if not outs:
        return Check("loads", False, "no ONNX or .pt2 export to load"), outs, facts
    how = {"onnx": "onnxruntime", "pt2": "torch.export.load"}
    return Check("loads", True, ", ".join(f"{artifacts[f].name} via {how[f]}" for f in outs)
                 + " in a process without kdforge"), outs, facts


def check_matches(reference: Tensor, loaded: dict[str, np.ndarray], atol: float = 1e-4) -> Check:
    """Check 2: loaded outputs reproduce the in-memory model's (ONNX within ``atol``, .pt2 exactly)."""
    ref = reference.detach().numpy()
    diffs: dict[str, float] = {}
    for fmt, y in loaded.items():
        if y.shape != ref.shape:
            return Check("matches", False, f"{fmt} output shape {tuple(y.shape)} != {tuple(ref.shape)}",
                         {"max_abs_diff": diffs})
        diffs[fmt] = float(np.abs(y.astype(np.float64) - ref.astype(np.float64)).max())
    bad = [f for f, d in diffs.items() if d > (0.0 if f == "pt2" else atol)]
    text = ", ".join(f"{f} max |diff| {d:.2e}" for f, d in diffs.items())
    limits = "limits: " + ", ".join(f"{f} {'exact' if f == 'pt2' else f'{atol:g}'}" for f in loaded) + \
        f"; {len(ref)} held-out inputs"
    return Check("matches", not bad, f"{text} ({limits})", {"max_abs_diff": diffs, "atol": atol, "n": len(ref)})


def check_smaller(params: tuple[int, int], bytes_: dict[str, tuple[int, int]], quantized: bool = False) -> Check:
    """Check 3: fewer parameters and fewer bytes on disk (per format) than the original.

    ``quantized``: a copy stored in fewer bits keeps its parent's parameters, so it may have as many as the
    original (never more); its bytes on disk must still shrink.
    """
    po, pc = params
    grew = pc > po if quantized else pc >= po
    bad = [f"params {pc:,} {'>' if quantized else '>='} original {po:,}"] if grew else []
    bad += [f"{f} {c:,} B >= original {o:,} B" for f, (o, c) in bytes_.items() if c >= o]
    text = f"params {pc:,} vs {po:,} ({pc / po:.2f}x); " + ", ".join(
        f"{f} {c / 1e6:.2f} MB vs {o / 1e6:.2f} MB" for f, (o, c) in bytes_.items())
    return Check("smaller", not bad, "; ".join(bad) if bad else text,
                 {"params": {"original": po, "compressed": pc},
                  "bytes": {f: {"original": o, "compressed": c} for f, (o, c) in bytes_.items()}})


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def interleaved_latency(runners: dict[str, Any], x_by_batch: dict[int, np.ndarray], rounds: int = 7, iters: int = 5
                        ) -> dict[int, dict[str, dict[str, float]]]:
    """Per batch size and runner: median (and min/max) ms per call over ``rounds`` interleaved rounds."""
    res: dict[int, dict[str, dict[str, float]]] = {}
    names = list(runners)
    for b, x in x_by_batch.items():
        t0 = time.perf_counter()
        for _ in range(3):  # warm-up (allocations, arenas); also sizes a round
            for n in names:
                runners[n](x)
        # a round lasts at least ~20 ms per runner, so that the timer's and the scheduler's jitter stay small
        k = max(iters, int(0.02 / max((time.perf_counter() - t0) / (3 * len(names)), 1e-6)) + 1)
        per: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            for n in (names if r % 2 == 0 else names[::-1]):  # A B, B A, ...: drift hits both alike
                t0 = time.perf_counter()
                for _ in range(k):
                    runners[n](x)
                per[n].append(1000 * (time.perf_counter() - t0) / k)
        res[b] = {n: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)} for n, v in per.items()}
    return res


def onnx_runner(path: Path, threads: int = 1) -> Any:
    """A callable running an ONNX file in onnxruntime on one array."""
    s = _session(path, threads)
    name = s.get_inputs()[0].name
    return lambda a: s.run(None, {name: a})[0]


def torch_runner(model: nn.Module) -> Any:
    """A callable running an eager model on one array (no grad)."""
    model.eval()

    def run(a: np.ndarray) -> Any:
        with torch.no_grad():
            return model(torch.from_numpy(a))

    return run


def check_faster(original: Any, compressed: Any, shape: tuple[int, ...], batch_sizes: list[int], rounds: int = 7,
                 iters: int = 5, runtime: str = "onnxruntime", also: dict[str, Any] | None = None) -> Check:
    """Check 4: the compressed model's median latency is below the original's at every batch size.

    ``also``: more runners timed in the same interleaved rounds (an int8 model's float parent), reported only.
    """
    xs = {b: np.random.default_rng(b).standard_normal((b, *shape)).astype(np.float32) for b in batch_sizes}
    lat = interleaved_latency({"original": original, "compressed": compressed, **(also or {})}, xs, rounds, iters)
    speed = {b: v["original"]["median_ms"] / v["compressed"]["median_ms"] for b, v in lat.items()}
    over = {n: {str(b): v[n]["median_ms"] / v["compressed"]["median_ms"] for b, v in lat.items()} for n in also or {}}
    slow = [b for b, s in speed.items() if s <= 1.0]
    text = ", ".join(f"batch {b}: {lat[b]['compressed']['median_ms']:.2f} vs {lat[b]['original']['median_ms']:.2f} ms "
                     f"({speed[b]:.2f}x)" for b in batch_sizes)
    return Check("faster", not slow, f"{text}; {runtime}, median of {rounds} interleaved rounds",
                 {"runtime": runtime, "rounds": rounds, "iters": iters,
                  "latency": {str(b): v for b, v in lat.items()}, "speedup": {str(b): s for b, s in speed.items()},
                  **({"speedup_over": over} if over else {})})


def check_quality(original: float, compressed: float, max_drop: float, split: str = "test") -> Check:
    """Check 5: top-1 accuracy drop (points) on a split that selection never saw is within ``max_drop``."""
    drop = original - compressed
    return Check("quality", drop <= max_drop, f"top-1 {compressed:.2f} vs {original:.2f} on the {split} split: "
                                              f"drop {drop:.2f} points (allowed {max_drop:g})",
                 {"original": original, "compressed": compressed, "drop": drop, "max_drop": max_drop,
                  "split": split})


def verdict(checks: list[Check]) -> Check | None:
    """The first failed check, or None when all passed."""
    return next((c for c in checks if not c.ok), None)


def checks_json(checks: list[Check]) -> dict[str, Any]:
    return {c.name: asdict(c) for c in checks}
