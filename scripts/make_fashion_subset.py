"""Build the embedded Fashion-MNIST subset from Debian's dataset-fashion-mnist IDX files.

Run once (``apt-get install -y dataset-fashion-mnist`` first)::

    python scripts/make_fashion_subset.py [--src /usr/share/datasets/fashion-mnist] [--train 6000 --test 1000]

Writes ``src/kdforge/data/assets/fashion_mnist_subset.npz``: a stratified, seeded subset
(equal count per class) of the official train and test splits, uint8 images and labels.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np


def read_idx(path: Path) -> np.ndarray:
    """Read one gzipped IDX file into a numpy array."""
    raw = gzip.open(path).read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def stratified(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of n samples with the same count for every class, sorted."""
    classes = np.unique(labels)
    per = n // len(classes)
    idx = [rng.choice(np.flatnonzero(labels == c), per, replace=False) for c in classes]
    return np.sort(np.concatenate(idx))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--train", type=int, default=6000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1]
                                         / "src/kdforge/data/assets/fashion_mnist_subset.npz"))
    a = ap.parse_args()
    src = Path(a.src)
    rng = np.random.default_rng(a.seed)
    xtr, ytr = read_idx(src / "train-images-idx3-ubyte.gz"), read_idx(src / "train-labels-idx1-ubyte.gz")
    xte, yte = read_idx(src / "t10k-images-idx3-ubyte.gz"), read_idx(src / "t10k-labels-idx1-ubyte.gz")
    itr, ite = stratified(ytr, a.train, rng), stratified(yte, a.test, rng)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(a.out, x_train=xtr[itr], y_train=ytr[itr], x_test=xte[ite], y_test=yte[ite])
    print(f"wrote {a.out}: train {len(itr)}, test {len(ite)}")


if __name__ == "__main__":
    main()
