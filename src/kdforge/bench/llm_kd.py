"""LLM distillation benchmarks: SmolLM2-135M teaches itself pruned to 22 layers, by each divergence and text source.

``llm-kd`` trains on Python's documentation and measures perplexity on Austen (another domain, 8 steps);
``llm-kd-austen`` trains on Austen's other five novels and measures on *Persuasion* (the same domain, 32 steps).
"""

from __future__ import annotations

import copy
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdforge.bench import BENCHES
from kdforge.bench.common import bench_dir, fmt_mean_std, machine_note, markdown_table, write_json
from kdforge.engine.callbacks import Callback

ROWS = [("SFT", "sft"), ("forward KL", "fkl"), ("reverse KL", "rkl"), ("JSD(0.5)", "jsd"), ("skew KL (α 0.1)", "skl"),
        ("on-policy GKD (λ 0.5, JSD 0.5)", "gkd"), ("forward KL from top-32 cache", "cached")]
PYDOC_TRAIN = "the calibration part of Python's `pydoc_data.topics`"
#: the rows of the in-domain bench (five objectives, so that 32 steps × 3 seeds fit about 45 core-minutes)
AUSTEN_ROWS = ("sft", "fkl", "rkl", "jsd", "cached")


def _log(msg: str) -> None:
    print(f"[llm-kd] {msg}", file=sys.stderr, flush=True)


def _settings(quick: bool, domain: str = "pydoc") -> dict[str, Any]:
    """``domain``: ``pydoc`` (train on pydoc, measure on Austen) or ``austen`` (train and measure on Austen)."""
    rows = [k for _, k in ROWS if domain == "pydoc" or k in AUSTEN_ROWS]
    if quick:
        return {"model": "tiny", "calib_len": 64, "seq_len": 32, "prompt_len": 16, "pool_rows": 16, "seeds": [0, 1],
                "steps": 3, "batch": 2, "lr": 3e-3, "remove": 2, "kl_rows": 2, "n_eval": 4, "agree_prompts": 3,
                "agree_tokens": 4, "k": 8, "domain": domain, "rows": rows}
    s = {"model": "smollm2", "calib_len": 128, "seq_len": 64, "prompt_len": 32, "pool_rows": 48, "seeds": [0, 1, 2],
         "steps": 8, "batch": 4, "lr": 3e-4, "remove": 8, "kl_rows": 2, "n_eval": 12, "agree_prompts": 6,
         "agree_tokens": 16, "k": 32, "domain": domain, "rows": rows}
    if domain == "austen":  # fixed before the run: 4x the steps of llm-kd, the heal lr of sglp-llm
        s.update(pool_rows=128, steps=32, lr=2e-4)
    return s


def _rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, kind) of the rows a run trains (a page written before ``rows`` was recorded: all of them)."""
    kinds = s.get("rows", [k for _, k in ROWS])
    return [(label, k) for label, k in ROWS if k in kinds]


def _terms(kind: str) -> list[tuple[Any, float]]:
    from kdforge.losses import build_loss

    if kind == "sft":
        return [(build_loss("lm_ce"), 1.0)]
    name = {"fkl": "lm_fkl", "cached": "lm_fkl", "rkl": "lm_rkl", "jsd": "lm_jsd", "gkd": "lm_jsd", "skl": "lm_skl"}
    kw = {"jsd": {"beta": 0.5}, "gkd": {"beta": 0.5}, "skl": {"alpha": 0.1}}.get(kind, {})
    return [(build_loss(name[kind], **kw), 1.0)]


class _Timer(Callback):
    """Engine callback: wall time of each step (between step ends) and peak resident memory above the step's start."""

    def __init__(self) -> None:
        self.t: list[float] = []
        self.peak_mb: list[float] = []
        self._base = _rss_kb()

    def on_step_end(self, trainer: Any, out: Any) -> None:
        self.t.append(time.perf_counter())
        self.peak_mb.append((_hwm_kb() - self._base) / 1024)
        _reset_hwm()
        self._base = _rss_kb()


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))  # type: ignore[union-attr]


def _rss_kb() -> int:
    return _status("VmRSS")


def _hwm_kb() -> int:
    return _status("VmHWM")


def _reset_hwm() -> None:
    """Reset the process's peak resident size (Linux: clear_refs 5), so each step's peak is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _examples(rows: Tensor, prompt_len: int, seq_len: int) -> list[Any]:
    """Continuation examples: every ``seq_len`` tokens of the rows, the first ``prompt_len`` of them the prompt."""
    from kdforge.llm.text import Example

    out = []
    for r in rows.tolist():
        for i in range(0, len(r) - seq_len + 1, seq_len):
            ids = r[i: i + seq_len]
            out.append(Example(ids, [False] * prompt_len + [True] * (seq_len - prompt_len)))
    return out


def _paired(a: list[float], b: list[float]) -> str:
    """Mean of b − a over seeds with its 95 % t-interval."""
    from scipy import stats

    d = [y - x for x, y in zip(a, b, strict=True)]
    m = statistics.fmean(d)
    if len(d) < 2:
        return f"{m:+.2f}"
    half = stats.t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / len(d) ** 0.5
    return f"{m:+.2f} [{m - half:+.2f}, {m + half:+.2f}]"


@BENCHES.register("llm-kd")
def run(out: Path | None = None, quick: bool = False) -> dict[str, Any]:
    """SmolLM2-135M → itself pruned to 22 layers: SFT and six KD variants at equal budgets, trained on pydoc."""
    return _run("llm-kd", out, quick, "pydoc")


@BENCHES.register("llm-kd-austen")
def run_austen(out: Path | None = None, quick: bool = False) -> dict[str, Any]:
    """The same student and objectives trained on Austen's other novels and measured on *Persuasion*."""
    return _run("llm-kd-austen", out, quick, "austen")


def _run(name: str, out: Path | None, quick: bool, domain: str) -> dict[str, Any]:
    """One llm-kd bench: select the student, train every row for every seed, measure, write NAME.md/json."""
    from kdforge.bench.sglp import PUBLISHED_SELECTIONS, published_choice
    from kdforge.llm import (
        ByteTokenizer,
        greedy_agreement,
        load_smollm2,
        perplexity,
        pydoc_text,
        split_blocks,
        tiny_llama,
        token_blocks,
    )
    from kdforge.llm.cache import LMTopKCache
    from kdforge.llm.distill import LMDistill, OnPolicy, PackedRows, check_vocab, distill_lm, distill_recipe
    from kdforge.llm.loading import SMOLLM2_LABEL
    from kdforge.llm.text import AUSTEN_OTHER_NOVELS, austen_text, pack, spread_rows
    from kdforge.prune.importance import causal_lm_kl_task, select_baseline, with_reference
    from kdforge.prune.sglp import LLM_RECOMMENDED_SELECTION
    from kdforge.prune.surgery import find_units, prune_model

    s = _settings(quick, domain)
    out = bench_dir(name, out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    if quick:
        teacher, tok, label = tiny_llama(6, seed=0), ByteTokenizer(), "random tiny Llama (6 layers)"
        held_text = pydoc_text()[-20_000:]
        held_name = "the last 20,000 characters of pydoc topics"
    else:
        teacher, tok = load_smollm2(who="kdforge bench llm-kd")
        label = SMOLLM2_LABEL
        held_text, held_name = austen_text(("persuasion",)), "Jane Austen's *Persuasion*"
    vocab = check_vocab(tok, tok, teacher, teacher)
    # the student: the recommended criterion on the calibration rows of `kdforge bench sglp-llm`
    blocks = token_blocks(tok, pydoc_text(), s["calib_len"], 64 * 40 if quick else None)
    calib, ev_pydoc = split_blocks(blocks, 0.2)
    perm = torch.randperm(len(calib), generator=torch.Generator().manual_seed(0))
    units = find_units(teacher)
    n = len(units)
    sel_method = LLM_RECOMMENDED_SELECTION["method"]
    published = None if quick else published_choice(sel_method, s["remove"], n)
    if published is not None:
        removed, select_s, criterion = published
        criterion_page = PUBLISHED_SELECTIONS[sel_method][0]
    else:  # no published run to read: select here, on calibration rows the training pool does not use
        kl_b = with_reference(teacher, [calib[perm[-4 - s["kl_rows"]: -4]], calib[perm[-4:]]])
        t0 = time.perf_counter()
        sel = select_baseline(sel_method, teacher, units, n - s["remove"], kl_b, causal_lm_kl_task(), set())
        removed, select_s, criterion, criterion_page = sel.removed, time.perf_counter() - t0, sel_method, None
    base_student = prune_model(teacher, units, [i for i in range(n) if i not in set(removed)])
    _log(f"{label}: student keeps {n - len(removed)}/{n} layers, removed {removed} ({select_s:.0f}s)")
    # training pool (prompt/response continuations), held-out text and prompts
    held_rows = token_blocks(tok, held_text, s["calib_len"])
    held = held_rows[: s["n_eval"]]
    if domain == "pydoc":
        pool_rows, train_name = calib[perm[: s["pool_rows"]]], PYDOC_TRAIN
        prompts = ev_pydoc[: s["agree_prompts"], : s["prompt_len"]]
        prompt_name = "held-out pydoc prompts"
    else:  # rows spread evenly over the other five novels; prompts from Persuasion after the perplexity rows
        books = AUSTEN_OTHER_NOVELS
        train_rows = (calib if quick else token_blocks(tok, austen_text(books), s["calib_len"]))
        pool_rows = spread_rows(train_rows, s["pool_rows"])
        train_name = ("the calibration part of pydoc (quick run)" if quick else
                      f"{len(train_rows)} rows of Jane Austen's other five novels ({', '.join(books)})")
        prompts = held_rows[s["n_eval"]: s["n_eval"] + s["agree_prompts"], : s["prompt_len"]]
        prompt_name = f"held-out prompts (from {held_name}, after the perplexity rows)"
    pool = _examples(pool_rows, s["prompt_len"], s["seq_len"])
    packed = pack(pool, s["seq_len"], one_per_row=True)
    cache = LMTopKCache.build(teacher, packed, out / "teacher-cache", k=s["k"], overwrite=True)
    base = {"teacher": {"ppl": perplexity(teacher, held)},
            "student": {"ppl": perplexity(base_student, held),
                        "agree": greedy_agreement(base_student, teacher, prompts, s["agree_tokens"])}}
    _log(f"held-out ppl: teacher {base['teacher']['ppl']:.2f}, unhealed student {base['student']['ppl']:.2f}")
    runs: list[dict[str, Any]] = []
    for label_, kind in _rows(s):
        for seed in s["seeds"]:
            student = copy.deepcopy(base_student)
            recipe = distill_recipe(s["steps"], s["lr"], s["batch"], seed)
            c = cache if kind == "cached" else None
            method = LMDistill(student, None if kind in ("sft", "cached") else teacher, _terms(kind), cache=c,
                               vocab=vocab)
            source: Any = PackedRows(packed, s["batch"], seed)
            if kind == "gkd":
                source = OnPolicy(pool, student, s["batch"], s["seq_len"], 0.5, s["seq_len"] - s["prompt_len"],
                                  1.0, seed, pad_id=0)
            timer = _Timer()
            _reset_hwm()
            t0 = time.perf_counter()
            logs = distill_lm(method, source, recipe, callbacks=[timer])
            train_s = time.perf_counter() - t0
            r = {"label": label_, "kind": kind, "seed": seed, "train_s": train_s,
                 "train_tok_s": s["steps"] * s["batch"] * s["seq_len"] / train_s,
                 "peak_mb": max(timer.peak_mb[1:] or timer.peak_mb), "first_loss": logs[0]["loss"],
                 "last_loss": logs[-1]["loss"], "ppl": perplexity(student, held),
                 "agree": greedy_agreement(student, teacher, prompts, s["agree_tokens"])}
            runs.append(r)
            _log(f"{label_} seed {seed}: ppl {r['ppl']:.2f}, agreement {r['agree']:.3f}, {train_s:.0f}s")
    res = {"settings": s, "model": label, "held_out": held_name, "pool": len(pool), "train_text": train_name,
           "prompts": prompt_name, "bench": name, "n_layers": n, "student_removed": removed,
           "criterion": criterion, "criterion_method": sel_method, "criterion_page": criterion_page,
           "select_s": select_s, "base": base, "runs": runs,
           "total_s": time.perf_counter() - t_all, "machine": machine_note()}
    write_json(out / f"{name}.json", res)
    _write_md(out / f"{name}.md", res, quick)
    return res


# -- page ------------------------------------------------------------------------------------
def _write_md(path: Path, res: dict[str, Any], quick: bool) -> None:
    s, base, runs = res["settings"], res["base"], res["runs"]
    sft = {r["seed"]: r for r in runs if r["kind"] == "sft"}
    table = [{"method": f"teacher ({res.get('n_layers', 30)} layers)", "held-out ppl": f"{base['teacher']['ppl']:.2f}",
              "greedy agreement": "",
              "ppl gain over SFT [95% CI]": "", "agreement gain over SFT [95% CI]": "", "train tok/s": "",
              "peak step MB": ""},
             {"method": "student before training", "held-out ppl": f"{base['student']['ppl']:.2f}",
              "greedy agreement": f"{base['student']['agree']:.3f}", "ppl gain over SFT [95% CI]": "",
              "agreement gain over SFT [95% CI]": "", "train tok/s": "", "peak step MB": ""}]
    name = res.get("bench", "llm-kd")
    for label_, kind in _rows(s):
        rs = [r for r in runs if r["kind"] == kind]
        seeds = [r["seed"] for r in rs]
        table.append({"method": label_, "held-out ppl": fmt_mean_std([r["ppl"] for r in rs]),
                      "greedy agreement": fmt_mean_std([r["agree"] for r in rs], 3),
                      "ppl gain over SFT [95% CI]": "" if kind == "sft" else
                      _paired([r["ppl"] for r in rs], [sft[i]["ppl"] for i in seeds]),
                      "agreement gain over SFT [95% CI]": "" if kind == "sft" else
                      _paired([sft[i]["agree"] for i in seeds], [r["agree"] for r in rs]),
                      "train tok/s": f"{statistics.fmean(r['train_tok_s'] for r in rs):.0f}",
                      "peak step MB": f"{statistics.fmean(r['peak_mb'] for r in rs):.0f}"})
    n_seeds = len(s["seeds"])
    text = [f"# Benchmark: {name}{' (quick smoke run)' if quick else ''}", "",
            f"Teacher: **{res['model']}**. Student: the teacher with layers "
            f"{', '.join(map(str, res['student_removed']))} "
            f"removed by the recommended criterion (selection `{res['criterion_method']}`: {res['criterion']}, "
            f"{res['select_s']:.0f} s"
            + (f"; its published choice, see [{page}]({page}.md)). " if (page := res.get("criterion_page")) else
               ", selected in this run). ")
            + "Every row trains the same student for the same budget: "
            f"{s['steps']} AdamW steps (lr {s['lr']}, constant, clip 1.0) of {s['batch']} sequences × "
            f"{s['seq_len']} tokens, the first {s['prompt_len']} of each a prompt that is not trained on. "
            f"Training text: {res['pool']} continuation "
            f"examples cut from {res.get('train_text', PYDOC_TRAIN)}. "
            f"{n_seeds} seeds (0–{n_seeds - 1}); mean ± std over seeds.", "",
            markdown_table(table), "",
            f"- **held-out ppl**: perplexity on {s['n_eval']} sequences of {s['calib_len']} tokens of "
            f"{res['held_out']}, "
            "text that neither the layer selection nor training saw.",
            f"- **greedy agreement**: on {s['agree_prompts']} {res.get('prompts', 'held-out pydoc prompts')} of "
            f"{s['prompt_len']} tokens the "
            f"teacher continues greedily for {s['agree_tokens']} tokens; the share of those tokens the student's "
            "argmax predicts from the same prefix.",
            "- **gain over SFT**: paired by seed (same data order), SFT − method for perplexity and method − SFT for "
            f"agreement (positive = better than SFT), with a 95 % t-interval over {n_seeds} seeds (wide at this n).",
            "- **train tok/s**: trained-over tokens per second of the whole fit"
            + (", including on-policy sampling (the student samples the continuation of the batch's prompts on half "
               "the steps, at temperature 1)." if "gkd" in s.get("rows", ["gkd"]) else "."),
            "- **peak step MB**: the largest rise of resident memory within a step over its start (Linux VmHWM, "
            "reset every step); approximate on the CPU, where freed heap memory is kept.",
            "- SFT: next-token CE on the data. KD rows: the divergence alone, teacher temperature 1, every token of "
            "the answer. The cached row reads the teacher's top-32 logits per token plus the rest's mass (a "
            "bucket), built once before training.", "",
            "Step cost and peak memory of a KD step against an SFT step: [llm-kd-step](llm-kd-step.md).", "",
            ("Other pages: [llm-kd](llm-kd.md) (trained on pydoc, measured on Austen) and [llm-kd-austen]"
             "(llm-kd-austen.md) (trained on Austen's other novels, measured on *Persuasion*)."), "",
            f"Command: `kdforge bench {name}{' --quick' if quick else ''}`. Machine: {res['machine']}. Total wall "
            f"time {res['total_s'] / 60:.1f} min. Short sequences, {s['steps']} steps, {n_seeds} seeds: a "
            "comparison of objectives at a small budget, not a trained model.",
            ""]
    path.write_text("\n".join(text))
