"""Recipe schema of a teacher-output cache: ``method.cache`` of a ``distill`` recipe."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kdforge.config import Strict

#: the default folder that holds one sub-folder per cache
DEFAULT_DIR = "runs/teacher-cache"
#: class counts up to this store every logit (fp16) with ``store: auto``; above it, the top-k
FULL_MAX_CLASSES = 1024


class TeacherCacheConfig(Strict):
    """Where a teacher's outputs are cached and how: ``cache: {name: demo-kd, store: auto, k: 20}``.

    ``store``: ``full`` keeps every logit, ``topk`` the ``k`` largest and the log of the remaining mass,
    ``auto`` full up to ``full_max_classes`` classes. ``fallback: live`` runs the live teacher (one line on
    stderr) when the training set's augmentation cannot be replayed, instead of refusing.
    """

    name: str = Field(min_length=1, max_length=120, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    dir: str = DEFAULT_DIR
    store: Literal["auto", "full", "topk"] = "auto"
    k: int = Field(20, ge=1, le=4096)
    dtype: Literal["fp16", "fp32"] = "fp16"
    full_max_classes: int = Field(FULL_MAX_CLASSES, ge=1)
    fallback: Literal["refuse", "live"] = "refuse"
    chunk: int = Field(256, ge=1, le=1 << 20)
    batch_size: int = Field(256, ge=1)

    def resolved_store(self, num_classes: int) -> Literal["full", "topk"]:
        """``full`` or ``topk`` for a model with ``num_classes`` outputs."""
        if self.store == "auto":
            return "full" if num_classes <= self.full_max_classes else "topk"
        if self.store == "topk" and self.k >= num_classes:
            return "full"
        return self.store
