"""The worked side-optimizer method of docs/developing.md runs through the engine as the page says."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import kdforge as kd
from kdforge.registry import METHODS
from tests.conftest import digits_recipe

DOC = Path(__file__).resolve().parents[1] / "docs" / "developing.md"


def _example() -> str:
    text = DOC.read_text()
    part = text[text.index("### A method with a side optimizer, worked"):]
    return re.search(r"```python\n(.*?)```", part, re.S).group(1)  # type: ignore[union-attr]


def test_the_worked_example_is_short_and_trains_both_optimizers() -> None:
    code = _example()
    assert len(code.strip().splitlines()) < 60, "the worked example must stay under 60 lines"
    exec(compile(code, str(DOC), "exec", dont_inherit=True), {"__name__": "kdforge_docs_example"})
    try:
        _train_the_example()
    finally:
        METHODS._items.pop("tiny_adv", None)  # other tests enumerate the registered methods


def _train_the_example() -> None:
    r = digits_recipe({"name": "tiny_adv", "teacher": {"model": "cnn_tiny"}, "student": {"model": "cnn_tiny"}},
                      epochs=1)
    r["data"]["limit_train"] = 256
    recipe = kd.Recipe.from_dict(r)
    data = kd.load_data(recipe.data)
    method = kd.method.build_method(recipe.method.model_dump(),
                                    kd.DataInfo(data.num_classes, data.in_chans, data.image_size))
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    t = kd.Trainer(method, data, recipe)
    out = t.train_steps(3)
    assert {"loss", "loss_d"} <= set(out)
    assert set(t.optimizers) == {"student", "disc"} and t.optimizers["disc"].manual
    assert t.optimizers["disc"].steps == 3 and t.optimizers["student"].steps == 3
    owned = {id(p) for o in t.optimizers.values() for p in o.params}
    changed = [n for n, p in method.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("disc.") for n in changed) and any(n.startswith("student.") for n in changed)
    assert all(id(dict(method.named_parameters())[n]) in owned for n in changed)
    assert not any(n.startswith("teacher.") for n in changed)
    assert not any(p.requires_grad for p in method.disc.parameters()), "the disc is frozen outside its update"
