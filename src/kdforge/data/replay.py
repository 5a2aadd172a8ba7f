"""Replayable augmentation: per-view parameters drawn from (seed, sample, view), recorded and re-applied exactly.

A training image's view ``v`` gets its augmentation parameters (crop offset, flip) from a counter-based
generator keyed by ``(view_seed, sample index, view)``: the same key gives the same parameters in every
process, on every machine and in any order, so a teacher's output computed once on a view (the teacher
cache) belongs to exactly the image the student later sees. :class:`ReplayViews` serves the views;
:class:`ViewSampler` picks one of the ``K`` views of each sample per epoch (every view once per ``K`` epochs,
in a per-sample random order), as FKD's stored crops are reused across epochs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler, Sampler, Subset

from kdforge.data.tensor_dataset import TensorImages
from kdforge.errors import KdforgeError

_MASK = (1 << 64) - 1
#: number of recorded parameters per view: crop offset dy, dx and the flip flag
N_PARAMS = 3


class NotReplayable(KdforgeError):
    """A training set whose augmentation cannot be replayed (its random parameters are not recorded)."""


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def draws(*key: int, n: int = 1) -> list[int]:
    """``n`` uniform 64-bit integers from a counter-based generator seeded by the integers ``key``."""
    s = 0x2545F4914F6CDD1D
    for k in key:
        s = _splitmix64(s ^ (int(k) & _MASK))
    return [_splitmix64(s + i) for i in range(n)]


@dataclass(frozen=True)
class ReplaySpec:
    """What a view's parameters mean: a random crop after zero padding by ``crop_pad`` and a random h-flip."""

    crop_pad: int = 2
    flip: bool = True
    augment: bool = True

    def params(self, seed: int, index: int, view: int) -> tuple[int, int, int]:
        """(dy, dx, flip) of view ``view`` of sample ``index``; the un-augmented image is (pad, pad, 0)."""
        p = self.crop_pad
        if not self.augment:
            return p, p, 0
        a, b, c = draws(seed, index, view, n=3)
        dy, dx = (a % (2 * p + 1), b % (2 * p + 1)) if p > 0 else (0, 0)
        return dy, dx, int(self.flip and (c >> 11) / 2**53 < 0.5)

    def apply(self, x: Tensor, params: tuple[int, int, int] | Tensor) -> Tensor:
        """The view of image ``x`` (C, H, W) that ``params`` describe; exact, no interpolation."""
        dy, dx, flip = (int(v) for v in params)
        p = self.crop_pad
        if p > 0 and (dy != p or dx != p):
            h, w = x.shape[-2:]
            x = F.pad(x, (p, p, p, p))[:, dy:dy + h, dx:dx + w]
        if flip:
            x = x.flip(-1)
        return x


def view_of(seed: int, epoch: int, index: int, views: int) -> int:
    """The view sample ``index`` trains on in ``epoch``: each view once per ``views`` epochs, order per sample."""
    if views == 1:
        return 0
    cycle, pos = divmod(epoch, views)
    order = list(range(views))
    r = draws(seed, index, cycle, 0x5EED, n=views)
    for i in range(views - 1, 0, -1):  # Fisher-Yates
        j = r[i] % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order[pos]


class ViewSampler(Sampler[int]):
    """A shuffling DistributedSampler over the samples whose items are view codes ``view * N + index``."""

    def __init__(self, n: int, views: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.views, self.seed, self.epoch = n, views, seed, 0
        self.base = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,  # type: ignore[arg-type]
                                       seed=seed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.base.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        for i in self.base:
            yield view_of(self.seed, self.epoch, i, self.views) * self.n + i

    def __len__(self) -> int:
        return len(self.base)


def _unwrap(ds: Dataset) -> tuple[TensorImages, np.ndarray]:
    """The in-memory image set under a chain of Subsets and the sample positions it maps to."""
    idx: np.ndarray | None = None
    while isinstance(ds, Subset):
        sub = np.asarray(ds.indices, dtype=np.int64)
        idx = sub if idx is None else sub[idx]
        ds = ds.dataset
    if isinstance(ds, ReplayViews):
        return ds.base, ds.indices if idx is None else ds.indices[idx]
    if not isinstance(ds, TensorImages):
        raise NotReplayable(_why_not(ds))
    return ds, np.arange(len(ds), dtype=np.int64) if idx is None else idx


def _why_not(ds: Dataset) -> str:
    tf = getattr(ds, "transform", None)
    names = [type(t).__name__ for t in getattr(tf, "transforms", [tf] if tf is not None else [])]
    rand = [n for n in names if n.startswith("Random") or n in ("ColorJitter", "RandAugment", "AutoAugment",
                                                                 "TrivialAugmentWide", "AugMix", "GaussianBlur")]
    what = f"its transform {', '.join(rand)} draws parameters it does not record" if rand else \
        f"{type(ds).__name__} is not an in-memory image set (TensorImages)"
    return (f"the training set's augmentation cannot be replayed: {what}; use a data set kdforge holds in memory "
            "(fashion_mnist_subset, fashion_mnist, digits, cifar10/100) with data.views: K")


class ReplayViews(Dataset):
    """``K`` recorded views of every training sample; item ``view * N + index`` is view ``view`` of ``index``.

    Items are ``(x, y)``, or with ``fields`` dicts ``{"x", "y", "index", "view"}`` (what a teacher cache
    looks its logits up by). A plain index ``i < N`` is view 0.
    """

    def __init__(self, base: TensorImages, indices: np.ndarray, spec: ReplaySpec, views: int, view_seed: int = 0,
                 fields: bool = False) -> None:
        if views < 1:
            raise KdforgeError(f"data.views must be at least 1, got {views}")
        self.base, self.indices, self.spec = base, np.asarray(indices, dtype=np.int64), spec
        self.views = views if spec.augment else 1  # without augmentation every view is the image itself
        self.view_seed, self.fields = view_seed, fields

    def __len__(self) -> int:
        return len(self.indices)

    def decode(self, code: int) -> tuple[int, int]:
        """(sample index, view) of an item code."""
        view, index = divmod(int(code), len(self.indices))
        if view >= self.views:
            raise IndexError(f"view {view} of {self.views}")
        return index, view

    def params(self, index: int, view: int) -> tuple[int, int, int]:
        """The recorded augmentation parameters of one view."""
        return self.spec.params(self.view_seed, index, view)

    def image(self, index: int, view: int) -> Tensor:
        """View ``view`` of sample ``index`` (the exact tensor a batch holds)."""
        return self.spec.apply(self.base.x[int(self.indices[index])], self.params(index, view))

    def __getitem__(self, code: int) -> Any:
        index, view = self.decode(code)
        x, y = self.image(index, view), self.base.y[int(self.indices[index])]
        if self.fields:
            return {"x": x, "y": y, "index": index, "view": view}
        return x, y

    def with_fields(self) -> ReplayViews:
        """The same views whose items are dicts carrying the sample index and view."""
        return ReplayViews(self.base, self.indices, self.spec, self.views, self.view_seed, fields=True)

    def train_sampler(self, seed: int, rank: int, world: int) -> ViewSampler:
        """The engine's training sampler for this set: one view per sample per epoch (seeded by the run's seed)."""
        return ViewSampler(len(self.indices), self.views, seed, rank, world)

    def params_table(self) -> Tensor:
        """Every view's parameters: (N, K, 3) int16, the record a cache stores beside the teacher's outputs."""
        return torch.tensor([[self.params(i, v) for v in range(self.views)] for i in range(len(self.indices))],
                            dtype=torch.int16).reshape(len(self.indices), self.views, N_PARAMS)

    def identity(self) -> dict[str, Any]:
        """What the views depend on besides the pixels: augmentation kind, views, seed."""
        return {"replay": asdict(self.spec), "views": self.views, "view_seed": self.view_seed,
                "params_version": 1}

    def fingerprint(self) -> str:
        """sha256 of the training images (after normalisation and padding) and labels, in sample order."""
        h = hashlib.sha256()
        idx = torch.from_numpy(self.indices)
        h.update(str(tuple(self.base.x.shape[1:])).encode())
        h.update(self.base.x.index_select(0, idx).contiguous().numpy().tobytes())
        h.update(self.base.y.index_select(0, idx).contiguous().numpy().tobytes())
        return h.hexdigest()


def replay_views(train: Dataset, views: int | None = None, view_seed: int = 0) -> ReplayViews:
    """The training set as recorded views: ``views`` per sample (``None``: 1, which needs augmentation off).

    Raises :class:`NotReplayable` when the set's augmentation cannot be replayed: a torchvision transform with
    random parameters, or live random augmentation (``data.augment`` without ``data.views``).
    """
    if isinstance(train, ReplayViews):
        return train
    base, idx = _unwrap(train)
    if views is None:
        if base.augment:
            raise NotReplayable("the training set is augmented live (data.augment: true draws crops and flips "
                                "from the global RNG and records nothing): set data.views: K for K recorded "
                                "views per sample")
        views = 1
    return ReplayViews(base, idx, ReplaySpec(base.crop_pad, base.flip, base.augment), views, view_seed)
