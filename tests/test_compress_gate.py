"""The compress gate: each check passes on a faithful export and fails on a model built to fail it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from kdforge.compress.export import apply_plan, export_all, export_onnx, export_pt2, load_compressed
from kdforge.compress.gate import (
    check_faster,
    check_loads,
    check_matches,
    check_quality,
    check_smaller,
    torch_runner,
)
from kdforge.engine.checkpoint import save_weights
from kdforge.models import create_model
from kdforge.profile import count_params
from kdforge.prune.surgery import find_units, prune_model

SHAPE = (3, 32, 32)


@pytest.fixture(scope="module")
def pruned_resnet(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, dict[str, Path], nn.Module]:
    """A CIFAR resnet20 with 4 residual blocks removed, exported to ONNX and .pt2; and the unpruned model."""
    torch.manual_seed(0)
    base = create_model("resnet20", 10, 3).eval()
    for m in base.modules():  # non-trivial BN statistics, so a wrong export cannot hide behind identity BNs
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    units = find_units(base)
    drop = {1, 2, 8, 9}
    kept = [i for i in range(len(units)) if i not in drop]
    pruned = prune_model(base, units, kept).eval()
    folder = tmp_path_factory.mktemp("pruned")
    files = {"onnx": export_onnx(pruned, SHAPE, folder / "model.onnx"),
             "pt2": export_pt2(pruned, SHAPE, folder / "model.pt2")}
    return pruned, files, base


def test_pruned_cifar_resnet_onnx_matches_in_onnxruntime(pruned_resnet):
    pruned, files, base = pruned_resnet
    assert count_params(pruned) < count_params(base)
    x = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(1))
    loads, outs, facts = check_loads(files, x)
    assert loads.ok, loads.detail
    assert not facts["onnx"]["kdforge_imported"] and not facts["pt2"]["kdforge_imported"]
    with torch.no_grad():
        ref = pruned(x)
    assert float((torch.from_numpy(outs["onnx"]) - ref).abs().max()) <= 1e-4  # onnxruntime vs eager, independently
    assert torch.equal(torch.from_numpy(outs["pt2"]), ref)
    m = check_matches(ref, outs)
    assert m.ok and m.values["max_abs_diff"]["pt2"] == 0.0


def test_loads_takes_a_path_relative_to_the_callers_folder(pruned_resnet, monkeypatch):
    _, files, _ = pruned_resnet
    monkeypatch.chdir(files["onnx"].parent.parent)  # the loader runs elsewhere: relative paths must still resolve
    rel = {"onnx": Path(files["onnx"].parent.name) / files["onnx"].name}
    c, _, _ = check_loads(rel, torch.zeros(1, *SHAPE))
    assert c.ok, c.detail


def test_matches_fails_when_the_export_differs(pruned_resnet):
    pruned, files, _ = pruned_resnet
    x = torch.randn(4, *SHAPE)
    _, outs, _ = check_loads(files, x)
    changed = copy.deepcopy(pruned)
    with torch.no_grad():
        changed.fc.bias.add_(1e-3)  # the in-memory model moved on after export: the export no longer reproduces it
        ref = changed(x)
    c = check_matches(ref, outs, atol=1e-4)
    assert not c.ok and "max |diff|" in c.detail
    assert c.values["max_abs_diff"]["onnx"] == pytest.approx(1e-3, rel=0.05)


def test_loads_fails_on_a_file_the_runtime_cannot_read(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx protobuf")
    c, outs, _ = check_loads({"onnx": bad}, torch.zeros(1, *SHAPE))
    assert not c.ok and "model.onnx does not load with onnxruntime" in c.detail and not outs
    assert "\n" not in c.detail


def test_smaller_fails_on_a_model_that_grows(tmp_path):
    small, big = create_model("resnet8", 10, 3), create_model("resnet14", 10, 3)
    save_weights(small, tmp_path / "small.safetensors")
    save_weights(big, tmp_path / "big.safetensors")
    sizes = {"safetensors": ((tmp_path / "small.safetensors").stat().st_size,
                             (tmp_path / "big.safetensors").stat().st_size)}
    grows = check_smaller((count_params(small), count_params(big)), sizes)
    assert not grows.ok and "params" in grows.detail and ">= original" in grows.detail
    shrinks = check_smaller((count_params(big), count_params(small)), {"safetensors": sizes["safetensors"][::-1]})
    assert shrinks.ok


def test_faster_fails_on_a_slower_model():
    torch.manual_seed(0)
    fast = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    slow = nn.Sequential(nn.Conv2d(3, 128, 3, padding=1), nn.Conv2d(128, 128, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(128, 10))  # ~400x the multiply-adds: slower on any machine
    c = check_faster(torch_runner(fast), torch_runner(slow), SHAPE, [1, 8], rounds=7, iters=1, runtime="torch")
    assert not c.ok and c.values["speedup"]["1"] < 1 and c.values["rounds"] == 7
    ok = check_faster(torch_runner(slow), torch_runner(fast), SHAPE, [1, 8], rounds=7, iters=1, runtime="torch")
    assert ok.ok


def test_quality_fails_beyond_the_allowed_drop():
    assert check_quality(90.0, 89.5, 1.0).ok
    c = check_quality(90.0, 88.0, 1.0)
    assert not c.ok and c.values["drop"] == pytest.approx(2.0) and "allowed 1" in c.detail


def test_width_pruned_safetensors_rebuilds_from_its_plan(tmp_path):
    pytest.importorskip("torch_pruning")
    from kdforge.compress.candidates import width_prune

    torch.manual_seed(0)
    base = create_model("resnet8", 10, 3).eval()
    pruned, hist = width_prune(base, 0.5, SHAPE, 10)
    assert count_params(pruned) < 0.4 * count_params(base)
    spec = {"builder": "model", "model": "resnet8", "kwargs": {}, "num_classes": 10, "in_chans": 3, "image_size": 32}
    files = export_all(pruned, SHAPE, tmp_path, ["safetensors"], spec, {"width": {"history": hist, "ratio": 0.5}})
    again = load_compressed(files["safetensors"])
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        assert torch.equal(again(x), pruned(x))
    replayed = apply_plan(create_model("resnet8", 10, 3).eval(), {"width": {"history": hist}}, SHAPE)
    assert [p.shape for p in replayed.parameters()] == [p.shape for p in pruned.parameters()]
