"""Two-modality ReID data: the training pair set and its P×K sampler, evaluation sets, loaders of SYSU-MM01, RegDB
and LLCM in their published folder layouts, and kdforge's offline synthetic pedestrians.

A training item is a (visible, infrared) pair addressed by a code ``v · n_ir + i``; the sampler emits
P identities × K pairs per batch, so both modalities carry the same identity order in contiguous runs.
An evaluation item is ``(image, identity)``; the set carries ``pids``, ``cams``, ``modal`` (0 visible,
1 infrared) and the ``protocol`` that scores it.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from kdforge.config import DataConfig
from kdforge.data import DataBundle
from kdforge.errors import KdforgeError
from kdforge.registry import DATASETS

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VISIBLE, INFRARED = 0, 1


# -- image sources -----------------------------------------------------------------------------------
class Images:
    """Images by index as normalised float tensors [3, H, W]: in memory (uint8 N×3×H×W) or files resized to H×W."""

    def __init__(self, size: tuple[int, int], array: Tensor | None = None, paths: Sequence[Path] | None = None
                 ) -> None:
        self.size, self.array, self.paths = size, array, list(paths) if paths is not None else None
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.array) if self.array is not None else len(self.paths or [])

    def raw(self, i: int) -> Tensor:
        """Image ``i`` in [0, 1], [3, H, W]."""
        if self.array is not None:
            return self.array[i].float() / 255.0
        from PIL import Image

        p = self.paths[i]  # type: ignore[index]
        try:
            with Image.open(p) as im:
                im = im.convert("RGB").resize((self.size[1], self.size[0]), Image.BILINEAR)
                return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255.0
        except OSError as e:
            raise KdforgeError(f"cannot read image {str(p)!r}: {e}") from None

    def normalise(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def __getitem__(self, i: int) -> Tensor:
        return self.normalise(self.raw(i))


def augment(x: Tensor, pad: int, erase: tuple[float, float], mean: Tensor) -> Tensor:
    """The training augmentation of both modalities on a [0, 1] image: pad-and-crop, flip, RandomGrayscale(0.5),
    RandomErasing(p 0.5, area ``erase``, aspect ≥ 0.3, ImageNet-mean fill); torch RNG, so seeded loops repeat."""
    h, w = x.shape[-2:]
    if pad:
        xp = F.pad(x, (pad, pad, pad, pad))
        dy, dx = torch.randint(0, 2 * pad + 1, (2,)).tolist()
        x = xp[:, dy:dy + h, dx:dx + w]
    if torch.rand(()) < 0.5:
        x = x.flip(-1)
    if torch.rand(()) < 0.5:
        x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).expand(3, h, w)
    x = x.clone()
    if torch.rand(()) < 0.5:
        for _ in range(100):
            area = h * w * float(torch.empty(()).uniform_(*erase))
            ratio = math.exp(float(torch.empty(()).uniform_(math.log(0.3), math.log(1 / 0.3))))
            eh, ew = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < eh < h and 0 < ew < w:
                y0, x0 = int(torch.randint(0, h - eh + 1, ())), int(torch.randint(0, w - ew + 1, ()))
                x[:, y0:y0 + eh, x0:x0 + ew] = mean
                break
    return x


class CrossModalTrain(Dataset):
    """(x_V, x_I, y_V, y_I) pairs addressed by ``code = v · n_ir + i``; labels re-indexed to 0..classes−1."""

    def __init__(self, vis: Images, ir: Images, vis_pids: np.ndarray, ir_pids: np.ndarray, augment: bool = True,
                 pad: int = 10, erase: tuple[float, float] = (0.02, 0.4)) -> None:
        ids = np.unique(np.concatenate([vis_pids, ir_pids]))
        remap = {int(p): k for k, p in enumerate(ids)}
        self.vis, self.ir = vis, ir
        self.vis_labels = np.array([remap[int(p)] for p in vis_pids], dtype=np.int64)
        self.ir_labels = np.array([remap[int(p)] for p in ir_pids], dtype=np.int64)
        self.num_classes = len(ids)
        self.augment, self.pad, self.erase = augment, pad, erase
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.vis) * len(self.ir)

    def _image(self, src: Images, i: int) -> Tensor:
        x = src.raw(i)
        if self.augment:
            x = augment(x, self.pad, self.erase, self.mean)
        return src.normalise(x)

    def __getitem__(self, code: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        v, i = divmod(int(code), len(self.ir))
        return (self._image(self.vis, v), self._image(self.ir, i), torch.tensor(self.vis_labels[v]),
                torch.tensor(self.ir_labels[i]))


class CrossModalPKSampler(Sampler[int]):
    """Identity-balanced cross-modal sampler: per batch P distinct identities × K (visible, infrared) pairs.

    Images are drawn with replacement; one epoch is ``max(#V, #I) // (P·K)`` batches (at least one; at most
    ``limit // (P·K)`` with a limit); batch b goes to process ``b % world``. Identities come in contiguous runs of K.
    """

    def __init__(self, vis_labels: np.ndarray, ir_labels: np.ndarray, p: int, k: int, seed: int = 0,
                 rank: int = 0, world: int = 1, limit: int | None = None) -> None:
        self.n_ir = len(ir_labels)
        self.p, self.k, self.seed, self.rank, self.world = p, k, seed, rank, world
        ids = np.intersect1d(np.unique(vis_labels), np.unique(ir_labels))
        if len(ids) < p:
            raise KdforgeError(f"the P×K sampler needs {p} identities seen in both modalities per batch; the "
                               f"training set has {len(ids)} (lower method.ids_per_batch)")
        self.ids = ids
        self.vis_of = {int(c): np.flatnonzero(vis_labels == c) for c in ids}
        self.ir_of = {int(c): np.flatnonzero(ir_labels == c) for c in ids}
        n = max(len(vis_labels), len(ir_labels)) if limit is None else min(limit, max(len(vis_labels),
                                                                                       len(ir_labels)))
        self.batches = max(1, n // (p * k)) // world or 1
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches * self.p * self.k

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        codes = []
        for b in range(self.batches * self.world):
            chosen = rng.choice(self.ids, size=self.p, replace=False)
            batch = []
            for c in chosen.tolist():
                v = rng.choice(self.vis_of[c], size=self.k, replace=True)
                i = rng.choice(self.ir_of[c], size=self.k, replace=True)
                batch += (v * self.n_ir + i).tolist()
            if b % self.world == self.rank:
                codes += batch
        return iter(codes)


class ReIDEvalSet(Dataset):
    """Query and gallery images of both modalities: items ``(image, identity)``, metadata ``pids/cams/modal``."""

    def __init__(self, images: Images, pids: np.ndarray, cams: np.ndarray, modal: np.ndarray, protocol: str,
                 trials: int = 10) -> None:
        self.images, self.protocol, self.trials = images, protocol, trials
        self.pids, self.cams, self.modal = pids.astype(np.int64), cams.astype(np.int64), modal.astype(np.int64)

    def __len__(self) -> int:
        return len(self.pids)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[i], torch.tensor(self.pids[i])


def _split_val(pids: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training identities split into (train ids, validation ids): ``fraction`` of the identities, seeded."""
    ids = np.unique(pids)
    n_val = round(len(ids) * fraction) if fraction > 0 else 0
    if n_val and len(ids) - n_val < 2:
        raise KdforgeError(f"data.val_fraction {fraction} leaves {len(ids) - n_val} training identities (need 2)")
    perm = np.random.default_rng(seed).permutation(ids)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def make_bundle(images: Images, pids: np.ndarray, cams: np.ndarray, modal: np.ndarray, train_mask: np.ndarray,
                test: ReIDEvalSet, cfg: DataConfig, pad: int, erase: tuple[float, float], val_protocol: str,
                test_images: Images | None = None) -> DataBundle:
    """Train pairs + a validation set of held-out training identities (never the test gallery) + the test set."""
    tr_ids, va_ids = _split_val(pids[train_mask], cfg.val_fraction, cfg.split_seed)
    use = train_mask & np.isin(pids, tr_ids)
    v_idx, i_idx = np.flatnonzero(use & (modal == VISIBLE)), np.flatnonzero(use & (modal == INFRARED))
    train = CrossModalTrain(_subset(images, v_idx), _subset(images, i_idx), pids[v_idx], pids[i_idx], cfg.augment,
                            pad, erase)
    val = None
    if len(va_ids):
        va = np.flatnonzero(train_mask & np.isin(pids, va_ids))
        val = ReIDEvalSet(_subset(images, va), pids[va], cams[va], modal[va], val_protocol)
    h = images.size[0]
    return DataBundle(train, val, test, train.num_classes, 3, h, [str(int(p)) for p in tr_ids])


def _subset(images: Images, idx: np.ndarray) -> Images:
    if images.array is not None:
        return Images(images.size, array=images.array[torch.from_numpy(idx)])
    return Images(images.size, paths=[images.paths[i] for i in idx])  # type: ignore[index]


def _size(cfg: DataConfig, default_h: int) -> tuple[int, int]:
    """Image size H×W = (resize or default) × half of it (the 2:1 pedestrian aspect)."""
    h = cfg.resize or default_h
    return h, max(h // 2, 1)


# -- synthetic pedestrians --------------------------------------------------------------------------
SYN_VIS_CAMS, SYN_IR_CAMS = (1, 2, 4, 5), (3, 6)
SYN_IDS, SYN_TEST_IDS = 100, 20
# part labels of the layout map
BG, SKIN, HAIR, SHIRT, PATTERN, TROUSERS, SHOES, BAG = range(8)


def _identity_attrs(rng: np.random.Generator) -> dict[str, object]:
    """What makes one synthetic pedestrian: body shape, clothing geometry, colours (visible), temperatures (IR)."""
    return {"height": rng.uniform(0.74, 0.94), "width": rng.uniform(0.26, 0.46), "head": rng.uniform(0.075, 0.1),
            "hair_long": rng.random() < 0.4, "sleeves": int(rng.integers(3)), "shorts": rng.random() < 0.35,
            "pattern": int(rng.integers(4)), "stripes": int(rng.integers(2, 5)), "split": rng.uniform(0.3, 0.7),
            "bag": int(rng.integers(3)), "torso": rng.uniform(0.36, 0.48),
            "col": {SKIN: rng.uniform([150, 100, 70], [240, 200, 170]), HAIR: rng.uniform(10, 120, 3),
                    SHIRT: rng.uniform(0, 255, 3), PATTERN: rng.uniform(0, 255, 3), TROUSERS: rng.uniform(0, 255, 3),
                    SHOES: rng.uniform(0, 90, 3), BAG: rng.uniform(0, 255, 3)},
            "skin_temp": rng.uniform(0.85, 1.0)}


def _thermal(a: dict[str, object], rng: np.random.Generator, coupling: float) -> np.ndarray:
    """Per-part infrared brightness of one identity: ``coupling`` of it from the fabric's visible luminance
    (dark cloth reads warm), the rest independent of colour; skin is warm. Index = part label."""
    col = a["col"]
    t = np.zeros(8)
    for k in (HAIR, SHIRT, PATTERN, TROUSERS, SHOES, BAG):
        lum = float(np.dot(col[k], (0.299, 0.587, 0.114))) / 255.0  # type: ignore[index]
        t[k] = coupling * (0.9 - 0.75 * lum) + (1 - coupling) * rng.uniform(0.1, 0.8)
    t[SKIN] = a["skin_temp"]
    return t


def _layout(a: dict[str, object], h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """The part-label map of one image of identity ``a`` with pose jitter (offset, scale, stride)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    s = rng.uniform(0.9, 1.05)
    H = a["height"] * h * s
    top = (h - H) / 2 + rng.uniform(-0.04, 0.04) * h
    cx = w / 2 + rng.uniform(-0.08, 0.08) * w
    bw = a["width"] * w * s
    lab = np.zeros((h, w), np.int64)
    head_r = a["head"] * h * s
    hy = top + head_r
    neck = hy + head_r
    torso_end = neck + a["torso"] * H
    legs_end = top + H - 0.03 * h
    # legs with a stride
    gap, stride = bw * 0.08, rng.uniform(-0.12, 0.12) * bw
    for side in (-1, 1):
        lx = cx + side * (gap + bw * 0.2) + side * stride * (yy - torso_end) / max(H, 1)
        leg = (yy >= torso_end) & (yy < legs_end) & (np.abs(xx - lx) <= bw * 0.2)
        lab[leg] = TROUSERS
        if a["shorts"]:
            lab[leg & (yy > torso_end + 0.45 * (legs_end - torso_end))] = SKIN
        lab[(yy >= legs_end) & (yy < legs_end + 0.03 * h) & (np.abs(xx - lx) <= bw * 0.24)] = SHOES
    # arms
    arm_len = (torso_end - neck) * 1.05
    for side in (-1, 1):
        ax = cx + side * (bw / 2 + bw * 0.09)
        arm = (yy >= neck + 1) & (yy < neck + arm_len) & (np.abs(xx - ax) <= bw * 0.09)
        lab[arm] = SKIN
        sleeve_end = neck + arm_len * (0.0, 0.45, 1.0)[a["sleeves"]]
        lab[arm & (yy < sleeve_end)] = SHIRT
    # torso and pattern
    torso = (yy >= neck) & (yy < torso_end) & (np.abs(xx - cx) <= bw / 2)
    lab[torso] = SHIRT
    rel = (yy - neck) / max(torso_end - neck, 1)
    if a["pattern"] == 1:
        lab[torso & (np.floor(rel * a["stripes"] * 2) % 2 == 1)] = PATTERN
    elif a["pattern"] == 2:
        lab[torso & (rel > a["split"])] = PATTERN
    elif a["pattern"] == 3:
        lab[torso & (np.abs(xx - cx) <= bw * 0.18) & (rel > 0.2) & (rel < 0.5)] = PATTERN
    # bag on one side
    if a["bag"]:
        side = -1 if a["bag"] == 1 else 1
        bx = cx + side * (bw / 2 + bw * 0.2)
        lab[(yy >= neck + 0.2 * (torso_end - neck)) & (yy < torso_end + 0.1 * H) & (np.abs(xx - bx) <= bw * 0.14)] = BAG
    # head and hair
    head = (yy - hy) ** 2 + ((xx - cx) * 1.15) ** 2 <= head_r ** 2
    lab[head] = SKIN
    lab[head & (yy < hy - head_r * 0.25)] = HAIR
    if a["hair_long"]:
        lab[(yy >= hy - head_r * 0.25) & (yy < neck + head_r * 1.2) & (np.abs(xx - cx) <= head_r * 1.05)
            & (np.abs(xx - cx) >= head_r * 0.55)] = HAIR
    return lab


def _box_blur(img: np.ndarray) -> np.ndarray:
    p = np.pad(img, ((1, 1), (1, 1)) + ((0, 0),) * (img.ndim - 2), mode="edge")
    return sum(p[dy:dy + img.shape[0], dx:dx + img.shape[1]] for dy in range(3) for dx in range(3)) / 9.0


@functools.lru_cache(maxsize=2)
def render_pedestrians(n_ids: int, seed: int, per_cam: int = 5, size: tuple[int, int] = (64, 32),
                       coupling: float = 0.8) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic pedestrians: ``per_cam`` images per (identity, camera); visible cams 1, 2, 4, 5 (RGB), infrared
    cams 3, 6 (a thermal-like rendering: per-part temperatures, a random monotone response curve, blur,
    sensor noise, grey replicated to 3 channels). Shape survives across modalities, colour does not;
    ``coupling`` of each cloth's temperature comes from its visible luminance (0: colour-independent temperatures).

    Returns images (N, 3, H, W) uint8, identities, cameras, modalities.
    """
    h, w = size
    rng = np.random.default_rng(seed)
    attrs = [_identity_attrs(rng) for _ in range(n_ids)]
    thermal = [_thermal(a, rng, coupling) for a in attrs]
    cam_bg = {c: rng.uniform(40, 200, 3) for c in SYN_VIS_CAMS}
    cam_tint = {c: rng.uniform(0.8, 1.2, 3) for c in SYN_VIS_CAMS}
    cam_bg_temp = {c: rng.uniform(0.1, 0.4) for c in SYN_IR_CAMS}
    imgs, pids, cams, modal = [], [], [], []
    yy = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    for pid, a in enumerate(attrs):
        for cam in (*SYN_VIS_CAMS, *SYN_IR_CAMS):
            for _ in range(per_cam):
                lab = _layout(a, h, w, rng)
                if cam in SYN_VIS_CAMS:
                    bg = cam_bg[cam] * (0.8 + 0.4 * yy) + rng.normal(0, 12, (h, w, 3))
                    for _k in range(2):  # background clutter
                        y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 6)
                        bg[y0:y0 + rng.integers(4, 12), x0:x0 + rng.integers(3, 8)] = rng.uniform(0, 255, 3)
                    colours = np.stack([np.zeros(3)] + [a["col"][k] for k in range(1, 8)])  # type: ignore[index]
                    img = np.where(lab[..., None] == BG, bg, colours[lab])
                    img = img * cam_tint[cam] * rng.uniform(0.6, 1.3) + rng.normal(0, 6, (h, w, 3))
                    img = _box_blur(img) * 0.4 + img * 0.6
                    m = VISIBLE
                else:
                    temps = thermal[pid]
                    t = np.where(lab == BG, cam_bg_temp[cam] + rng.normal(0, 0.05, (h, w)), temps[lab])
                    t = _box_blur(_box_blur(t)) + rng.normal(0, 0.03, (h, w))
                    gamma = rng.uniform(0.6, 1.6)
                    lo, hi = rng.uniform(0, 30), rng.uniform(200, 255)
                    g = lo + (hi - lo) * np.clip(t, 0, 1) ** gamma
                    img = np.repeat(g[..., None], 3, axis=2)
                    m = INFRARED
                imgs.append(np.clip(img, 0, 255).astype(np.uint8).transpose(2, 0, 1))
                pids.append(pid)
                cams.append(cam)
                modal.append(m)
    return np.stack(imgs), np.array(pids), np.array(cams), np.array(modal)


@DATASETS.register("reid_synthetic")
def reid_synthetic(cfg: DataConfig) -> DataBundle:
    """Offline synthetic two-modality pedestrians: 100 identities (80 train, 20 test), 4 visible + 2 infrared cams.

    5 images per (identity, camera), 64×32 (``data.resize`` sets the height); validation identities are
    ``val_fraction`` of the 80; test is SYSU-like (IR queries, one visible image per identity and camera
    per trial, 10 trials, cam-3 queries skip cam-2 gallery images). The infrared brightness of the clothes
    follows their visible luminance (80 %), so both modalities share shape and a brightness pattern.
    """
    h, w = _size(cfg, 64)
    x, pids, cams, modal = render_pedestrians(SYN_IDS, 20260 + cfg.split_seed, 5, (64, 32))
    t = torch.from_numpy(x)
    if (h, w) != (64, 32):
        t = F.interpolate(t.float(), size=(h, w), mode="bilinear", align_corners=False).round().clamp(0, 255).byte()
    images = Images((h, w), array=t)
    train_mask = pids < SYN_IDS - SYN_TEST_IDS
    te = np.flatnonzero(~train_mask)
    test = ReIDEvalSet(_subset(images, te), pids[te], cams[te], modal[te], "synthetic")
    return make_bundle(images, pids, cams, modal, train_mask, test, cfg, max(1, round(2 * h / 64)), (0.02, 0.4),
                       "synthetic")


# -- published data sets ----------------------------------------------------------------------------
IMG_EXTS = (".jpg", ".jpeg", ".png", ".bmp")


def _root(cfg: DataConfig, what: str, layout: str) -> Path:
    root = Path(cfg.root or "")
    if not cfg.root or not root.is_dir():
        raise KdforgeError(f"{what} not found at {str(cfg.root)!r}: set data.root to the folder that holds {layout}")
    return root


def _read_ids(path: Path) -> list[int]:
    if not path.is_file():
        raise KdforgeError(f"SYSU-MM01 id file missing: {str(path)!r} (the release's exp/ folder)")
    return [int(s) for s in re.split(r"[,\s]+", path.read_text().strip()) if s]


@DATASETS.register("sysu_mm01")
def sysu_mm01(cfg: DataConfig) -> DataBundle:
    """SYSU-MM01 in its release layout: ``root/cam{1..6}/{id:04d}/*.jpg`` and ``root/exp/{train,val,test}_id.txt``.

    Train = train + val identities (395), of which ``val_fraction`` are held out for model selection;
    test = the 96 test identities (IR cams 3, 6 as queries; visible cams 1, 2, 4, 5 as gallery);
    all/indoor search, single- and multi-shot, 10 trials. Images resized to 384×192 (``data.resize``: H).
    """
    root = _root(cfg, "SYSU-MM01", "cam1..cam6 and exp/ (the SYSU-MM01 release)")
    train_ids = _read_ids(root / "exp" / "train_id.txt") + _read_ids(root / "exp" / "val_id.txt")
    test_ids = _read_ids(root / "exp" / "test_id.txt")
    paths, pids, cams = [], [], []
    for cam in range(1, 7):
        for pid in (*train_ids, *test_ids):
            d = root / f"cam{cam}" / f"{pid:04d}"
            if d.is_dir():
                for p in sorted(d.iterdir()):
                    if p.suffix.lower() in IMG_EXTS:
                        paths.append(p)
                        pids.append(pid)
                        cams.append(cam)
    if not paths:
        raise KdforgeError(f"no SYSU-MM01 images under {str(root)!r} (expected cam1..cam6/<id:04d>/*.jpg)")
    pids_a, cams_a = np.array(pids), np.array(cams)
    modal = np.where(np.isin(cams_a, (3, 6)), INFRARED, VISIBLE)
    images = Images(_size(cfg, 384), paths=paths)
    te = np.flatnonzero(np.isin(pids_a, test_ids))
    test = ReIDEvalSet(_subset(images, te), pids_a[te], cams_a[te], modal[te], "sysu")
    return make_bundle(images, pids_a, cams_a, modal, np.isin(pids_a, train_ids), test, cfg, 10, (0.2, 0.8), "sysu")


def _read_list(root: Path, rel: str, what: str) -> tuple[list[Path], list[int]]:
    p = root / rel
    if not p.is_file():
        raise KdforgeError(f"{what} list missing: {str(p)!r}")
    paths, labels = [], []
    for line in p.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2:
            paths.append(root / parts[0])
            labels.append(int(parts[1]))
    return paths, labels


@DATASETS.register("regdb")
def regdb(cfg: DataConfig) -> DataBundle:
    """RegDB: ``root/idx/{train,test}_{visible,thermal}_{trial}.txt`` (``path label`` lines), trial = split_seed (1–10).

    Test: every image of the 206 test identities, visible→thermal and thermal→visible (one camera each).
    """
    root = _root(cfg, "RegDB", "idx/ and the Visible/ Thermal/ image folders")
    trial = cfg.split_seed
    if not 1 <= trial <= 10:
        raise KdforgeError(f"RegDB trial comes from data.split_seed: {trial} (valid: 1..10)")
    lists = {f"{s}_{m}": _read_list(root, f"idx/{s}_{m}_{trial}.txt", "RegDB")
             for s in ("train", "test") for m in ("visible", "thermal")}
    paths, pids, modal, is_train = [], [], [], []
    for key, (ps, ls) in lists.items():
        paths += ps
        pids += ls
        modal += [INFRARED if key.endswith("thermal") else VISIBLE] * len(ps)
        is_train += [key.startswith("train")] * len(ps)
    pids_a, modal_a, train_mask = np.array(pids), np.array(modal), np.array(is_train)
    cams_a = np.where(modal_a == VISIBLE, 1, 2)
    images = Images(_size(cfg, 288), paths=paths)
    te = np.flatnonzero(~train_mask)
    test = ReIDEvalSet(_subset(images, te), pids_a[te], cams_a[te], modal_a[te], "regdb")
    return make_bundle(images, pids_a, cams_a, modal_a, train_mask, test, cfg, 10, (0.02, 0.4), "regdb")


def _llcm_cam(path: Path) -> int:
    m = re.search(r"c0*(\d+)", path.name) or re.search(r"cam0*(\d+)", str(path))
    if m is None:
        raise KdforgeError(f"cannot read the LLCM camera from {str(path)!r} (expected c<NN> in the file name)")
    return int(m.group(1))


@DATASETS.register("llcm")
def llcm(cfg: DataConfig) -> DataBundle:
    """LLCM: ``root/idx/{train_vis,train_nir,test_vis,test_nir}.txt`` (``path label`` lines, camera ``c<NN>`` in the
    file name). Test: IR→VIS and VIS→IR, single-shot gallery, 10 trials, same-identity-same-camera removed."""
    root = _root(cfg, "LLCM", "idx/ and the image folders of the LLCM release")
    paths, pids, modal, is_train = [], [], [], []
    for split in ("train", "test"):
        for m, tag in ((VISIBLE, "vis"), (INFRARED, "nir")):
            ps, ls = _read_list(root, f"idx/{split}_{tag}.txt", "LLCM")
            paths += ps
            pids += ls
            modal += [m] * len(ps)
            is_train += [split == "train"] * len(ps)
    pids_a, modal_a, train_mask = np.array(pids), np.array(modal), np.array(is_train)
    cams_a = np.array([_llcm_cam(p) for p in paths])
    images = Images(_size(cfg, 384), paths=paths)
    te = np.flatnonzero(~train_mask)
    test = ReIDEvalSet(_subset(images, te), pids_a[te], cams_a[te], modal_a[te], "llcm")
    return make_bundle(images, pids_a, cams_a, modal_a, train_mask, test, cfg, 10, (0.02, 0.4), "llcm")
