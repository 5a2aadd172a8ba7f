"""``kdforge bench self-kd``: MixSKD and the self-KD baselines on the embedded Fashion-MNIST subset."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kdforge.bench import BENCHES
from kdforge.bench.common import (
    bar_chart,
    bench_dir,
    fmt_mean_std,
    machine_note,
    markdown_table,
    mean_std,
    restores_threads,
    result_summary,
    write_json,
)

BACKBONE: dict[str, Any] = {"model": "cnn_small", "kwargs": {"width": 16}}
EPOCHS = 12
SEEDS = (0, 1, 2)
WORKERS = 2  # runs in parallel, one thread each: steadier than two threads per run on a shared 2-core machine
COST = {"mixskd": 5.0, "byot": 2.0}  # step cost relative to CE (measured), to schedule the longest runs first
COMMAND = "kdforge bench self-kd"
# the data-limited regime (issue 13): few images, many epochs, so that CE overfits as in the papers' long runs
LIMITED_IMAGES = 1000
LIMITED_EPOCHS = 60
LIMITED_EVAL_EVERY = 5
LIMITED_METHODS = ("CE", "label smoothing", "mixup", "MixSKD")
LIMITED_COMMAND = "kdforge bench self-kd-limited"
LIMITED_NAME = "self-kd-limited"


def methods(epochs: int) -> list[tuple[str, dict[str, Any]]]:
    """(label, recipe method section) of every compared method, CE first."""
    m = BACKBONE
    return [
        ("CE", {"name": "supervised", "model": m}),
        ("label smoothing", {"name": "label_smoothing", "model": m, "epsilon": 0.1}),
        ("mixup", {"name": "mixup", "model": m, "alpha": 0.4}),
        ("Tf-KD (reg)", {"name": "tfkd", "model": m}),
        ("CS-KD", {"name": "cskd", "model": m}),
        ("PS-KD", {"name": "pskd", "model": m, "epochs": epochs}),
        ("BYOT", {"name": "byot", "model": m}),
        ("MixSKD", {"name": "mixskd", "model": m}),
    ]


def recipe(method: dict[str, Any], seed: int, epochs: int, quick: bool, limit: int | None = None,
           eval_every: int = 1) -> dict[str, Any]:
    """The shared training recipe (SGD + cosine) around one method section; ``limit`` caps the training images."""
    limit = 128 if quick else limit
    return {
        "name": f"self-kd-{method['name']}-s{seed}", "seed": seed,
        "data": {"name": "fashion_mnist_subset", "batch_size": 128, "val_fraction": 0.1,
                 **({"limit_train": limit} if limit else {})},
        "method": method,
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        "sched": {"name": "cosine", "warmup_epochs": 0 if quick else 1},
        "train": {"epochs": epochs, "progress": "silent", "threads": 1, "eval_every": eval_every},
    }


def _params(recipe_dict: dict[str, Any]) -> tuple[int, int]:
    """Parameters of the deployable model and of everything the method holds in training."""
    import torch

    from kdforge.config import Recipe
    from kdforge.data import load_data
    from kdforge.method import DataInfo, build_method
    from kdforge.profile import count_params

    r = Recipe.from_dict(recipe_dict)
    data = load_data(r.data)
    method = build_method(r.method.model_dump(), DataInfo(data.num_classes, data.in_chans, data.image_size))
    x = torch.stack([data.train[i][0] for i in range(4)])
    method.setup((x, torch.zeros(4, dtype=torch.long)))
    return count_params(method.deployable()), count_params(method)


def train_one(method: dict[str, Any], seed: int, epochs: int, quick: bool, run_dir: str | None) -> dict[str, float]:
    """Train one (method, seed) run on one thread and summarise it (a process-pool task)."""
    from kdforge.config import Recipe
    from kdforge.run import train

    res = train(Recipe.from_dict(recipe(method, seed, epochs, quick)), run_dir, overwrite=True)
    return result_summary(res)


@BENCHES.register("self-kd")
@restores_threads
def run(out: Path | None = None, quick: bool = False) -> Path:
    """Train every method on Fashion-MNIST (3 seeds) and write the table and plot; returns the table path."""
    epochs, seeds = (1, (0,)) if quick else (EPOCHS, SEEDS)
    dest = bench_dir("self-kd", out)
    t0 = time.perf_counter()
    raw: dict[str, Any] = {"epochs": epochs, "seeds": list(seeds), "backbone": BACKBONE, "workers": WORKERS,
                           "runs": {}}
    rows, labels, means, stds = [], [], [], []
    ce_last, ce_time = None, None
    table = methods(epochs)
    # costliest first, so that the two workers finish together
    tasks = sorted(((label, m, seed) for label, m in table for seed in seeds),
                   key=lambda t: -COST.get(t[1]["name"], 1.0))
    results: dict[tuple[str, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="self-kd-") as tmp:
        # quick: no run folder (no checkpoints or per-run report), so "best" is the last epoch
        def run_dir(m: dict[str, Any], seed: int) -> str | None:
            return None if quick else str(Path(tmp) / f"{m['name']}-{seed}")

        def done(label: str, seed: int, s: dict[str, float]) -> None:
            results[(label, seed)] = s
            print(f"[self-kd] {label} seed {seed}: best {s['best']:.2f} last {s['last']:.2f} "
                  f"({s['epoch_s']:.1f} s/epoch) [{len(results)}/{len(tasks)}, "
                  f"{(time.perf_counter() - t0) / 60:.1f} min]", file=sys.stderr, flush=True)

        if quick or WORKERS == 1:
            for label, m, seed in tasks:
                done(label, seed, train_one(m, seed, epochs, quick, run_dir(m, seed)))
        else:
            from concurrent.futures import ProcessPoolExecutor, as_completed
            from multiprocessing import get_context

            with ProcessPoolExecutor(WORKERS, mp_context=get_context("spawn")) as pool:
                futures = {pool.submit(train_one, m, seed, epochs, quick, run_dir(m, seed)): (label, seed)
                           for label, m, seed in tasks}
                for f in as_completed(futures):
                    done(*futures[f], f.result())
    for label, method in table:
        summaries = [results[(label, seed)] for seed in seeds]
        deploy_p, train_p = _params(recipe(method, seeds[0], epochs, quick))
        best, last = [s["best"] for s in summaries], [s["last"] for s in summaries]
        epoch_s = mean_std([s["epoch_s"] for s in summaries])[0]
        m_last = mean_std(last)[0]
        if ce_last is None:
            ce_last, ce_time = m_last, epoch_s
        raw["runs"][label] = {"method": method, "results": summaries, "deploy_params": deploy_p,
                              "train_params": train_p}
        rows.append({"method": label, "best top-1 (%)": fmt_mean_std(best), "last top-1 (%)": fmt_mean_std(last),
                     "Δ last vs CE": f"{m_last - ce_last:+.2f}", "deployed params": f"{deploy_p:,}",
                     "params in training": f"{train_p:,}", "epoch time (s)": f"{epoch_s:.1f}",
                     "× CE time": f"{epoch_s / max(ce_time or epoch_s, 1e-9):.1f}"})
        labels.append(label)
        means.append(m_last)
        stds.append(mean_std(last)[1])
    wall = time.perf_counter() - t0
    raw["wall_s"] = wall
    dest.mkdir(parents=True, exist_ok=True)
    png = bar_chart(labels, means, stds, dest / "self-kd.png", ylabel="test top-1, last epoch (%)",
                    title=f"Self-KD on Fashion-MNIST subset, cnn_small-16, {epochs} epochs, {len(seeds)} seeds",
                    baseline=ce_last)
    write_json(dest / "self-kd.json", raw)
    md = dest / "self-kd.md"
    md.write_text(_report(rows, raw, epochs, seeds, wall, quick, png.name))
    print(markdown_table(rows), file=sys.stderr)
    print(f"[self-kd] wrote {md} and {png} in {wall / 60:.1f} min", file=sys.stderr)
    return md


def _verdict(raw: dict[str, Any]) -> str:
    """One honest sentence on MixSKD against CE and against the best other method."""
    runs = raw["runs"]
    last = {k: mean_std([s["last"] for s in v["results"]]) for k, v in runs.items()}
    best = {k: mean_std([s["best"] for s in v["results"]])[0] for k, v in runs.items()}
    mix, ce = last["MixSKD"], last["CE"]
    gap = mix[0] - ce[0]
    spread = max(mix[1], ce[1])
    if gap > spread:
        verdict = f"MixSKD beats CE on the mean by {gap:+.2f} points (last epoch), more than one std ({spread:.2f})."
    elif gap > 0:
        verdict = (f"MixSKD is above CE on the mean by only {gap:+.2f} points (last epoch), within one std "
                   f"({spread:.2f}): not a clear win at this budget.")
    else:
        verdict = f"MixSKD does NOT beat CE here: {gap:+.2f} points on the mean (last epoch, std up to {spread:.2f})."
    verdict += f" By best-epoch accuracy the gap is {best['MixSKD'] - best['CE']:+.2f}."
    top = max((k for k in last if k != "MixSKD"), key=lambda k: last[k][0])
    verdict += f" The best other method (last epoch) is {top} at {last[top][0]:.2f}."
    return verdict


def _report(rows: list[dict[str, Any]], raw: dict[str, Any], epochs: int, seeds: tuple[int, ...], wall: float,
            quick: bool, png: str) -> str:
    r = recipe({"name": "…"}, 0, epochs, quick)
    cmd = COMMAND + (" --quick" if quick else "")
    return f"""# Self-distillation on the embedded Fashion-MNIST subset

{"**Quick smoke run (1 epoch, 128 images, 1 seed): not a result.**" if quick else ""}

Command: `{cmd}` ({wall / 60:.1f} min in total). Machine: {machine_note()}.
Runs: {"one after another" if quick else f"{WORKERS} at a time in separate processes"}, one torch thread each, so
"epoch time" is one thread's training time per epoch{"" if quick else " with the other core busy"}.

- Data: `fashion_mnist_subset` (28×28, 1 channel), 5,400 train / 600 val / 1,000 test images
  {"(limited to 128 train images)" if quick else ""}, crop-2 + flip augmentation, batch {r["data"]["batch_size"]}.
- Backbone: `cnn_small` width 16 (conv stem; stages conv 16 + max-pool, conv 32 + max-pool, conv 64; 2×2
  average pool; fc), the same for every method. MixSKD and BYOT exits copy stages 2–3 and the pool.
- Training: SGD lr {r["optim"]["lr"]}, momentum 0.9, Nesterov, weight decay 5e-4, cosine schedule
  with {r["sched"]["warmup_epochs"]} warm-up epoch, {epochs} epochs; seeds {", ".join(map(str, seeds))}.
- Accuracy: test top-1 of the deployable model (the plain backbone) at the last epoch, and at the
  epoch with the best validation accuracy ("best"); mean ± sample std over the seeds.
- Every method uses its paper's defaults: label smoothing ε = 0.1; mixup α = 0.4; Tf-KD_reg paper
  form (a = 0.9, T = 20, α = 0.1); CS-KD T = 4, λ = 1, partners drawn within the batch; PS-KD
  α_T = 0.8 with per-sample past predictions (keyed by sample index); BYOT α = 0.3, λ = 0.03, T = 3;
  MixSKD α = 0.4, T = 3, all weights 1, `adv_mode: minimax` (trained discriminators).
- "params in training" counts exits, self-teacher and discriminators; they are dropped for deployment.

{markdown_table(rows)}

![self-kd]({png})

{_verdict(raw)}

Raw per-seed numbers: `self-kd.json`.
"""


def train_limited(method: dict[str, Any], seed: int, epochs: int, quick: bool, run_dir: Path) -> dict[str, float]:
    """One data-limited run; adds the last model's top-1 on its own (un-augmented) training images."""
    from kdforge.config import Recipe
    from kdforge.evaluate import evaluate_source
    from kdforge.run import train

    r = recipe(method, seed, epochs, quick, limit=LIMITED_IMAGES, eval_every=1 if quick else LIMITED_EVAL_EVERY)
    res = train(Recipe.from_dict(r), run_dir, overwrite=True)
    return {**result_summary(res), "train_top1": evaluate_source(run_dir, split="train", which="last")["top1"]}


@BENCHES.register("self-kd-limited")
@restores_threads
def run_limited(out: Path | None = None, quick: bool = False) -> Path:
    """The data-limited regime: CE, label smoothing, mixup and MixSKD on 1,000 images for 60 epochs (3 seeds).

    Runs one after another on one thread each; writes ``self-kd-limited.{md,json,png}`` to
    ``runs/bench/self-kd-limited`` (or ``out``); ``kdforge bench self-kd-limited --publish`` copies them to the docs.
    """
    from kdforge.demo import format_interval, paired_interval

    epochs, seeds = (1, (0,)) if quick else (LIMITED_EPOCHS, SEEDS)
    dest = bench_dir(LIMITED_NAME, out)
    table = [(label, m) for label, m in methods(epochs) if label in LIMITED_METHODS]
    images = 128 if quick else LIMITED_IMAGES
    raw: dict[str, Any] = {"epochs": epochs, "seeds": list(seeds), "backbone": BACKBONE, "images": images,
                           "eval_every": 1 if quick else LIMITED_EVAL_EVERY, "workers": 1, "runs": {}}
    t0 = time.perf_counter()
    results: dict[tuple[str, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="self-kd-limited-") as tmp:
        for label, m in table:
            for seed in seeds:
                s = results[(label, seed)] = train_limited(m, seed, epochs, quick, Path(tmp) / f"{m['name']}-{seed}")
                print(f"[self-kd-limited] {label} seed {seed}: best {s['best']:.2f} last {s['last']:.2f} "
                      f"train {s['train_top1']:.2f} ({s['epoch_s']:.2f} s/epoch) "
                      f"[{len(results)}/{len(table) * len(seeds)}, {(time.perf_counter() - t0) / 60:.1f} min]",
                      file=sys.stderr, flush=True)
    rows, labels, means, stds = [], [], [], []
    ce = [results[("CE", seed)] for seed in seeds]
    ce_time = mean_std([s["epoch_s"] for s in ce])[0]
    for label, method in table:
        summaries = [results[(label, seed)] for seed in seeds]
        best, last = [s["best"] for s in summaries], [s["last"] for s in summaries]
        train_acc = [s["train_top1"] for s in summaries]
        paired = paired_interval(last, [s["last"] for s in ce])
        epoch_s = mean_std([s["epoch_s"] for s in summaries])[0]
        raw["runs"][label] = {"method": method, "results": summaries, "paired_vs_ce": paired}
        rows.append({"method": label, "best top-1 (%)": fmt_mean_std(best), "last top-1 (%)": fmt_mean_std(last),
                     "Δ last vs CE, paired [95 % CI]": "—" if label == "CE" else format_interval(paired),
                     "per-seed Δ": "—" if label == "CE" else ", ".join(f"{d:+.1f}" for d in paired["diffs"]),
                     "train top-1 (%)": fmt_mean_std(train_acc),
                     "train − test": f"{mean_std(train_acc)[0] - mean_std(last)[0]:.1f}",
                     "epoch time (s)": f"{epoch_s:.2f}", "× CE time": f"{epoch_s / max(ce_time, 1e-9):.1f}"})
        labels.append(label)
        means.append(mean_std(last)[0])
        stds.append(mean_std(last)[1])
    wall = time.perf_counter() - t0
    raw["wall_s"] = wall
    dest.mkdir(parents=True, exist_ok=True)
    png = bar_chart(labels, means, stds, dest / "self-kd-limited.png", ylabel="test top-1, last epoch (%)",
                    title=f"Self-KD, data-limited: {images} images, {epochs} epochs, {len(seeds)} seeds",
                    baseline=means[0])
    write_json(dest / "self-kd-limited.json", raw)
    md = dest / f"{LIMITED_NAME}.md"
    md.write_text(_report_limited(rows, raw, wall, quick, png.name))
    print(markdown_table(rows), file=sys.stderr)
    print(f"[self-kd-limited] wrote {md} and {png} in {wall / 60:.1f} min", file=sys.stderr)
    return md


def _report_limited(rows: list[dict[str, Any]], raw: dict[str, Any], wall: float, quick: bool, png: str) -> str:
    epochs, images, seeds = raw["epochs"], raw["images"], raw["seeds"]
    steps = epochs * -(-images // 128)
    cmd = LIMITED_COMMAND + (" --quick" if quick else "")
    smoke = "**Quick smoke run (1 epoch, 128 images, 1 seed): not a result.**\n\n" if quick else ""
    return f"""# Self-distillation, data-limited: {images:,} training images, {epochs} epochs

{smoke}Command: `{cmd}` ({wall / 60:.1f} min in total). Machine: {machine_note()}.
Runs: one after another, one torch thread each.

- Data: the first {images:,} images of the same seeded training split (about {images // 10} per class), the same
  600 validation and 1,000 test images, crop-2 + flip augmentation, batch 128: {steps:,} steps in all.
- Backbone, optimiser and method settings: as in the full-split table ([self-kd.md](self-kd.md): `cnn_small`
  width 16, SGD 0.05, Nesterov, wd 5e-4, cosine with 1 warm-up epoch); validation every {raw["eval_every"]}
  epochs for "best".
- "train top-1" is the last model on its own {images:,} training images without augmentation; "train − test"
  (last epoch, means) measures how far each method overfits.
- Δ vs CE is paired by seed (same seed, same data order); the interval is a 95 % t-interval with
  {len(seeds) - 1} degrees of freedom. Seeds {", ".join(map(str, seeds))}.

{markdown_table(rows)}

![self-kd data-limited]({png})

{_verdict(raw)}

Raw per-seed numbers: `self-kd-limited.json`.
"""
