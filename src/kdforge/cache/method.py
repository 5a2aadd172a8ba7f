"""How ``distill`` uses a teacher cache: which terms may read it, and opening it on the training set."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from kdforge.cache.config import TeacherCacheConfig
from kdforge.errors import KdforgeError

if TYPE_CHECKING:
    from kdforge.distill.offline import Distill, Term

#: response losses that are exact or documented with a top-k cache (the rest of the mass spread evenly)
TOPK_OK = frozenset({"kd"})


def num_classes(teacher: nn.Module) -> int | None:
    fc = getattr(teacher, "fc", None) or getattr(teacher, "head", None) or getattr(teacher, "classifier", None)
    return getattr(fc, "out_features", None)


def check_terms(cfg: TeacherCacheConfig, terms: Sequence[Term], classes: int | None) -> None:
    """Refuse, in one line, a top-k cache for a loss that needs every teacher logit (DKD, DIST, ...)."""
    if classes is None or cfg.resolved_store(classes) != "topk":
        return
    for t in terms:
        name = getattr(t.loss, "registry_name", t.name)
        if t.loss.inputs == "logits" and name not in TOPK_OK:
            raise KdforgeError(f"loss {name!r} needs every teacher logit, but method.cache stores the top-{cfg.k} of "
                               f"{classes} classes; set method.cache.store: full (or remove the cache)")


def open_cache(method: Distill, dataset: Dataset) -> tuple[Any, Dataset]:
    """(the verified TeacherCache, the training set as recorded views with sample index and view), or
    ``(None, dataset)`` with ``fallback: live`` when the augmentation cannot be replayed."""
    from kdforge.cache.build import open_for
    from kdforge.data.replay import NotReplayable, replay_views

    cfg = method.cache_cfg
    assert cfg is not None
    try:
        views = replay_views(dataset)
    except NotReplayable as e:
        if cfg.fallback != "live":
            raise KdforgeError(f"{e} (or set method.cache.fallback: live to use the live teacher)") from None
        print(f"note: teacher cache {cfg.name!r} not used, the live teacher runs instead: {e}", file=sys.stderr)
        return None, dataset
    if method._teacher_spec is None:
        raise KdforgeError("a distill method with a teacher cache needs its teacher's ModelSpec (teacher_spec=)")
    was = method.teacher.training
    with torch.no_grad():
        x = views[0][0].unsqueeze(0).to(next(method.teacher.parameters()).device)
        classes = int(method.teacher.eval()(x).shape[-1])
    method.teacher.train(was)
    check_terms(cfg, list(method.terms), classes)  # type: ignore[arg-type]
    cache = open_for(method.teacher, method._teacher_spec, views, cfg, classes)
    return cache, views.with_fields()
