"""Healing a candidate by KD from the original model: one engine fit (the engine is what optimizes)."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from kdforge.compress.recipe import CompressRecipe
from kdforge.data import DataBundle


def heal(student: nn.Module, teacher: nn.Module, data: DataBundle, r: CompressRecipe, seed: int | None = None
         ) -> tuple[nn.Module, dict[str, Any]]:
    """Distil ``teacher`` into a copy of ``student`` (CE + KD terms of the recipe); returns it and the fit's facts."""
    from kdforge.config import MethodConfig, Recipe
    from kdforge.distill import Distill, Term
    from kdforge.engine.trainer import Trainer, seed_everything
    from kdforge.losses import build_loss

    if r.heal.mode == "none":
        return student, {"mode": "none"}
    h = r.heal
    s = r.seed if seed is None else seed
    seed_everything(s)
    terms = [Term(build_loss("ce"), h.ce_weight, name="ce"), Term(build_loss("kd", T=h.T), h.kd_weight, name="kd")]
    # named in the method section, so the fit's banner shows the student (its own size) and the frozen teacher
    name = r.model.model if r.model is not None else type(teacher).__name__
    method = Distill(copy.deepcopy(student).train(), copy.deepcopy(teacher).eval(), terms)
    recipe = Recipe(name=f"{r.name}-heal", seed=s, data=r.data, optim=r.optim, sched=r.sched, train=r.train,
                    method=MethodConfig(name="distill", student={"model": f"{name}, compressed"},
                                        teacher={"model": name}))
    res = Trainer(method, data, recipe).fit()
    return method.deployable().cpu().eval(), {"mode": "kd", "epochs": res.epochs, "steps": res.steps,
                                              "train_time_s": res.train_time_s, "seed": s}
