"""Step cost of LM distillation: SFT, cached top-k KD and live KD steps, interleaved in one process, and peak memory."""

from __future__ import annotations

import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.bench import BENCHES
from kdforge.bench.common import bench_dir, machine_note, markdown_table, write_json
from kdforge.bench.llm_kd import _log, _Timer

#: peak memory is probed for these modes, each in a fresh process
MEMORY_MODES = ("sft_hf", "kd_cached", "kd_live", "kd_live_plain")
#: step times are interleaved over these modes
TIMED_MODES = ("sft_hf", "kd_cached", "kd_live")


def _settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"layers": 4, "vocab": 512, "hidden": 64, "batch": 2, "len": 16, "rounds": 2, "steps": 3, "chunk": None,
                "k": 8}
    return {"layers": 30, "vocab": 49_152, "hidden": 576, "batch": 4, "len": 512, "rounds": 2, "steps": 3,
            "chunk": None, "k": 32}


def _shaped_pair(p: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    """Randomly initialised teacher with SmolLM2-135M's shape and its 22-layer student (cost does not need weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdforge.llm.surgery import prune_decoder_layers

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["hidden"] * 8 // 3,
                      num_hidden_layers=p["layers"], num_attention_heads=9 if p["hidden"] == 576 else 4,
                      num_key_value_heads=3 if p["hidden"] == 576 else 2, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    teacher = LlamaForCausalLM(cfg).eval()
    keep = [i for i in range(p["layers"]) if i % 4 != 1][: p["layers"] - max(1, p["layers"] * 8 // 30)]
    return teacher, prune_decoder_layers(teacher, keep)


def _method(mode: str, student: nn.Module, teacher: nn.Module, cache: Any, chunk: int | None) -> Any:
    from kdforge.llm.distill import LMDistill
    from kdforge.llm.metrics import lm_loss
    from kdforge.losses import build_loss
    from kdforge.method import Method

    if mode == "sft_hf":
        class HFSFT(Method):
            def __init__(self, m: nn.Module) -> None:
                super().__init__()
                self.student = m

            def training_step(self, batch: Any, step: int) -> dict[str, Tensor]:
                return {"loss": lm_loss(self.student, batch["ids"])}

            def deployable(self) -> nn.Module:
                return self.student

        return HFSFT(student)
    if mode == "kd_live_plain":  # one chunk of every position, full logits of both models, no fused gradient
        from kdforge.llm.losses import chunked_logit_loss

        class PlainKD(Method):
            def __init__(self, m: nn.Module, t: nn.Module) -> None:
                super().__init__()
                self.student, self.teacher = m, t
                self.term = build_loss("lm_fkl")

            def training_step(self, batch: Any, step: int) -> dict[str, Tensor]:
                from kdforge.llm.metrics import lm_logits

                ids = batch["ids"]
                with torch.no_grad():
                    t = lm_logits(self.teacher, ids)[:, :-1].flatten(0, 1)
                s = lm_logits(self.student, ids)[:, :-1].flatten(0, 1)
                mask = torch.ones(len(s), dtype=torch.bool)
                return {"loss": chunked_logit_loss([(self.term, 1.0)], s, t, mask, chunk=len(s))}

            def deployable(self) -> nn.Module:
                return self.student

        return PlainKD(student, teacher)
    return LMDistill(student, None if mode == "kd_cached" else teacher, [(build_loss("lm_fkl", chunk=chunk), 1.0)],
                     cache=cache if mode == "kd_cached" else None)


def _fit(mode: str, student: nn.Module, teacher: nn.Module, cache: Any, ids: Tensor, steps: int, chunk: int | None
         ) -> _Timer:
    from kdforge.llm.distill import distill_lm, distill_recipe

    class Same:
        steps_per_epoch = 1

        def batch(self, step: int) -> dict[str, Tensor]:
            return {"ids": ids, "rows": torch.arange(len(ids))}

    timer = _Timer()
    distill_lm(_method(mode, student, teacher, cache, chunk), Same(), distill_recipe(steps, 1e-5, len(ids)),
               callbacks=[timer])
    return timer


def _batch(p: dict[str, Any]) -> Tensor:
    return torch.randint(0, p["vocab"], (p["batch"], p["len"]), generator=torch.Generator().manual_seed(1))


def memory_probe(mode: str, p: dict[str, Any]) -> None:
    """Run in a fresh process: peak resident memory (MB) of the second step of ``mode``, printed as JSON."""
    from kdforge.llm.cache import LMTopKCache

    teacher, student = _shaped_pair(p)
    ids = _batch(p)
    with tempfile.TemporaryDirectory() as d:
        cache = LMTopKCache.build(teacher, ids, d, k=p["k"]) if mode == "kd_cached" else None
        timer = _fit(mode, student, teacher, cache, ids, 2, p["chunk"])
    print(json.dumps({"mode": mode, "peak_mb": timer.peak_mb[1]}))


@BENCHES.register("llm-kd-step")
def run(out: Path | None = None, quick: bool = False) -> dict[str, Any]:
    """Step time of SFT, cached-top-k KD and live KD interleaved in one process; peak memory per step per mode."""
    from kdforge.llm.cache import LMTopKCache
    from kdforge.llm.metrics import lm_logits

    p = _settings(quick)
    out = bench_dir("llm-kd-step", out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    teacher, student = _shaped_pair(p)
    ids = _batch(p)
    times: dict[str, list[float]] = {m: [] for m in TIMED_MODES}
    with tempfile.TemporaryDirectory() as d:
        cache = LMTopKCache.build(teacher, ids, d, k=p["k"])
        for r in range(p["rounds"]):
            for mode in TIMED_MODES:
                t = _fit(mode, student, teacher, cache, ids, p["steps"], p["chunk"]).t
                times[mode] += [b - a for a, b in itertools.pairwise(t)]
                _log(f"round {r}: {mode} steps {[round(x, 3) for x in times[mode][-(p['steps'] - 1):]]} s")
    t_fwd = []
    with torch.no_grad():
        for _ in range(p["rounds"] + 1):
            t0 = time.perf_counter()
            lm_logits(teacher, ids)
            t_fwd.append(time.perf_counter() - t0)
    mem = {}
    for mode in MEMORY_MODES:
        code = f"from kdforge.bench.llm_kd_step import memory_probe; memory_probe({mode!r}, {p!r})"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
        try:
            mem[mode] = json.loads(r.stdout.strip().splitlines()[-1])["peak_mb"]
        except (IndexError, ValueError, KeyError):
            _log(f"memory probe {mode} failed: {r.stderr.strip().splitlines()[-1:]}")
            mem[mode] = float("nan")
        _log(f"peak memory of a {mode} step: {mem[mode]:.0f} MB")
    res = {"settings": p, "step_s": times, "median_s": {m: statistics.median(v) for m, v in times.items()},
           "teacher_forward_s": statistics.median(t_fwd[1:]), "peak_mb": mem, "total_s": time.perf_counter() - t_all,
           "machine": machine_note()}
    write_json(out / "llm-kd-step.json", res)
    _write_md(out / "llm-kd-step.md", res, quick)
    return res


def _write_md(path: Path, res: dict[str, Any], quick: bool) -> None:
    from kdforge.llm.losses import auto_chunk

    p, med, pm = res["settings"], res["median_s"], res["peak_mb"]
    chunk = p["chunk"] or auto_chunk(p["vocab"])
    how = "the default" if p["chunk"] is None else "given"
    sft_t = med["sft_hf"]
    bound = 1 + res["teacher_forward_s"] / sft_t
    ranges = {m: (min(v) / sft_t, max(v) / sft_t) for m, v in res["step_s"].items()}
    n_logits_mb = p["batch"] * p["len"] * p["vocab"] * 4 / 2**20

    def ratio(m: str) -> str:
        return f"{med[m] / sft_t:.2f} ({ranges[m][0]:.2f}–{ranges[m][1]:.2f})"

    table = [
        {"step": "SFT (Hugging Face loss, full logits)", "median s": f"{sft_t:.3f}", "× SFT": "1.00", "target": "",
         "peak MB": f"{pm['sft_hf']:.0f}", "peak × SFT": "1.00", "target peak": ""},
        {"step": f"KD from the top-{p['k']} cache (fused, chunks of {chunk})",
         "median s": f"{med['kd_cached']:.3f}", "× SFT": ratio("kd_cached"), "target": "≤ 1.05",
         "peak MB": f"{pm['kd_cached']:.0f}",
         "peak × SFT": f"{pm['kd_cached'] / pm['sft_hf']:.2f}", "target peak": "≤ 1.15"},
        {"step": f"KD, live teacher (fused, chunks of {chunk})", "median s": f"{med['kd_live']:.3f}",
         "× SFT": ratio("kd_live"), "target": f"≤ {bound:.2f}", "peak MB": f"{pm['kd_live']:.0f}",
         "peak × SFT": f"{pm['kd_live'] / pm['sft_hf']:.2f}", "target peak": "≤ 1.15"},
        {"step": "KD, live teacher, plain (full logits of both)", "median s": "", "× SFT": "", "target": "",
         "peak MB": f"{pm['kd_live_plain']:.0f}", "peak × SFT": f"{pm['kd_live_plain'] / pm['sft_hf']:.2f}",
         "target peak": ""}]
    n_timed = p["rounds"] * (p["steps"] - 1)
    text = [f"# Benchmark: llm-kd-step{' (quick smoke run)' if quick else ''}", "",
            f"A teacher with SmolLM2-135M's shape (random weights: the cost does not depend on them; vocabulary "
            f"{p['vocab']:,}, {p['layers']} layers, hidden {p['hidden']}, tied head) and its "
            f"{p['layers'] - max(1, p['layers'] * 8 // 30)}-layer student; one batch of {p['batch']} × {p['len']} "
            f"tokens (a full float32 logit tensor of it: {n_logits_mb:.0f} MB); AdamW through the engine. "
            f"Step times: SFT, cached KD and live KD interleaved in one process, {p['rounds']} rounds of "
            f"{p['steps']} steps per mode (the first step of each left out: {n_timed} timed steps per mode); median, "
            f"and in brackets the min–max ratio of single steps to the SFT median. Teacher forward "
            f"{res['teacher_forward_s']:.3f} s (median of {p['rounds']}), so the live target is 1 + teacher forward "
            "/ SFT step. Peak memory: the largest rise of resident memory (Linux VmHWM, reset every step) within "
            "each mode's second step, each mode in a fresh process.", "",
            markdown_table(table), "",
            "- **SFT**: `lm_loss` (the model's full logits, then cross-entropy), the step every KD row is compared "
            "with.",
            "- **fused**: the student's KD term from its final hidden states, chunk by chunk; each chunk's logits "
            "are made once and the loss's gradient with respect to them is multiplied into the gradients of the "
            "hidden states and the head in the forward pass (closed form for forward KL; nothing recomputed). The "
            "live teacher's logits are made chunk by chunk from its hidden states; the cached teacher's are its "
            f"top-{p['k']} log-probabilities and one bucket for the rest.",
            f"- **chunks**: {chunk} token positions ({how}: {chunk * p['vocab'] * 4 / 2**20:.0f} MB of float32 logits "
            "per chunk).",
            "- **plain**: both models' full logits and the loss on them in one piece (what chunking avoids).", "",
            f"Command: `kdforge bench llm-kd-step{' --quick' if quick else ' --publish'}`. Machine: {res['machine']}. "
            f"Total wall time {res['total_s'] / 60:.1f} min.", ""]
    path.write_text("\n".join(text))
