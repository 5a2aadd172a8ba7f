"""``kdforge prune RECIPE``: the command body the main Typer app wires in."""

from __future__ import annotations

from pathlib import Path


def prune_command(recipe: Path, out: Path | None = None, set_: list[str] | None = None,
                  overwrite: bool = False, resume: bool = False) -> None:
    """Prune a model by a prune recipe; writes the pruned model, report.md, plots and results.json."""
    import typer

    from kdforge.prune.report import before_after_table
    from kdforge.prune.sglp import load_recipe, run_prune

    r = load_recipe(recipe, set_)
    run_dir = out or Path("runs") / "prune" / r.name
    res = run_prune(r, run_dir, overwrite=overwrite, resume=resume, command=f"kdforge prune {recipe} -o {run_dir}")
    names = [u.name for u in res.analysis.units]
    typer.echo(f"{res.selection.method}: kept {len(res.selection.kept)}/{len(names)} units; removed "
               + (", ".join(names[i] for i in res.selection.removed) or "nothing"))
    typer.echo(before_after_table(res.before, res.after, res.healed))
    typer.echo(f"report: {run_dir / 'report.md'}")
