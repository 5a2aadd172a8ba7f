"""Data sets by name, seeded train/val/test splits, and loaders."""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from kdforge.config import DataConfig
from kdforge.data.tensor_dataset import TensorImages
from kdforge.errors import KdforgeError
from kdforge.registry import DATASETS

FASHION_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "ankle boot"]
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
DEBIAN_FASHION = "/usr/share/datasets/fashion-mnist"


@dataclass
class DataBundle:
    """Train / val / test sets of one data set and what models need to know about it."""

    train: Dataset
    val: Dataset | None
    test: Dataset
    num_classes: int
    in_chans: int
    image_size: int
    class_names: list[str]


def load_data(cfg: DataConfig | None = None, **overrides: object) -> DataBundle:
    """Load a data set by name with a seeded validation split: ``load_data(name="digits")``."""
    cfg = (cfg or DataConfig()).model_copy(update=overrides)
    bundle: DataBundle = DATASETS.get(cfg.name)(cfg)
    if cfg.val_fraction > 0 and bundle.val is None:
        bundle.train, bundle.val = split_train_val(bundle.train, cfg.val_fraction, cfg.split_seed)
    if cfg.limit_train is not None and cfg.limit_train < len(bundle.train):
        bundle.train = Subset(bundle.train, range(cfg.limit_train))
    if cfg.views is not None:
        from kdforge.data.replay import replay_views

        bundle.train = replay_views(bundle.train, cfg.views, cfg.view_seed)
    return bundle


class _NoAugment(Dataset):
    """A view of a TensorImages set with augmentation off (for validation)."""

    def __init__(self, base: TensorImages, indices: np.ndarray) -> None:
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        j = int(self.indices[i])
        return self.base.x[j], self.base.y[j]


def split_train_val(train: Dataset, fraction: float, seed: int,
                    eval_view: Dataset | None = None) -> tuple[Dataset, Dataset]:
    """A seeded, stratified-by-shuffle split; the validation view is never augmented.

    ``eval_view``: the same samples as ``train`` with evaluation transforms (for sets that augment inside).
    """
    n = len(train)
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * fraction))
    val_idx, tr_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    if eval_view is not None:
        val: Dataset = Subset(eval_view, val_idx.tolist())
    elif isinstance(train, TensorImages):
        val = _NoAugment(train, val_idx)
    else:
        val = Subset(train, val_idx.tolist())
    return Subset(train, tr_idx.tolist()), val


def make_loader(ds: Dataset, batch_size: int, train: bool, seed: int = 0, rank: int = 0, world: int = 1,
                num_workers: int = 0, drop_last: bool = False) -> DataLoader:
    """A loader whose shuffle order comes from (seed, epoch); shards by rank like DistributedSampler."""
    if train:
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                     drop_last=drop_last)
    else:
        sampler = list(range(rank, len(ds), world))  # type: ignore[assignment]
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=drop_last and train, persistent_workers=num_workers > 0)


def _bundle(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, cfg: DataConfig,
            mean: tuple[float, ...], std: tuple[float, ...], names: list[str], flip: bool = True,
            crop_pad: int = 2) -> DataBundle:
    common = dict(mean=mean, std=std, pad_to=cfg.pad_to, resize=cfg.resize)
    train = TensorImages(_to_nchw(xtr), torch.from_numpy(ytr.astype(np.int64)), augment=cfg.augment,
                         flip=flip, crop_pad=crop_pad, **common)
    test = TensorImages(_to_nchw(xte), torch.from_numpy(yte.astype(np.int64)), **common)
    c, h, _ = train.image_shape
    return DataBundle(train, None, test, len(names), c, h, names)


@DATASETS.register("fashion_mnist_subset")
def fashion_mnist_subset(cfg: DataConfig) -> DataBundle:
    """Embedded stratified Fashion-MNIST subset: 6,000 train / 1,000 test, 28×28 (MIT licence)."""
    with resources.as_file(resources.files("kdforge.data") / "assets" / "fashion_mnist_subset.npz") as p:
        if not p.is_file():
            raise KdforgeError(f"embedded data missing: {str(p)!r}; rebuild it with "
                               "scripts/make_fashion_subset.py (needs apt-get install dataset-fashion-mnist)")
        d = np.load(p)
        arrays = d["x_train"], d["y_train"], d["x_test"], d["y_test"]
    return _bundle(*arrays, cfg, FASHION_MEAN, FASHION_STD, FASHION_CLASSES)


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@DATASETS.register("npz")
def npz(cfg: DataConfig) -> DataBundle:
    """Your own arrays: ``data.root`` is an ``.npz`` file with ``x_train``, ``y_train``, ``x_test``, ``y_test``.

    Optional: ``x_val``/``y_val`` (the validation split; otherwise carved from train by ``data.val_fraction``) and
    ``class_names``. Images (N, H, W), (N, H, W, C) or (N, C, H, W) with C ≤ 4, uint8 0–255 or float in [0, 1];
    labels integers 0..K−1. Normalised by the training images' per-channel mean and std. ``data.augment``:
    random crops (±1 pixel per 14 of side) and horizontal flips; turn it off for images a flip changes (digits,
    text).
    """
    path = Path(cfg.root or "")
    if path.suffix != ".npz" or not path.is_file():
        raise KdforgeError(f"data.root must be an existing .npz file for data.name: npz (got {str(path)!r})")
    try:
        with np.load(path, allow_pickle=False) as d:
            arrays = {k: d[k] for k in d.files}
    except (OSError, ValueError) as e:
        raise KdforgeError(f"{str(path)!r} is not a readable .npz file ({_first(e)})") from None
    missing = [k for k in NPZ_KEYS if k not in arrays]
    if missing or (("x_val" in arrays) != ("y_val" in arrays)):
        raise KdforgeError(f"{path.name} lacks {', '.join(missing) or 'x_val or y_val (give both or neither)'}; "
                           f"an npz data set holds {', '.join(NPZ_KEYS)} (optionally x_val, y_val, class_names); "
                           f"found {', '.join(sorted(arrays)) or 'no arrays'}")
    splits = [s for s in ("train", "val", "test") if f"x_{s}" in arrays]
    xs = {s: _npz_images(arrays[f"x_{s}"], f"x_{s}", path.name) for s in splits}
    ys = {s: _npz_labels(arrays[f"y_{s}"], f"y_{s}", len(xs[s]), path.name) for s in splits}
    shapes = {xs[s].shape[1:] for s in splits}
    if len(shapes) > 1:
        raise KdforgeError(f"{path.name}: the splits' images differ in shape ({', '.join(map(str, shapes))})")
    k = int(max(int(y.max()) for y in ys.values())) + 1
    names = [str(n) for n in arrays["class_names"]] if "class_names" in arrays else [str(i) for i in range(k)]
    if len(names) < k:
        raise KdforgeError(f"{path.name}: class_names has {len(names)} names but the labels go up to {k - 1}")
    x01 = xs["train"].astype(np.float64) / (255.0 if xs["train"].dtype == np.uint8 else 1.0)
    ch = x01 if x01.ndim == 4 else x01[..., None]
    mean = tuple(float(m) for m in ch.mean(axis=(0, 1, 2)))
    std = tuple(max(float(v), 1e-6) for v in ch.std(axis=(0, 1, 2)))
    # crops of ±1 pixel per 14 of side: Fashion-MNIST's ±2 at 28, ±1 on 8x8 digits
    pad = max(1, round(xs["train"].shape[1] / 14))
    bundle = _bundle(xs["train"], ys["train"], xs["test"], ys["test"], cfg, mean, std, names, crop_pad=pad)
    if "val" in xs:  # load_data carves a validation split from train only when the bundle has none
        bundle.val = TensorImages(_to_nchw(xs["val"]), torch.from_numpy(ys["val"]), mean=mean, std=std,
                                  pad_to=cfg.pad_to, resize=cfg.resize)
    return bundle


def _npz_images(x: np.ndarray, key: str, name: str) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) images of one split, checked."""
    if x.ndim == 4 and x.shape[1] <= 4 < x.shape[-1]:
        x = x.transpose(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] > 4) or len(x) == 0:
        raise KdforgeError(f"{name}: {key} has shape {tuple(x.shape)}; expected (N, H, W), (N, H, W, C) or "
                           "(N, C, H, W) with N > 0 and C at most 4")
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise KdforgeError(f"{name}: {key} is {x.dtype}; expected uint8 (0-255) or float (0-1)")
    return x


def _npz_labels(y: np.ndarray, key: str, n: int, name: str) -> np.ndarray:
    """Integer labels 0..K−1 of one split, one per image."""
    if y.ndim != 1 or len(y) != n:
        raise KdforgeError(f"{name}: {key} has shape {tuple(y.shape)}; expected ({n},), one label per image")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and int(y.min()) < 0):
        raise KdforgeError(f"{name}: {key} must hold integer class indices from 0 (got {y.dtype}, "
                           f"min {y.min() if len(y) else 'none'})")
    return y.astype(np.int64)


def _to_nchw(x: np.ndarray) -> torch.Tensor:
    """(N, H, W) or (N, H, W, C) arrays as an (N, C, H, W) tensor."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file; a corrupt file is a KdforgeError naming it."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
        ndim = raw[3]
        dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)
    except (OSError, EOFError, ValueError, IndexError) as e:
        raise KdforgeError(f"corrupt IDX file {str(path)!r} ({type(e).__name__}); "
                           "re-download it or reinstall dataset-fashion-mnist") from None


@DATASETS.register("fashion_mnist")
def fashion_mnist(cfg: DataConfig) -> DataBundle:
    """Full Fashion-MNIST (60k/10k): IDX files in ``root`` (default Debian's), or torchvision's download."""
    root = Path(cfg.root or DEBIAN_FASHION)
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte"]
    found = [next((root / f"{n}{ext}" for ext in (".gz", "") if (root / f"{n}{ext}").is_file()), None)
             for n in names]
    if all(found):
        arrays = [read_idx(p) for p in found]  # type: ignore[arg-type]
        return _bundle(*arrays, cfg, FASHION_MEAN, FASHION_STD, FASHION_CLASSES)
    if cfg.download:
        from torchvision.datasets import FashionMNIST

        tr, te = _fetch("Fashion-MNIST", root, lambda: (FashionMNIST(str(root), train=True, download=True),
                                                        FashionMNIST(str(root), train=False, download=True)))
        return _bundle(tr.data.numpy(), tr.targets.numpy(), te.data.numpy(), te.targets.numpy(), cfg,
                       FASHION_MEAN, FASHION_STD, FASHION_CLASSES)
    raise KdforgeError(f"Fashion-MNIST IDX files not found in {str(root)!r}; run 'apt-get install -y "
                       "dataset-fashion-mnist', or set data.root to a folder with them, or data.download=true")


@DATASETS.register("digits")
def digits(cfg: DataConfig) -> DataBundle:
    """scikit-learn's 8×8 handwritten digits (1,797 images), a seeded 80/20 train/test split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    perm = np.random.default_rng(1234).permutation(len(x))
    n_test = len(x) // 5
    te, tr = perm[:n_test], perm[n_test:]
    cfg = cfg.model_copy(update={"augment": cfg.augment})
    return _bundle(x[tr], d.target[tr], x[te], d.target[te], cfg, (0.305,), (0.376,),
                   [str(i) for i in range(10)], flip=False, crop_pad=1)


def _first(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:160] if text else type(e).__name__


def _fetch(what: str, root: Path, get: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
    """Run a torchvision download; on failure remove the folders it created and fail in one line."""
    made = [p for p in (root, *root.parents) if not p.exists()]
    try:
        return get()
    except Exception as e:  # URLError, socket errors, HTTP errors, corrupt archives: all mean "no data here"
        for p in made:  # deepest first: only the folders this call created
            shutil.rmtree(p, ignore_errors=True)
        raise KdforgeError(f"downloading {what} into {str(root)!r} failed ({_first(e)}); without network, set "
                           "data.root to a folder that already holds it") from None


def _torchvision_cifar(cfg: DataConfig, cls_name: str) -> DataBundle:
    from torchvision import datasets

    cls = getattr(datasets, cls_name)
    root = Path(cfg.root or "data")
    if cfg.download:
        tr, te = _fetch(cls_name, root, lambda: (cls(str(root), train=True, download=True),
                                                 cls(str(root), train=False, download=True)))
    else:
        try:
            tr = cls(str(root), train=True, download=False)
            te = cls(str(root), train=False, download=False)
        except (RuntimeError, OSError, ValueError, EOFError) as e:
            raise KdforgeError(f"{cls_name} not found or corrupt in {str(root)!r} ({_first(e)}); set "
                               "data.download=true (needs network) or data.root to a folder holding it") from None
    mean, std = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)) if cls_name == "CIFAR10" else \
        ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    return _bundle(tr.data, np.array(tr.targets), te.data, np.array(te.targets), cfg, mean, std,
                   list(tr.classes), crop_pad=4)


@DATASETS.register("cifar10")
def cifar10(cfg: DataConfig) -> DataBundle:
    """CIFAR-10 via torchvision (``root``, ``download``); crop-4 + flip augmentation."""
    return _torchvision_cifar(cfg, "CIFAR10")


@DATASETS.register("cifar100")
def cifar100(cfg: DataConfig) -> DataBundle:
    """CIFAR-100 via torchvision (``root``, ``download``); crop-4 + flip augmentation."""
    return _torchvision_cifar(cfg, "CIFAR100")


@DATASETS.register("imagefolder")
def imagefolder(cfg: DataConfig) -> DataBundle:
    """Your own images: ``root/train/<class>/*`` plus ``root/test/<class>/*`` and/or ``root/val/<class>/*``.

    With ``test/``, it is the test split and ``val/`` (if any) the validation split. Without ``test/``, ``val/``
    is the test split (the ImageNet layout, whose labelled ``val`` is its held-out set) and the validation split
    is carved from ``train/`` by ``data.val_fraction``.
    """
    from torchvision import datasets
    from torchvision import transforms as T

    root = Path(cfg.root or "")
    has = {k: (root / k).is_dir() for k in ("train", "val", "test")}
    if not has["train"] or not (has["val"] or has["test"]):
        raise KdforgeError(f"imagefolder needs {str(root / 'train')!r} and {str(root / 'test')!r} (or "
                           f"{str(root / 'val')!r}) with one sub-folder per class (data.root is {str(root)!r})")
    size = cfg.resize or 224
    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm]) \
        if cfg.augment else T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), norm])
    eval_tf = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), norm])
    try:
        tr = datasets.ImageFolder(str(root / "train"), train_tf, loader=_read_image)
        held = {k: datasets.ImageFolder(str(root / k), eval_tf, loader=_read_image)
                for k in ("val", "test") if has[k]}
    except (FileNotFoundError, OSError) as e:
        raise KdforgeError(f"imagefolder {str(root)!r}: {_first(e)}") from None
    for k, ds in held.items():
        _align_classes(tr, ds, root / k)
    test = held.get("test", held.get("val"))
    val = held.get("val") if has["test"] else None
    names = list(tr.classes)
    if val is None and cfg.val_fraction > 0:  # carved from train/, seen with the evaluation transforms
        plain = datasets.ImageFolder(str(root / "train"), eval_tf, loader=_read_image)
        tr, val = split_train_val(tr, cfg.val_fraction, cfg.split_seed, eval_view=plain)
    return DataBundle(tr, val, test, len(names), 3, size, names)


def _align_classes(tr: Any, held: Any, where: Path) -> None:
    """Label a held-out folder by train's class order; a class that train lacks is a one-line error."""
    extra = sorted(set(held.classes) - set(tr.classes))
    if extra:
        raise KdforgeError(f"imagefolder {str(where)!r} has classes that train lacks: {extra[:3]} "
                           f"(their labels would be out of range; valid classes: {tr.classes[:5]}...)")
    if held.class_to_idx != {c: tr.class_to_idx[c] for c in held.classes}:
        # it lacks some classes: relabel by train's class order so that label k means the same class
        held.samples = [(p, tr.class_to_idx[held.classes[y]]) for p, y in held.samples]
        held.targets = [y for _, y in held.samples]
        held.imgs = held.samples


def _read_image(path: str) -> Any:
    """PIL loader whose failure names the file (a corrupt image is a one-line error, not a traceback)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise KdforgeError(f"cannot read image {path!r} ({_first(e)}); remove or replace it") from None


__all__ = ["DATASETS", "DataBundle", "TensorImages", "load_data", "make_loader", "split_train_val"]
