"""``kdforge bench kd-zoo``: every KD loss and scheme on the embedded Fashion-MNIST subset, one teacher, 3 seeds.

Sizes are chosen for 2 CPU cores: teacher ``cnn_small`` (width 16, 26 k parameters, trained once and
cached by recipe hash), student ``cnn_tiny`` (width 4, 1.9 k parameters), 8 epochs per student run.
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kdforge.bench import BENCHES
from kdforge.bench.common import (
    bar_chart,
    cached_teacher,
    fmt_mean_std,
    machine_note,
    markdown_table,
    mean_std,
    result_summary,
    write_json,
)
from kdforge.config import Recipe
from kdforge.data import load_data
from kdforge.method import DataInfo, build_method
from kdforge.profile import count_params

SEEDS = (0, 1, 2)
EPOCHS = 8
TEACHER_EPOCHS = 15
DATA: dict[str, Any] = {"name": "fashion_mnist_subset", "batch_size": 128, "val_fraction": 0.1}
TEACHER: dict[str, Any] = {"model": "cnn_small", "kwargs": {"width": 16}}
TEACHER2: dict[str, Any] = {"model": "mlp", "kwargs": {"hidden": [256, 128]}}
STUDENT: dict[str, Any] = {"model": "cnn_tiny"}
STAGES = ["stage1", "stage2", "stage3"]
COMMAND = "kdforge bench kd-zoo"


def _recipe(name: str, method: dict[str, Any], epochs: int, seed: int = 0, limit: int | None = None) -> Recipe:
    # quick runs (limit set) also use smaller batches: the set-up dry run and each step cost less
    data = dict(DATA, limit_train=limit, batch_size=64) if limit else dict(DATA)
    return Recipe.from_dict({"name": name, "seed": seed, "data": data, "method": method,
                             "optim": {"name": "sgd", "lr": 0.05, "weight_decay": 5e-4},
                             "sched": {"name": "cosine"}, "train": {"epochs": epochs, "progress": "never"}})


def _distill(teacher: dict[str, Any], *terms: dict[str, Any]) -> dict[str, Any]:
    return {"name": "distill", "teacher": teacher, "student": STUDENT, "terms": list(terms)}


def methods(teacher_ck: str, teacher2_ck: str, quick: bool = False) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, family, method section) for every row of the table."""
    t = dict(TEACHER, checkpoint=teacher_ck)
    t2 = dict(TEACHER2, checkpoint=teacher2_ck)
    ce = {"loss": "ce", "weight": 1.0}
    kd = [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "T": 4}]
    bank = {"bank_size": 512, "num_negatives": 128} if quick else {"bank_size": 4096, "num_negatives": 1024}

    def feat(loss: str, weight: float, taps: str | list[str], **kw: Any) -> dict[str, Any]:
        return _distill(t, ce, {"loss": loss, "weight": weight, "student_tap": taps, "teacher_tap": taps, **kw})

    return [
        ("student alone", "baseline", {"name": "supervised", "model": STUDENT}),
        ("kd", "response", _distill(t, *kd)),
        ("dkd", "response", _distill(t, ce, {"loss": "dkd", "alpha": 1.0, "beta": 2.0, "T": 4, "warmup": 2})),
        ("dist", "response", _distill(t, ce, {"loss": "dist", "beta": 2.0, "gamma": 2.0, "T": 4})),
        ("fitnet", "feature", feat("fitnet", 100, "stage2")),
        ("nst", "feature", feat("nst", 50, "stage3")),
        ("ft", "feature", feat("ft", 200, "stage3")),
        ("ab", "feature", feat("ab", 1.0, STAGES)),
        ("fsp", "feature", feat("fsp", 50, STAGES)),
        ("vid", "feature", feat("vid", 1.0, STAGES)),
        ("ofd", "feature", feat("ofd", 2.0, "stage3")),
        ("reviewkd", "feature", feat("reviewkd", 1.0, [*STAGES, "pool"])),
        ("rkd", "relation", feat("rkd", 1.0, "pool")),
        ("sp", "relation", feat("sp", 3000, "stage3")),
        ("cc", "relation", feat("cc", 0.02, "pool")),
        ("pkt", "relation", feat("pkt", 30000, "pool")),
        ("crd", "relation", feat("crd", 0.8, "pool", **bank)),
        ("at", "attention", {"name": "at", "teacher": t, "student": STUDENT, "beta": 1000}),
        ("dml (peer 0 of 2)", "online", {"name": "dml", "peers": [STUDENT, STUDENT]}),
        ("kdcl (peer 0 of 2)", "online", {"name": "kdcl", "peers": [STUDENT, STUDENT]}),
        ("multi-teacher avg", "multi-teacher", {"name": "multi_teacher", "teachers": [t, t2], "student": STUDENT}),
        ("aekd", "multi-teacher", {"name": "aekd", "teachers": [t, t2], "student": STUDENT, "ce_weight": 0.1,
                                   "kd_weight": 0.9, "C": 0.6}),
        ("cross-modal (student 2× low-res)", "cross-modal",
         {"name": "cross_modal", "teacher": t, "student": STUDENT, "terms": kd,
          "student_view": {"kind": "lowres", "factor": 2}}),
        ("adversarial", "adversarial", {"name": "adversarial", "teacher": t, "student": STUDENT, "ce_weight": 0.1,
                                        "kd_weight": 0.9, "adv_weight": 0.1}),
        ("dafl", "data-free", {"name": "dafl", "teacher": t, "student": STUDENT, "batch_size": 32 if quick else 128,
                               "gen_width": 64, "lr_g": 0.02}),
        ("deepinversion", "data-free",
         {"name": "deepinversion", "teacher": t, "student": STUDENT, "batch_size": 32 if quick else 128,
          "synth_iters": 1 if quick else 30, "synth_every": 21, "pool_batches": 4}),
    ]


def _extra_params(method_cfg: dict[str, Any], info: DataInfo, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """Parameters trained besides the deployed student (connectors, peers, generators, discriminators)."""
    m = build_method(copy.deepcopy(method_cfg), info)
    m.setup(batch)
    deploy = {id(p) for p in m.deployable().parameters()}
    frozen = {id(p) for name, p in m.named_parameters() if name.startswith(m.frozen_prefixes)}
    return sum(p.numel() for p in m.parameters() if id(p) not in deploy and id(p) not in frozen)


def _run_one(label: str, method: dict[str, Any], seed: int, epochs: int, limit: int | None,
             root: Path | None) -> dict[str, float]:
    from kdforge.run import train

    recipe = _recipe(f"kdzoo-{label.split(' ')[0]}", copy.deepcopy(method), epochs, seed, limit)
    run_dir = None if root is None else root / f"{label.split(' ')[0]}-s{seed}"
    return result_summary(train(recipe, run_dir, overwrite=True))


@BENCHES.register("kd-zoo")
def run(out: Path | None = None, quick: bool = False) -> Path:
    """Train the teacher once, then every KD method with the fixed student; write the table and the chart."""
    t_start = time.perf_counter()
    seeds = SEEDS[:1] if quick else SEEDS
    epochs, t_epochs = (1, 1) if quick else (EPOCHS, TEACHER_EPOCHS)
    limit = 64 if quick else None
    teacher_ck = cached_teacher(_recipe("kdzoo-teacher", {"name": "supervised", "model": TEACHER}, t_epochs,
                                        limit=256 if quick else None))
    teacher2_ck = cached_teacher(_recipe("kdzoo-teacher2", {"name": "supervised", "model": TEACHER2}, t_epochs,
                                         limit=256 if quick else None))
    rows = methods(str(teacher_ck), str(teacher2_ck), quick)

    data = load_data(_recipe("x", {"name": "supervised", "model": STUDENT}, 1).data)
    info = DataInfo(data.num_classes, data.in_chans, data.image_size)
    batch = (torch.stack([data.train[i][0] for i in range(32)]), torch.stack([data.train[i][1] for i in range(32)]))
    student_params = count_params(build_method({"name": "supervised", "model": STUDENT}, info).deployable())

    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="kdzoo-") as tmp:
        root = None if quick else Path(tmp)
        for label, _, method in rows:
            results[label] = [_run_one(label, method, s, epochs, limit, root) for s in seeds]
    teachers = {}
    for name, ck in (("teacher cnn_small(16)", teacher_ck), ("teacher 2 mlp(256,128)", teacher2_ck)):
        res = json.loads((ck.parent.parent / "results.json").read_text())
        teachers[name] = res["test_last"]["top1"]

    base_epoch = statistics.fmean(r["epoch_s"] for r in results["student alone"]) or 1.0
    base_last = mean_std([r["last"] for r in results["student alone"]])[0]
    table = []
    for label, family, method in rows:
        rs = results[label]
        last = [r["last"] for r in rs]
        table.append({
            "method": label, "family": family,
            "top-1 best": fmt_mean_std([r["best"] for r in rs]), "top-1 last": fmt_mean_std(last),
            "Δ last vs student": f"{mean_std(last)[0] - base_last:+.2f}",
            "params (deployed)": student_params,
            "extra trained params": _extra_params(method, info, batch),
            "time/epoch (× student)": f"{statistics.fmean(r['epoch_s'] for r in rs) / base_epoch:.2f}",
        })
    out_dir = Path(out) if out is not None else Path("docs/benchmarks")
    out_dir.mkdir(parents=True, exist_ok=True)
    png = bar_chart([r["method"] for r in table], [mean_std([x["last"] for x in results[r["method"]]])[0]
                                                   for r in table],
                    [mean_std([x["last"] for x in results[r["method"]]])[1] for r in table],
                    out_dir / "kd-zoo.png", title="KD zoo on Fashion-MNIST subset (last-epoch test top-1)",
                    baseline=base_last)
    total = time.perf_counter() - t_start
    md = _markdown(table, teachers, seeds, epochs, t_epochs, quick, total, base_epoch, png.name)
    path = out_dir / "kd-zoo.md"
    path.write_text(md)
    write_json(out_dir / "kd-zoo.json", {"results": results, "teachers": teachers, "seeds": list(seeds),
                                         "epochs": epochs, "quick": quick, "total_s": total})
    print(md)
    return path


def _markdown(table: list[dict[str, Any]], teachers: dict[str, float], seeds: tuple[int, ...], epochs: int,
              t_epochs: int, quick: bool, total: float, base_epoch: float, png: str) -> str:
    better = [r["method"] for r in table[1:] if float(r["Δ last vs student"]) > 0]
    lines = [
        "# KD zoo benchmark",
        "",
        ("**Quick smoke run: numbers mean nothing.** " if quick else "")
        + f"Command: `{COMMAND}{' --quick' if quick else ''}`. Machine: {machine_note()}. "
        + f"Seeds: {', '.join(map(str, seeds))}. Total wall time: {total / 60:.1f} min.",
        "",
        f"Data: embedded Fashion-MNIST subset (`fashion_mnist_subset`, 28×28×1; 5,400 train − 10 % validation, "
        f"1,000 test), crop-2 + flip augmentation. Teacher: `cnn_small` width 16, {t_epochs} epochs, trained once "
        f"and cached by recipe hash ({', '.join(f'{k}: {v:.2f} %' for k, v in teachers.items())} test top-1). "
        f"Student: `cnn_tiny` (width 4), {epochs} epochs, SGD lr 0.05 momentum 0.9 wd 5e-4, cosine, batch 128. "
        f"'best' is the test top-1 of the epoch with the best validation top-1, 'last' that of the last epoch; "
        f"mean ± sample std over seeds. Time per epoch is relative to the student alone ({base_epoch:.2f} s).",
        "",
        markdown_table(table),
        "",
        f"![bar chart]({png})",
        "",
        f"Above the student alone on the last-epoch mean: {', '.join(better) or 'none'}.",
        "",
        "Notes:",
        "",
        "- Feature and relation rows are CE + β·loss without a KD term (RepDistiller's protocol), with "
        "RepDistiller's β where it has one; AB and FSP are used as plain terms, not as an initialisation stage.",
        "- The AT row is the `at` scheme: CE + 1000·AT over the three stage outputs. `attn_map` (attention "
        "maps of transformers) has no row: the student here is a CNN.",
        "- Online rows deploy peer 0 of two `cnn_tiny` peers (both trained, so twice the student's cost); "
        "every peer's training accuracy is in its run's metrics (`train_acc_peerK`).",
        "- Multi-teacher rows use the cached `cnn_small` teacher and an MLP teacher (different architectures).",
        "- The cross-modal student sees a 2× low-resolution view (train and test), the teacher the full image: it "
        "solves a harder task than the student alone, so compare it with care.",
        "- Data-free students never see a training image (synthetic images only); the validation split is "
        "used only to pick the best epoch. With a few hundred steps they are far below the others.",
        "- The discriminator (adversarial) and the generator (DAFL) have their own Adam inside the method; "
        "'extra trained params' counts them, the peers of online methods, and the connectors of feature losses.",
    ]
    return "\n".join(lines) + "\n"
