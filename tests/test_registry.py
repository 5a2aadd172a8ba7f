"""Registries: lookup by name, suggestions for near misses, listing."""

from __future__ import annotations

import pytest

import kdforge  # noqa: F401 - registers everything
from kdforge.errors import KdforgeError
from kdforge.registry import DATASETS, LOSSES, METHODS, MODELS, Registry


def test_lookup_and_near_names() -> None:
    reg: Registry = Registry("widget")
    reg.register("alpha")(lambda: 1)
    reg.register("beta")(lambda: 2)
    assert reg.get("alpha")() == 1 and reg.names() == ["alpha", "beta"] and "beta" in reg
    with pytest.raises(KdforgeError, match=r"unknown widget 'alpah'; did you mean 'alpha'\?"):
        reg.get("alpah")


def test_double_registration_is_refused() -> None:
    reg: Registry = Registry("widget")
    reg.register("a")(lambda: 1)
    with pytest.raises(KeyError):
        reg.register("a")(lambda: 2)


def test_builtin_tables() -> None:
    assert {"resnet20", "resnet56", "wrn_40_2", "mlp", "cnn_small"} <= set(MODELS.names())
    assert {"fashion_mnist_subset", "digits", "fashion_mnist", "cifar10", "cifar100", "imagefolder"} <= set(DATASETS)
    assert {"supervised", "distill"} <= set(METHODS.names())
    assert {"ce", "kd"} <= set(LOSSES.names())
    with pytest.raises(KdforgeError, match="did you mean 'fashion_mnist"):
        DATASETS.get("fashion-mnist")
