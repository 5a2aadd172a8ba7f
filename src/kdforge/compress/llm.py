"""Compressing a causal LM: decoder layers removed to the budget, healed by logit KD, exported as a HF folder.

The gate for language models: the folder loads with ``AutoModelForCausalLM.from_pretrained`` in a process
without kdforge and reproduces the in-memory logits; it is smaller (parameters, bytes); prefill and greedy-decode
tokens/s beat the original's in transformers (both loaded from their exported folders, interleaved); held-out
perplexity on the ``eval`` corpus grows by at most ``budget.max_ppl_ratio``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdforge.compress.candidates import Candidate, Skipped, _largest_within
from kdforge.compress.gate import Check
from kdforge.compress.recipe import DEPTH_FAMILIES, CompressRecipe
from kdforge.errors import KdforgeError


@dataclass
class LMSource:
    """The original LM, its tokenizer, calibration rows, held-out evaluation rows and the rows healing reads."""

    model: nn.Module
    tokenizer: Any
    calib: Tensor
    eval: Tensor
    where: str
    heal: Tensor | None = None  # None: heal on ``calib``
    heal_text: str | None = None  # where ``heal`` was read


def load_lm_source(r: CompressRecipe) -> LMSource:
    """Load the recipe's causal LM and cut its calibration and evaluation text into token rows."""
    from kdforge.llm.loading import load_causal_lm
    from kdforge.llm.text import read_text, split_blocks, spread_rows, token_blocks

    assert r.llm is not None
    model, tok = load_causal_lm(r.llm.source, r.llm.gguf_file, torch.float32)
    model = dequantized(model, r.llm.source)
    t = r.text
    calib = token_blocks(tok, read_text(t.calib), t.seq_len, t.max_tokens)
    if t.eval == t.calib:
        calib, ev = split_blocks(calib, t.eval_fraction)
    else:
        ev = token_blocks(tok, read_text(t.eval), t.seq_len, t.max_tokens)
    heal = None
    if t.heal is not None and t.heal != t.calib:
        heal = spread_rows(token_blocks(tok, read_text(t.heal), t.seq_len, t.max_tokens), t.heal_sequences)
    return LMSource(model.eval(), tok, calib[: t.calib_sequences], ev[: t.eval_sequences], r.llm.source, heal,
                    t.heal if heal is not None else None)


def dequantized(model: nn.Module, where: str) -> nn.Module:
    """A model transformers loaded from a GGUF file, as the plain float model it is.

    transformers dequantizes GGUF weights to float on load but keeps its GGUF quantizer on the model and a
    ``quantization_config`` in its config: ``save_pretrained`` then refuses ("not serializable"), and a saved
    config would send ``from_pretrained`` to the GGUF loader. When every module is a plain float layer, both
    markers are dropped; weights still held in quantized blocks are refused in one line.
    """
    q = getattr(model, "hf_quantizer", None)
    if q is None:
        return model
    if getattr(q, "packed_modules", None) or any(not p.is_floating_point() for p in model.parameters()):
        raise KdforgeError(f"{where}: transformers kept this model's weights in quantized GGUF blocks; compress "
                           "needs float weights (load it with dequantization, or give a float HF folder)")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def lm_measure(model: nn.Module, metric: str, rows: Tensor, layers: int) -> float:
    """An LM's size by the budget's metric (``latency``: median prefill ms of one row)."""
    from kdforge.profile import count_params

    if metric == "params":
        return float(count_params(model))
    if metric == "layers":
        return float(layers)
    if metric == "flops":
        from torch.utils.flop_counter import FlopCounterMode

        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(input_ids=rows[:1], use_cache=False)
        return float(fc.get_total_flops())
    from kdforge.llm.metrics import tokens_per_second

    return 1000 * rows.shape[1] / tokens_per_second(model, rows, 1, repeats=5)


#: rows of the calibration text that ``sleb_pick`` reads: SLEB's greedy search on the first, the pick between its
#: set and block influence's on the next (as docs/benchmarks/sglp-llm-pick.md measured it)
SLEB_ROWS, PICK_ROWS = 2, 16


def sleb_pick_kept(model: nn.Module, units: Any, n_keep: int, calib: Tensor, memo: dict[Any, list[int]]
                   ) -> tuple[list[int], dict[str, Any]]:
    """``sleb_pick`` (kdforge.prune's selection) on the calibration rows: SLEB on the first ``SLEB_ROWS``, the
    pick on the next ``PICK_ROWS``; (kept units, details).

    SLEB's greedy order is a prefix of any longer one, so ``memo`` keeps the longest order computed on these
    rows and a smaller budget reuses it (one search for every fraction of a bench).
    """
    import hashlib

    from kdforge.prune.importance import causal_lm_kl_task, select_baseline, with_reference

    if len(calib) < SLEB_ROWS + 1:
        raise KdforgeError(f"candidates.families sleb_pick needs at least {SLEB_ROWS + 1} calibration sequences, "
                           f"got {len(calib)} (raise text.calib_sequences)")
    rest = calib[SLEB_ROWS: SLEB_ROWS + PICK_ROWS]
    batches = with_reference(model, [calib[:SLEB_ROWS], *(rest[i: i + 4] for i in range(0, len(rest), 4))])
    key = ("sleb", id(model), hashlib.sha1(calib[:SLEB_ROWS].numpy().tobytes()).hexdigest())
    sel = select_baseline("sleb_pick", model, units, n_keep, batches, causal_lm_kl_task(),
                          sleb_prefix=memo.get(key, []))
    d = sel.details
    if len(d["order"]) > len(memo.get(key, [])):
        memo[key] = d["order"]
    return sel.kept, {"picked": d["picked"], "pick_kl": d["pick_losses"], "sleb_order": d["order"],
                      "removed": d["candidates"]}


def search_lm(src: LMSource, r: CompressRecipe, log: Any = print, memo: dict[Any, Any] | None = None
              ) -> tuple[float, list[Candidate], list[Skipped]]:
    """Depth candidates of every requested family: the most decoder layers kept within the budget.

    ``memo``: shared between calls on the same model and text (SLEB's greedy order is reused, see
    :func:`sleb_pick_kept`).
    """
    from kdforge.prune.importance import allocate_keep, causal_lm_task, select_baseline, sglp_select
    from kdforge.prune.sglp import AnalysisConfig, analyze
    from kdforge.prune.surgery import find_units, prune_model, pruned_record

    units = find_units(src.model)
    task = causal_lm_task()
    c = r.candidates
    cka = [src.calib[i: i + 16] for i in range(0, len(src.calib) - 15, 16)] or [src.calib]
    score = [src.calib[:4]]
    b = r.budget
    original = lm_measure(src.model, b.metric, src.calib, len(units))
    target = b.fraction * original
    analysis = None
    memo = {} if memo is None else memo
    picks: dict[int, dict[str, Any]] = {}
    cands: list[Candidate] = []
    skipped: list[Skipped] = []
    for fam in c.families:
        t0 = time.perf_counter()
        cache: dict[int, tuple[list[int], float]] = {}

        def probe(n: int, fam: str = fam, cache: dict[int, tuple[list[int], float]] = cache
                  ) -> tuple[list[int], float]:
            nonlocal analysis
            if n not in cache:
                if fam == "sglp":
                    if analysis is None:
                        analysis = analyze(src.model, units, cka, task, AnalysisConfig(k_max=6))
                    per = allocate_keep(analysis.segmentation.sizes(), n / len(units))
                    kept = sglp_select(src.model, units, analysis.segmentation.segments, per, score, task, set(),
                                       "subnet", "min", "global", c.max_candidates, c.seed).kept
                elif fam == "sleb_pick":
                    kept, picks[n] = sleb_pick_kept(src.model, units, n, src.calib, memo)
                else:
                    kept = select_baseline(DEPTH_FAMILIES[fam], src.model, units, n, cka[:1], task, set(),
                                           c.seed).kept
                cache[n] = kept, lm_measure(prune_model(src.model, units, kept), b.metric, src.calib, len(kept))
            return cache[n]

        if b.metric == "layers":  # known without measuring: the most layers within the fraction
            n = min(len(units) - 1, int(b.fraction * len(units) + 1e-9))
            best = n if n >= 1 else None
        else:
            best = _largest_within(1, len(units) - 1, lambda n: probe(n)[1] <= target)
        if best is None:
            skipped.append(Skipped(fam, f"even one decoder layer gives {probe(1)[1] / original:.2f} of the "
                                        f"original's {b.metric}", probe(1)[1] / original))
            log(f"compress: {fam}: no candidate ({skipped[-1].reason})")
            continue
        kept, value = probe(best)
        plan = {"depth": pruned_record(units, kept, {})}
        plan["depth"].pop("base")
        info = {"kept": len(kept), "units": len(units), "kept_layers": kept}
        if fam == "sleb_pick":
            info["pick"] = picks[best]
        cands.append(Candidate(f"{fam}-{len(kept)}of{len(units)}", fam, prune_model(src.model, units, kept), plan,
                               value, value / original, time.perf_counter() - t0, info))
        log(f"compress: {fam}: {cands[-1].name}, {b.metric} {value / original:.2f}x the original"
            + (f" (picked {picks[best]['picked']}'s set)" if fam == "sleb_pick" else ""))
    if not cands:
        s = min(skipped, key=lambda s: s.smallest_fraction or 1.0)
        raise KdforgeError(f"budget {b.metric} <= {b.fraction:g}x the original is unreachable: the smallest "
                           f"reachable is {s.smallest_fraction:.2f}x ({s.family})")
    return original, cands, skipped


def heal_lm(student: nn.Module, src: LMSource, r: CompressRecipe, seed: int | None = None
            ) -> tuple[nn.Module, dict[str, Any]]:
    """Logit KD from the original on the heal rows (the calibration rows unless ``text.heal``; an engine fit)."""
    import copy

    from kdforge.llm.heal import heal_kd, heal_recipe

    if r.heal.mode == "none":
        return student, {"mode": "none"}
    s = r.seed if seed is None else seed
    m = copy.deepcopy(student)
    recipe = heal_recipe(r.train.max_steps or 20, 5e-5, 2, s)
    if "optim" in r.model_fields_set:
        recipe = recipe.model_copy(update={"optim": r.optim})
    t0 = time.perf_counter()
    rows = src.calib if src.heal is None else src.heal
    losses = heal_kd(m, src.model, rows, recipe=recipe, T=r.heal.T)
    return m.eval(), {"mode": "kd", "steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1],
                      "train_time_s": time.perf_counter() - t0, "seed": s,
                      "text": src.heal_text if src.heal is not None else r.text.calib,
                      "rows": len(rows), "lr": recipe.optim.lr}


def export_hf(model: nn.Module, tokenizer: Any, folder: Path) -> Path:
    """``save_pretrained`` (safetensors, config with per-layer lists shortened by the surgery) and the tokenizer."""
    from kdforge.llm.loading import save_causal_lm

    return save_causal_lm(model, tokenizer, folder)


def folder_bytes(folder: Path) -> int:
    """Bytes of every file in a folder (weights, config, tokenizer)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


HF_LOADER = r"""
import json, sys
import numpy as np, torch
from transformers import AutoModelForCausalLM
job = json.loads(sys.argv[1])
torch.set_num_threads(job["threads"])
m = AutoModelForCausalLM.from_pretrained(job["path"], dtype=torch.float32).eval()
ids = torch.from_numpy(np.load(job["inputs"]))
with torch.no_grad():
    y = m(input_ids=ids, use_cache=False).logits
np.save(job["out"], y.numpy())
print(json.dumps({"kdforge_imported": any(k == "kdforge" or k.startswith("kdforge.") for k in sys.modules),
                  "layers": m.config.num_hidden_layers, "class": type(m).__name__}))
"""


def check_loads_hf(folder: Path, ids: Tensor, threads: int = 1) -> tuple[Check, np.ndarray | None, dict[str, Any]]:
    """Check 1 for LMs: ``AutoModelForCausalLM.from_pretrained`` in a fresh process without kdforge."""
    with tempfile.TemporaryDirectory(prefix="kdforge-gate-") as tmp:
        inp, out = Path(tmp) / "ids.npy", Path(tmp) / "y.npy"
        np.save(inp, ids.numpy())
        job = {"path": str(folder.resolve()), "inputs": str(inp), "out": str(out), "threads": threads}
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["HF_HUB_OFFLINE"] = "1"
        p = subprocess.run([sys.executable, "-c", HF_LOADER, json.dumps(job)], capture_output=True, text=True,
                           timeout=600, env=env, cwd=tmp)
        if p.returncode != 0:
            err = [line for line in p.stderr.strip().splitlines() if line.strip()]
            return Check("loads", False, f"{folder.name} does not load with AutoModelForCausalLM.from_pretrained: "
                                         f"{(err[-1] if err else p.returncode)!s:.200}"), None, {}
        facts = json.loads(p.stdout.strip().splitlines()[-1])
        if facts["kdforge_imported"]:
            return Check("loads", False, "loading the folder imported kdforge"), None, facts
        return Check("loads", True, f"{folder.name}/ via AutoModelForCausalLM.from_pretrained ({facts['class']}, "
                                    f"{facts['layers']} layers) in a process without kdforge", facts), \
            np.load(out), facts


def lm_speed(original: nn.Module, compressed: nn.Module, rows: Tensor, batch: int, new_tokens: int,
             rounds: int = 7) -> dict[str, dict[str, float]]:
    """Prefill tokens/s at batch 1 and ``batch``, greedy decode tokens/s at batch 1; interleaved rounds, medians."""
    models = {"original": original.eval(), "compressed": compressed.eval()}

    @torch.no_grad()
    def prefill(m: nn.Module, b: int) -> float:
        ids = rows[:b]
        t0 = time.perf_counter()
        m(input_ids=ids, use_cache=False)
        return ids.numel() / (time.perf_counter() - t0)

    @torch.no_grad()
    def decode(m: nn.Module) -> float:
        ids = rows[:1, :16]
        t0 = time.perf_counter()
        m.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return new_tokens / (time.perf_counter() - t0)

    modes = {"prefill_b1": lambda m: prefill(m, 1), f"prefill_b{min(batch, len(rows))}":
             lambda m: prefill(m, batch), "decode_b1": decode}
    res: dict[str, dict[str, float]] = {}
    for mode, fn in modes.items():
        for m in models.values():
            fn(m)  # warm-up
        per: dict[str, list[float]] = {n: [] for n in models}
        names = list(models)
        for r in range(rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                per[n].append(fn(models[n]))
        res[mode] = {n: statistics.median(v) for n, v in per.items()}
    return res


def check_faster_lm(speed: dict[str, dict[str, float]], rounds: int) -> Check:
    """Check 4 for LMs: more tokens/s than the original in every mode (prefill batch 1 and B, decode)."""
    ratio = {k: v["compressed"] / v["original"] for k, v in speed.items()}
    slow = [k for k, x in ratio.items() if x <= 1.0]
    text = ", ".join(f"{k} {v['compressed']:.0f} vs {v['original']:.0f} tok/s ({ratio[k]:.2f}x)"
                     for k, v in speed.items())
    return Check("faster", not slow, f"{text}; transformers eager, median of {rounds} interleaved rounds",
                 {"runtime": "transformers", "tokens_per_s": speed, "speedup": ratio, "rounds": rounds})


def check_quality_lm(ppl_original: float, ppl_compressed: float, max_ratio: float) -> Check:
    """Check 5 for LMs: held-out perplexity grows by at most ``max_ratio``."""
    ratio = ppl_compressed / ppl_original
    return Check("quality", ratio <= max_ratio, f"held-out perplexity {ppl_compressed:.2f} vs {ppl_original:.2f}: "
                                                f"{ratio:.3f}x (allowed {max_ratio:g}x)",
                 {"ppl_original": ppl_original, "ppl_compressed": ppl_compressed, "ratio": ratio,
                  "max_ratio": max_ratio})


def run_compress_lm(r: CompressRecipe, out: Path, log: Any = print, src: LMSource | None = None,
                    memo: dict[Any, Any] | None = None) -> dict[str, Any]:
    """The language-model path of ``run_compress``: search, heal, export HF folders, gate, write the report.

    ``src`` (the recipe's model and text, already loaded) and ``memo`` (:func:`search_lm`) let several budgets
    on one model share the loading and the search. Candidates of different families that keep the same
    layers are healed once (the heal is deterministic in its seed), each still exported and gated.
    """
    import shutil

    from kdforge.compress.gate import check_matches, check_smaller, checks_json, verdict
    from kdforge.compress.pipeline import environment
    from kdforge.engine.checkpoint import atomic_write_text
    from kdforge.llm.metrics import perplexity
    from kdforge.profile import count_params

    t_start = time.perf_counter()
    src = load_lm_source(r) if src is None else src
    log(f"compress: {type(src.model).__name__} from {src.where}, {count_params(src.model):,} params, "
        f"{len(src.calib)} calibration and {len(src.eval)} held-out rows of {r.text.seq_len} tokens")
    original_value, cands, skipped = search_lm(src, r, log, memo)
    orig_dir = export_hf(src.model, src.tokenizer, out / "original")
    ppl0 = perplexity(src.model, src.eval)
    from transformers import AutoModelForCausalLM

    orig_loaded = AutoModelForCausalLM.from_pretrained(str(orig_dir), dtype=torch.float32).eval()
    orig_row = {"name": "original", "family": "original", "params": count_params(src.model), "ppl": ppl0,
                "bytes": folder_bytes(orig_dir), "layers": int(src.model.config.num_hidden_layers),
                "budget_value": original_value}
    rows = []
    held = src.eval[: min(4, len(src.eval))]
    healed_by_layers: dict[tuple[int, ...], tuple[nn.Module, dict[str, Any], str]] = {}
    for c in cands:
        same = healed_by_layers.get(tuple(c.info["kept_layers"]))
        if same is None:
            healed, heal_info = heal_lm(c.model, src, r)
            healed_by_layers[tuple(c.info["kept_layers"])] = healed, heal_info, c.name
        else:
            healed, heal_info = same[0], {**same[1], "same_layers_as": same[2]}
            log(f"compress: {c.name} keeps the layers of {same[2]}: its healed model is reused")
        folder = export_hf(healed, src.tokenizer, out / "candidates" / c.name)
        ppl = perplexity(healed, src.eval)
        checks: list[Check] = []
        loads, y, _ = check_loads_hf(folder, held, r.gate.threads)
        checks.append(loads)
        speed = None
        if loads.ok and y is not None:
            with torch.no_grad():
                ref = healed(input_ids=held, use_cache=False).logits
            checks.append(check_matches(ref, {"hf": y}, r.gate.atol))
            checks.append(check_smaller((orig_row["params"], count_params(healed)),
                                        {"hf folder": (orig_row["bytes"], folder_bytes(folder))}))
            loaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
            speed = lm_speed(orig_loaded, loaded, src.eval, r.llm_gate.batch, r.llm_gate.new_tokens, r.gate.rounds)
            checks.append(check_faster_lm(speed, r.gate.rounds))
            checks.append(check_quality_lm(ppl0, ppl, r.budget.max_ppl_ratio))
        failed = verdict(checks)
        rows.append({"name": c.name, "family": c.family, "params": count_params(healed), "ppl": ppl,
                     "bytes": folder_bytes(folder), "layers": c.info["kept"], "kept_layers": c.info["kept_layers"],
                     "budget_fraction": c.budget_fraction, "heal": heal_info, "passed": failed is None,
                     **({"pick": c.info["pick"]} if "pick" in c.info else {}),
                     "gate": checks_json(checks), "folder": str(folder)})
        log(f"compress: {c.name}: perplexity {ppl:.2f} (original {ppl0:.2f}), "
            + ("gate passed" if failed is None else f"gate FAILED {failed.line()}"))
    passed = [x for x in rows if x["passed"]]
    chosen = min(passed, key=lambda x: x["ppl"]) if passed else None
    if chosen is not None:
        shutil.copytree(chosen["folder"], out / "model", dirs_exist_ok=True)
    res = {"format": "kdforge-compress-report/1", "kind": "llm", "name": r.name, "environment": environment(
        r.gate.threads), "budget": r.budget.model_dump(), "original": orig_row, "candidates": rows,
           "skipped": [s.__dict__ for s in skipped], "chosen": chosen["name"] if chosen else None,
           "seconds": time.perf_counter() - t_start, "recipe": r.model_dump(mode="json")}
    atomic_write_text(out / "compress.json", json.dumps(res, indent=2, default=str))
    atomic_write_text(out / "report.md", lm_report(res))
    return res


def lm_table(res: dict[str, Any]) -> str:
    """The deployment table of a language-model compress run."""
    o = res["original"]
    modes = None
    for c in res["candidates"]:
        f = c["gate"].get("faster")
        if f:
            modes = list(f["values"]["tokens_per_s"])
            break
    modes = modes or []
    head = ["model", "layers", "size MB", "params"] + [f"{m} tok/s" for m in modes] + \
        [f"speed-up {m}" for m in modes] + ["perplexity", "ratio", "gate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    first = next((c["gate"]["faster"]["values"]["tokens_per_s"] for c in res["candidates"] if c["gate"].get("faster")),
                 {})
    lines.append("| " + " | ".join(["original", str(o["layers"]), f"{o['bytes'] / 1e6:.1f}", f"{o['params']:,}"]
                                  + [f"{first[m]['original']:.0f}" for m in modes] + ["1.00×"] * len(modes)
                                  + [f"{o['ppl']:.2f}", "1.000", "—"]) + " |")
    for c in res["candidates"]:
        f = c["gate"].get("faster", {}).get("values", {})
        failed = next((k for k, v in c["gate"].items() if not v["ok"]), None)
        lines.append("| " + " | ".join(
            [c["name"], str(c["layers"]), f"{c['bytes'] / 1e6:.1f}", f"{c['params']:,}"]
            + [f"{f['tokens_per_s'][m]['compressed']:.0f}" if f else "—" for m in modes]
            + [f"{f['speedup'][m]:.2f}×" if f else "—" for m in modes]
            + [f"{c['ppl']:.2f}", f"{c['ppl'] / o['ppl']:.3f}", "pass" if c["passed"] else f"FAIL: {failed}"]) + " |")
    return "\n".join(lines)


def lm_report(res: dict[str, Any]) -> str:
    """``report.md`` of a language-model compress run."""
    from kdforge.compress.report import caption

    b = res["budget"]
    lines = [f"# compress: {res['name']}", "", f"Budget: {b['metric']} at most {b['fraction']:g}x the original; "
             f"held-out perplexity at most {b['max_ppl_ratio']:g}x.", "", lm_table(res), "",
             f"*{caption(res['environment'])}. Tokens/s: transformers, both models loaded from their exported "
             "folders, median of interleaved rounds.*", "",
             f"Chosen: **{res['chosen']}** (folder `model/`)." if res["chosen"] else
             "**No candidate passed the gate**; every folder stays in `candidates/`.", "", "## Gate", ""]
    for c in res["candidates"]:
        lines.append(f"- **{c['name']}**: " + ("passed" if c["passed"] else "rejected"))
        lines += [f"  - {v['name']}: {'pass' if v['ok'] else 'FAIL'} ({v['detail']})" for v in c["gate"].values()]
    if res["skipped"]:
        lines += ["", "## Families without a candidate", ""] + [f"- {s['family']}: {s['reason']}"
                                                                 for s in res["skipped"]]
    return "\n".join(lines) + "\n"
