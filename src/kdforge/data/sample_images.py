"""Write a small ImageFolder tree of PNGs from the embedded Fashion-MNIST subset (to try kdforge on image files).

``python -m kdforge.data.sample_images my_images --classes 3 --train 60 --test 20`` writes
``my_images/train/<class>/*.png`` and ``my_images/test/<class>/*.png``, the layout of ``data.name: imagefolder``.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

import numpy as np

from kdforge.data import FASHION_CLASSES


def write_sample_images(out: Path, classes: int = 3, train: int = 60, test: int = 20) -> dict[str, int]:
    """Write ``train``/``test`` PNGs per class for the first ``classes`` classes; returns files per split."""
    from PIL import Image

    with resources.as_file(resources.files("kdforge.data") / "assets" / "fashion_mnist_subset.npz") as p:
        d = np.load(p)
        arrays = {"train": (d["x_train"], d["y_train"], train), "test": (d["x_test"], d["y_test"], test)}
    written = {}
    for split, (x, y, n) in arrays.items():
        count = 0
        for c in range(classes):
            folder = out / split / FASHION_CLASSES[c].lower().replace("/", "-").replace(" ", "-")
            folder.mkdir(parents=True, exist_ok=True)
            for i, idx in enumerate(np.flatnonzero(y == c)[:n]):
                Image.fromarray(x[idx]).save(folder / f"{i:04d}.png")
                count += 1
        written[split] = count
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m kdforge.data.sample_images", description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="folder to write (train/ and test/ inside)")
    ap.add_argument("--classes", type=int, default=3, help="how many classes (1-10)")
    ap.add_argument("--train", type=int, default=60, help="training images per class")
    ap.add_argument("--test", type=int, default=20, help="test images per class")
    a = ap.parse_args(argv)
    if not 1 <= a.classes <= len(FASHION_CLASSES):
        ap.error(f"--classes must be 1-{len(FASHION_CLASSES)}")
    n = write_sample_images(a.out, a.classes, a.train, a.test)
    print(f"wrote {n['train']} training and {n['test']} test images of {a.classes} classes to {a.out}")


if __name__ == "__main__":
    main()
