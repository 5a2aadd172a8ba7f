"""Healing a candidate by KD from the original model: one engine fit (the engine is what optimizes)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

from kdforge.cache.config import TeacherCacheConfig
from kdforge.compress.recipe import CompressRecipe
from kdforge.data import DataBundle
from kdforge.errors import KdforgeError

#: the teacher cache's folder in a compress folder
CACHE_NAME = "teacher-cache"


def cache_config(out: str | Path) -> TeacherCacheConfig:
    """The teacher cache of a compress folder: every logit, fp32 (healing from it equals the live teacher's)."""
    return TeacherCacheConfig(name=CACHE_NAME, dir=str(out), store="full", dtype="fp32")


def build_heal_cache(teacher: nn.Module, spec: dict[str, Any], data: DataBundle, r: CompressRecipe,
                     out: str | Path) -> TeacherCacheConfig | None:
    """With ``heal.teacher: cache``, the original's logits on the training set's recorded views, computed once
    into ``out/teacher-cache`` for every heal to read; ``None`` when healing runs the live teacher."""
    if r.heal.mode == "none" or r.heal.teacher != "cache":
        return None
    from kdforge.cache.build import build, identity
    from kdforge.data.replay import replay_views

    cfg = cache_config(out)
    views = replay_views(data.train)  # the views the engine's cached fit replays (kdforge.cache.method.open_cache)
    build(teacher.eval(), views, identity(teacher, spec, views, cfg, data.num_classes), cfg)
    return cfg


def heal(student: nn.Module, teacher: nn.Module, data: DataBundle, r: CompressRecipe, seed: int | None = None,
         cache: TeacherCacheConfig | None = None, teacher_spec: dict[str, Any] | None = None
         ) -> tuple[nn.Module, dict[str, Any]]:
    """Distil ``teacher`` into a copy of ``student`` (CE + KD terms of the recipe); returns it and the fit's facts.

    With ``heal.teacher: cache``, ``cache`` (from :func:`build_heal_cache`) and the original's ``teacher_spec``
    give the engine the cached logits in place of the teacher's forward pass.
    """
    from kdforge.config import MethodConfig, Recipe
    from kdforge.distill import Distill, Term
    from kdforge.engine.trainer import Trainer, seed_everything
    from kdforge.losses import build_loss

    if r.heal.mode == "none":
        return student, {"mode": "none"}
    h = r.heal
    if (h.teacher == "cache") != (cache is not None) or (cache is not None and teacher_spec is None):
        raise KdforgeError(f"heal.teacher is {h.teacher!r}: pass cache= (build_heal_cache) and teacher_spec= "
                           "exactly when it is 'cache'")
    s = r.seed if seed is None else seed
    seed_everything(s)
    terms = [Term(build_loss("ce"), h.ce_weight, name="ce"), Term(build_loss("kd", T=h.T), h.kd_weight, name="kd")]
    # named in the method section, so the fit's banner shows the student (its own size) and the frozen teacher
    name = r.model.model if r.model is not None else type(teacher).__name__
    method = Distill(copy.deepcopy(student).train(), copy.deepcopy(teacher).eval(), terms, cache=cache,
                     teacher_spec=teacher_spec)  # type: ignore[arg-type]
    recipe = Recipe(name=f"{r.name}-heal", seed=s, data=r.data, optim=r.optim, sched=r.sched, train=r.train,
                    method=MethodConfig(name="distill", student={"model": f"{name}, compressed"},
                                        teacher={"model": name}))
    res = Trainer(method, data, recipe).fit()
    return method.deployable().cpu().eval(), {"mode": "kd", "teacher": h.teacher, "epochs": res.epochs,
                                              "steps": res.steps, "train_time_s": res.train_time_s, "seed": s}
