"""Re-create the demo teacher that ships as ``src/kdforge/recipes/demo/teacher.safetensors``.

    taskset -c 1 env OMP_NUM_THREADS=1 python scripts/make_demo_teacher.py

Trains ``recipes/demo/teacher.yaml`` (cnn_small width 16, 30 epochs, one thread, seed 0) into
``runs/demo-teacher`` and copies its last checkpoint into the package. CPU runs repeat bit for bit on one
machine, not across machines: another CPU gives a teacher of about the same accuracy, not the same bytes.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from kdforge.demo import demo_recipe
from kdforge.run import train

PACKAGED = Path(__file__).resolve().parents[1] / "src" / "kdforge" / "recipes" / "demo" / "teacher.safetensors"


def main() -> None:
    """Train the teacher and copy its last checkpoint into the package."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/demo-teacher"), help="run folder")
    ap.add_argument("--dest", type=Path, default=PACKAGED, help="where the checkpoint is copied")
    args = ap.parse_args()
    res = train(demo_recipe("teacher"), args.out, overwrite=True)
    shutil.copyfile(args.out / "checkpoints" / "last.safetensors", args.dest)
    print(f"teacher test top-1 {res.test_last['top1']:.2f} % -> {args.dest}")


if __name__ == "__main__":
    main()
