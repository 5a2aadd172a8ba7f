"""The teacher signal a cache offers a distillation method: which loss terms may read it, and opening it.

The method hands over plain things (its teacher, the teacher's spec, its terms' names and inputs, the
training set) and gets a :class:`TeacherSignal` back; the cache knows nothing of the method.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from kdforge.cache.config import TeacherCacheConfig
from kdforge.errors import KdforgeError


class TeacherSignal(Protocol):
    """What replaces the teacher's forward pass: its logits of each (sample index, view) of a batch."""

    def logits(self, index: Tensor, view: Tensor) -> Tensor: ...

#: response losses that are exact or documented with a top-k cache (the rest of the mass spread evenly)
TOPK_OK = frozenset({"kd"})


def num_classes(teacher: nn.Module) -> int | None:
    fc = getattr(teacher, "fc", None) or getattr(teacher, "head", None) or getattr(teacher, "classifier", None)
    return getattr(fc, "out_features", None)


def check_terms(cfg: TeacherCacheConfig, terms: Sequence[tuple[str, str]], classes: int | None) -> None:
    """Refuse, in one line, a top-k cache for a loss that needs every teacher logit (DKD, DIST, ...);
    ``terms``: (loss name, what it reads: ``logits``, ``features`` or ``labels``)."""
    if classes is None or cfg.resolved_store(classes) != "topk":
        return
    for name, inputs in terms:
        if inputs == "logits" and name not in TOPK_OK:
            raise KdforgeError(f"loss {name!r} needs every teacher logit, but method.cache stores the top-{cfg.k} of "
                               f"{classes} classes; set method.cache.store: full (or remove the cache)")


def open_cache(cfg: TeacherCacheConfig, teacher: nn.Module, teacher_spec: Any, terms: Sequence[tuple[str, str]],
               dataset: Dataset) -> tuple[TeacherSignal | None, Dataset]:
    """(the verified cache, the training set as recorded views with sample index and view), or
    ``(None, dataset)`` with ``fallback: live`` when the augmentation cannot be replayed."""
    from kdforge.cache.build import open_for
    from kdforge.data.replay import NotReplayable, replay_views

    try:
        views = replay_views(dataset)
    except NotReplayable as e:
        if cfg.fallback != "live":
            raise KdforgeError(f"{e} (or set method.cache.fallback: live to use the live teacher)") from None
        print(f"note: teacher cache {cfg.name!r} not used, the live teacher runs instead: {e}", file=sys.stderr)
        return None, dataset
    if teacher_spec is None:
        raise KdforgeError("a distill method with a teacher cache needs its teacher's ModelSpec (teacher_spec=)")
    was = teacher.training
    with torch.no_grad():
        x = views[0][0].unsqueeze(0).to(next(teacher.parameters()).device)
        classes = int(teacher.eval()(x).shape[-1])
    teacher.train(was)
    check_terms(cfg, terms, classes)
    cache = open_for(teacher, teacher_spec, views, cfg, classes)
    return cache, views.with_fields()
