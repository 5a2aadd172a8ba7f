"""In-memory image datasets with cheap, seeded per-sample augmentation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset


class TensorImages(Dataset):
    """Images (N, C, H, W, uint8 or float in [0, 1]) and labels held in memory.

    Normalisation, padding/resizing to a target size and augmentation (random crop after
    zero padding, horizontal flip) are done per sample with the torch global RNG, so a seeded
    loop is reproducible bit for bit.
    """

    def __init__(self, images: Tensor, labels: Tensor, mean: Sequence[float], std: Sequence[float],
                 pad_to: int | None = None, resize: int | None = None, augment: bool = False,
                 crop_pad: int = 2, flip: bool = True) -> None:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if resize is not None and x.shape[-1] != resize:
            x = F.interpolate(x, size=(resize, resize), mode="bilinear", align_corners=False)
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        x = (x - m) / s
        if pad_to is not None and x.shape[-1] < pad_to:
            p = pad_to - x.shape[-1]
            x = F.pad(x, (p // 2, p - p // 2, p // 2, p - p // 2))
        self.x = x.contiguous()
        self.y = labels.long()
        self.augment = augment
        self.crop_pad = crop_pad
        self.flip = flip

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.x[i]
        if self.augment:
            x = self._augment(x)
        return x, self.y[i]

    def _augment(self, x: Tensor) -> Tensor:
        p = self.crop_pad
        if p > 0:
            h, w = x.shape[-2:]
            padded = F.pad(x, (p, p, p, p))
            dy, dx = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = padded[:, dy:dy + h, dx:dx + w]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the samples this set yields."""
        return tuple(self.x.shape[1:])  # type: ignore[return-value]
