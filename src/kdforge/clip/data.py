"""Image–text pairs: CSV or folder layouts (as CC3M/CC12M users keep them), and offline pair sets made
from the embedded Fashion-MNIST (caption templates) and generated colour–shape images (compositional
captions).

A pair set yields ``(image, caption_id)``: ids index its ``captions`` table, and with several caption
options per image one is drawn per visit (torch RNG, so seeded loops repeat). Validation and test sets
yield ``(image, class)`` for zero-shot accuracy; their ``prompts`` attribute holds each class's prompts
and ``pair_captions`` one caption per image for retrieval. CSV/folder data have no classes
(``zero_shot`` is False): their validation and test sets are scored by retrieval recall alone.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from kdforge.config import DataConfig
from kdforge.data import DataBundle
from kdforge.data.tensor_dataset import TensorImages
from kdforge.errors import KdforgeError
from kdforge.registry import DATASETS

FASHION_WORDS = ["t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                 "ankle boot"]
TRAIN_TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.", "a product photo of a {}.",
                   "a low resolution photo of a {}.", "a close-up photo of a {}.", "a small {}."]
EVAL_TEMPLATES = ["a black and white photo of the {}.", "a cropped photo of a {}."]
SHAPE_EVAL_TEMPLATES = ["a rendering of the {}.", "a cropped picture of a {}."]
COLOURS = {"red": (230, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (235, 220, 40),
           "purple": (150, 60, 200), "white": (240, 240, 240)}
SHAPES = ["circle", "square", "triangle", "cross"]
POSITIONS = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}
CLIP_MEAN, CLIP_STD = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)


class PairDataset(Dataset):
    """(image, caption id) pairs over a base image set; ``options[i]`` lists caption ids of sample i."""

    def __init__(self, base: Dataset, captions: list[str], options: Tensor, prompts: list[list[str]] | None = None,
                 class_names: list[str] | None = None, zero_shot: bool = True) -> None:
        self.base, self.captions, self.options = base, captions, options.long()
        self.prompts, self.class_names, self.zero_shot = prompts, class_names, zero_shot

    def __len__(self) -> int:
        return len(self.options)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.base[i][0]
        opts = self.options[i]
        j = int(torch.randint(len(opts), ())) if len(opts) > 1 else 0
        return x, opts[j]


class EvalImages(Dataset):
    """(image, class) for zero-shot accuracy, with per-class prompts and one caption per image.

    ``zero_shot`` False: the "classes" are the images' own captions (CSV/folder data), so only
    retrieval is meaningful.
    """

    def __init__(self, base: Dataset, labels: Tensor, prompts: list[list[str]], pair_captions: list[str],
                 class_names: list[str], zero_shot: bool = True) -> None:
        self.base, self.labels = base, labels.long()
        self.prompts, self.pair_captions, self.class_names = prompts, pair_captions, class_names
        self.zero_shot = zero_shot

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.base[i][0], self.labels[i]


def find_attr(ds: Dataset, name: str) -> object:
    """An attribute of a data set, looking through Subset-style wrappers (``.dataset``/``.base``)."""
    while ds is not None:
        if getattr(ds, name, None) is not None:
            return getattr(ds, name)
        ds = getattr(ds, "dataset", None)
    return None


def class_pairs(x_tr: np.ndarray, cap_tr: np.ndarray, lab_tr: np.ndarray, x_te: np.ndarray, cap_te: np.ndarray,
                lab_te: np.ndarray, names: list[str], cfg: DataConfig, mean: Sequence[float], std: Sequence[float],
                flip: bool, train_caps: list[list[str]], eval_caps: list[list[str]],
                prompts: list[list[str]]) -> DataBundle:
    """A pair bundle where captions come from a caption class per image (``cap_*``) and zero-shot
    labels from a label class (``lab_*``): training captions ``train_caps[k]``, held-out wordings
    ``eval_caps[k]`` for the evaluation pair captions, and zero-shot ``prompts`` per label class.
    """
    captions = [c for cs in train_caps for c in cs]
    k = len(train_caps[0])
    if any(len(cs) != k for cs in train_caps):
        raise KdforgeError("every caption class needs the same number of training captions")
    per_class = torch.arange(len(captions)).view(len(train_caps), k)
    n_val = round(len(x_tr) * cfg.val_fraction)
    perm = np.random.default_rng(cfg.split_seed).permutation(len(x_tr))
    va, tr = np.sort(perm[:n_val]), np.sort(perm[n_val:])

    def images(x: np.ndarray, augment: bool) -> TensorImages:
        t = torch.from_numpy(np.ascontiguousarray(x))
        t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
        return TensorImages(t, torch.zeros(len(t)), mean, std, pad_to=cfg.pad_to, resize=cfg.resize,
                            augment=augment, flip=flip)

    g = np.random.default_rng(cfg.split_seed + 1)

    def evalset(x: np.ndarray, cap: np.ndarray, lab: np.ndarray) -> EvalImages:
        pair = [eval_caps[c][g.integers(len(eval_caps[c]))] for c in cap]
        return EvalImages(images(x, False), torch.from_numpy(lab.astype(np.int64)), prompts, pair, names)

    train = PairDataset(images(x_tr[tr], cfg.augment), captions,
                        per_class[torch.from_numpy(cap_tr[tr].astype(np.int64))], prompts, names)
    val = evalset(x_tr[va], cap_tr[va], lab_tr[va]) if n_val else None
    test = evalset(x_te, cap_te, lab_te)
    c, h, _ = train.base.image_shape
    return DataBundle(train, val, test, len(names), c, h, names)


def fill(templates: Sequence[str], names: Sequence[str]) -> list[list[str]]:
    """Templates filled with each name: one caption list per name."""
    return [[t.format(n) for t in templates] for n in names]


def _fashion_arrays() -> tuple[np.ndarray, ...]:
    with resources.as_file(resources.files("kdforge.data") / "assets" / "fashion_mnist_subset.npz") as p:
        d = np.load(p)
        return d["x_train"], d["y_train"], d["x_test"], d["y_test"]


@DATASETS.register("clip_fashion")
def clip_fashion(cfg: DataConfig) -> DataBundle:
    """Fashion-MNIST subset as image–caption pairs: 8 training templates, 2 held-out zero-shot prompts."""
    x_tr, y_tr, x_te, y_te = _fashion_arrays()
    ev = fill(EVAL_TEMPLATES, FASHION_WORDS)
    return class_pairs(x_tr, y_tr, y_tr, x_te, y_te, y_te, FASHION_WORDS, cfg, (0.2860,), (0.3530,), True,
                       fill(TRAIN_TEMPLATES, FASHION_WORDS), ev, ev)


def render_shapes(n: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``n`` RGB images (n, size, size, 3) uint8 of one coloured shape in a quadrant, with noise.

    Returns images, colour index, shape index, position index.
    """
    rng = np.random.default_rng(seed)
    cols, shp, pos = rng.integers(len(COLOURS), size=n), rng.integers(len(SHAPES), size=n), \
        rng.integers(len(POSITIONS), size=n)
    half = size // 2
    yy, xx = np.mgrid[0:half, 0:half].astype(np.float32)
    rgb = np.array(list(COLOURS.values()), dtype=np.float32)
    out = rng.normal(20, 8, size=(n, size, size, 3)).astype(np.float32)
    for i in range(n):
        r = rng.uniform(0.28, 0.42) * half
        cy, cx = half / 2 + rng.uniform(-1.5, 1.5), half / 2 + rng.uniform(-1.5, 1.5)
        dy, dx = yy - cy, xx - cx
        mask = [dy**2 + dx**2 <= r**2, (abs(dy) <= r * 0.85) & (abs(dx) <= r * 0.85),
                (dy <= r * 0.8) & (abs(dx) <= (dy + r) * 0.55), ((abs(dy) <= r / 3) | (abs(dx) <= r / 3))
                & (abs(dy) <= r) & (abs(dx) <= r)][shp[i]]
        qy, qx = list(POSITIONS.values())[pos[i]]
        tile = out[i, qy * half:(qy + 1) * half, qx * half:(qx + 1) * half]
        tile[mask] = rgb[cols[i]] * rng.uniform(0.8, 1.0)
    return np.clip(out, 0, 255).astype(np.uint8), cols, shp, pos


@DATASETS.register("clip_shapes")
def clip_shapes(cfg: DataConfig) -> DataBundle:
    """Generated colour–shape images (4,000 train / 800 test, 28×28 RGB) with compositional captions.

    A caption names colour, shape and position ("a red circle in the top left."); zero-shot classes
    are the 24 colour–shape pairs, with held-out prompt wordings.
    """
    colours, positions = list(COLOURS), list(POSITIONS)
    names = [f"{c} {s}" for c in colours for s in SHAPES]
    placed = [f"{n} in the {p}" for n in names for p in positions]  # caption class = (colour, shape, position)
    arrays = []
    for n, seed in ((4000, 11), (800, 12)):
        x, c, s, p = render_shapes(n, seed)
        label = c * len(SHAPES) + s
        arrays += [x, label * len(positions) + p, label]
    return class_pairs(*arrays, names, cfg, CLIP_MEAN, CLIP_STD, False, fill(TRAIN_TEMPLATES, placed),
                       fill(SHAPE_EVAL_TEMPLATES, placed), fill(SHAPE_EVAL_TEMPLATES, names))


# -- CSV / folder pairs --------------------------------------------------------------------------
IMAGE_KEYS = ("filepath", "image", "file", "path", "url")
CAPTION_KEYS = ("title", "caption", "text")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class FileImages(Dataset):
    """Images read from files (RGB), resized and normalised with the CLIP statistics."""

    def __init__(self, paths: list[Path], size: int, augment: bool) -> None:
        from torchvision import transforms as T

        self.paths = paths
        norm = T.Normalize(CLIP_MEAN, CLIP_STD)
        bicubic = T.InterpolationMode.BICUBIC
        self.tf = T.Compose([T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=bicubic), T.ToTensor(), norm]) \
            if augment else T.Compose([T.Resize(size, interpolation=bicubic), T.CenterCrop(size), T.ToTensor(), norm])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as im:
                return self.tf(im.convert("RGB")), i
        except OSError as e:
            raise KdforgeError(f"cannot read image {str(self.paths[i])!r}: {e}") from None


def read_pairs_csv(path: Path) -> tuple[list[Path], list[str]]:
    """(image paths, captions) of a CSV/TSV with an image column and a caption column."""
    if not path.is_file():
        raise KdforgeError(f"pairs file not found: {str(path)!r} (a .csv or .tsv with image and caption columns)")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        cols = reader.fieldnames or []
        img_key = next((k for k in IMAGE_KEYS if k in cols), None)
        cap_key = next((k for k in CAPTION_KEYS if k in cols), None)
        for key, valid, what in ((img_key, IMAGE_KEYS, "image"), (cap_key, CAPTION_KEYS, "caption")):
            if key is None:
                raise KdforgeError(f"{str(path)!r} has no {what} column (columns: {', '.join(cols) or 'none'}; "
                                   f"valid {what} columns: {', '.join(valid)})")
        rows = [(r[img_key], r[cap_key]) for r in reader if r.get(img_key) and r.get(cap_key)]
    if not rows:
        raise KdforgeError(f"{str(path)!r} holds no rows with both an image and a caption")
    return [path.parent / p for p, _ in rows], [c for _, c in rows]


def read_pairs_folder(root: Path) -> tuple[list[Path], list[str]]:
    """(image paths, captions) of a tree where ``name.jpg`` has its caption in ``name.txt`` (img2dataset)."""
    if not root.is_dir():
        raise KdforgeError(f"pairs folder not found: {str(root)!r}")
    imgs = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.with_suffix(".txt").is_file())
    if not imgs:
        raise KdforgeError(f"no image/caption pairs under {str(root)!r} (expected name.jpg beside name.txt; "
                           f"image types: {', '.join(IMAGE_EXTS)})")
    return imgs, [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in imgs]


def file_pairs(paths: list[Path], captions: list[str], cfg: DataConfig, test: tuple[list[Path], list[str]] | None
               ) -> DataBundle:
    """Train pairs, a validation split held out of them (``val_fraction``) and a test split, for retrieval.

    Without a test file a seeded ``max(val_fraction, 1 %)`` of the pairs is the test split; the
    validation split is then drawn from the rest, so model selection never sees a test pair.
    """
    size = cfg.resize or 224
    if test is None:  # hold out a seeded fraction as the test split
        n_te = max(1, round(len(paths) * max(cfg.val_fraction, 0.01)))
        perm = np.random.default_rng(cfg.split_seed).permutation(len(paths))
        te, tr = perm[:n_te].tolist(), perm[n_te:].tolist()
        test = [paths[i] for i in te], [captions[i] for i in te]
        paths, captions = [paths[i] for i in tr], [captions[i] for i in tr]
    n_va = max(1, round(len(paths) * cfg.val_fraction)) if cfg.val_fraction > 0 else 0
    val = None
    if n_va and len(paths) - n_va >= 1:  # (load_data would otherwise split pairs, not retrieval items)
        perm = np.random.default_rng(cfg.split_seed + 1).permutation(len(paths))
        va, tr = sorted(perm[:n_va].tolist()), sorted(perm[n_va:].tolist())
        val = _retrieval_set([paths[i] for i in va], [captions[i] for i in va], size)
        paths, captions = [paths[i] for i in tr], [captions[i] for i in tr]
    te_paths, te_caps = test
    evalset = _retrieval_set(te_paths, te_caps, size)
    train = PairDataset(FileImages(paths, size, cfg.augment), captions, torch.arange(len(paths)).unsqueeze(1),
                        evalset.prompts, zero_shot=False)
    return DataBundle(train, val, evalset, len(te_caps), 3, size, te_caps)


def _retrieval_set(paths: list[Path], captions: list[str], size: int) -> EvalImages:
    """Images with their captions; each caption is its own "class" (retrieval only)."""
    return EvalImages(FileImages(paths, size, False), torch.arange(len(paths)), [[c] for c in captions], captions,
                      captions, zero_shot=False)


@DATASETS.register("clip_csv")
def clip_csv(cfg: DataConfig) -> DataBundle:
    """Pairs from ``root``: a CSV/TSV file, or a folder with ``train.csv``/``.tsv`` (and ``test.csv``)."""
    root = Path(cfg.root or "")
    if root.is_dir():
        pick = lambda stem: next((root / f"{stem}{e}" for e in (".csv", ".tsv") if (root / f"{stem}{e}").is_file()),
                                 root / f"{stem}.csv")
        test = pick("test")
        return file_pairs(*read_pairs_csv(pick("train")), cfg, read_pairs_csv(test) if test.is_file() else None)
    return file_pairs(*read_pairs_csv(root), cfg, None)


@DATASETS.register("clip_folder")
def clip_folder(cfg: DataConfig) -> DataBundle:
    """Pairs from a folder tree of ``name.jpg`` + ``name.txt`` (``root/train`` and ``root/test`` if present)."""
    root = Path(cfg.root or "")
    if (root / "train").is_dir() and (root / "test").is_dir():
        return file_pairs(*read_pairs_folder(root / "train"), cfg, read_pairs_folder(root / "test"))
    return file_pairs(*read_pairs_folder(root), cfg, None)
