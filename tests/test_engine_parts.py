"""Schedules, profile, checkpoints and data: the engine's smaller parts."""

from __future__ import annotations

import math
from itertools import pairwise
from pathlib import Path

import pytest
import torch

import kdforge as kd
from kdforge.config import DataConfig, SchedConfig
from kdforge.data import load_data, make_loader
from kdforge.engine.schedule import lr_factor
from kdforge.errors import KdforgeError


def test_warmup_then_cosine() -> None:
    cfg = SchedConfig(name="cosine", warmup_epochs=1)
    f = [lr_factor(s, cfg, steps_per_epoch=10, total_steps=50, base_lr=0.1) for s in range(50)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[30] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in pairwise(f[10:]))


def test_step_and_multistep() -> None:
    step = SchedConfig(name="step", step_size=2, gamma=0.5)
    assert [lr_factor(s * 10, step, 10, 80, 0.1) for s in range(6)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    ms = SchedConfig(name="multistep", milestones=[150, 180, 210], gamma=0.1)
    assert lr_factor(149 * 5, ms, 5, 1200, 0.05) == 1.0
    assert lr_factor(150 * 5, ms, 5, 1200, 0.05) == pytest.approx(0.1)
    assert lr_factor(239 * 5, ms, 5, 1200, 0.05) == pytest.approx(1e-3)


def test_profile_counts() -> None:
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    p = kd.profile(m, (1, 8, 8), batch_size=4, repeats=5)
    assert p.params == 650 and p.flops == 2 * 64 * 10 and p.latency_ms > 0
    r20 = kd.create_model("resnet20", 10, 3)
    assert 80e6 < kd.count_flops(r20, (3, 32, 32)) < 90e6  # ~41 M multiply-adds


def test_weights_round_trip_and_mismatch(tmp_path: Path) -> None:
    a = kd.create_model("resnet8", 10, 1)
    kd.save_weights(a, tmp_path / "w.safetensors", {"note": "x"})
    b = kd.create_model("resnet8", 10, 1, checkpoint=tmp_path / "w.safetensors")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    with pytest.raises(KdforgeError, match="does not fit"):
        kd.create_model("resnet14", 10, 1, checkpoint=tmp_path / "w.safetensors")
    with pytest.raises(KdforgeError, match="checkpoint not found"):
        kd.create_model("resnet8", 10, 1, checkpoint=tmp_path / "none.safetensors")


def test_embedded_data_and_splits() -> None:
    b = load_data(DataConfig(name="fashion_mnist_subset", val_fraction=0.1, augment=False))
    assert (len(b.train), len(b.val), len(b.test)) == (5400, 600, 1000)
    assert (b.num_classes, b.in_chans, b.image_size) == (10, 1, 28) and b.class_names[7] == "sneaker"
    ys = torch.stack([b.test[i][1] for i in range(len(b.test))])
    assert torch.equal(torch.bincount(ys), torch.full((10,), 100))
    tr = set(b.train.indices)
    assert tr.isdisjoint(b.val.indices) and len(tr | set(b.val.indices.tolist())) == 6000
    padded = load_data(name="fashion_mnist_subset", pad_to=32)
    assert padded.train[0][0].shape == (1, 32, 32) and padded.image_size == 32


def test_sampler_order_is_seeded_and_sharded() -> None:
    b = load_data(name="digits", augment=False)
    order = lambda rank, world, epoch: [int(i) for i in _indices(make_loader(b.train, 8, True, 0, rank, world), epoch)]
    assert order(0, 1, 0) == order(0, 1, 0) and order(0, 1, 0) != order(0, 1, 1)
    both = order(0, 2, 3) + order(1, 2, 3)
    assert sorted(both) == sorted(order(0, 1, 3))


def _indices(loader: torch.utils.data.DataLoader, epoch: int) -> list[int]:
    loader.sampler.set_epoch(epoch)
    return list(iter(loader.sampler))


def test_missing_fashion_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KdforgeError, match="apt-get install -y dataset-fashion-mnist"):
        load_data(name="fashion_mnist", root=str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"junk")
    for n in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / f"{n}.gz").write_bytes(b"junk")
    with pytest.raises(KdforgeError, match="corrupt IDX file"):
        load_data(name="fashion_mnist", root=str(tmp_path))


def test_cifar_without_data_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KdforgeError, match="CIFAR100 not found"):
        load_data(name="cifar100", root=str(tmp_path))
