"""One model-loading door: safetensors, .pt/.pth state dicts, run folders, pretrained files, user code."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from kdforge.cli import main
from kdforge.engine.checkpoint import save_weights
from kdforge.errors import KdforgeError
from kdforge.models import create_model
from kdforge.models.loading import load_weights, read_state_dict, weights_file
from tests.conftest import digits_recipe


def _same(a: nn.Module, b: nn.Module, shape: tuple[int, ...] = (2, 1, 8, 8)) -> bool:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    a.eval(), b.eval()
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def _src() -> nn.Module:
    torch.manual_seed(1)
    return create_model("cnn_small", num_classes=10, in_chans=1)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "ddp"])
def test_pt_state_dicts_load(tmp_path: Path, wrap: str) -> None:
    src = _src()
    sd = src.state_dict()
    obj = {"plain": sd, "state_dict": {"state_dict": sd, "epoch": 3}, "model": {"model": sd, "optimizer": {}},
           "ddp": {f"module.{k}": v for k, v in sd.items()}}[wrap]
    torch.save(obj, tmp_path / "w.pt")
    torch.manual_seed(2)
    fresh = create_model("cnn_small", num_classes=10, in_chans=1)
    assert not _same(src, fresh)
    loaded = create_model("cnn_small", num_classes=10, in_chans=1, checkpoint=tmp_path / "w.pt")
    assert _same(src, loaded)
    assert loaded.kdforge_weights == str(tmp_path / "w.pt")


def test_pth_suffix_and_safetensors_without_suffix(tmp_path: Path) -> None:
    src = _src()
    torch.save(src.state_dict(), tmp_path / "w.pth")
    save_weights(src, tmp_path / "weights.bin")  # safetensors content under another name: read by its header
    for f in ("w.pth", "weights.bin"):
        assert _same(src, load_weights(create_model("cnn_small", num_classes=10, in_chans=1), tmp_path / f))


def test_run_folder_gives_best_then_last(tmp_path: Path) -> None:
    run = tmp_path / "run"
    best, last = _src(), create_model("cnn_small", num_classes=10, in_chans=1)
    save_weights(last, run / "checkpoints" / "last.safetensors")
    assert weights_file(run) == run / "checkpoints" / "last.safetensors"
    save_weights(best, run / "checkpoints" / "best.safetensors")
    assert weights_file(run) == run / "checkpoints" / "best.safetensors"
    assert _same(best, create_model("cnn_small", num_classes=10, in_chans=1, checkpoint=run))
    (tmp_path / "empty").mkdir()
    with pytest.raises(KdforgeError, match="not a kdforge run folder"):
        weights_file(tmp_path / "empty")


def test_mismatch_is_one_line_naming_first_keys(tmp_path: Path) -> None:
    sd = _src().state_dict()
    first = sorted(sd)[0]
    bad = {k: v for k, v in sd.items() if k != first} | {"extra.weight": torch.zeros(1)}
    torch.save(bad, tmp_path / "w.pt")
    with pytest.raises(KdforgeError) as e:
        create_model("cnn_small", num_classes=10, in_chans=1, checkpoint=tmp_path / "w.pt")
    msg = str(e.value)
    assert "\n" not in msg and first in msg and "extra.weight" in msg and "1 model keys missing" in msg
    torch.save(_src().state_dict(), tmp_path / "ten.pt")
    with pytest.raises(KdforgeError, match=r"has shape \[10"):
        create_model("cnn_small", num_classes=7, in_chans=1, checkpoint=tmp_path / "ten.pt")


def test_pickled_model_and_junk_are_refused(tmp_path: Path) -> None:
    torch.save(_src(), tmp_path / "whole.pt")  # a whole pickled module: weights_only refuses it
    with pytest.raises(KdforgeError, match=r"state_dict\(\) instead"):
        read_state_dict(tmp_path / "whole.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 64)
    with pytest.raises(KdforgeError, match="neither safetensors nor a torch state dict"):
        read_state_dict(tmp_path / "junk.pt")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(KdforgeError, match="not a state dict of tensors"):
        read_state_dict(tmp_path / "meta.pt")


def test_torchvision_pretrained_file_with_new_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    imagenet = create_model("torchvision:resnet18", num_classes=1000)
    torch.save(imagenet.state_dict(), tmp_path / "resnet18-imagenet.pth")
    with pytest.raises(KdforgeError, match="new_head: true"):
        create_model("torchvision:resnet18", num_classes=5, checkpoint=tmp_path / "resnet18-imagenet.pth")
    mine = create_model("torchvision:resnet18", num_classes=5, checkpoint=tmp_path / "resnet18-imagenet.pth",
                        new_head=True)
    assert mine.fc.out_features == 5
    assert torch.equal(mine.layer4[1].conv2.weight, imagenet.layer4[1].conv2.weight)
    assert torch.equal(mine.conv1.weight, imagenet.conv1.weight)


USER_NET = '''
from torch import nn

def build(num_classes, in_chans=3, width=4):
    return nn.Sequential(nn.Conv2d(in_chans, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, num_classes))
'''


def test_user_module_function_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_nets.py").write_text(USER_NET)
    monkeypatch.chdir(tmp_path)
    m = create_model("my_nets:build", num_classes=3, in_chans=1, width=6)
    assert m[-1].out_features == 3 and m[0].in_channels == 1 and m[0].out_channels == 6
    m2 = create_model(f"{tmp_path / 'my_nets.py'}:build", num_classes=4, in_chans=1)
    assert m2[-1].out_features == 4
    with pytest.raises(KdforgeError, match="has no function or class 'nope'"):
        create_model("my_nets:nope", num_classes=3)
    with pytest.raises(KdforgeError, match="unknown model source"):
        create_model("nosuchthing_xyz:net", num_classes=3)
    sys.modules.pop("my_nets", None)


def test_entry_point_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A package registers a model in the kdforge.models entry-point group; recipes name it like a zoo model."""
    (tmp_path / "acme_nets.py").write_text(USER_NET)
    dist = tmp_path / "acme_nets-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-nets\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[kdforge.models]\nacme_tiny = acme_nets:build\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    m = create_model("acme_tiny", num_classes=7, in_chans=1)
    assert m[-1].out_features == 7
    sys.modules.pop("acme_nets", None)


def _kd_recipe(tmp_path: Path, teacher: dict) -> Path:
    r = digits_recipe({"name": "distill", "teacher": teacher, "student": {"model": "cnn_small", "kwargs": {"width": 8}},
                       "terms": [{"loss": "ce"}, {"loss": "kd", "T": 4}]}, epochs=1)
    r["train"]["progress"] = "auto"
    p = tmp_path / "kd.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def test_teacher_without_weights_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = _kd_recipe(tmp_path, {"model": "cnn_small"})
    assert main(["train", str(p), "-o", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "method.teacher (cnn_small) has no weights" in err
    assert "weights: random" in err and not (tmp_path / "run").exists()
    p = _kd_recipe(tmp_path, {"model": "cnn_small", "weights": "random"})
    assert main(["train", str(p), "--dry-run"]) == 0


def test_banner_names_teacher_weights_and_cached_accuracy(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from kdforge.config import DataConfig
    from kdforge.data import load_data, make_loader
    from kdforge.method import evaluate_classifier

    monkeypatch.setenv("KDFORGE_CACHE_DIR", str(tmp_path / "cache"))
    teacher = _src()
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    p = _kd_recipe(tmp_path, {"model": "cnn_small", "checkpoint": str(tmp_path / "teacher.pt")})
    assert main(["train", str(p), "-o", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.strip().startswith("weights"))
    assert str(tmp_path / "teacher.pt") in line
    # the same number, computed here from the recipe's own validation split
    data = load_data(DataConfig(**yaml.safe_load(p.read_text())["data"]))
    want = evaluate_classifier(teacher, make_loader(data.val, 256, False))["top1"]
    assert f"val top1 {want:.2f} %" in line
    cached = json.loads((tmp_path / "cache" / "teacher-accuracy.json").read_text())
    assert list(cached.values()) == [pytest.approx(want)]
    # a second run reads the cache: change the stored number and the banner shows the stored one
    key = next(iter(cached))
    (tmp_path / "cache" / "teacher-accuracy.json").write_text(json.dumps({key: 12.5}))
    assert main(["train", str(p), "-o", str(tmp_path / "run2")]) == 0
    assert "val top1 12.50 %" in capsys.readouterr().err


def test_packaged_recipe_runs_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert not Path("src").exists()
    assert main(["train", "recipes/demo/kd.yaml", "--dry-run"]) == 0, capsys.readouterr().err
    assert main(["recipes", "cache/demo-kd", "--copy", "mine"]) == 0
    assert (tmp_path / "mine" / "demo" / "teacher.safetensors").is_file()
    os.chdir(tmp_path / "mine" / "cache")  # the copy reads its teacher next to itself, from its own folder too
    assert main(["train", "demo-kd.yaml", "--dry-run", "--set", "method.cache=null"]) == 0, capsys.readouterr().err
