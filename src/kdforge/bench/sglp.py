"""SGLP benchmarks: resnet56 on Fashion-MNIST (sglp-cnn) and SmolLM2-135M on pydoc text (sglp-llm)."""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdforge.bench import BENCHES
from kdforge.bench.common import bench_dir, fmt_mean_std, machine_note, markdown_table, mean_std, write_json


def _log(msg: str) -> None:
    print(f"[sglp] {msg}", file=sys.stderr, flush=True)


# -- CNN ------------------------------------------------------------------------------------------
def _cnn_settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"model": "resnet20", "data": {"name": "digits", "batch_size": 64, "val_fraction": 0.1},
                "teacher_epochs": 2, "teacher_lr": 0.1, "n_calib": 128, "calib_bs": 64, "score_bs": 32,
                "random_seeds": 2, "heal_epochs": 1, "heal_limit": 128, "ratios": [0.5, 0.75], "lat_repeats": 2,
                "max_candidates": 8, "cache": None, "k_max": 3}
    return {"model": "resnet56", "data": {"name": "fashion_mnist_subset", "pad_to": 32, "batch_size": 128,
                                          "val_fraction": 0.1},
            # batch 32 + a warm-up epoch: 8 epochs at batch 128 (344 steps) left resnet56 at 50 % validation
            "teacher_epochs": 8, "teacher_lr": 0.05, "teacher_batch": 32,
            "n_calib": 2500, "calib_bs": 500, "score_bs": 64,
            "random_seeds": 5, "heal_epochs": 1, "heal_limit": None, "ratios": [0.35, 0.5, 0.75], "lat_repeats": 10,
            "max_candidates": 32, "cache": "runs/cache", "k_max": 6}


def _teacher(s: dict[str, Any], cache: Path) -> Path:
    from kdforge.bench.common import cached_run
    from kdforge.config import Recipe

    recipe = Recipe.from_dict({
        "name": f"sglp-teacher-{s['model']}", "seed": 0,
        "data": dict(s["data"], batch_size=s.get("teacher_batch", s["data"]["batch_size"])),
        "method": {"name": "supervised", "model": {"model": s["model"]}},
        "optim": {"lr": s["teacher_lr"], "weight_decay": 5e-4},
        "sched": {"name": "cosine", "warmup_epochs": 1 if "teacher_batch" in s else 0},
        "train": {"epochs": s["teacher_epochs"], "progress": "silent"}})
    return cached_run(recipe, cache) / "checkpoints" / "last.safetensors"


def _profile(model: nn.Module, shape: tuple[int, ...], repeats: int) -> dict[str, float]:
    from kdforge.profile import count_flops, count_params, measure_latency

    return {"params": float(count_params(model)), "flops": float(count_flops(model, shape)),
            "lat1": measure_latency(model, shape, 1, warmup=2, repeats=repeats * 3),
            "lat64": measure_latency(model, shape, 64, warmup=1, repeats=repeats)}


@BENCHES.register("sglp-cnn")
def run_cnn(out: Path | None = None, quick: bool = False) -> dict[str, Any]:
    """SGLP vs random, last-N, block influence and the oracle on resnet56 / Fashion-MNIST, no heal, CE and KD heal."""
    import tempfile

    from kdforge.config import DataConfig
    from kdforge.data import load_data, make_loader
    from kdforge.metrics import evaluate
    from kdforge.models import create_model
    from kdforge.prune.importance import classification_task, select_baseline
    from kdforge.prune.report import plot_cka, plot_tradeoff
    from kdforge.prune.sglp import (
        AnalysisConfig,
        BudgetConfig,
        CalibrationConfig,
        PruneRecipe,
        SelectionConfig,
        analyze,
        choose,
        cnn_calibration,
        heal_cnn,
    )
    from kdforge.prune.surgery import find_units, pinned_indices, prune_model

    s = _cnn_settings(quick)
    out = bench_dir("sglp-cnn", out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    cache = Path(s["cache"]) if s["cache"] else Path(tempfile.mkdtemp(prefix="sglp-cache-"))
    t0 = time.perf_counter()
    ckpt = _teacher(s, cache)
    teacher_s = time.perf_counter() - t0
    dcfg = DataConfig(**s["data"])
    bundle = load_data(dcfg)
    model = create_model(s["model"], bundle.num_classes, bundle.in_chans, ckpt, image_size=bundle.image_size).eval()
    shape = (bundle.in_chans, bundle.image_size, bundle.image_size)
    test_loader = make_loader(bundle.test, 512, False)
    units = find_units(model)
    pinned = pinned_indices(units)
    task = classification_task()
    calib = CalibrationConfig(n_samples=s["n_calib"], batch_size=s["calib_bs"], score_batch_size=s["score_bs"])
    cka_b, score_b = cnn_calibration(bundle, calib)
    _log(f"{s['model']}: {len(units)} units, CKA on {sum(len(b[0]) for b in cka_b)} training images")
    analysis = analyze(model, units, cka_b, task, AnalysisConfig(k_max=s["k_max"]))
    names = [u.name for u in units]
    plot_cka(analysis.cka, analysis.segmentation.segments, out / "sglp-cnn-cka.png", names,
             title=f"{s['model']} CKA, {analysis.segmentation.k} segments")
    base = {"top1": evaluate(model, test_loader)["top1"], **_profile(model, shape, s["lat_repeats"])}
    _log(f"unpruned top-1 {base['top1']:.2f}%; segments {analysis.segmentation.sizes()} "
         f"(CKA {analysis.cka_seconds:.1f}s)")

    def select(method: str, ratio: float, seed: int = 0, mode: str = "hybrid", direction: str = "max") -> Any:
        budget = BudgetConfig(keep_ratio=ratio)
        if method == "sglp":
            cfg = SelectionConfig(method="sglp", candidate_mode=mode, select=direction,  # type: ignore[arg-type]
                                  max_candidates=s["max_candidates"], seed=0)
            return choose(model, analysis, budget, cfg, score_b, task, pinned, mode)
        from kdforge.prune.sglp import keep_budget

        n_keep = sum(keep_budget(analysis, budget, pinned))
        return select_baseline(method, model, units, n_keep, cka_b[:1], task, pinned, seed)

    variants = [("SGLP (hybrid, max)", "sglp", 0, "hybrid", "max"), ("SGLP (subnet, min)", "sglp", 0, "subnet", "min")]
    variants += [(f"random (seed {i})", "random", i, "", "") for i in range(s["random_seeds"])]
    variants += [("last-N", "last_n", 0, "", ""), ("block influence", "block_influence", 0, "", ""),
                 ("oracle (remove-one loss)", "oracle", 0, "", "")]
    heal_data = dcfg.model_copy(update={"limit_train": s["heal_limit"]})
    heal_bundle = load_data(heal_data)
    rows: list[dict[str, Any]] = []
    for label, method, seed, mode, direction in variants:
        sel = select(method, 0.5, seed, mode, direction)
        pruned = prune_model(model, units, sel.kept)
        prof = _profile(pruned, shape, s["lat_repeats"])
        row = {"label": label, "method": method, "seed": seed, "kept": sel.kept,
               "removed": [names[i] for i in sel.removed], "select_s": sel.seconds, "n_evals": sel.n_evals,
               "top1_noheal": evaluate(pruned, test_loader)["top1"], **prof}
        for mode_h in ("ce", "kd"):
            heal = PruneRecipe.from_dict({"seed": seed, "model": {"model": s["model"]}, "data": heal_data.model_dump(),
                                          "heal": {"mode": mode_h}, "optim": {"lr": 0.02},
                                          "train": {"epochs": s["heal_epochs"], "progress": "silent",
                                                    "save_checkpoints": False}})
            _, info = heal_cnn(pruned, model, heal_bundle, heal)
            row[f"top1_{mode_h}"] = info["test_top1"]
            row[f"heal_{mode_h}_s"] = info["train_time_s"]
        rows.append(row)
        _log(f"{label}: kept {len(sel.kept)}/{len(units)}, no heal {row['top1_noheal']:.2f}%, "
             f"CE {row['top1_ce']:.2f}%, KD {row['top1_kd']:.2f}% (selection {sel.seconds:.1f}s)")
    trade = []
    for ratio in s["ratios"]:
        for label, method, mode, direction in (("SGLP (hybrid, max)", "sglp", "hybrid", "max"),
                                               ("random (seed 0)", "random", "", ""), ("last-N", "last_n", "", ""),
                                               ("block influence", "block_influence", "", "")):
            if ratio == 0.5:
                r = next(x for x in rows if x["label"] == label)
                trade.append({"method": label, "ratio": ratio, "top1": r["top1_noheal"],
                              "latency_ratio": r["lat64"] / base["lat64"]})
                continue
            sel = select(method, ratio, 0, mode, direction)
            pruned = prune_model(model, units, sel.kept)
            lat = _profile(pruned, shape, s["lat_repeats"])["lat64"]
            trade.append({"method": label, "ratio": ratio, "top1": evaluate(pruned, test_loader)["top1"],
                          "latency_ratio": lat / base["lat64"]})
    plot_tradeoff(trade, out / "sglp-cnn-tradeoff.png", ylabel="test top-1 (%), no healing", baseline=base["top1"],
                  title=f"{s['model']}: accuracy vs latency (batch 64) across keep ratios")
    total = time.perf_counter() - t_all
    analysis_s = analysis.cka_seconds + analysis.segment_seconds
    result = {"settings": s, "base": base, "rows": rows, "tradeoff": trade, "segments": analysis.segmentation.to_json(),
              "timing": {"teacher_s": teacher_s, "cka_s": analysis.cka_seconds, "segment_s": analysis.segment_seconds,
                         "total_s": total}, "machine": machine_note()}
    write_json(out / "sglp-cnn.json", result)
    _write_cnn_md(out / "sglp-cnn.md", result, base, rows, analysis_s, quick)
    return result


def _write_cnn_md(path: Path, res: dict[str, Any], base: dict[str, float], rows: list[dict[str, Any]],
                  analysis_s: float, quick: bool) -> None:
    s = res["settings"]

    def line(label: str, rs: list[dict[str, Any]]) -> dict[str, Any]:
        agg = {k: fmt_mean_std([r[k] for r in rs]) if len(rs) > 1 else f"{rs[0][k]:.2f}"
               for k in ("top1_noheal", "top1_ce", "top1_kd")}
        r0 = rs[0]
        return {"method": label, "kept units": f"{len(r0['kept'])}/{len(r0['kept']) + len(r0['removed'])}",
                "top-1 no heal": agg["top1_noheal"], "top-1 CE fine-tune": agg["top1_ce"],
                "top-1 KD heal": agg["top1_kd"], "params (M)": f"{mean_std([r['params'] for r in rs])[0] / 1e6:.3f}",
                "MFLOPs": f"{mean_std([r['flops'] for r in rs])[0] / 1e6:.1f}",
                "latency b1 ratio": f"{mean_std([r['lat1'] for r in rs])[0] / base['lat1']:.2f}",
                "latency b64 ratio": f"{mean_std([r['lat64'] for r in rs])[0] / base['lat64']:.2f}",
                "selection (s)": f"{mean_std([r['select_s'] for r in rs])[0]:.1f}"}

    table = [{"method": "unpruned", "kept units": "all", "top-1 no heal": f"{base['top1']:.2f}",
              "top-1 CE fine-tune": "", "top-1 KD heal": "", "params (M)": f"{base['params'] / 1e6:.3f}",
              "MFLOPs": f"{base['flops'] / 1e6:.1f}", "latency b1 ratio": "1.00", "latency b64 ratio": "1.00",
              "selection (s)": ""}]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault("random (mean ± std)" if r["method"] == "random" else r["label"], []).append(r)
    table += [line(k, v) for k, v in groups.items()]
    sel_rows = [r for r in rows if r["method"] == "sglp"]
    seg = res["segments"]
    text = [f"# Benchmark: sglp-cnn{' (quick smoke run)' if quick else ''}", "",
            f"SGLP layer pruning of **{s['model']}** trained on `{s['data']['name']}` "
            f"({s['teacher_epochs']} epochs), keep ratio 0.5 over the stem + residual blocks "
            "(the stem and the two downsampling blocks are pinned). Calibration: "
            f"{s['n_calib']} images of the training split in batches of {s['calib_bs']} (never the test split); "
            f"GradNorm on 2 augmented training batches of {s['score_bs']}. Healing: {s['heal_epochs']} epoch(s) "
            "SGD lr 0.02 cosine, CE alone or KD (0.1·CE + 0.9·KD, T = 4) from the unpruned model, through "
            "kdforge's Trainer. Test top-1 on the held-out test split.", "",
            markdown_table(table), "",
            f"Analysis time (CKA over {s['n_calib']} images + DP): **{analysis_s:.1f} s**; selection per method in "
            "the last column (SGLP: GradNorm over Σ_s C(n_s, r_s) candidates, greedy inside a segment past "
            f"{s['max_candidates']} candidates). SGLP totals (analysis + selection): "
            + ", ".join(f"{r['label']} {analysis_s + r['select_s']:.1f} s ({r['n_evals']} GradNorm evaluations)"
                        for r in sel_rows) + ".", "",
            f"Segments (k = {seg['k']}, colsum descriptor, exact backtrack): "
            + " | ".join(f"{len(x)}" for x in seg["segments"]) + ".", "",
            "Removed blocks: " + "; ".join(f"{r['label']}: {', '.join(r['removed'])}" for r in rows
                                           if r["method"] != "random") + ".", "",
            "Latency: median forward wall time of the pruned model over the unpruned one, batch 1 and 64, "
            "on the same machine in the same process.", "",
            "![CKA](sglp-cnn-cka.png)", "", "![trade-off](sglp-cnn-tradeoff.png)", "",
            f"Command: `kdforge bench sglp-cnn{' --quick' if quick else ''}`. Machine: {res['machine']}. "
            f"Random removal over {s['random_seeds']} seeds (mean ± sample std). Total wall time "
            f"{res['timing']['total_s'] / 60:.1f} min (teacher {res['timing']['teacher_s'] / 60:.1f} min, cached "
            "after the first run).", "",
            "Reading: GradNorm on hybrid candidates is a trainability proxy, not a retention proxy; "
            "the oracle is the upper bound for fine-tuning-free selection.", ""]
    path.write_text("\n".join(text))


# -- LLM ------------------------------------------------------------------------------------------
def _llm_settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"model": "tiny", "seq_len": 64, "max_tokens": 64 * 40, "n_eval": 6, "cka_batches": 2, "cka_bs": 6,
                "score_rows": 2, "kl_rows": 2, "heal_steps": 6, "heal_lr": 1e-3, "heal_bs": 2,
                "max_candidates": 8, "decode_tokens": 8, "removals": [2, 3], "ablation_at": 2}
    return {"model": "smollm2", "seq_len": 128, "max_tokens": None, "n_eval": 16, "cka_batches": 3, "cka_bs": 16,
            "score_rows": 4, "kl_rows": 2, "heal_steps": 40, "heal_lr": 2e-4, "heal_bs": 2,
            "max_candidates": 32, "decode_tokens": 32, "removals": [8, 12], "ablation_at": 8}


def _llm_metrics(m: nn.Module, ev: torch.Tensor, s: dict[str, Any]) -> dict[str, float]:
    from kdforge.llm import perplexity, tokens_per_second
    from kdforge.profile import count_params

    return {"ppl": perplexity(m, ev), "params": float(count_params(m)),
            "prefill_tok_s": tokens_per_second(m, ev, 1, repeats=2)}


#: SLEB's greedy removal scored by the KL to the unpruned model (selection ``sleb``, ``llm_loss: kl``); kdforge's
#: LLM default before ``sleb_pick`` (prune/sglp.py's LLM_RECOMMENDED_SELECTION), which picks between its set and
#: block influence's
SLEB_KL = "SLEB (KL to unpruned)"


@dataclass
class _LLMRows:
    """The model and the pydoc rows every SmolLM2 depth-pruning bench draws, in one fixed order."""

    model: nn.Module
    label: str
    n_sequences: int
    calib: torch.Tensor
    ev: torch.Tensor
    perm: torch.Tensor
    load_s: float


def _llm_rows(s: dict[str, Any], quick: bool, bench: str) -> _LLMRows:
    """SmolLM2 (or a random tiny Llama for --quick) and its calibration / held-out pydoc rows, permuted by seed 0."""
    from kdforge.llm import ByteTokenizer, load_smollm2, pydoc_text, split_blocks, tiny_llama, token_blocks
    from kdforge.llm.loading import SMOLLM2_LABEL

    t0 = time.perf_counter()
    if quick:
        model, tok, label = tiny_llama(8, hidden=64), ByteTokenizer(), "random tiny Llama (8 layers)"
    else:
        model, tok = load_smollm2(who=f"kdforge bench {bench}")
        label = SMOLLM2_LABEL
    load_s = time.perf_counter() - t0
    blocks = token_blocks(tok, pydoc_text(), s["seq_len"], s["max_tokens"])
    calib, ev = split_blocks(blocks, 0.2)
    perm = torch.randperm(len(calib), generator=torch.Generator().manual_seed(0))
    return _LLMRows(model, label, len(blocks), calib, ev[: s["n_eval"]], perm, load_s)


@BENCHES.register("sglp-llm")
def run_llm(out: Path | None = None, quick: bool = False) -> dict[str, Any]:
    """SmolLM2-135M on pydoc text: layer-removal criteria at 8/30 and 12/30 removed, unhealed and KD-healed."""
    from kdforge.llm import (
        heal_kd,
    )
    from kdforge.prune.importance import (
        allocate_keep,
        causal_lm_kl_task,
        causal_lm_task,
        select_baseline,
        sglp_select,
        with_reference,
    )
    from kdforge.prune.report import plot_cka
    from kdforge.prune.sglp import AnalysisConfig, analyze
    from kdforge.prune.surgery import find_units, prune_model

    s = _llm_settings(quick)
    out = bench_dir("sglp-llm", out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    data = _llm_rows(s, quick, "sglp-llm")
    model, label, calib, ev, perm, load_s = data.model, data.label, data.calib, data.ev, data.perm, data.load_s
    units = find_units(model)
    n = len(units)
    cka_b = [calib[perm[i * s["cka_bs"]:(i + 1) * s["cka_bs"]]] for i in range(s["cka_batches"])]
    score_b = [calib[perm[-s["score_rows"]:]]]
    ce, kl = causal_lm_task(), causal_lm_kl_task()
    kl_b = with_reference(model, [calib[perm[-s["score_rows"] - s["kl_rows"]: -s["score_rows"]]]])
    _log(f"{label}: {n} layers, {data.n_sequences} sequences of {s['seq_len']} tokens "
         f"({len(ev)} held out for perplexity)")
    analyses = {rep: analyze(model, units, cka_b, ce, AnalysisConfig(representation=rep))
                for rep in ("sample", "token")}
    for rep, a in analyses.items():
        plot_cka(a.cka, a.segmentation.segments, out / f"sglp-llm-cka{'' if rep == 'sample' else '-token'}.png",
                 [str(i) for i in range(n)], title=f"{label.split(' (')[0]} layer CKA per {rep}, "
                                                    f"{a.segmentation.k} segments")
        _log(f"CKA per {rep}: segments {a.segmentation.sizes()} ({a.cka_seconds:.1f}s)")
    base = _llm_metrics(model, ev, s)
    _log(f"unpruned ppl {base['ppl']:.2f}")
    rows: list[dict[str, Any]] = []
    pruned_models: dict[tuple[str, int], nn.Module] = {}

    def add(name: str, k: int, sel: Any, seconds: float | None = None) -> None:
        pruned = prune_model(model, units, sel.kept)
        pruned_models[(name, k)] = pruned
        rows.append({"label": name, "n_removed": k, "removed": sel.removed, "n_evals": sel.n_evals,
                     "select_s": sel.seconds if seconds is None else seconds, **_llm_metrics(pruned, ev, s)})
        _log(f"{name} @{k}: removed {sel.removed} ppl {rows[-1]['ppl']:.2f} ({rows[-1]['select_s']:.1f}s, "
             f"{sel.n_evals} evals)")

    # SLEB's search runs once to the largest budget: its first k removals are its choice at k
    t0 = time.perf_counter()
    sleb = select_baseline("sleb", model, units, n - max(s["removals"]), kl_b, kl, set())
    sleb_s = time.perf_counter() - t0
    for k in s["removals"]:
        drop = set(sleb.details["order"][:k])
        part = type(sleb)("sleb", [i for i in range(n) if i not in drop], n, {}, sum(n - j for j in range(k)))
        add(SLEB_KL, k, part, sleb_s * part.n_evals / max(sleb.n_evals, 1))
        add("block influence (ShortGPT)", k, select_baseline("block_influence", model, units, n - k, cka_b[:1], ce,
                                                             set()))
        variants = [("SGLP as published (CKA per sample, GradNorm of CE)", "sample", ce, score_b, "gradnorm",
                     set()),
                    ("SGLP fixed (CKA per token, KL score, last layer kept)", "token", kl, kl_b, "loss", {n - 1})]
        if k == s["ablation_at"]:
            variants.insert(1, ("SGLP + KL score (CKA per sample)", "sample", kl, kl_b, "loss", set()))
        for name, rep, task, batches, score_by, pinned in variants:
            a = analyses[rep]
            pins = [sum(1 for u in seg if u in pinned) for seg in a.segmentation.segments]
            per_seg = allocate_keep(a.segmentation.sizes(), (n - k) / n, pins, total=n - k)
            sel = sglp_select(model, units, a.segmentation.segments, per_seg, batches, task, pinned, "subnet", "min",
                              "global", s["max_candidates"], 0, score_by)  # type: ignore[arg-type]
            add(name, k, sel)
    heals: dict[str, Any] = {}
    for k in s["removals"]:
        student = copy.deepcopy(pruned_models[(SLEB_KL, k)])
        t0 = time.perf_counter()
        losses = heal_kd(student, model, calib, s["heal_steps"], s["heal_lr"], s["heal_bs"], T=1.0)
        heal_s = time.perf_counter() - t0
        r = next(r for r in rows if r["label"] == SLEB_KL and r["n_removed"] == k)
        rows.append({**r, "label": f"{SLEB_KL} + KD heal", **_llm_metrics(student, ev, s)})
        heals[str(k)] = {"seconds": heal_s, "first_loss": losses[0], "last_loss": losses[-1]}
        _log(f"KD heal @{k} ({s['heal_steps']} steps, {heal_s:.0f}s): ppl {rows[-1]['ppl']:.2f}")
    total = time.perf_counter() - t_all
    result = {"settings": s, "model": label, "n_layers": n, "base": base, "rows": rows,
              "segments": {rep: a.segmentation.to_json() for rep, a in analyses.items()},
              "sleb_order": sleb.details["order"], "heal": heals,
              "timing": {"load_s": load_s, "cka_s": {r: a.cka_seconds for r, a in analyses.items()},
                         "total_s": total}, "machine": machine_note()}
    write_json(out / "sglp-llm.json", result)
    _write_llm_md(out / "sglp-llm.md", result, quick)
    return result


def _write_llm_md(path: Path, res: dict[str, Any], quick: bool) -> None:
    s, base, n = res["settings"], res["base"], res["n_layers"]
    table = [{"method": "unpruned", "removed": "", "layers removed": "", "perplexity": f"{base['ppl']:.2f}",
              "× unpruned": "1.00", "prefill tok/s": f"{base['prefill_tok_s']:.0f}", "selection (s)": ""}]
    for k in s["removals"]:
        for r in (r for r in res["rows"] if r["n_removed"] == k):
            table.append({"method": r["label"], "removed": f"{k}/{n}",
                          "layers removed": ", ".join(map(str, r["removed"])),
                          "perplexity": f"{r['ppl']:.2f}", "× unpruned": f"{r['ppl'] / base['ppl']:.2f}",
                          "prefill tok/s": f"{r['prefill_tok_s']:.0f}", "selection (s)": f"{r['select_s']:.1f}"})
    seg = res["segments"]
    heal_txt = "; ".join(f"{k}/{n}: {h['seconds']:.0f} s, KD loss {h['first_loss']:.3f} → {h['last_loss']:.3f}"
                         for k, h in res["heal"].items())
    text = [f"# Benchmark: sglp-llm{' (quick smoke run)' if quick else ''}", "",
            f"Layer removal from **{res['model']}** ({n} decoder layers) at "
            f"{' and '.join(f'{k}/{n}' for k in s['removals'])} layers removed, by each criterion, before and "
            "after a KD heal. Text: Python's `pydoc_data.topics` in "
            f"sequences of {s['seq_len']} tokens; the last 20% is held out and perplexity is measured on "
            f"{s['n_eval']} of those sequences; every selection uses the first 80% only.", "",
            markdown_table(table), "",
            "Criteria:", "",
            f"- **{SLEB_KL}** (the default before `sleb_pick`, [sglp-llm-pick](sglp-llm-pick.md)): remove one "
            "layer at a time, each time the one whose "
            "removal leaves the smallest KL(unpruned ‖ pruned) of the next-token distributions on "
            f"{s['kl_rows']} calibration sequences (SLEB's greedy search, scored by KL to the original instead of "
            "perplexity). One search to the largest budget; its first k removals are its choice at k.",
            "- **block influence (ShortGPT)**: remove the layers with the lowest 1 − cos(h_in, h_out), one batch of "
            f"{s['cka_bs']} sequences.",
            f"- **SGLP as published**: linear CKA of the layer outputs with one flattened sequence per sample "
            f"({s['cka_batches']} batches of {s['cka_bs']}), Fisher segmentation (k = {seg['sample']['k']}, sizes "
            f"{[len(x) for x in seg['sample']['segments']]}), keep per segment in proportion, GradNorm of the "
            f"next-token CE on subnet candidates ({s['score_rows']} sequences), lowest kept; greedy inside a segment "
            f"past {s['max_candidates']} candidates.",
            "- **SGLP + KL score**: the same segments; a candidate is scored by its KL to the unpruned model.",
            f"- **SGLP fixed**: CKA with one token per sample (the first token of each sequence left out; "
            f"k = {seg['token']['k']}, sizes {[len(x) for x in seg['token']['segments']]}), KL score, last layer "
            "pinned.", "",
            f"KD heal: {s['heal_steps']} AdamW steps (lr {s['heal_lr']}, batch {s['heal_bs']} × {s['seq_len']} "
            f"tokens, clip 1.0) of logit KD (T = 1) from the unpruned model on calibration text ({heal_txt}).", "",
            "Throughput: prefill tokens/s of one sequence, batch 1, fp32 on the CPU (noisy on a shared machine).", "",
            "![CKA per sample](sglp-llm-cka.png) ![CKA per token](sglp-llm-cka-token.png)", "",
            f"Command: `kdforge bench sglp-llm{' --quick' if quick else ''}`. Machine: {res['machine']}. Total wall "
            f"time {res['timing']['total_s'] / 60:.1f} min (model load {res['timing']['load_s']:.0f} s).", ""]
    path.write_text("\n".join(text))


# -- LLM: choosing between SLEB's and block influence's removal sets on calibration text -----------
#: the choice between candidate removal sets (docs/benchmarks/sglp-llm.md, "sglp-llm-pick")
PICK = "SLEB-KL or block influence, lower calibration KL"
#: where each selection method's choice on SmolLM2 is published: its bench and row label (llm-kd reads the
#: recommended method's, LLM_RECOMMENDED_SELECTION in prune/sglp.py)
PUBLISHED_SELECTIONS: dict[str, tuple[str, str]] = {"sleb": ("sglp-llm", SLEB_KL),
                                                     "sleb_pick": ("sglp-llm-pick", PICK)}


def published_choice(method: str, k: int, n: int) -> tuple[list[int], float, str] | None:
    """A selection method's layers at k of n removed, its selection seconds and row label, from its published
    bench run (None if the method has no published row, or the run is absent or of another model depth)."""
    from kdforge.bench.common import PUBLISHED

    if method not in PUBLISHED_SELECTIONS:
        return None
    bench, label = PUBLISHED_SELECTIONS[method]
    f = PUBLISHED / f"{bench}.json"
    if not f.is_file():
        return None
    res = json.loads(f.read_text())
    if res.get("n_layers") != n:
        return None
    for r in res.get("rows", []):
        if r["label"] == label and r["n_removed"] == k:
            seconds = r["select_s"] if "select_s" in r else res["sleb_s"] + res["bi_s"] + r["pick_s"]
            return list(r["removed"]), float(seconds), label
    return None


@BENCHES.register("sglp-llm-pick")
def run_llm_pick(out: Path | None = None, quick: bool = False) -> dict[str, Any]:
    """SmolLM2-135M: SLEB-KL and block influence at 8/30 and 12/30, and the one of each pair with the lower KL to
    the unpruned model on calibration rows that neither search saw (selection ``sleb_pick``)."""
    from kdforge.llm import (
        heal_kd,
        perplexity,
    )
    from kdforge.prune.importance import (
        block_influence,
        causal_lm_kl_task,
        causal_lm_task,
        pick_lowest_loss,
        sleb_order,
        with_reference,
    )
    from kdforge.prune.surgery import find_units, prune_model, removed

    # the pick's set is healed as sglp-llm heals SLEB-KL's (same calibration rows, steps, lr, batch, T)
    s = {**_llm_settings(quick), "pick_rows": 4 if quick else 16, "heal_at": [2, 3] if quick else [8, 12]}
    out = bench_dir("sglp-llm-pick", out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    data = _llm_rows(s, quick, "sglp-llm-pick")  # the calibration rows of `kdforge bench sglp-llm`, drawn the same way
    model, label, calib, ev, perm = data.model, data.label, data.calib, data.ev, data.perm
    units = find_units(model)
    n = len(units)
    n_cka = s["cka_batches"] * s["cka_bs"]
    bi_ref = calib[perm[: s["cka_bs"]]]  # sglp-llm's block-influence batch
    sleb_b = with_reference(model, [calib[perm[-s["score_rows"] - s["kl_rows"]: -s["score_rows"]]]])
    pick_rows = perm[n_cka: n_cka + s["pick_rows"]]  # rows no selection of sglp-llm uses
    pick_b = with_reference(model, [calib[pick_rows[i: i + 4]] for i in range(0, len(pick_rows), 4)])
    kl, ce = causal_lm_kl_task(), causal_lm_task()
    t0 = time.perf_counter()
    order, _, sleb_evals = sleb_order(model, units, max(s["removals"]), sleb_b, kl, set())
    sleb_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    bi_pick = block_influence(model, units, pick_b, kl)
    bi_short = block_influence(model, units, [bi_ref], ce)
    bi_s = time.perf_counter() - t0

    def lowest(scores: dict[int, float], k: int) -> list[int]:
        return sorted(sorted(scores, key=lambda i: (scores[i], i))[:k])

    def ppl(removed_units: list[int]) -> float:
        with removed(model, units, [i for i in range(n) if i not in set(removed_units)]):
            return perplexity(model, ev)

    base_ppl = perplexity(model, ev)
    rows = []
    for k in s["removals"]:
        cands = {"sleb": sorted(order[:k]), "block_influence": lowest(bi_pick, k)}
        t0 = time.perf_counter()
        pick, losses = pick_lowest_loss(model, units, {c: [i for i in range(n) if i not in set(r)]
                                                       for c, r in cands.items()}, pick_b, kl)
        pick_s = time.perf_counter() - t0
        for name, rem in (("SLEB (KL to unpruned)", cands["sleb"]),
                          ("block influence (ShortGPT), as in sglp-llm", lowest(bi_short, k)),
                          ("block influence on the pick rows (KL task)", cands["block_influence"]),
                          (PICK, cands[pick])):
            rows.append({"label": name, "n_removed": k, "removed": rem, "ppl": ppl(rem)})
            _log(f"{name} @{k}: removed {rem} ppl {rows[-1]['ppl']:.2f}")
        rows[-1].update({"picked": pick, "pick_kl": losses, "pick_s": pick_s})
    heals: dict[str, Any] = {}
    for k in s["heal_at"]:
        r = next(r for r in rows if "picked" in r and r["n_removed"] == k)
        student = prune_model(model, units, [i for i in range(n) if i not in set(r["removed"])])
        t0 = time.perf_counter()
        losses = heal_kd(student, model, calib, s["heal_steps"], s["heal_lr"], s["heal_bs"], T=1.0)
        heal_s = time.perf_counter() - t0
        rows.append({"label": f"{PICK} + KD heal", "n_removed": k, "removed": r["removed"],
                     "ppl": perplexity(student, ev)})
        heals[str(k)] = {"seconds": heal_s, "first_loss": losses[0], "last_loss": losses[-1]}
        _log(f"KD heal of the pick @{k} ({s['heal_steps']} steps, {heal_s:.0f}s): ppl {rows[-1]['ppl']:.2f}")
    res = {"settings": s, "heal": heals, "model": label, "n_layers": n, "base_ppl": base_ppl, "rows": rows,
           "sleb_order": order,
           "sleb_s": sleb_s, "sleb_evals": sleb_evals, "bi_s": bi_s, "total_s": time.perf_counter() - t_all,
           "machine": machine_note()}
    write_json(out / "sglp-llm-pick.json", res)
    _write_pick_md(out / "sglp-llm-pick.md", res, quick)
    return res


def _write_pick_md(path: Path, res: dict[str, Any], quick: bool) -> None:
    s, n, base = res["settings"], res["n_layers"], res["base_ppl"]
    table = [{"method": "unpruned", "removed": "", "layers removed": "", "perplexity": f"{base:.2f}",
              "× unpruned": "1.00", "calibration KL of the pair": ""}]
    for r in res["rows"]:
        kls = r.get("pick_kl")
        table.append({"method": r["label"] + (f" → {r['picked']}" if "picked" in r else ""),
                      "removed": f"{r['n_removed']}/{n}", "layers removed": ", ".join(map(str, r["removed"])),
                      "perplexity": f"{r['ppl']:.2f}", "× unpruned": f"{r['ppl'] / base:.2f}",
                      "calibration KL of the pair": "" if kls is None else
                      ", ".join(f"{c} {v:.4f}" for c, v in kls.items())})
    text = [f"# Benchmark: sglp-llm-pick{' (quick smoke run)' if quick else ''}", "",
            f"**{res['model']}** ({n} decoder layers), the text and held-out rows of "
            f"[sglp-llm](sglp-llm.md) (perplexity on {s['n_eval']} held-out pydoc sequences of {s['seq_len']} "
            "tokens). SLEB's greedy search by KL to the unpruned model on its "
            f"{s['kl_rows']} calibration sequences (as in sglp-llm; {res['sleb_evals']} evaluations, "
            f"{res['sleb_s']:.0f} s), block influence (1 − cos of each layer's input and output) on "
            f"{s['pick_rows']} other calibration sequences, and the pick: of the two removal sets, the one whose "
            f"pruned model has the lower mean KL(unpruned ‖ pruned) on those {s['pick_rows']} sequences, which "
            "neither SLEB's search nor sglp-llm's block-influence batch uses (selection `sleb_pick`). The ShortGPT "
            "row recomputes sglp-llm's (block influence of the next-token CE task on its 16-sequence batch).", "",
            markdown_table(table), "",
            *([f"KD heal of the pick's set (rows \"+ KD heal\"), as sglp-llm heals SLEB-KL's: {s['heal_steps']} "
               f"AdamW steps (lr {s['heal_lr']}, batch {s['heal_bs']} × {s['seq_len']} tokens, clip 1.0, seed 0) of "
               "logit KD (T = 1) from the unpruned model on the calibration rows ("
               + "; ".join(f"{k}/{n}: {h['seconds']:.0f} s, KD loss {h['first_loss']:.3f} → {h['last_loss']:.3f}"
                           for k, h in res["heal"].items()) + ").", ""] if res.get("heal") else []),
            f"Command: `kdforge bench sglp-llm-pick{' --quick' if quick else ''}`. Machine: {res['machine']}. "
            f"Total wall time {res['total_s'] / 60:.1f} min.", ""]
    path.write_text("\n".join(text))
