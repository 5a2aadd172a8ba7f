"""Time training steps through kdforge's Trainer against minimal hand-written loops.

Two methods, each against the hand loop doing the same work on the same data loader:

- vanilla KD: teacher forward without grad, student forward and backward, Hinton KD + CE, SGD step;
- adversarial KD (a method with a side optimizer): the same, plus a discriminator on the logits
  updated by its own Adam step each batch (the engine's manual optimizer), and the student's
  non-saturating adversarial term.

Blocks of steps are interleaved (A B A B ...) in one process and the ratio of per-step medians is
printed with the per-round spread. Run pinned, with fixed malloc thresholds (``make bench-overhead``):
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647 taskset -c 0 python
benchmarks/engine_overhead.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import kdforge as kd
from kdforge.data import DataBundle, TensorImages
from kdforge.losses import kd_loss


def make_data(n: int, size: int = 32) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 100, (n,), generator=g)
    ds = TensorImages(x, y, mean=(0.5,) * 3, std=(0.25,) * 3, augment=True, crop_pad=4)
    return DataBundle(ds, None, TensorImages(x[:64], y[:64], (0.5,) * 3, (0.25,) * 3), 100, 3, size, [])


KD = {"name": "distill", "teacher": {"model": "resnet56"}, "student": {"model": "resnet20"},
      "terms": [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "T": 4}]}
ADV = {"name": "adversarial", "teacher": {"model": "resnet56"}, "student": {"model": "resnet20"},
       "input": "logits", "T": 4.0, "ce_weight": 0.1, "kd_weight": 0.9, "adv_weight": 0.1, "lr_d": 1e-3}


def build_trainer(data: DataBundle, batch: int, zero_first: bool, method: dict | None = None) -> kd.Trainer:
    torch.manual_seed(0)
    recipe = kd.Recipe.from_dict({
        "data": {"name": "digits", "batch_size": batch, "augment": True},
        "method": method or KD,
        "optim": {"lr": 0.05}, "sched": {"name": "constant"},
        "train": {"epochs": 1, "device": "cpu", "progress": "silent", "log_every": 10**9},
    })
    m = kd.method.build_method(recipe.method.model_dump(), kd.DataInfo(100, 3, 32))
    return kd.Trainer(m, data, recipe, zero_grad_before_backward=zero_first)


def time_kdforge(tr: kd.Trainer) -> float:
    n = tr.batches_per_epoch
    t0 = time.perf_counter()
    tr.train_steps(n)
    return (time.perf_counter() - t0) / n


def time_hand_adv(loader: torch.utils.data.DataLoader, teacher: torch.nn.Module, student: torch.nn.Module,
                  disc: torch.nn.Module, opt: torch.optim.Optimizer, opt_d: torch.optim.Optimizer) -> float:
    from kdforge.distill.adversarial import discriminator_loss, generator_loss

    student.train()
    t0 = time.perf_counter()
    for x, y in loader:
        with torch.no_grad():
            t_logits = teacher(x)
        s_logits = student(x)
        disc.requires_grad_(True)
        opt_d.zero_grad(set_to_none=True)
        discriminator_loss(disc(t_logits), disc(s_logits.detach())).backward()
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        disc.requires_grad_(False)
        adv = generator_loss(disc(s_logits))
        loss = 0.1 * F.cross_entropy(s_logits, y) + 0.9 * kd_loss(s_logits, t_logits, 4.0) + 0.1 * adv
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / len(loader)


def time_hand(loader: torch.utils.data.DataLoader, teacher: torch.nn.Module, student: torch.nn.Module,
              opt: torch.optim.Optimizer) -> float:
    student.train()
    t0 = time.perf_counter()
    for x, y in loader:
        with torch.no_grad():
            t_logits = teacher(x)
        s_logits = student(x)
        loss = 0.1 * F.cross_entropy(s_logits, y) + 0.9 * kd_loss(s_logits, t_logits, 4.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / len(loader)


def report(title: str, runs: dict[str, list[float]], ref: str) -> None:
    hand = statistics.median(runs[ref])
    print(title)
    for name, vals in runs.items():
        med = statistics.median(vals)
        ratios = [v / h for v, h in zip(vals, runs[ref], strict=True)]
        print(f"  {name:26s} median {1000 * med:7.1f} ms/step  ratio to hand loop {med / hand:.3f} "
              f"(per-round min {min(ratios):.3f}, max {max(ratios):.3f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="steps per timed block")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved A/B rounds")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = make_data(a.steps * a.batch)
    tr_zero_first = build_trainer(data, a.batch, zero_first=True)
    tr_zero_after = build_trainer(data, a.batch, zero_first=False)
    tr_adv = build_trainer(data, a.batch, zero_first=True, method=ADV)
    teacher = kd.create_model("resnet56", 100, 3).eval()
    student = kd.create_model("resnet20", 100, 3)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    student2 = kd.create_model("resnet20", 100, 3)
    opt2 = torch.optim.SGD(student2.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    from kdforge.distill.adversarial import Discriminator

    disc = Discriminator(100, 64).requires_grad_(False)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=(0.5, 0.999))
    loader = tr_zero_first.train_loader
    kd_runs: dict[str, list[float]] = {"hand": [], "kdforge": [], "kdforge_zero_after_step": []}
    adv_runs: dict[str, list[float]] = {"hand": [], "kdforge": []}
    time_hand(loader, teacher, student, opt)  # warm-up every path
    time_kdforge(tr_zero_first)
    time_hand_adv(loader, teacher, student2, disc, opt2, opt_d)
    time_kdforge(tr_adv)
    for _ in range(a.rounds):
        kd_runs["hand"].append(time_hand(loader, teacher, student, opt))
        kd_runs["kdforge"].append(time_kdforge(tr_zero_first))
        kd_runs["kdforge_zero_after_step"].append(time_kdforge(tr_zero_after))
        adv_runs["hand"].append(time_hand_adv(loader, teacher, student2, disc, opt2, opt_d))
        adv_runs["kdforge"].append(time_kdforge(tr_adv))
    print(f"machine: {kd.bench.common.machine_note()}")
    print(f"resnet56 -> resnet20, batch {a.batch} of 3x32x32, {a.rounds} rounds x {a.steps} steps, "
          f"{a.threads} threads")
    report("vanilla KD (one optimizer)", kd_runs, "hand")
    report("adversarial KD (student SGD + discriminator Adam, a manual engine optimizer)", adv_runs, "hand")


if __name__ == "__main__":
    import kdforge.bench.common

    main()
