"""Shared fixtures: small recipes on scikit-learn's digits and a trained digits teacher."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import kdforge as kd

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# teachers' measured accuracies are cached per user; the suite keeps its own, never the developer's
os.environ["KDFORGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="kdforge-test-cache-")
torch.set_num_threads(2)


def digits_recipe(method: dict, epochs: int = 3, **extra: object) -> dict:
    """A quick recipe dict on the digits data."""
    r = {"name": "t", "seed": 0, "data": {"name": "digits", "batch_size": 64, "val_fraction": 0.1},
         "method": method, "optim": {"lr": 0.1}, "train": {"epochs": epochs, "progress": "silent"}}
    r.update(extra)
    return r


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cnn_small teacher trained on digits for a few epochs; returns its best checkpoint."""
    run = tmp_path_factory.mktemp("teacher") / "run"
    recipe = kd.Recipe.from_dict(digits_recipe({"name": "supervised", "model": {"model": "cnn_small"}}, epochs=6))
    res = kd.train(recipe, run)
    assert res.test_last["top1"] > 90
    return run / "checkpoints" / "best.safetensors"


@pytest.fixture(scope="module")
def clip_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CLIP teacher's weights, written once per test module."""
    from tests.tiny_methods import clip_teacher_weights

    return clip_teacher_weights(tmp_path_factory.mktemp("clip") / "teacher.safetensors")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread inside the test (tiny models; results independent of the suite's order)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
