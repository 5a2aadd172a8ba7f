"""Time one KD training step through kdforge's Trainer against a minimal hand-written loop.

Both do the same work on the same data loader: teacher forward without grad, student forward and
backward, Hinton KD + CE, SGD step. Blocks of steps are interleaved (A B A B ...) in one process and
the ratio of per-step medians is printed. Run: ``python benchmarks/engine_overhead.py``.
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


def build_trainer(data: DataBundle, batch: int, zero_first: bool) -> kd.Trainer:
    torch.manual_seed(0)
    recipe = kd.Recipe.from_dict({
        "data": {"name": "digits", "batch_size": batch, "augment": True},
        "method": {"name": "distill", "teacher": {"model": "resnet56"}, "student": {"model": "resnet20"},
                   "terms": [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "T": 4}]},
        "optim": {"lr": 0.05}, "sched": {"name": "constant"},
        "train": {"epochs": 1, "device": "cpu", "progress": "never", "log_every": 10**9},
    })
    method = kd.method.build_method(recipe.method.model_dump(), kd.DataInfo(100, 3, 32))
    return kd.Trainer(method, data, recipe, zero_grad_before_backward=zero_first)


def time_kdforge(tr: kd.Trainer) -> float:
    t0 = time.perf_counter()
    tr._train_epoch(0, None)
    return (time.perf_counter() - t0) / len(tr.train_loader)


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
    teacher = kd.create_model("resnet56", 100, 3).eval()
    student = kd.create_model("resnet20", 100, 3)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = tr_zero_first.train_loader
    runs: dict[str, list[float]] = {"hand": [], "kdforge": [], "kdforge_zero_after_step": []}
    time_hand(loader, teacher, student, opt)  # warm-up both paths
    time_kdforge(tr_zero_first)
    for _ in range(a.rounds):
        runs["hand"].append(time_hand(loader, teacher, student, opt))
        runs["kdforge"].append(time_kdforge(tr_zero_first))
        runs["kdforge_zero_after_step"].append(time_kdforge(tr_zero_after))
    hand = statistics.median(runs["hand"])
    print(f"machine: {kd.bench.common.machine_note()}")
    print(f"resnet56 -> resnet20, vanilla KD, batch {a.batch} of 3x32x32, {a.rounds} rounds x {a.steps} steps")
    for name, vals in runs.items():
        med = statistics.median(vals)
        ratios = [v / h for v, h in zip(vals, runs["hand"], strict=True)]
        print(f"{name:26s} median {1000 * med:7.1f} ms/step  ratio to hand loop {med / hand:.3f} "
              f"(per-round min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    import kdforge.bench.common

    main()
