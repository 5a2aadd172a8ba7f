"""DDIM sampling (η = 0) with any step count for a base model, exactly its own steps for a distilled one."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor, nn

from kdforge.diffusion.schedule import CosineGrid, sampling_grid
from kdforge.errors import KdforgeError


def step_indices(model: nn.Module, steps: int | None = None) -> list[int]:
    """Grid indices the sampler visits; a model distilled to T < G steps refuses any other count."""
    grid, own = int(model.grid), int(model.steps)
    if steps is None:
        steps = own
    if own < grid and steps != own:
        raise KdforgeError(f"this model is distilled to {own} sampling steps and samples only with {own} "
                           f"(asked for {steps}); only the {grid}-step base model samples with any count")
    return sampling_grid(grid, steps)


@torch.no_grad()
def ddim_sample(model: nn.Module, n: int, shape: tuple[int, int, int], steps: int | None = None, seed: int = 0,
                batch_size: int = 500) -> Tensor:
    """``n`` samples in [−1, 1] from x_G ~ N(0, I) (seeded), x̂ clipped to [−1, 1] before every step."""
    idx = step_indices(model, steps)
    sched = CosineGrid(int(model.grid))
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    z_all = torch.randn((n, *shape), generator=gen)
    out = []
    for start in range(0, n, batch_size):
        z = z_all[start:start + batch_size].to(dev)
        for a, b in itertools.pairwise(idx):
            t = torch.full((len(z),), a, device=dev, dtype=torch.long)
            x_hat = sched.to_x(model(z, t), z, t, model.prediction).clamp(-1, 1)  # type: ignore[arg-type]
            z = sched.ddim_step(z, x_hat, a, b)
        out.append(z.clamp(-1, 1).cpu())
    model.train(was)
    return torch.cat(out)


def to_uint8(x: Tensor) -> np.ndarray:
    """[−1, 1] images (N, C, H, W) → uint8 (N, H, W, C)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_grid(x: Tensor, path: str | Path | BinaryIO, cols: int | None = None, scale: int = 4) -> Path | BinaryIO:
    """A PNG grid of [−1, 1] images, each pixel repeated ``scale`` times (small images stay visible)."""
    from PIL import Image

    imgs = to_uint8(x)
    n, h, w, c = imgs.shape
    cols = cols or max(1, int(np.ceil(np.sqrt(n))))
    rows = int(np.ceil(n / cols))
    canvas = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        canvas[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = imgs[k]
    canvas = canvas.repeat(scale, 0).repeat(scale, 1)
    if isinstance(path, str | Path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas[..., 0] if c == 1 else canvas).save(path, format="PNG")
    return path


def sample_run(source: str | Path, n: int, seed: int, steps: int | None = None, out: str | Path | None = None,
               which: str = "last", overwrite: bool = False) -> tuple[Path, Path]:
    """``kdforge sample``: n samples of a run folder's (or checkpoint's) denoiser → PNG grid and .npz.

    The output folder (default ``RUN/samples``) is a run folder of kind ``sample``: a sample folder is added
    to (its other grids stay); a grid of the same name (steps, seed, n) is refused unless ``overwrite``, which
    replaces only those two files. Any other existing folder is refused unless ``overwrite`` (a kdforge
    folder only, replaced as a whole).
    """
    from kdforge.engine.run_dir import check_writable_dir, open_run, run_kind
    from kdforge.evaluate import load_deployable

    if n < 1:
        raise KdforgeError(f"-n must be a positive number of samples, got {n}")
    if not 0 <= seed < 2**63:
        raise KdforgeError(f"--seed must be in [0, 2**63), got {seed}")
    model, meta = load_deployable(source, which)
    if not hasattr(model, "grid") or not hasattr(model, "steps"):
        raise KdforgeError(f"{str(source)!r} holds a {type(model).__name__}, not a diffusion denoiser")
    spec_shape = (int(meta.get("in_chans") or 1), int(meta.get("image_size") or 8))
    used = int(model.steps) if steps is None else steps
    step_indices(model, steps)  # refuse a wrong count before any work
    src = Path(source)
    dest = Path(out) if out is not None else (src if src.is_dir() else src.parent) / "samples"
    check_writable_dir(dest, "sample folder")
    stem = f"samples-{used}steps-seed{seed}-n{n}"
    png, npz = dest / f"{stem}.png", dest / f"{stem}.npz"
    # a sample folder is added to, with or without --overwrite (which then replaces only this grid's files)
    adding = dest.is_dir() and (run_kind(dest) == "sample" or (run_kind(dest) is None and any(dest.iterdir())
                                                                 and _legacy_samples(dest)))
    there = [p for p in (png, npz) if p.exists()] if adding else []
    if there and not overwrite:
        raise KdforgeError(f"{str(there[0])!r} already exists (an earlier 'kdforge sample' with {used} steps, seed "
                           f"{seed}, n {n}); pass --overwrite to replace it, or choose another -o folder or --seed")
    with open_run(dest, "sample", resume="auto", overwrite=overwrite and not adding, legacy=_legacy_samples,
                  resume_cmd=f"kdforge sample {source} -n {n} --seed {seed} -o {dest}"
                             + (" --overwrite" if there else "")):
        x = ddim_sample(model, n, (spec_shape[0], spec_shape[1], spec_shape[1]), steps, seed)
        _atomic(png, lambda f: save_grid(x[:min(n, 256)], f))
        _atomic(npz, lambda f: np.savez_compressed(f, x=x.numpy().astype(np.float32), images=to_uint8(x),
                                                   steps=used, seed=seed))
    return png, npz


def _atomic(path: Path, write: Callable[[Any], object]) -> None:
    """Write ``path`` through a temp file in its folder and a rename: a kill never leaves half a grid."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix="")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _legacy_samples(path: Path) -> bool:
    """A samples folder written before run folders recorded their kind: only ``samples-*`` files."""
    return all(p.name.startswith("samples-") and p.suffix in (".png", ".npz") for p in path.iterdir())
