"""The one-engine rule (issue 11 point 3) for every registered method.

(a) every parameter a few engine steps change belongs to an engine-built optimizer; (b) a run interrupted
at step k and resumed ends bit-identical to an uninterrupted one (weights and every optimizer's state);
(c) no module outside ``src/kdforge/engine/`` builds a torch optimizer or calls ``backward()`` /
``step()`` itself, except lines marked ``# gradient-only analysis``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import kdforge as kd
from kdforge.data import load_data
from kdforge.engine.checkpoint import load_state
from kdforge.engine.trainer import seed_everything
from kdforge.method import DataInfo, build_method
from tests.tiny_methods import registered, tiny_recipe

SRC = Path(__file__).resolve().parents[1] / "src" / "kdforge"
ALLOW = "# gradient-only analysis"


pytestmark = pytest.mark.usefixtures("one_thread")


def _build(recipe: kd.Recipe) -> tuple[kd.Method, Any]:
    seed_everything(recipe.seed)
    data = load_data(recipe.data)
    return build_method(recipe.method.model_dump(), DataInfo(data.num_classes, data.in_chans, data.image_size)), data


# -- (a) every changed parameter is in an engine optimizer ----------------------------------------------
@pytest.mark.parametrize("name", registered())
def test_every_changed_parameter_belongs_to_an_engine_optimizer(name: str, clip_teacher: Path) -> None:
    recipe = tiny_recipe(name, clip_teacher, steps=2, val=False)
    method, data = _build(recipe)
    trainer = kd.Trainer(method, data, recipe)
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    trainer.train_steps(2)
    changed = {n for n, p in method.named_parameters() if not torch.equal(before[n], p.detach())}
    owned = {id(p): o for o, eo in trainer.optimizers.items() for p in eo.params}
    params = dict(method.named_parameters())
    stray = sorted(n for n in changed if id(params[n]) not in owned)
    assert not stray, f"{name}: parameters changed outside every engine optimizer: {stray[:5]}"
    for opt, eo in trainer.optimizers.items():  # and every optimizer did change something
        assert any(n in changed for n, p in params.items() if any(p is q for q in eo.params)), (name, opt)
    assert all(eo.steps > 0 for eo in trainer.optimizers.values()), name


# -- (b) interrupted and resumed = uninterrupted -------------------------------------------------------
class _Interrupt(kd.Callback):
    """Stop the run right after step ``k`` (its checkpoint is written by the run folder first)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def on_step_end(self, trainer: kd.Trainer, out: dict[str, torch.Tensor]) -> None:
        if trainer.global_step == self.k:
            raise KeyboardInterrupt


def _fit(recipe: kd.Recipe, run: Path, resume: bool = False, callbacks: tuple = ()) -> None:
    method, data = _build(recipe)
    kd.Trainer(method, data, recipe, run_dir=run, resume=resume, callbacks=callbacks).fit()


def _tensors(x: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor (and number) in a nested state, by path."""
    if isinstance(x, torch.Tensor):
        return {prefix: x}
    if isinstance(x, dict):
        return {k: v for key, val in x.items() for k, v in _tensors(val, f"{prefix}/{key}").items()}
    if isinstance(x, list | tuple):
        return {k: v for i, val in enumerate(x) for k, v in _tensors(val, f"{prefix}/{i}").items()}
    if isinstance(x, int | float | bool):
        return {prefix: torch.tensor(x)}
    return {}


@pytest.mark.parametrize("name", registered())
def test_interrupted_and_resumed_run_is_bit_identical(name: str, clip_teacher: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(name, clip_teacher, steps=2, epochs=2, val=False, save_every_steps=1)
    _fit(recipe, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        _fit(recipe, tmp_path / "cut", callbacks=(_Interrupt(3),))  # inside the second epoch
    _, st = load_state(tmp_path / "cut" / "checkpoints" / "state")
    assert st["global_step"] == 3 and st["batch_in_epoch"] == 1
    _fit(recipe, tmp_path / "cut", resume=True)
    wa, sa = load_state(tmp_path / "full" / "checkpoints" / "state")
    wb, sb = load_state(tmp_path / "cut" / "checkpoints" / "state")
    assert wa.keys() == wb.keys()
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not diff, f"{name}: weights/buffers differ after resume: {diff[:5]}"
    oa, ob = _tensors(sa["optimizers"]), _tensors(sb["optimizers"])
    assert set(oa) == set(ob) and set(sa["optimizers"]) == set(sb["optimizers"])
    diff = [k for k in oa if not torch.equal(oa[k], ob[k])]
    assert not diff, f"{name}: optimizer state differs after resume: {diff[:5]}"
    assert sa["global_step"] == sb["global_step"] == 4


# -- (c) the source scan -----------------------------------------------------------------------------
def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _is_handle(node: ast.AST) -> bool:
    """``self.optimizer("disc")`` / ``trainer.handle("x")``: an engine handle."""
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
        "optimizer", "handle")


def rule_violations(source: str) -> list[tuple[int, str]]:
    """(line, what) of every optimizer construction, backward or step outside an engine handle."""
    tree = ast.parse(source)
    lines = source.splitlines()
    handles = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign) and _is_handle(node.value)
               for t in node.targets if isinstance(t, ast.Name)}
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        what = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            attr, recv = node.func.attr, node.func.value
            via_handle = _is_handle(recv) or (isinstance(recv, ast.Name) and recv.id in handles)
            if attr == "backward" and not via_handle:
                what = ".backward()"
            elif attr == "step" and not via_handle and "pruner" not in _dotted(recv).lower() \
                    and (not node.args or "scaler" in _dotted(recv).lower()):  # a pruner's step removes channels
                what = ".step()"
            elif attr[:1].isupper() and "optim" in _dotted(recv).split("."):
                what = f"{_dotted(recv)}.{attr}()"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.optim"):
            what = f"from {node.module} import"
        elif isinstance(node, ast.ClassDef) and (re.search(r"(Adam|SGD|Optimizer)$", node.name) or any(
                _dotted(b).endswith("Optimizer") for b in node.bases)):
            what = f"class {node.name}"
        if what and ALLOW not in lines[node.lineno - 1]:
            found.append((node.lineno, what))
    return found


def test_the_scan_finds_what_the_rule_forbids() -> None:
    bad = '''
import torch
from torch.optim import SGD
class BufferAdam(torch.nn.Module): ...
def f(model, loss, opt, scaler):
    o = torch.optim.Adam(model.parameters())
    s = torch.optim.lr_scheduler.StepLR(o, 1)
    loss.backward()
    opt.step()
    scaler.step(opt)
'''
    assert sorted(w for _, w in rule_violations(bad)) == sorted([
        "from torch.optim import", "class BufferAdam", "torch.optim.Adam()", "torch.optim.lr_scheduler.StepLR()",
        ".backward()", ".step()", ".step()"])
    ok = f'''
def g(self, loss, model, sched):
    h = self.optimizer("disc")
    with h.toggle():
        h.backward(loss)
        h.step()
    self.optimizer("gen").step()
    model(x).sum().backward()  {ALLOW}
    sched.step(model_output, t, x)  # a diffusion sampler's step, not an optimizer's
'''
    assert rule_violations(ok) == []


def test_no_optimizer_backward_or_step_outside_the_engine() -> None:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path.relative_to(SRC).parts[0] == "engine":
            continue
        found += [f"{path.relative_to(SRC.parent)}:{line}: {what}" for line, what in rule_violations(path.read_text())]
    assert not found, "outside src/kdforge/engine/ (mark gradient-only analysis with '" + ALLOW + "'):\n" + \
        "\n".join(found)
