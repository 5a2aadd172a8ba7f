"""The class-incremental protocol: a seeded class order, B base classes then T tasks of I classes."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kdforge.errors import KdforgeError


@dataclass(frozen=True)
class CILSplit:
    """B base classes, then T tasks of I classes each, drawn in a seeded random order of C classes.

    Labels are remapped to the position of the class in the order, so task t holds the contiguous
    new labels ``bounds(t)``; ``order[new_label]`` is the original class id.
    """

    num_classes: int
    base: int
    increment: int
    tasks: int
    seed: int = 0

    def __post_init__(self) -> None:
        valid = f"need base ≥ 1, increment ≥ 1, tasks ≥ 0 and base + tasks·increment ≤ {self.num_classes}"
        if self.base < 1 or self.increment < 1 or self.tasks < 0:
            raise KdforgeError(f"bad class-incremental split base={self.base} increment={self.increment} "
                               f"tasks={self.tasks}: {valid}")
        used = self.base + self.tasks * self.increment
        if used > self.num_classes:
            raise KdforgeError(f"split base + tasks·increment = {self.base} + {self.tasks}·{self.increment} = {used} "
                               f"exceeds the data set's {self.num_classes} classes: {valid}")

    @property
    def num_tasks(self) -> int:
        """Tasks including the base task (T + 1)."""
        return self.tasks + 1

    @property
    def used_classes(self) -> int:
        """Classes that take part: B + T·I."""
        return self.base + self.tasks * self.increment

    @cached_property
    def order(self) -> np.ndarray:
        """The seeded class order: ``order[k]`` is the original id of the k-th class to arrive."""
        return np.random.RandomState(self.seed).permutation(self.num_classes)

    @cached_property
    def remap(self) -> np.ndarray:
        """Original class id → new label (its position in the order)."""
        inv = np.empty(self.num_classes, dtype=np.int64)
        inv[self.order] = np.arange(self.num_classes)
        return inv

    def bounds(self, t: int) -> tuple[int, int]:
        """[lo, hi) of the new labels of task t."""
        if not 0 <= t < self.num_tasks:
            raise KdforgeError(f"task {t} out of range: valid tasks are 0..{self.num_tasks - 1}")
        lo = 0 if t == 0 else self.base + (t - 1) * self.increment
        return lo, self.base if t == 0 else lo + self.increment

    def task_classes(self, t: int) -> list[int]:
        """Original class ids of task t, in order."""
        lo, hi = self.bounds(t)
        return self.order[lo:hi].tolist()

    def seen(self, t: int) -> int:
        """Number of classes seen after task t."""
        return self.bounds(t)[1]


def dataset_labels(ds: Dataset) -> np.ndarray:
    """All labels of a data set, read from ``.y`` / ``.targets`` when it has them (else one pass)."""
    for attr in ("y", "targets"):
        if hasattr(ds, attr):
            return np.asarray(torch.as_tensor(getattr(ds, attr)).cpu(), dtype=np.int64)
    if hasattr(ds, "dataset") and hasattr(ds, "indices"):
        return dataset_labels(ds.dataset)[np.asarray(ds.indices)]
    if hasattr(ds, "base") and hasattr(ds, "indices"):  # kdforge.data's un-augmented validation view
        return dataset_labels(ds.base)[np.asarray(ds.indices)]
    return np.array([int(ds[i][1]) for i in range(len(ds))], dtype=np.int64)


class TaskView(Dataset):
    """The samples of some classes of a data set, with labels remapped to the split's order."""

    def __init__(self, base: Dataset, indices: np.ndarray, remap: np.ndarray) -> None:
        self.base, self.indices, self.remap = base, np.asarray(indices, dtype=np.int64), remap
        self.y = torch.from_numpy(remap[dataset_labels(base)[self.indices]])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, _ = self.base[int(self.indices[i])]
        return x, self.y[i]

    def tensors(self) -> tuple[Tensor, Tensor] | None:
        """(x, y) as whole tensors for an in-memory, un-augmented base set (the fast path), else None."""
        if hasattr(self.base, "x") and not getattr(self.base, "augment", False):
            return self.base.x[torch.from_numpy(self.indices)], self.y
        return None


def task_view(ds: Dataset, split: CILSplit, tasks: range | list[int]) -> TaskView:
    """The samples of the classes of ``tasks`` (e.g. ``[t]`` or ``range(t + 1)`` for Joint)."""
    labels = dataset_labels(ds)
    if labels.size and labels.max() >= split.num_classes:
        raise KdforgeError(f"data set has label {int(labels.max())} but the split has {split.num_classes} classes")
    wanted = np.zeros(split.num_classes, dtype=bool)
    for t in tasks:
        wanted[split.task_classes(t)] = True
    return TaskView(ds, np.flatnonzero(wanted[labels]), split.remap)


def batches(ds: Dataset, batch_size: int, shuffle: bool, gen: torch.Generator | None = None):
    """Yield (x, y) batches; an in-memory TaskView is sliced directly, anything else goes through a DataLoader."""
    fast = ds.tensors() if isinstance(ds, TaskView) else None
    if fast is not None:
        x, y = fast
        idx = torch.randperm(len(y), generator=gen) if shuffle else torch.arange(len(y))
        for i in range(0, len(idx), batch_size):
            j = idx[i:i + batch_size]
            yield x[j], y[j]
        return
    yield from DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen)
