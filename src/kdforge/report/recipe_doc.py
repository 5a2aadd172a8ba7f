"""The recipe-key reference (``docs/recipe-keys.md``), generated from the pydantic schemas of the recipes.

``python -m kdforge.report.recipe_doc > docs/recipe-keys.md`` (``make docs-cli``) rewrites it; a test checks that
the page matches the schemas.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from typing import Any

from pydantic import BaseModel

HEADER = """# Recipe keys

Every key a recipe can hold, generated from the recipes' own schemas by `make docs-cli`
(`python -m kdforge.report.recipe_doc > docs/recipe-keys.md`); a test checks that it matches them.
A key that is not listed is refused with one line naming the closest valid key. Any key can be changed on
the command line: `kdforge train RECIPE --set optim.lr=0.1 --set method.student.model=timm:resnet18`.

- [`kdforge train` recipes](#train-recipe): [`data`](#data), [`method`](#method) (and the
  [model spec](#model-spec) of every model in it), [`optim`](#optim), [`sched`](#sched), [`train`](#train)
- [methods](#methods): the keys of each `method.name`, and the [loss terms](#loss-terms) of `distill`
- [`kdforge cil`](#cil-recipe), [`kdforge prune`](#prune-recipe) and [`kdforge audio`](#audio-recipe) recipes
"""


def _type(ann: Any) -> str:
    """A short, readable type: ``int``, ``float | None``, ``'sgd' | 'adamw'``, ``list[str]``."""
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if ann is type(None):
        return "null"
    if origin is typing.Literal:
        return " \\| ".join(repr(a) if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type(a) for a in args)
    if origin in (list, tuple, dict, set):
        inner = ", ".join(_type(a) for a in args if a is not Ellipsis)
        return f"{origin.__name__}[{inner}]" if inner else origin.__name__
    if origin is typing.Annotated:
        return _type(args[0])
    if isinstance(ann, type):
        if issubclass(ann, BaseModel):
            return f"[{_section(ann)}](#{_anchor(ann)})"
        return ann.__name__
    return re.sub(r"\btyping\.", "", str(ann))


def _anchor(cls: type[BaseModel]) -> str:
    return _section(cls).lower().replace(" ", "-").replace(".", "").replace("`", "")


def _section(cls: type[BaseModel]) -> str:
    return SECTION_NAMES.get(cls.__name__, cls.__name__)


def _default(field: Any) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:
            return ""
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(its defaults)"
    if value in ([], {}, ()):
        return f"`{value!r}`"
    text = repr(value) if isinstance(value, str) else str(value).replace("None", "null")
    text = {"True": "true", "False": "false"}.get(text, text)
    return f"`{text}`"


def _comments(cls: type) -> dict[str, str]:
    """Field -> the ``#:`` comment lines written above it in the class body (this class and its bases)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, BaseModel)) or klass is BaseModel:
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        pending: list[str] = []
        for line in src.splitlines()[1:]:
            s = line.strip()
            if s.startswith("#:"):
                pending.append(s[2:].strip())
                continue
            m = re.match(r"^\s+([A-Za-z_]\w*)\s*:", line)
            if m and pending:
                out[m.group(1)] = " ".join(pending)
            if s and not s.startswith("#"):
                pending = []
    return out


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def _doc(cls: type) -> str:
    return " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())


def model_table(cls: type[BaseModel], seen: set[type], queue: list[type[BaseModel]]) -> list[str]:
    """A table of one schema's keys; the schemas nested in it are queued for their own sections."""
    notes = _comments(cls)
    rows = ["| key | type | default | what |", "| --- | --- | --- | --- |"]
    for name, field in cls.model_fields.items():
        what = field.description or notes.get(name, "")
        rows.append(f"| `{name}` | {_type(field.annotation)} | {_default(field)} | {_md(what)} |")
        for sub in _models_in(field.annotation):
            if sub not in seen:
                seen.add(sub)
                queue.append(sub)
    extra = "" if cls.model_config.get("extra") != "allow" else " Other keys are passed on (see below)."
    return [_md(_doc(cls)) + extra, "", *rows, ""]


def _models_in(ann: Any) -> list[type[BaseModel]]:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    return [m for a in typing.get_args(ann) for m in _models_in(a)]


def _sections(root: type[BaseModel], title: str, seen: set[type]) -> list[str]:
    """The root schema's table, then one section per nested schema not shown yet."""
    seen.add(root)
    queue: list[type[BaseModel]] = []
    out = [f"## {title}", "", *model_table(root, seen, queue)]
    while queue:
        cls = queue.pop(0)
        out += [f"### {_section(cls)}", "", *model_table(cls, seen, queue)]
    return out


def _loss_terms() -> list[str]:
    from kdforge.registry import LOSSES

    out = ["### loss terms", "",
           "Each entry of a `distill` recipe's `terms` names a loss (`kdforge list losses`) with its weight and, "
           "for feature losses, the taps it reads; its other keys are the loss's own arguments:", "",
           "| loss | its own keys (default) | what |", "| --- | --- | --- |"]
    for name in LOSSES.names():
        cls = LOSSES.get(name)
        try:
            params = inspect.signature(cls).parameters.values()
        except (TypeError, ValueError):
            params = []
        keys = ", ".join(f"`{p.name}` ({p.default!r})" if p.default is not p.empty else f"`{p.name}`"
                         for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        out.append(f"| `{name}` | {_md(keys) or '—'} | {_md(_doc(cls))} |")
    return [*out, ""]


def _methods(seen: set[type]) -> list[str]:
    from kdforge.registry import METHODS

    out = ["## methods", "", "The `method` section of a `kdforge train` recipe: `name` picks the method, the "
           "other keys are that method's (`kdforge list methods`).", ""]
    for name in METHODS.names():
        cls = getattr(METHODS.get(name), "Config", None)
        if cls is None:
            continue
        queue: list[type[BaseModel]] = []
        out += [f"### method `{name}`", "", *model_table(cls, seen | {cls}, queue)]
        seen.update(queue)
        for sub in queue:  # nested schemas of a method that no other section shows
            out += [f"#### {_section(sub)}", "", *model_table(sub, seen, queue)]
        if name == "distill":
            out += _loss_terms()
    return out


SECTION_NAMES = {"Recipe": "train recipe", "DataConfig": "data", "MethodConfig": "method", "OptimConfig": "optim",
                 "SchedConfig": "sched", "TrainConfig": "train", "ModelSpec": "model spec", "CilRecipe": "cil recipe",
                 "PruneRecipe": "prune recipe", "AudioRecipe": "audio recipe"}


def recipe_markdown() -> str:
    """The recipe-key reference as Markdown."""
    import kdforge  # noqa: F401 - registers every method and loss
    from kdforge.audio.recipe import AudioRecipe
    from kdforge.config import ModelSpec, Recipe
    from kdforge.continual.recipe import CilRecipe
    from kdforge.prune.sglp import PruneRecipe

    seen: set[type] = {ModelSpec}
    lines = [HEADER]
    lines += _sections(Recipe, "train recipe", seen)
    lines += ["### model spec", "", "Every model in a recipe (`method.model`, `method.teacher`, `method.student`, "
              "`method.peers`, a prune recipe's `model`) is a model spec.", "",
              *model_table(ModelSpec, seen, [])]
    lines += _methods(seen)
    for cls, title in ((CilRecipe, "cil recipe"), (PruneRecipe, "prune recipe"), (AudioRecipe, "audio recipe")):
        lines += _sections(cls, title, seen)
    return "\n".join(lines).rstrip("\n") + "\n"


def schema_keys() -> dict[str, set[str]]:
    """Every key of the train recipe's sections: ``{"train": {"epochs", ...}, ...}`` (for the test)."""
    from kdforge.config import Recipe

    return {name: set(f.annotation.model_fields) for name, f in Recipe.model_fields.items()
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}


if __name__ == "__main__":
    print(recipe_markdown(), end="")
