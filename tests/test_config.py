"""Recipe validation: unknown keys, bad values and overrides give one clear line."""

from __future__ import annotations

import pytest

from kdforge import Recipe
from kdforge.config import apply_overrides
from kdforge.errors import KdforgeError
from kdforge.method import DataInfo, build_method

INFO = DataInfo(10, 1, 8)


def test_defaults_validate() -> None:
    r = Recipe.from_dict({})
    assert r.data.name == "fashion_mnist_subset" and r.optim.name == "sgd" and r.train.epochs == 10


def test_unknown_key_names_it_and_the_valid_ones() -> None:
    with pytest.raises(KdforgeError) as e:
        Recipe.from_dict({"train": {"epoch": 3}})
    msg = str(e.value)
    assert "'train.epoch'" in msg and "did you mean 'epochs'" in msg and "grad_accum" in msg
    assert "\n" not in msg


def test_unknown_top_level_key() -> None:
    with pytest.raises(KdforgeError, match=r"unknown key 'optimizer'.*did you mean 'optim'"):
        Recipe.from_dict({"optimizer": {"lr": 1}})


def test_bad_literal_lists_valid_values() -> None:
    with pytest.raises(KdforgeError, match=r"train.precision.*'fp8'.*'fp32', 'bf16' or 'fp16'"):
        Recipe.from_dict({"train": {"precision": "fp8"}})


def test_bad_number() -> None:
    with pytest.raises(KdforgeError, match=r"optim.lr"):
        Recipe.from_dict({"optim": {"lr": -1}})


def test_overrides_parse_yaml_values() -> None:
    r = Recipe.from_dict({}, ["optim.lr=0.1", "train.epochs=3", "sched.milestones=[1, 2]", "data.pad_to=32"])
    assert r.optim.lr == 0.1 and r.train.epochs == 3 and r.sched.milestones == [1, 2] and r.data.pad_to == 32


def test_override_needs_equals() -> None:
    with pytest.raises(KdforgeError, match="key=value"):
        apply_overrides({}, ["optim.lr"])


def test_method_keys_are_checked_by_the_method() -> None:
    r = Recipe.from_dict({"method": {"name": "supervised", "model": {"model": "mlp"}, "lable_smoothing": 0.1}})
    with pytest.raises(KdforgeError, match=r"'method.lable_smoothing'.*did you mean 'label_smoothing'"):
        build_method(r.method.model_dump(), INFO)


def test_unknown_model_suggests_close_names() -> None:
    r = Recipe.from_dict({"method": {"name": "supervised", "model": {"model": "resnet21"}}})
    with pytest.raises(KdforgeError, match=r"unknown model 'resnet21'; did you mean .*'resnet20'"):
        build_method(r.method.model_dump(), INFO)


def test_unknown_loss_and_loss_option() -> None:
    method = {"name": "distill", "student": {"model": "mlp"}, "teacher": {"model": "mlp"},
              "terms": [{"loss": "kd", "temperature": 4}]}
    with pytest.raises(KdforgeError,
                       match=r"terms.0: loss 'kd' has no option 'temperature' \(valid: T, compat, reduction\)"):
        build_method(Recipe.from_dict({"method": method}).method.model_dump(), INFO)
    method["terms"] = [{"loss": "kdd"}]
    with pytest.raises(KdforgeError, match=r"unknown loss 'kdd'; did you mean 'kd'"):
        build_method(Recipe.from_dict({"method": method}).method.model_dump(), INFO)


def test_yaml_errors(tmp_path) -> None:
    with pytest.raises(KdforgeError, match="recipe file not found"):
        Recipe.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(KdforgeError, match="not valid YAML"):
        Recipe.from_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(KdforgeError, match="must be a mapping"):
        Recipe.from_yaml(lst)


def test_resolved_recipe_round_trips() -> None:
    r = Recipe.from_dict({"method": {"name": "supervised", "model": {"model": "mlp"}}}, ["optim.lr=0.2"])
    import yaml

    again = Recipe.from_dict(yaml.safe_load(r.to_yaml()))
    assert again == r
