"""``kdforge bench rdd``: the teacher's DDIM vs PD, CFD and RDD students at 8 → 4 → 2 → 1 steps on digits 8×8.

The tiny set-up: grid G = 64, a small x-prediction UNet trained with the DDPM "both" loss and an
EMA teacher, a shared PD chain 64 → 32 → 16 → 8 (cached), then the compared rounds 8 → 4 → 2 → 1 with
each method and several seeds. Scores are the Fréchet distance, classifier-IS and class coverage in the
features of a held-out classifier (never the distillation classifier), on 1,000 samples per row.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kdforge.bench import BENCHES
from kdforge.bench.common import (
    bench_dir,
    cached_run,
    fmt_mean_std,
    machine_note,
    markdown_table,
    mean_std,
    restores_threads,
    write_json,
)
from kdforge.config import Recipe

COMMAND = "kdforge bench rdd"
SEEDS = (0, 1, 2)
METHODS = ("pd", "cfd", "rdd")
GRID = 64
BATCH = 64
UNET: dict[str, Any] = {"ch": 16, "mult": [1, 2], "blocks": 1, "grid": GRID, "prediction": "x"}
RDD_TINY: dict[str, Any] = {"queue": 2048, "contrast": 512, "per_step": 32}  # a scaled-down queue
#: epochs (of 23 batches of 64) per stage; quick: a smoke run
FULL = {"classifier": 30, "base": 100, "chain": 30, "round": 15, "samples": 1000, "lr_base": 1e-3, "lr_pd": 2e-4}
QUICK = {"classifier": 2, "base": 2, "chain": 1, "round": 1, "samples": 100, "lr_base": 1e-3, "lr_pd": 2e-4}
SAMPLE_SEED = 1234  # the same initial noise for every row (the first of the noise seeds)
NOISE_SEEDS = (1234, 1235, 1236)  # sampling variance: every row is sampled from each of these initial noises
TIMING_REPEATS = 3
CACHE = Path("runs/cache")
DATA = {"name": "digits_pm1", "val_fraction": 0.0, "augment": False, "batch_size": BATCH}


def _classifier(model: str, epochs: int, seed: int) -> Recipe:
    return Recipe.from_dict({
        "name": f"rdd-{model}", "seed": seed, "data": DATA,
        "method": {"name": "supervised", "model": {"model": model}},
        "optim": {"name": "adam", "lr": 2e-3, "weight_decay": 0.0}, "sched": {"name": "cosine"},
        "train": {"epochs": epochs, "progress": "silent", "device": "cpu", "threads": 1}})


def _diffusion(name: str, seed: int, model: dict[str, Any], rounds: list[dict[str, Any]], lr: float,
               features: str | None, ema: bool) -> Recipe:
    method: dict[str, Any] = {"name": "diffusion", "model": model, "rounds": rounds, "rdd": RDD_TINY}
    if features is not None:
        method["features"] = {"model": "diffusion_featnet", "checkpoint": features}
    train: dict[str, Any] = {"epochs": 1, "progress": "silent", "device": "cpu", "threads": 1, "grad_clip": 1.0}
    if ema:
        train["ema"] = {"decay": 0.999, "warmup": True}
    return Recipe.from_dict({"name": name, "seed": seed, "data": DATA, "method": method,
                             "optim": {"name": "adam", "lr": lr, "weight_decay": 0.0}, "sched": {"name": "cosine"},
                             "train": train})


def _stage_ck(run: Path, name: str) -> Path:
    hits = sorted((run / "stages").glob(f"*-{name}"))
    return hits[0] / "checkpoints" / "last.safetensors"


def _losses(run: Path) -> dict[str, list[float]]:
    """First and last epoch's training loss of every stage of a run."""
    import csv

    out = {}
    for d in sorted((run / "stages").iterdir()):
        rows = list(csv.DictReader((d / "metrics.csv").open()))
        vals = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
        out[d.name.split("-", 1)[1]] = [vals[0], vals[-1]] if vals else []
    return out


class _Scorer:
    """Samples a checkpoint from every noise seed and scores it; keeps the sampling time per image.

    ``fd``/``is``/``coverage``: means over the noise seeds against ``real`` (all 1,797 digits); ``fd_noise``:
    the FD of each noise seed; ``fd_test359``: the earlier protocol (359 test digits, first noise seed only).
    """

    def __init__(self, evalnet: torch.nn.Module, real: Any, real_test: Any, n: int,
                 noise_seeds: tuple[int, ...]) -> None:
        self.net, self.real, self.real_test, self.n, self.noise_seeds = evalnet, real, real_test, n, noise_seeds
        self.grids: dict[str, torch.Tensor] = {}

    def __call__(self, ck: Path, steps: int | None, label: str | None = None) -> dict[str, Any]:
        from kdforge.diffusion.metrics import classifier_outputs, frechet_distance, sample_scores
        from kdforge.diffusion.sample import ddim_sample
        from kdforge.evaluate import load_deployable

        model, _ = load_deployable(ck, "last")
        spent = []
        for _ in range(TIMING_REPEATS):  # the median of repeated runs: a single one is at the mercy of the machine
            t0 = time.perf_counter()
            x = ddim_sample(model, self.n, (1, 8, 8), steps, seed=self.noise_seeds[0], batch_size=self.n)
            spent.append(time.perf_counter() - t0)
        dt = statistics.median(spent)
        if label is not None:
            self.grids[label] = x[:64]
        per = [sample_scores(self.net, x, self.real)]
        old = frechet_distance(classifier_outputs(self.net, x)[0], self.real_test)
        for seed in self.noise_seeds[1:]:
            per.append(sample_scores(self.net, ddim_sample(model, self.n, (1, 8, 8), steps, seed=seed,
                                                           batch_size=self.n), self.real))
        out: dict[str, Any] = {k: statistics.fmean(p[k] for p in per) for k in ("fd", "is", "coverage")}
        return {**out, "fd_noise": [p["fd"] for p in per], "fd_test359": old, "ms_per_image": 1000 * dt / self.n}


@BENCHES.register("rdd")
@restores_threads
def run(out: Path | None = None, quick: bool = False) -> Path:
    """Teacher DDIM (G and 1–8 steps) vs PD/CFD/RDD students 8→4→2→1 on digits; writes rdd.md, rdd.json, PNGs."""
    from kdforge.data import load_data
    from kdforge.diffusion.metrics import classifier_outputs
    from kdforge.evaluate import load_deployable

    torch.set_num_threads(1)
    b = QUICK if quick else FULL
    seeds = SEEDS[:1] if quick else SEEDS
    dest = bench_dir("rdd", out)
    dest.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[rdd] {msg} [{(time.perf_counter() - t_all) / 60:.1f} min]", file=sys.stderr, flush=True)

    # 1. the frozen feature network (distillation) and the held-out metric network
    t0 = time.perf_counter()
    feat_run = cached_run(_classifier("diffusion_featnet", b["classifier"], 0), CACHE)
    eval_run = cached_run(_classifier("diffusion_evalnet", b["classifier"], 1), CACHE)
    feat_ck = str(feat_run / "checkpoints" / "last.safetensors")
    accs = {k: json.loads((r / "results.json").read_text())["test_last"]["top1"]
            for k, r in (("featnet", feat_run), ("evalnet", eval_run))}
    times["classifiers"] = time.perf_counter() - t0
    log(f"classifiers: featnet {accs['featnet']:.1f}%, evalnet {accs['evalnet']:.1f}%")

    # 2. the shared base (DDPM, EMA) and the PD chain 64 -> 8
    t0 = time.perf_counter()
    chain = [{"kind": "ddpm", "epochs": b["base"], "lr": b["lr_base"]}] + \
        [{"kind": "pd", "epochs": b["chain"], "lr": b["lr_pd"]} for _ in range(3)]
    base_run = cached_run(_diffusion("rdd-base-chain", 0, {"model": "diffusion_unet", "kwargs": UNET}, chain,
                                     b["lr_base"], None, ema=True), CACHE)
    times["base + PD chain"] = time.perf_counter() - t0
    log("base and PD chain to 8 steps")
    pd8 = base_run / "checkpoints" / "last.safetensors"

    # 3. the compared rounds 8 -> 4 -> 2 -> 1, every method and seed
    runs: dict[tuple[str, int], Path] = {}
    for m in METHODS:
        t0 = time.perf_counter()
        for s in seeds:
            rounds = [{"kind": m, "epochs": b["round"], "lr": b["lr_pd"]} for _ in range(3)]
            spec = {"model": "diffusion_unet", "kwargs": UNET, "checkpoint": str(pd8)}
            runs[(m, s)] = cached_run(_diffusion(f"rdd-{m}", s, spec, rounds, b["lr_pd"], feat_ck, ema=False), CACHE)
            log(f"{m} seed {s}")
        times[f"{m} rounds ({len(seeds)} seeds)"] = time.perf_counter() - t0

    # 4. scores: held-out classifier features on the real test digits vs 1,000 samples per row
    t0 = time.perf_counter()
    evalnet, _ = load_deployable(eval_run, "last")
    digits = load_data(name="digits_pm1", val_fraction=0.0, augment=False)
    test_feats, _ = classifier_outputs(evalnet, digits.test.x)  # type: ignore[attr-defined]
    real_feats, _ = classifier_outputs(evalnet, torch.cat([digits.train.x, digits.test.x]))  # type: ignore[attr-defined]
    noise_seeds = NOISE_SEEDS[:1] if quick else NOISE_SEEDS
    score = _Scorer(evalnet, real_feats, test_feats, b["samples"], noise_seeds)
    base_ck = _stage_ck(base_run, f"ddpm-{GRID}")
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    for steps in (GRID, 8, 4, 2, 1):
        r = score(base_ck, steps, f"teacher DDIM {steps}")
        raw[f"teacher/{steps}"] = [r]
    raw["pd-chain/8"] = [score(pd8, None, "PD chain 8")]
    for m in METHODS:
        for steps in (4, 2, 1):
            raw[f"{m}/{steps}"] = [score(_stage_ck(runs[(m, s)], f"{m}-{steps}"), None,
                                         f"{m.upper()} {steps}" if s == seeds[0] else None) for s in seeds]
    times["sampling and scoring"] = time.perf_counter() - t0
    t_teacher = raw[f"teacher/{GRID}"][0]["ms_per_image"]
    labels = {f"teacher/{s}": f"teacher DDIM, {s} steps" for s in (GRID, 8, 4, 2, 1)}
    labels["pd-chain/8"] = "PD chain (shared), 8 steps"
    for key, vals in raw.items():
        name, steps = key.split("/")
        label = labels.get(key, f"{name.upper()} student, {steps} steps")
        ms = mean_std([v["ms_per_image"] for v in vals])[0]
        noise_sd = statistics.fmean(statistics.stdev(v["fd_noise"]) if len(v["fd_noise"]) > 1 else float("nan")
                                    for v in vals)
        rows.append({"row": label, "steps": int(steps), "seeds": len(vals),
                     "FD ↓": fmt_mean_std([v["fd"] for v in vals]), "FD noise std": f"{noise_sd:.2f}",
                     "FD, old protocol": fmt_mean_std([v["fd_test359"] for v in vals]),
                     "IS ↑": fmt_mean_std([v["is"] for v in vals]),
                     "coverage ↑": fmt_mean_std([v["coverage"] for v in vals]),
                     "ms / image": f"{ms:.3f}", "speed-up vs 64-step teacher": f"{t_teacher / ms:.0f}×"})
    wall = time.perf_counter() - t_all
    losses = {f"{m}/seed{s}": _losses(runs[(m, s)]) for m in METHODS for s in seeds}
    losses["base-chain"] = _losses(base_run)
    write_json(dest / "rdd.json", {"budget": b, "seeds": list(seeds), "unet": UNET, "rdd": RDD_TINY,
                                   "classifier_top1": accs, "scores": raw, "train_loss_first_last": losses,
                                   "noise_seeds": list(noise_seeds), "reference_images": len(real_feats),
                                   "times_s": times, "wall_s": wall})
    _grids(score.grids, dest / "rdd-samples.png")
    _chart(raw, seeds, dest / "rdd.png")
    (dest / "rdd.md").write_text(_report(rows, raw, losses, accs, times, wall, b, seeds, quick, noise_seeds))
    log(f"wrote {dest / 'rdd.md'} in {wall / 60:.1f} min")
    return dest / "rdd.md"


def _grids(grids: dict[str, torch.Tensor], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kdforge.diffusion.sample import save_grid

    n = len(grids)
    cols = 4
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.2 * rows))
    tmp = path.with_suffix(".tmp.png")
    for ax, (label, x) in zip(axes.flat, grids.items(), strict=False):
        save_grid(x, tmp, cols=8, scale=1)
        ax.imshow(plt.imread(tmp), cmap="gray", interpolation="nearest")
        ax.set_title(label, fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    tmp.unlink(missing_ok=True)
    fig.suptitle(f"64 samples per row (sampling seed {SAMPLE_SEED}; students: seed 0)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _chart(raw: dict[str, Any], seeds: tuple[int, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [8, 4, 2, 1]
    ax.plot(steps, [raw[f"teacher/{s}"][0]["fd"] for s in steps], "k--o", label="teacher DDIM")
    ax.axhline(raw[f"teacher/{GRID}"][0]["fd"], color="gray", lw=1, label=f"teacher DDIM, {GRID} steps")
    for m, c in zip(METHODS, ("#4C72B0", "#DD8452", "#55A868"), strict=True):
        ms = [mean_std([v["fd"] for v in raw[f"{m}/{s}"]]) for s in (4, 2, 1)]
        ax.errorbar([8, 4, 2, 1], [raw["pd-chain/8"][0]["fd"]] + [a for a, _ in ms],
                    yerr=[0.0] + [b for _, b in ms], marker="o", capsize=3, color=c, label=m.upper())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set(xlabel="sampling steps", ylabel="Fréchet distance (held-out classifier)",
           title=f"digits 8×8, mean ± std over {len(seeds)} seeds")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _report(rows: list[dict[str, Any]], raw: dict[str, Any], losses: dict[str, Any], accs: dict[str, float],
            times: dict[str, float], wall: float, b: dict[str, Any], seeds: tuple[int, ...], quick: bool,
            noise_seeds: tuple[int, ...]) -> str:
    cmd = COMMAND + (" --quick" if quick else "")
    steps_per_epoch = 23  # ceil(1,437 / 64)
    t1, tg = raw["teacher/1"][0]["fd"], raw[f"teacher/{GRID}"][0]["fd"]
    verdict = []
    for m in METHODS:
        v = mean_std([x["fd"] for x in raw[f"{m}/1"]])
        verdict.append(f"{m.upper()} 1-step FD {v[0]:.2f} ± {v[1]:.2f}: "
                       f"{'better' if v[0] < t1 else 'NOT better'} than the teacher's 1-step DDIM ({t1:.2f}), "
                       f"{'better' if v[0] < tg else 'not better'} than the teacher's {GRID}-step DDIM ({tg:.2f})")
    drops = [fl[1] < fl[0] for per in losses.values() for fl in per.values() if fl]
    time_rows = markdown_table([{"part": k, "seconds": f"{v:.0f}"} for k, v in times.items()])
    return f"""# RDD: relational diffusion distillation on digits 8×8 (`kdforge.diffusion`)

{"**Quick smoke run: not a result.**" if quick else ""}

Command: `{cmd}` ({wall / 60:.1f} min in total). Machine: 2-core x86-64 VM, CPU, {machine_note()}; run through
`OMP_NUM_THREADS=1 taskset -c N` (pinned to one core, one thread).

- Data: scikit-learn digits 8×8 in [−1, 1], 1,437 train / 359 test (the tiny set-up), batch {BATCH}
  ({steps_per_epoch} steps per epoch), no augmentation.
- Denoiser: `diffusion_unet` ch 16, levels (1, 2), 1 residual block per level (160k parameters), x-prediction,
  cosine grid G = {GRID}.
- Base: DDPM with the "both" loss (max of x- and ε-MSE), Adam lr {b['lr_base']}, cosine lr, clip 1,
  {b['base']} epochs = {b['base'] * steps_per_epoch} steps, EMA 0.999 with warm-up (the engine's `train.ema`,
  decay min(0.999, (1 + n)/(10 + n)) at update n; the EMA weights are the teacher; the earlier page's EMA had no
  warm-up and kept 0.999^2300 ≈ 10 % of the random initial weights).
- Shared PD chain 64 → 32 → 16 → 8: {b['chain']} epochs = {b['chain'] * steps_per_epoch} steps per round,
  Adam lr {b['lr_pd']}, cosine to 0, student clip 1, no EMA (cached, seed 0).
- Compared rounds 8 → 4 → 2 → 1, each method, seeds {", ".join(map(str, seeds))}: {b['round']} epochs =
  {b['round'] * steps_per_epoch} steps per round, Adam lr {b['lr_pd']}, cosine to 0, student clip 1. PD: "both"
  MSE to the two-step target; CFD: L_CFD only (τ_c 0.9); RDD: L_CFD + 1.0·L_IS (all pairs, τ 1) + 0.1·L_M
  (queue {RDD_TINY['queue']}, contrast {RDD_TINY['contrast']}, {RDD_TINY['per_step']} enqueued per step, τ_M 0.1),
  the projection head
  with its own Adam (constant lr, not clipped). No PD-MSE term in CFD/RDD (the official command).
- Feature network (distillation): `diffusion_featnet` (64×4×4 map), test top-1 {accs['featnet']:.1f}%.
  Metric network (held out, a different architecture): `diffusion_evalnet`, test top-1 {accs['evalnet']:.1f}%.
- Scores: {b['samples']} samples per row from each of {len(noise_seeds)} initial noises (seeds
  {", ".join(map(str, noise_seeds))}, the same for every row) against all 1,797 real digits (train + test, as FID
  uses the training set): FD = Fréchet distance of the metric network's 128-d penultimate features; IS =
  exp(E KL(p(y|x) ‖ p(y))) (max 10); coverage = entropy (nats) of the predicted-class histogram (max ln 10 = 2.30).
  Each model's score is the mean over the noise seeds; "FD noise std" is the sample std over the noise seeds
  (averaged over the training seeds): the sampling variance, which a single noise seed hides. "FD, old protocol":
  the earlier page's protocol (first noise seed only, against the 359 test digits), for before/after comparison.
  Mean ± sample std over training seeds; teacher and chain rows are single models.
- ms / image: wall time of sampling {b['samples']} images in one batch divided by {b['samples']} (median of
  {TIMING_REPEATS} repeats, then the mean over seeds), measured in this run on one thread; speed-up = the 64-step
  teacher's time per image over the row's (every row uses the same network, so it is a step-count ratio plus
  fixed per-call costs).

{markdown_table(rows)}

{"; ".join(verdict)}. Training loss lower at the end of the round than in its first epoch in
{sum(drops)} of {len(drops)} rounds.

![Fréchet distance vs steps](rdd.png)

![samples](rdd-samples.png)

Where the time goes (seconds; cached stages count as their loading time):

{time_rows}

Raw scores, per-round first/last training loss and timings: `rdd.json`.
"""
