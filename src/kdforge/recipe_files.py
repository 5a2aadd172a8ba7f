"""The recipes that ship inside the package (``kdforge/recipes/AREA/NAME.yaml``): list, find, copy."""

from __future__ import annotations

import fnmatch
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kdforge.errors import KdforgeError

#: how a checkout's recipes refer to files shipped next to them (rewritten when a recipe is copied)
_IN_CHECKOUT = "src/kdforge/recipes/"


@dataclass(frozen=True)
class PackagedRecipe:
    """One shipped recipe: ``area/stem`` name, its file, and the first line of its header comment."""

    name: str
    path: Path
    summary: str

    @property
    def area(self) -> str:
        return self.name.split("/", 1)[0]


def recipes_root() -> Path:
    """The folder holding the shipped recipes."""
    return Path(str(resources.files("kdforge") / "recipes"))


def _summary(path: Path) -> str:
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("#"):
            text = line.lstrip("#").strip()
            if text:
                return text
        elif line:
            break
    return ""


def all_recipes() -> list[PackagedRecipe]:
    """Every shipped recipe, sorted by area and name."""
    root = recipes_root()
    out = [PackagedRecipe(p.relative_to(root).with_suffix("").as_posix(), p, _summary(p))
           for p in root.rglob("*.yaml") if p.is_file()]
    return sorted(out, key=lambda r: r.name)


def packaged(path: str | Path) -> Path | None:
    """The shipped recipe a path names (``recipes/prune/x.yaml``, ``prune/x.yaml`` or ``prune/x``), if any."""
    parts = Path(path).with_suffix("").parts if Path(path).suffix in (".yaml", ".yml") else Path(path).parts
    if parts and parts[0] == "recipes":
        parts = parts[1:]
    if not parts:
        return None
    p = recipes_root().joinpath(*parts).with_suffix(".yaml")
    return p if p.is_file() else None


def resolve_recipe(path: Path) -> Path:
    """A recipe path as given, or the packaged recipe it names (``recipes/AREA/NAME.yaml`` outside a checkout)."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    return packaged(path) or path


def select(patterns: list[str] | None) -> list[PackagedRecipe]:
    """The recipes matching areas, names or globs (``demo``, ``prune/sglp-digits-resnet20``, ``'cifar100/kd_*'``)."""
    every = all_recipes()
    if not patterns:
        return every
    chosen: list[PackagedRecipe] = []
    for pat in patterns:
        pat = pat.removeprefix("recipes/").removesuffix(".yaml").rstrip("/")
        hits = [r for r in every if r.area == pat or r.name == pat or fnmatch.fnmatchcase(r.name, pat)]
        if not hits:
            from kdforge.errors import closest

            names = {r.name: None for r in every} | {r.area: None for r in every}
            raise KdforgeError(f"no shipped recipe matches {pat!r}{closest(pat, names)} "
                               f"(areas: {', '.join(sorted({r.area for r in every}))}; see 'kdforge recipes')")
        chosen += [r for r in hits if r not in chosen]
    return chosen


def referenced_files(recipe: Path) -> list[Path]:
    """Shipped files a recipe reads by a path relative to its folder (``checkpoint: ../demo/teacher.safetensors``)."""
    from kdforge.config import FILE_KEYS, load_yaml

    root = recipes_root().resolve()
    found: list[Path] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in FILE_KEYS and isinstance(v, str) and not Path(v).is_absolute():
                    f = (recipe.parent / v).resolve()
                    if f.is_file() and f.is_relative_to(root) and f not in found:
                        found.append(f)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(load_yaml(recipe))
    return [recipes_root() / f.relative_to(root) for f in found]


def copy_recipes(chosen: list[PackagedRecipe], dest: Path, overwrite: bool = False) -> list[Path]:
    """Copy recipes to ``dest/AREA/NAME.yaml`` with the files they reference; refuses to replace files first."""
    root = recipes_root()
    plan: list[tuple[Path, Path]] = []
    for r in chosen:
        plan.append((r.path, dest / r.path.relative_to(root)))
        for f in referenced_files(r.path):
            pair = (f, dest / f.relative_to(root))
            if pair not in plan:
                plan.append(pair)
    if not overwrite:
        taken = [str(d) for _, d in plan if d.exists()]
        if taken:
            raise KdforgeError(f"{taken[0]!r} already exists ({len(taken)} file(s) would be replaced); "
                               "pass --overwrite or choose another folder")
    prefix = dest.as_posix().rstrip("/") + "/"
    written: list[Path] = []
    for src, dst in plan:
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.suffix in (".yaml", ".yml"):
                dst.write_text(src.read_text().replace(_IN_CHECKOUT, prefix))
            else:
                shutil.copyfile(src, dst)
        except OSError as e:
            raise KdforgeError(f"cannot write {str(dst)!r}: {e.strerror}") from None
        written.append(dst)
    return written
