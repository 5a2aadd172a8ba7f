"""``kdforge cache build|list|size|clear``: the teacher-output caches of a folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kdforge.cache.config import DEFAULT_DIR
from kdforge.errors import KdforgeError

cache_app = typer.Typer(no_args_is_help=True, help="Teacher-output caches: build, list, size, clear.")

DirOpt = Annotated[Path, typer.Option("--dir", help="folder holding the caches")]


def human(n: float) -> str:
    """Bytes in B/KB/MB/GB (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


@cache_app.command("build")
def build_cmd(
    recipe: Annotated[Path, typer.Argument(help="a distill recipe with a method.cache section")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a recipe key")] = None,
    overwrite: Annotated[bool, typer.Option(help="rebuild a cache built for another teacher, data or storage")] = False,
) -> None:
    """Compute the teacher's logits on K recorded views of every training sample (resumes; one shard per rank)."""
    from kdforge.cache.build import build_from_recipe
    from kdforge.config import Recipe
    from kdforge.recipe_files import resolve_recipe

    r = Recipe.from_yaml(resolve_recipe(recipe), set_)
    res = build_from_recipe(r, overwrite=overwrite, log=r.train.progress != "silent",
                            resume_cmd=f"kdforge cache build {recipe}" + "".join(f" --set {s}" for s in set_ or []))
    done = "up to date" if res.chunks_built == 0 else f"{res.chunks_built} of {res.chunks_total} chunks built"
    typer.echo(f"teacher cache {res.path}: {done} in {res.seconds:.1f} s, {human(res.bytes)}")


@cache_app.command("list")
def list_cmd(dir_: DirOpt = Path(DEFAULT_DIR)) -> None:
    """Every cache in the folder: name, state, samples × views, storage, size."""
    from kdforge.cache.store import list_caches

    caches = list_caches(dir_)
    if not caches:
        typer.echo(f"no teacher caches in {dir_}")
        return
    for c in caches:
        if c.damaged is not None:
            typer.echo(f"{c.path.name:28s} {'damaged':10s} {c.damaged}; clear it: kdforge cache clear "
                       f"{c.path.name} --dir {dir_}, {human(c.bytes)}")
            continue
        ident = c.meta.get("identity", {})
        st = ident.get("storage", {})
        store = f"top-{st.get('k')}" if st.get("store") == "topk" else "full"
        state = "complete" if c.complete else "incomplete"
        shape = f"{c.meta.get('n', ident.get('data', {}).get('samples', '?'))} samples x " \
                f"{c.meta.get('views', ident.get('preprocessing', {}).get('views', '?'))} views"
        teacher = ident.get("teacher", {})
        typer.echo(f"{c.path.name:28s} {state:10s} {shape:24s} {store} {st.get('dtype', '')} of "
                   f"{ident.get('classes', '?')} classes, teacher {teacher.get('model')} "
                   f"{str(teacher.get('weights_sha256', ''))[:12]}, {human(c.bytes)}")


@cache_app.command("size")
def size_cmd(
    name: Annotated[str | None, typer.Argument(help="one cache (default: all)")] = None,
    dir_: DirOpt = Path(DEFAULT_DIR),
) -> None:
    """Disk size of one cache or of all caches in the folder."""
    from kdforge.cache.store import folder_bytes, list_caches

    if name is not None:
        typer.echo(f"{name}: {human(folder_bytes(_one(dir_, name)))}")
        return
    total = sum(c.bytes for c in list_caches(dir_))
    typer.echo(f"{dir_}: {human(total)} in {len(list_caches(dir_))} caches")


@cache_app.command("clear")
def clear_cmd(
    name: Annotated[str | None, typer.Argument(help="the cache to delete")] = None,
    all_: Annotated[bool, typer.Option("--all", help="delete every cache in the folder")] = False,
    dir_: DirOpt = Path(DEFAULT_DIR),
) -> None:
    """Delete one cache (or --all); only folders that are teacher caches are touched."""
    from kdforge.cache.store import list_caches

    if (name is None) == (not all_):
        raise KdforgeError("kdforge cache clear needs a cache name or --all (not both)")
    from kdforge.engine.run_dir import remove_run

    targets = [c.path for c in list_caches(dir_)] if all_ else [_one(dir_, name)]  # type: ignore[arg-type]
    for p in targets:
        remove_run(p)  # refused while a build holds the cache's lock
        typer.echo(f"removed {p}")
    if not targets:
        typer.echo(f"no teacher caches in {dir_}")


def _one(root: Path, name: str) -> Path:
    """The folder of cache ``name`` under ``root``, refused in one line unless it is a teacher cache."""
    from kdforge.cache.store import is_cache, list_caches

    p = root / name
    if "/" in name or name in ("", ".", ".."):
        raise KdforgeError(f"bad cache name {name!r}: give the name of a folder in {str(root)!r}")
    if not is_cache(p):  # a damaged meta.json still counts: clearing is how it is repaired
        names = [c.path.name for c in list_caches(root)]
        raise KdforgeError(f"no teacher cache {name!r} in {str(root)!r} (caches there: {', '.join(names) or 'none'})")
    return p
