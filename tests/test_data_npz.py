"""`data: {name: npz, root: FILE.npz}`: a user's own image arrays, checked, normalised and trainable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from kdforge.cli import main
from kdforge.data import load_data
from kdforge.errors import KdforgeError
from tests.conftest import digits_recipe


def _digits_npz(path: Path, **extra: np.ndarray) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    arrays = {"x_train": x[:1400], "y_train": d.target[:1400], "x_test": x[1400:], "y_test": d.target[1400:],
              **extra}
    np.savez(path, **arrays)
    return arrays


def test_npz_images_are_normalised_by_the_training_split(tmp_path: Path) -> None:
    a = _digits_npz(tmp_path / "d.npz", class_names=np.array([f"digit {i}" for i in range(10)]))
    b = load_data(name="npz", root=str(tmp_path / "d.npz"), val_fraction=0.1, augment=False)
    assert (b.num_classes, b.in_chans, b.image_size) == (10, 1, 8) and b.class_names[3] == "digit 3"
    assert len(b.train) + len(b.val) == 1400 and len(b.test) == len(a["x_test"])
    raw = a["x_train"].astype(np.float64) / 255.0
    mean, std = raw.mean(), raw.std()
    x, y = b.test[5]
    np.testing.assert_allclose(x[0].numpy(), (a["x_test"][5] / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
    assert int(y) == a["y_test"][5]


def test_npz_channel_layouts_and_float_images_agree(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (20, 6, 6, 3), dtype=np.uint8)
    y = np.arange(20) % 4
    np.savez(tmp_path / "hwc.npz", x_train=hwc, y_train=y, x_test=hwc[:5], y_test=y[:5])
    np.savez(tmp_path / "chw.npz", x_train=hwc.transpose(0, 3, 1, 2) / 255.0, y_train=y,
             x_test=hwc[:5].transpose(0, 3, 1, 2) / 255.0, y_test=y[:5])
    a = load_data(name="npz", root=str(tmp_path / "hwc.npz"), val_fraction=0.0, augment=False)
    b = load_data(name="npz", root=str(tmp_path / "chw.npz"), val_fraction=0.0, augment=False)
    assert a.in_chans == 3 and a.class_names == ["0", "1", "2", "3"]
    np.testing.assert_allclose(a.test[2][0].numpy(), b.test[2][0].numpy(), atol=1e-5)
    per_channel = hwc.astype(np.float64).mean(axis=(0, 1, 2)) / 255.0
    np.testing.assert_allclose(a.train.x.mean(dim=(0, 2, 3)).numpy(), 0.0, atol=1e-5)  # each channel centred
    assert not np.allclose(per_channel, per_channel[0])  # the channels had different means to remove


def test_given_validation_arrays_are_the_validation_split(tmp_path: Path) -> None:
    _digits_npz(tmp_path / "v.npz", x_val=np.zeros((30, 8, 8), np.uint8), y_val=np.zeros(30, np.int64))
    b = load_data(name="npz", root=str(tmp_path / "v.npz"), val_fraction=0.1)
    assert len(b.val) == 30 and len(b.train) == 1400  # nothing carved from train


@pytest.mark.parametrize("arrays,match", [
    ({"x_train": np.zeros((4, 8, 8), np.uint8), "y_train": np.zeros(4, np.int64)}, "lacks x_test, y_test"),
    ({"x_train": np.zeros((4, 8, 8), np.uint8), "y_train": np.zeros(3, np.int64),
      "x_test": np.zeros((2, 8, 8), np.uint8), "y_test": np.zeros(2, np.int64)}, "y_train has shape"),
    ({"x_train": np.zeros((4, 8, 8), np.uint8), "y_train": np.full(4, 0.5),
      "x_test": np.zeros((2, 8, 8), np.uint8), "y_test": np.zeros(2, np.int64)}, "integer class indices"),
    ({"x_train": np.zeros((4, 8), np.uint8), "y_train": np.zeros(4, np.int64),
      "x_test": np.zeros((2, 8), np.uint8), "y_test": np.zeros(2, np.int64)}, "expected \\(N, H, W\\)"),
    ({"x_train": np.zeros((4, 8, 8), np.uint8), "y_train": np.zeros(4, np.int64),
      "x_test": np.zeros((2, 9, 9), np.uint8), "y_test": np.zeros(2, np.int64)}, "differ in shape"),
])
def test_bad_npz_files_are_refused_in_one_line(tmp_path: Path, arrays: dict, match: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(KdforgeError, match=match):
        load_data(name="npz", root=str(tmp_path / "bad.npz"))
    with pytest.raises(KdforgeError, match=r"existing \.npz file"):
        load_data(name="npz", root=str(tmp_path / "missing.npz"))


def test_a_model_trains_on_npz_arrays_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _digits_npz(tmp_path / "mine.npz")
    r = digits_recipe({"name": "supervised", "model": {"model": "mlp"}}, epochs=2)
    r["data"] = {"name": "npz", "root": str(tmp_path / "mine.npz"), "batch_size": 64, "val_fraction": 0.1,
                 "augment": False}  # a flipped digit is another digit
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    assert main(["train", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["data"] == "npz" and res["top1"] > 70  # chance is 10 %
    (tmp_path / "mine.npz").unlink()
    assert main(["train", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "run2")]) == 2
    assert "existing .npz file" in capsys.readouterr().err
