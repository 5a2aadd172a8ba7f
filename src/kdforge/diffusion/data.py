"""Image sets in [−1, 1] for diffusion (scikit-learn's digits, the embedded Fashion-MNIST subset, CIFAR-10)."""

from __future__ import annotations

import torch

from kdforge.config import DataConfig
from kdforge.data import DATASETS, DataBundle, cifar10, digits, fashion_mnist_subset
from kdforge.data.tensor_dataset import TensorImages


def _to_pm1(bundle: DataBundle, mean: float | tuple[float, ...], std: float | tuple[float, ...]) -> DataBundle:
    """Re-normalise a bundle's in-memory images from (x − mean)/std to [−1, 1] (x ∈ [0, 1], per channel)."""
    m = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    sd = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    for ds in (bundle.train, bundle.test):
        assert isinstance(ds, TensorImages)
        ds.x = ((ds.x * sd + m) * 2 - 1).clamp(-1, 1).contiguous()
    return bundle


@DATASETS.register("digits_pm1")
def digits_pm1(cfg: DataConfig) -> DataBundle:
    """scikit-learn's 8×8 digits in [−1, 1] (the RDD tiny set-up; same 80/20 split as ``digits``)."""
    return _to_pm1(digits(cfg.model_copy(update={"pad_to": None})), 0.305, 0.376)


@DATASETS.register("fashion_pm1")
def fashion_pm1(cfg: DataConfig) -> DataBundle:
    """The embedded Fashion-MNIST subset in [−1, 1] (``data.resize: 16`` for a 16×16 quick set-up)."""
    return _to_pm1(fashion_mnist_subset(cfg.model_copy(update={"pad_to": None})), 0.2860, 0.3530)


@DATASETS.register("cifar10_pm1")
def cifar10_pm1(cfg: DataConfig) -> DataBundle:
    """CIFAR-10 (torchvision, ``root``/``download``) in [−1, 1] with random horizontal flips only (RDD's data)."""
    bundle = _to_pm1(cifar10(cfg.model_copy(update={"pad_to": None})), (0.4914, 0.4822, 0.4465),
                     (0.2470, 0.2435, 0.2616))
    assert isinstance(bundle.train, TensorImages)
    bundle.train.crop_pad = 0  # flip only: no pad-and-crop
    return bundle
