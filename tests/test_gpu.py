"""The CUDA subset (``pytest -m gpu``, run by ``make gpu-check``): skipped where no GPU is visible.

AMP in bf16 and fp16 (with its GradScaler), channels-last models, the engine's side optimizer under fp16,
FSDP2 with one process (image KD, and LM distillation with the teacher sharded), and the teacher cache built
and read on the GPU.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import kdforge as kd
from tests.conftest import digits_recipe

# KDFORGE_GPU_DRY_RUN=1 runs this subset's code on the CPU (fp16 left out): a check of the tests without a GPU
DRY = os.environ.get("KDFORGE_GPU_DRY_RUN") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE == "cpu" and not DRY,
                                                  reason="needs a CUDA GPU (run: make gpu-check)")]
NEEDS_CUDA = pytest.mark.skipif(DEVICE == "cpu", reason="fp16 needs a GPU")

KD = {"name": "distill", "teacher": {"model": "cnn_small", "weights": "random"}, "student": {"model": "cnn_tiny"},
      "terms": [{"loss": "ce", "weight": 1.0}, {"loss": "kd", "weight": 0.9, "T": 4}]}


def _train(method: dict[str, Any], run: Path | None = None, **train: Any) -> kd.FitResult:
    r = digits_recipe(method, epochs=2)
    r["train"].update({"device": DEVICE, **train})
    return kd.train(kd.Recipe.from_dict(r), run)


@pytest.fixture(autouse=True)
def _exact_fp32() -> Any:
    """fp32 means fp32 (no TF32 matmuls) so that runs can be compared to tight tolerances."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=NEEDS_CUDA)])
def test_amp_trains_close_to_fp32(precision: str) -> None:
    sup = {"name": "supervised", "model": {"model": "cnn_small"}}
    ref = _train(sup)
    res = _train(sup, precision=precision)
    assert math.isfinite(res.history[-1]["train_loss"]) and res.skipped_steps <= 2
    assert abs(res.test_last["top1"] - ref.test_last["top1"]) < 5.0, (res.test_last, ref.test_last)


@NEEDS_CUDA
def test_fp16_uses_a_grad_scaler_that_skips_overflowing_steps() -> None:
    from kdforge.engine.trainer import Trainer
    from kdforge.method import DataInfo, build_method

    r = kd.Recipe.from_dict(digits_recipe({"name": "supervised", "model": {"model": "cnn_small"}}, epochs=1))
    r = r.model_copy(update={"train": r.train.model_copy(update={"device": DEVICE, "precision": "fp16"})})
    data = kd.load_data(r.data)
    t = Trainer(build_method(r.method.model_dump(), DataInfo(data.num_classes, data.in_chans, data.image_size)),
                data, r)
    assert t.acc.scaler is not None
    t.acc.scaler._init_scale = 2.0 ** 40  # large enough to overflow fp16 gradients at first
    t.fit()
    assert t.acc.scaler.get_scale() < 2.0 ** 40, "the scaler backed off after an overflow"


def test_channels_last_model_trains_like_a_contiguous_one() -> None:
    from kdforge.engine.trainer import Trainer
    from kdforge.method import DataInfo, build_method

    r = kd.Recipe.from_dict(digits_recipe({"name": "supervised", "model": {"model": "cnn_small"}}, epochs=1))
    r = r.model_copy(update={"train": r.train.model_copy(update={"device": DEVICE})})
    data = kd.load_data(r.data)
    info = DataInfo(data.num_classes, data.in_chans, data.image_size)
    losses = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        m = build_method(r.method.model_dump(), info).to(memory_format=fmt)
        res = Trainer(m, data, r).fit()
        if fmt is torch.channels_last:
            conv = next(p for p in m.parameters() if p.ndim == 4)
            assert conv.is_contiguous(memory_format=torch.channels_last)
        losses.append(res.history[-1]["train_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)


def test_side_optimizer_under_amp() -> None:
    adv = {**KD, "name": "adversarial", "input": "logits", "adv_weight": 0.5, "lr_d": 1e-3}
    adv.pop("terms")
    res = _train(adv, precision="fp16" if DEVICE == "cuda" else "bf16")
    assert math.isfinite(res.history[-1]["train_loss"]) and "train_loss_d" in res.history[-1]


def test_fsdp_world_size_one_equals_the_unsharded_run(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    _train(KD, tmp_path / "plain")
    _train(KD, tmp_path / "fsdp", distributed="fsdp", fsdp={"shard_teacher": True})
    a = load_file(str(tmp_path / "plain" / "checkpoints" / "last.safetensors"))
    b = load_file(str(tmp_path / "fsdp" / "checkpoints" / "last.safetensors"))
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert diff <= 1e-4, diff


def test_lm_distillation_under_fsdp_equals_the_unsharded_run_and_trains_in_bf16(tmp_path: Path) -> None:
    """Chunked forward KL of a tiny Llama, teacher sharded, one process: fp32 equals unsharded; bf16 is finite."""
    from safetensors.torch import load_file

    from kdforge.llm.distill import LMDistill, distill_lm, distill_recipe
    from kdforge.losses import build_loss
    from tests.fsdp_cases import Slices, tiny_llama

    rows = torch.randint(0, 64, (3, 2, 16), generator=torch.Generator().manual_seed(0))
    logs = {}
    for name, train in (("plain", {}), ("fsdp", {"distributed": "fsdp", "fsdp": {"shard_teacher": True}}),
                        ("bf16", {"distributed": "fsdp", "fsdp": {"shard_teacher": True}, "precision": "bf16"})):
        method = LMDistill(tiny_llama(2, 2), tiny_llama(3, 1), [(build_loss("lm_fkl", T=2.0), 1.0)], chunk=8)
        recipe = distill_recipe(steps=3, lr=1e-3, batch_size=2, device=DEVICE, save_checkpoints=True, **train)
        logs[name] = distill_lm(method, Slices(rows), recipe, run_dir=tmp_path / name)
    a, b = (load_file(str(tmp_path / n / "checkpoints" / "last.safetensors")) for n in ("plain", "fsdp"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert all(math.isfinite(x["loss"]) for x in logs["bf16"])
    assert logs["bf16"][0]["loss"] == pytest.approx(logs["plain"][0]["loss"], rel=0.05)


def test_teacher_cache_built_and_read_on_the_gpu_trains_like_the_cpu_one(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from kdforge.cache import build_from_recipe

    torch.manual_seed(0)
    teacher = tmp_path / "teacher.safetensors"
    kd.save_weights(kd.create_model("cnn_small", 10, 1, width=4), teacher)
    method = {**KD, "teacher": {"model": "cnn_small", "kwargs": {"width": 4}, "checkpoint": str(teacher)}}
    weights = []
    for i, device in enumerate(("cpu", DEVICE)):
        m = {**method, "cache": {"name": "t", "dir": str(tmp_path / f"cache-{i}-{device}"), "dtype": "fp32",
                                 "chunk": 64}}
        r = digits_recipe(m, epochs=1)
        r["data"]["augment"] = False  # one deterministic view per image: what a cache without data.views stores
        r["train"]["device"] = device
        recipe = kd.Recipe.from_dict(r)
        build_from_recipe(recipe)  # the teacher runs on `device`
        res = kd.train(recipe, tmp_path / f"run-{i}-{device}")
        assert math.isfinite(res.history[-1]["train_loss"])
        weights.append(load_file(str(tmp_path / f"run-{i}-{device}" / "checkpoints" / "last.safetensors")))
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) < 1e-3
