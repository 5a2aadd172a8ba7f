"""``kdforge bench pdm``: the two-stream baseline vs +MFGM vs +PLM vs full PDM on the synthetic pedestrians."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from kdforge.bench import BENCHES
from kdforge.bench.common import (
    bench_dir,
    fmt_mean_std,
    machine_note,
    markdown_table,
    mean_std,
    restores_threads,
    write_json,
)
from kdforge.engine.callbacks import Callback

EPOCHS, SEEDS, SIZE = 9, (0, 1, 2), 48
OFF = {"mfa": False, "sna": False, "mfgm": False, "plm": False, "phase_alpha": 0.0}
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("baseline (ID + triplet)", OFF),
    ("+MFGM (CPM, ort)", {**OFF, "mfgm": True}),
    ("+PLM (L_ch, DCS)", {**OFF, "plm": True}),
    ("+PLM, L_ch off (control)", {**OFF, "plm": True, "weights": {"ch": 0.0}}),
    ("full PDM", {}),
]
COMMAND = "kdforge bench pdm"
METRICS = [("rank1", "rank-1 (%)"), ("mAP", "mAP (%)"), ("mINP", "mINP (%)"), ("rank5", "rank-5 (%)"),
           ("indoor_rank1", "cams 1-2 rank-1 (%)")]


def recipe(model: dict[str, Any], seed: int, epochs: int, limit: int | None = None) -> dict[str, Any]:
    """The synthetic recipe of every row: 48×24 images, P=4 × K=4 pairs, SGD (Nesterov) lr 0.02, 2 warm-up epochs.

    ``model`` holds the network switches and, under ``weights``, loss-weight overrides.
    """
    model = dict(model)
    extra = {"weights": model.pop("weights")} if "weights" in model else {}
    return {"name": f"pdm-bench-s{seed}", "seed": seed,
            "data": {"name": "reid_synthetic", "batch_size": 16, "val_fraction": 0.2, "eval_batch_size": 256,
                     "resize": SIZE, **({"limit_train": limit} if limit else {})},
            "method": {"name": "pdm", "ids_per_batch": 4, "num_pos": 4, "backbone_lr": 1.0, **extra,
                       "model": {"backbone": "small", "width": 16, "prototypes": 4, **model}},
            "optim": {"name": "sgd", "lr": 0.02, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
            "sched": {"name": "cosine", "warmup_epochs": 2},
            "train": {"epochs": epochs, "eval_every": 2, "progress": "silent", "threads": 1,
                      "save_checkpoints": False}}


class Mechanisms(Callback):
    """Per-epoch probes on fixed test images (8 visible + 8 infrared of 10 identities), eval mode.

    gap: ‖μ_V − μ_I‖ of l2-normalised GAP features; cpm_ratio: mean over identities of d(c_I, c_G1(V))
    over the mean of d(c_V, c_G1(V)); ort_cos: mean cosine of the two generated GAP vectors;
    proto_rms: mean pairwise RMS distance between prototype maps.
    """

    def __init__(self, test: Any, ids: int = 10, k: int = 8) -> None:
        import numpy as np
        import torch

        chosen = np.unique(test.pids)[:ids]
        vis, ir = [], []
        for p in chosen:
            vis += np.flatnonzero((test.pids == p) & (test.modal == 0))[:k].tolist()
            ir += np.flatnonzero((test.pids == p) & (test.modal == 1))[:k].tolist()
        self.xv = torch.stack([test[i][0] for i in vis])
        self.xi = torch.stack([test[i][0] for i in ir])
        self.n_ids, self.k = len(chosen), k
        self.curve: list[dict[str, float]] = []

    def on_epoch_end(self, trainer: Any, row: dict[str, float], improved: bool) -> None:
        import torch
        import torch.nn.functional as F

        net = trainer.method.net
        was = net.training
        net.eval()
        with torch.no_grad():
            out = net.forward_train(self.xv, self.xi)
        net.train(was)
        b = len(self.xv)
        pool = out["pool"]
        z = F.normalize(pool, dim=1)
        rec = {"epoch": row["epoch"], "gap": float((z[:b].mean(0) - z[b:2 * b].mean(0)).norm())}
        if net.blocks == 6:
            c = pool.view(6, self.n_ids, self.k, -1).mean(2)  # block × identity centres
            pulled, own = (c[1] - c[2]).norm(dim=1).mean(), (c[0] - c[2]).norm(dim=1).mean()
            rec["cpm_ratio"] = float(pulled / own.clamp_min(1e-12))
            rec["ort_cos"] = float(F.cosine_similarity(pool[2 * b:4 * b], pool[4 * b:], dim=1).mean())
        if "maps" in out:
            s = out["maps"]
            iu = torch.triu_indices(s.shape[1], s.shape[1], 1)
            rec["proto_rms"] = float((s[:, iu[0]] - s[:, iu[1]]).pow(2).mean(-1).sqrt().mean())
        self.curve.append(rec)


def train_one(model: dict[str, Any], seed: int, epochs: int, limit: int | None = None) -> dict[str, Any]:
    """One row × seed through the engine; test metrics of the best-by-validation-mAP epoch and the curves."""
    from kdforge.config import Recipe
    from kdforge.data import load_data
    from kdforge.engine.trainer import Trainer, seed_everything
    from kdforge.method import DataInfo, build_method

    r = Recipe.from_dict(recipe(model, seed, epochs, limit))
    seed_everything(r.seed)
    data = load_data(r.data)
    method = build_method(r.method.model_dump(), DataInfo(data.num_classes, data.in_chans, data.image_size))
    probe = Mechanisms(data.test)
    t0 = time.perf_counter()
    res = Trainer(method, data, r, None, callbacks=[probe], keep_best_in_memory=True).fit()
    wall = time.perf_counter() - t0
    best = res.test_best or res.test_last
    epoch_s = [h["epoch_time_s"] for h in res.history]
    return {"test": best, "test_last": res.test_last, "best_epoch": res.best_epoch, "curve": probe.curve,
            "wall_s": wall, "train_s": sum(epoch_s), "eval_s": wall - sum(epoch_s),
            "params": sum(p.numel() for p in method.net.parameters())}


@BENCHES.register("pdm")
@restores_threads
def run(out: Path | None = None, quick: bool = False) -> Path:
    """Every variant over the seeds; writes pdm.md, pdm.json and the curves pdm-mechanisms.png."""
    import torch

    from kdforge.config import DataConfig
    from kdforge.data import load_data
    from kdforge.reid.metrics import chance_level

    torch.set_num_threads(1)
    epochs, seeds, limit = (1, (0,), 64) if quick else (EPOCHS, SEEDS, None)
    dest = bench_dir("pdm", out)
    t0 = time.perf_counter()
    test = load_data(DataConfig(name="reid_synthetic", val_fraction=0.2, resize=SIZE)).test
    chance = chance_level(test.pids, test.cams, test.modal, test.protocol)
    results: dict[str, list[dict[str, Any]]] = {}
    for label, model in VARIANTS:
        for seed in seeds:
            r = train_one(model, seed, epochs, limit)
            results.setdefault(label, []).append(r)
            print(f"[pdm] {label} seed {seed}: rank-1 {r['test']['rank1']:.2f} mAP {r['test']['mAP']:.2f} "
                  f"mINP {r['test']['mINP']:.2f} ({r['wall_s']:.0f} s) [{(time.perf_counter() - t0) / 60:.1f} min]",
                  file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    return _write(dest, results, chance, seeds, epochs, wall, quick)


def _rows(results: dict[str, list[dict[str, Any]]], chance: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    base = mean_std([r["test"]["mAP"] for r in results[VARIANTS[0][0]]])[0]
    for label, _ in VARIANTS:
        rs = results[label]
        row: dict[str, Any] = {"model": label}
        for k, h in METRICS:
            row[h] = fmt_mean_std([r["test"][k] for r in rs])
        row["Δ mAP vs baseline"] = f"{mean_std([r['test']['mAP'] for r in rs])[0] - base:+.2f}"
        row["params"] = f"{rs[0]['params'] / 1e3:.0f} k"
        row["train s / run"] = f"{mean_std([r['train_s'] for r in rs])[0]:.0f}"
        rows.append(row)
    rows.append({"model": "chance (random embeddings)", **{h: f"{chance[k]:.2f}" for k, h in METRICS if k in chance}})
    return rows


def _curves(results: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = [("gap", "modality gap ‖μ_V − μ_I‖"), ("cpm_ratio", "CPM ratio d(c_I,c_G(V)) / d(c_V,c_G(V))"),
            ("ort_cos", "cos(G1, G2) of GAP features"), ("proto_rms", "prototype-map RMS distance")]
    colours = dict(zip((v[0] for v in VARIANTS), ("#4C72B0", "#DD8452", "#55A868", "#8172B3",
                                                             "#C44E52"), strict=True))
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    for ax, (key, title) in zip(axes, keys, strict=True):
        for label, _ in VARIANTS:
            curves = [[c[key] for c in r["curve"] if key in c] for r in results[label]]
            if not curves or not curves[0]:
                continue
            arr = np.array(curves)
            ep = np.arange(1, arr.shape[1] + 1)
            ax.plot(ep, arr.mean(0), label=label, color=colours[label])
            for row in arr:  # every seed, thin
                ax.plot(ep, row, color=colours[label], lw=0.5, alpha=0.4)
        if key == "cpm_ratio":
            ax.axhline(1.0, ls="--", color="k", lw=0.8)
            ax.set_yscale("log")
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("mean over seeds (thick) and each seed (thin)", fontsize=8, y=0.99)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _mech_summary(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for label, _ in VARIANTS:
        row: dict[str, Any] = {"model": label}
        for key, h in (("gap", "gap"), ("cpm_ratio", "CPM ratio"), ("ort_cos", "cos(G1,G2)"),
                       ("proto_rms", "proto RMS")):
            first = [r["curve"][0][key] for r in results[label] if key in r["curve"][0]]
            last = [r["curve"][-1][key] for r in results[label] if key in r["curve"][-1]]
            row[f"{h} epoch 1 → last"] = (f"{mean_std(first)[0]:.3f} → {fmt_mean_std(last, 3)}" if first else "–")
        rows.append(row)
    return rows


def _write(dest: Path, results: dict[str, list[dict[str, Any]]], chance: dict[str, float], seeds: tuple[int, ...],
           epochs: int, wall: float, quick: bool) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    rows = _rows(results, chance)
    mech = _mech_summary(results)
    png = _curves(results, dest / "pdm-mechanisms.png")
    write_json(dest / "pdm.json", {"seeds": list(seeds), "epochs": epochs, "wall_s": wall, "chance": chance,
                                   "runs": results})
    times = {label: mean_std([r["wall_s"] for r in rs])[0] for label, rs in results.items()}
    md = dest / "pdm.md"
    md.write_text(_report(rows, mech, seeds, epochs, wall, quick, png.name, times))
    print(markdown_table(rows), file=sys.stderr)
    print(f"[pdm] wrote {md} and {png} in {wall / 60:.1f} min", file=sys.stderr)
    return md


PUBLISHED = [
    ("PDM (paper)", "SYSU all-search", "unknown", "unknown", "unknown"),
    ("PDM (paper)", "SYSU indoor-search", "unknown", "unknown", "unknown"),
    ("PDM (paper)", "LLCM IR→VIS", "unknown", "unknown", "unknown"),
    ("PDM (paper)", "LLCM VIS→IR", "unknown", "unknown", "unknown"),
    ("DEEN (CVPR'23, recalled, unverified)", "SYSU all-search", "74.7", "71.8", "unknown"),
    ("DEEN (CVPR'23, recalled, unverified)", "SYSU indoor-search", "80.3", "83.3", "unknown"),
    ("DEEN (CVPR'23, recalled, unverified)", "LLCM IR→VIS", "54.9", "62.9", "unknown"),
    ("DEEN (CVPR'23, recalled, unverified)", "LLCM VIS→IR", "62.5", "65.8", "unknown"),
]


def _report(rows: list[dict[str, Any]], mech: list[dict[str, Any]], seeds: tuple[int, ...], epochs: int,
            wall: float, quick: bool, png: str, times: dict[str, float]) -> str:
    cmd = COMMAND + (" --quick" if quick else "")
    note = "**Quick smoke run (1 epoch of 4 steps, 1 seed): not a result.**\n\n" if quick else ""
    pub = markdown_table([{"method": m, "setting": s, "rank-1 published": r1, "mAP published": mp,
                           "mINP published": mi, "kdforge rank-1": "", "kdforge mAP": ""}
                          for m, s, r1, mp, mi in PUBLISHED])
    where = ", ".join(f"{k}: {v:.0f} s" for k, v in times.items())
    return f"""# PDM on synthetic visible–infrared pedestrians

{note}Command: `{cmd}` ({wall / 60:.1f} min in total). Machine: {machine_note()}
(the 2-core x86-64 VM, CPU only, pinned to one core by `OMP_NUM_THREADS=1 taskset -c N`).
Method page: [docs/methods/pdm.md](../methods/pdm.md).

- Data: `reid_synthetic` — 100 procedural identities rendered at 64×32 and resized to 48×24
  (`data.resize: 48`), 5 per (identity, camera); visible cams 1, 2, 4, 5 (RGB), infrared cams 3, 6
  (thermal-like: per-part brightness, 80 % of it from the fabric's visible luminance — dark cloth reads
  warm — random response curve, blur, noise). 80 training identities, of which 16 are held out for model
  selection (validation mAP); 20 test identities. Test = SYSU-like: 200 infrared queries against one
  visible image per (identity, camera) (80 gallery images), 10 gallery trials, cam-3 queries skip cam-2
  gallery images; flip + MFGM-branch fusion at inference.
- Network: the small 4-stage CNN (width 16; stems conv3×3/2, stages 16-32-64-128 at strides 1-2-2-1, final
  map 6×3), P = 4 prototypes. Rows: baseline = separate stems + shared stages, ID + batch-hard triplet,
  no MFA/SNA/phase perturbation; +MFGM adds the generator with CPM and L_ort; +PLM adds the prototypes
  with the part ID loss, L_ch and DCS (the control row sets L_ch's weight to 0); full PDM = everything
  (MFA blocks, SNA, phase perturbation 0.8, MFGM, PLM) with the paper's weights.
- Training: {epochs} epochs × 80 steps, batch P = 4 identities × K = 4 (visible, infrared) pairs, SGD
  Nesterov, lr 0.02 for every parameter (`backbone_lr: 1.0`: the small CNN starts from scratch; lr 0.05
  collapsed CPM runs to all-zero features in a trial, and the paper's 0.1× backbone lr trained the baseline
  much slower), wd 5e-4, cosine with 2 warm-up epochs; seeds {", ".join(map(str, seeds))};
  mean ± sample std. Test metrics of the epoch with the best validation mAP (every 2 epochs).
- Where the time goes (mean wall per run incl. evaluation): {where}.

{markdown_table(rows)}

Chance: the same protocol scored with random embeddings (mean of 20 draws).

## Mechanisms (test probe: 10 identities × 8 images per modality, every epoch)

![mechanisms]({png})

{markdown_table(mech)}

## Paper scale

Recipes: [`sysu_mm01_resnet50.yaml`](../../src/kdforge/recipes/reid/sysu_mm01_resnet50.yaml) and
[`llcm_resnet50.yaml`](../../src/kdforge/recipes/reid/llcm_resnet50.yaml) (ResNet-50 ×3 with ImageNet weights from a
local file, 384×192, P = 8 × K = 4, P = 10 prototypes, 200 epochs, the official lr schedule), and
[`regdb_resnet50.yaml`](../../src/kdforge/recipes/reid/regdb_resnet50.yaml) (the RegDB variant, 288×144; `kdforge regdb`
trains it on each of the 10 splits and averages both directions, with RegDB's raw-ranking CMC). Not run here
(no data, no GPU). PDM's own numbers could not be retrieved (marked
[?]); DEEN's are recalled, not verified.

{pub}

Raw per-seed numbers and curves: `pdm.json`.
"""
