"""Prototypes and class means are taken on the un-augmented view, even when the training set augments."""

from __future__ import annotations

import torch

from kdforge.continual.baselines import FeTrIL, FrozenNCM
from kdforge.continual.ir import IR
from kdforge.continual.learner import TaskInfo, TrainCfg, make_backbone, without_augmentation
from kdforge.continual.protocol import CILSplit, task_view
from kdforge.data.tensor_dataset import TensorImages

SPLIT = CILSplit(4, 2, 2, 1, 0)


def _augmenting_set() -> TensorImages:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(40, 1, 8, 8, generator=g)
    labels = torch.arange(40) % 4
    return TensorImages(images, labels, mean=[0.5], std=[0.25], augment=True, crop_pad=2, flip=True)


def test_without_augmentation_switches_nested_flags_and_restores_them() -> None:
    ds = _augmenting_set()
    view = task_view(torch.utils.data.Subset(ds, list(range(40))), SPLIT, [0])
    with without_augmentation(view):
        assert ds.augment is False
        assert torch.equal(view[0][0], ds.x[int(view.indices[0])])
    assert ds.augment is True
    torch.manual_seed(1)
    assert any(not torch.equal(ds[i][0], ds.x[i]) for i in range(10))  # it really augments outside


def test_ir_prototypes_ncm_and_fetril_means_use_the_clean_images() -> None:
    ds = _augmenting_set()
    view = task_view(ds, SPLIT, [0])
    for cls in (IR, FrozenNCM, FeTrIL):
        torch.manual_seed(0)
        net, dim = make_backbone("cnn_small", 1, 8, width=4)
        lrn = cls(net, dim, SPLIT, TrainCfg(epochs=1))
        task = TaskInfo(0, SPLIT, view)
        lrn.end_task(task)
        net.eval()
        with torch.no_grad():
            clean = net(ds.x[torch.from_numpy(view.indices)])
        for c in range(task.lo, task.hi):
            want = clean[view.y == c].mean(0)
            assert torch.allclose(lrn.protos.means[c], want, atol=1e-5), (cls.__name__, c)
        assert ds.augment is True
