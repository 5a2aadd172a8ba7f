"""``kdforge compress RECIPE -o OUT``: the command body the main Typer app wires in."""

from __future__ import annotations

import sys
from pathlib import Path


def compress_command(recipe: Path, out: Path | None = None, set_: list[str] | None = None,
                     overwrite: bool = False) -> None:
    """Compress by a recipe; print the table; a gate failure is one line and exit code 1."""
    import typer

    from kdforge.compress.gate import GateFailed
    from kdforge.compress.pipeline import run_compress
    from kdforge.compress.recipe import CompressRecipe
    from kdforge.compress.report import table
    from kdforge.engine.run_dir import check_writable_dir

    r = CompressRecipe.from_yaml(recipe, set_)
    run_dir = out or Path("runs") / "compress" / r.name
    check_writable_dir(run_dir, "compress folder")
    try:
        res = run_compress(r, run_dir, overwrite=overwrite)
    except GateFailed as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(1) from None
    if isinstance(res, dict):  # a language model: the HF folder
        from kdforge.compress.llm import lm_table

        typer.echo(lm_table(res))
        typer.echo(f"chosen {res['chosen']}: {run_dir / 'model'}; report: {run_dir / 'report.md'}")
        return
    typer.echo(table(res.to_json()))
    assert res.chosen is not None
    typer.echo(f"chosen {res.chosen.name}: " + ", ".join(str(p) for p in sorted(run_dir.glob("model.*")))
               + f"; report: {run_dir / 'report.md'}")
