"""Class-incremental protocol and metrics: splits, label remapping, hand-computed metric values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdforge.continual.metrics import (
    average_forgetting,
    average_incremental_accuracy,
    backward_transfer,
    last_accuracy,
    step_accuracies,
    summarize,
)
from kdforge.continual.protocol import CILSplit, TaskView, batches, task_view
from kdforge.data.tensor_dataset import TensorImages
from kdforge.errors import KdforgeError


@pytest.mark.parametrize(("c", "b", "i", "t"), [(10, 2, 2, 4), (100, 50, 10, 5), (100, 50, 5, 10), (100, 40, 20, 3),
                                                 (10, 4, 3, 2)])
def test_split_disjoint_and_covers_seeded_order(c: int, b: int, i: int, t: int) -> None:
    s = CILSplit(c, b, i, t, seed=3)
    tasks = [s.task_classes(k) for k in range(s.num_tasks)]
    flat = [x for task in tasks for x in task]
    assert len(flat) == len(set(flat)) == b + t * i  # disjoint
    assert flat == s.order[: b + t * i].tolist()  # in the seeded order
    assert [len(x) for x in tasks] == [b] + [i] * t
    if b + t * i == c:
        assert sorted(flat) == list(range(c))  # covers every class
    assert s.order.tolist() == np.random.RandomState(3).permutation(c).tolist()
    assert CILSplit(c, b, i, t, seed=4).order.tolist() != s.order.tolist()
    assert all(s.remap[s.order[k]] == k for k in range(c))


def test_bounds_are_contiguous_new_labels() -> None:
    s = CILSplit(10, 4, 2, 3)
    assert [s.bounds(t) for t in range(4)] == [(0, 4), (4, 6), (6, 8), (8, 10)]
    assert s.seen(2) == 8
    with pytest.raises(KdforgeError, match=r"valid tasks are 0\.\.3"):
        s.bounds(4)


@pytest.mark.parametrize(("b", "i", "t", "msg"), [(2, 2, 5, "2 \\+ 5·2 = 12 exceeds the data set's 10 classes"),
                                                  (0, 2, 2, "base ≥ 1"), (2, 0, 2, "increment ≥ 1")])
def test_bad_split_is_one_clear_error(b: int, i: int, t: int, msg: str) -> None:
    with pytest.raises(KdforgeError, match=msg) as e:
        CILSplit(10, b, i, t)
    assert "\n" not in str(e.value) and "base + tasks·increment ≤ 10" in str(e.value)


def test_task_view_remaps_labels_and_selects_classes() -> None:
    y = torch.arange(10).repeat(3)
    ds = TensorImages(torch.rand(30, 1, 4, 4), y, mean=(0.0,), std=(1.0,))
    s = CILSplit(10, 2, 2, 4, seed=0)
    for t in range(s.num_tasks):
        v = task_view(ds, s, [t])
        lo, hi = s.bounds(t)
        assert len(v) == 3 * (hi - lo)
        assert set(v.y.tolist()) == set(range(lo, hi))
        orig = y[torch.from_numpy(v.indices)]
        assert torch.equal(torch.from_numpy(s.order)[v.y], orig)  # order[new label] == original label
        x0, y0 = v[0]
        assert torch.equal(x0, ds.x[v.indices[0]]) and int(y0) == int(v.y[0])
    joint = task_view(ds, s, range(3))
    assert set(joint.y.tolist()) == set(range(s.seen(2)))


def test_batches_fast_path_matches_loader_path() -> None:
    ds = TensorImages(torch.rand(12, 1, 4, 4), torch.arange(12) % 4, mean=(0.0,), std=(1.0,))
    v = task_view(ds, CILSplit(4, 2, 2, 1), [0, 1])
    assert v.tensors() is not None
    fast = list(batches(v, 5, shuffle=False))
    plain = _Plain(ds)  # no .x: goes through a DataLoader
    slow_view = TaskView(plain, v.indices, v.remap)
    assert slow_view.tensors() is None
    slow = list(batches(slow_view, 5, shuffle=False))
    assert [len(b[1]) for b in fast] == [5, 5, 2]
    assert torch.equal(torch.cat([b[0] for b in fast]), torch.cat([b[0] for b in slow]))
    got = sorted(torch.cat([b[1] for b in batches(v, 5, True, torch.Generator().manual_seed(0))]).tolist())
    assert got == sorted(v.y.tolist())


class _Plain(torch.utils.data.Dataset):
    def __init__(self, base: TensorImages) -> None:
        self.base, self.targets = base, base.y

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        return self.base[i]


# A hand-made 3-task matrix (rows: after task t; columns: task j), accuracies in %.
A = [[90.0, 0.0, 0.0],
     [60.0, 80.0, 0.0],
     [50.0, 70.0, 100.0]]


def test_metrics_on_hand_matrix() -> None:
    # A_t task-mean: 90, 70, 220/3
    assert step_accuracies(A).tolist() == pytest.approx([90.0, 70.0, 220 / 3])
    assert average_incremental_accuracy(A) == pytest.approx((90 + 70 + 220 / 3) / 3)
    assert last_accuracy(A) == pytest.approx(220 / 3)
    # forgetting: task 0 max(90, 60) − 50 = 40; task 1 max(80) − 70 = 10 → 25
    assert average_forgetting(A) == pytest.approx(25.0)
    # BWT: (50 − 90 + 70 − 80) / 2 = −25
    assert backward_transfer(A) == pytest.approx(-25.0)


def test_class_weighted_differs_from_task_mean_when_base_is_larger() -> None:
    sizes = [200, 100, 100]  # base task has twice the test images (B₀ = 2n)
    # A_1 = (2·60 + 80)/3, A_2 = (2·50 + 70 + 100)/4
    want = [90.0, 200 / 3, 270 / 4]
    assert step_accuracies(A, sizes).tolist() == pytest.approx(want)
    assert average_incremental_accuracy(A, sizes) == pytest.approx(sum(want) / 3)
    assert average_incremental_accuracy(A, sizes) != pytest.approx(average_incremental_accuracy(A))
    s = summarize(A, sizes)
    assert s["last_acc"] == pytest.approx(67.5) and s["forgetting"] == pytest.approx(25.0)


def test_forgetting_uses_max_over_earlier_rows_not_just_diagonal() -> None:
    a = [[50.0, 0, 0, 0], [70.0, 60.0, 0, 0], [40.0, 65.0, 80.0, 0], [30.0, 20.0, 70.0, 90.0]]
    # task 0: max(50, 70, 40) − 30 = 40; task 1: max(60, 65) − 20 = 45; task 2: 80 − 70 = 10
    assert average_forgetting(a) == pytest.approx(95 / 3)
    assert average_forgetting([[77.0]]) == 0.0 and backward_transfer([[77.0]]) == 0.0
    with pytest.raises(ValueError, match="square"):
        average_forgetting([[1.0, 2.0]])


def test_recipes_are_valid_and_build() -> None:
    from pathlib import Path

    from kdforge.continual.driver import build_learner
    from kdforge.continual.learner import TrainCfg
    from kdforge.continual.recipe import CilRecipe

    paths = sorted(Path(__file__).parents[1].glob("recipes/continual/*.yaml"))
    assert len(paths) >= 8
    for p in paths:
        r = CilRecipe.from_yaml(p)
        c = r.cil
        classes = 100 if r.data.name == "cifar100" else 10
        split = CILSplit(classes, c.base, c.increment, c.tasks)
        assert split.used_classes == classes, p.name  # every recipe covers all classes
        assert r.optim.name == "adam" and r.name == p.stem, p.name
        if r.data.name == "cifar100":
            assert r.sched.name == "step" and r.sched.step_size == 30 and r.train.epochs == 100, p.name
        if r.data.name == "cifar100" and "50-5x10" in p.name:  # one build per learner keeps this fast
            lrn = build_learner(c.learner, split, 3, 32, TrainCfg(), c.model, **c.learner_kwargs)
            lrn.setup(torch.rand(2, 3, 32, 32))
            assert lrn.num_classes == 100
