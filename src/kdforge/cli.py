"""The ``kdforge`` command: demo, train, eval, bench, report, list."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

try:  # typer >= 0.20 vendors its own click
    from typer._click import exceptions as click
except ImportError:  # pragma: no cover
    from click import exceptions as click  # type: ignore[no-redef]

from kdforge.errors import KdforgeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="kdforge: make deep models small and fast (distillation, pruning, continual).")

SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a recipe key: --set optim.lr=0.1")]


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe, or a run folder with --resume")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="run folder (default runs/<name>)")] = None,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option(help="continue the run in the run folder")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run folder")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="validate and run one step, write nothing")] = False,
) -> None:
    """Train a recipe; writes config.yaml, metrics.csv, checkpoints/ and report.md in the run folder."""
    from kdforge.config import Recipe
    from kdforge.run import dry_run as run_dry
    from kdforge.run import train as run_train

    if resume and recipe.is_dir():
        out = out or recipe
        recipe = recipe / "config.yaml"
    r = Recipe.from_yaml(recipe, set_)
    if dry_run:
        res = run_dry(r)
        typer.echo(f"recipe {str(recipe)!r} is valid; one step: " + ", ".join(f"{k}={v:.4f}" for k, v in res.items()))
        return
    run_dir = out or Path("runs") / r.name
    result = run_train(r, run_dir, resume=resume, overwrite=overwrite)
    typer.echo(f"test top-1 {result.test_last['top1']:.2f}% (last), {result.test_best['top1']:.2f}% "
               f"(best by val, epoch {result.best_epoch + 1}); run folder: {run_dir}")


@app.command("eval")
def eval_(
    source: Annotated[Path, typer.Argument(help="run folder or .safetensors checkpoint")],
    data: Annotated[str | None, typer.Option(help="data set name (default: the one it was trained on)")] = None,
    split: Annotated[str, typer.Option(help="test, val or train")] = "test",
    which: Annotated[str, typer.Option(help="best or last (run folders)")] = "best",
    set_: SetOpt = None,
) -> None:
    """Evaluate a trained model: top-1, top-5 and loss."""
    from kdforge.evaluate import evaluate_source

    if which not in ("best", "last"):
        raise KdforgeError(f"bad --which {which!r} (valid: best, last)")
    res = evaluate_source(source, data, split, which, [f"data.{s}" if not s.startswith("data.") else s
                                                        for s in (set_ or [])])
    typer.echo(json.dumps(res))


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="run folder")] = Path("runs/demo"),
    seeds: Annotated[int, typer.Option(help="number of paired student seeds")] = 5,
    overwrite: Annotated[bool, typer.Option(help="replace an existing demo folder")] = False,
    quick: Annotated[bool, typer.Option(help="tiny budget, for smoke tests")] = False,
    threads: Annotated[int | None, typer.Option(help="torch threads per run (train.threads)")] = None,
) -> None:
    """Shipped teacher, student alone and KD student on the embedded Fashion-MNIST subset; prints the table."""
    from kdforge.demo import run_demo

    run_demo(out, seeds=seeds, overwrite=overwrite, quick=quick, threads=threads)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="run folder")]) -> None:
    """Rewrite report.md and curves.png of a run folder."""
    from kdforge.report.run_report import write_run_report

    typer.echo(str(write_run_report(run_dir)))


@app.command("list")
def list_(what: Annotated[str, typer.Argument(help="models, datasets, methods, losses or benches")]) -> None:
    """List registered names."""
    import kdforge  # noqa: F401 - registers everything
    from kdforge.bench import load_benches
    from kdforge.registry import DATASETS, LOSSES, METHODS, MODELS

    tables = {"models": MODELS, "datasets": DATASETS, "methods": METHODS, "losses": LOSSES,
              "benches": load_benches()}
    if what not in tables:
        from kdforge.errors import closest

        raise KdforgeError(f"cannot list {what!r}{closest(what, tables)} (valid: {', '.join(tables)})")
    reg = tables[what]
    for name in reg.names():
        doc = (getattr(reg.get(name), "__doc__", None) or "").strip().splitlines()
        typer.echo(f"{name:24s} {doc[0] if doc else ''}")


@app.command()
def bench(
    name: Annotated[str, typer.Argument(help="benchmark name ('kdforge list benches')")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="where to write tables/plots")] = None,
    quick: Annotated[bool, typer.Option(help="tiny budget, for smoke tests")] = False,
) -> None:
    """Run a named benchmark and write its table."""
    from kdforge.bench import load_benches

    load_benches().get(name)(out=out, quick=quick)


@app.command()
def cil(
    recipe: Annotated[Path, typer.Argument(help="class-incremental recipe (recipes/continual/*.yaml)")],
    run_dir: Annotated[Path | None, typer.Option("--run-dir", "-r", help="save per task here; resumes")] = None,
) -> None:
    """Run an exemplar-free class-incremental recipe and print its accuracy matrix and metrics."""
    from kdforge.continual import run_recipe

    res = run_recipe(recipe, run_dir)
    for row in res.matrix:
        typer.echo(" ".join("   -  " if v is None else f"{v:6.2f}" for v in row))
    typer.echo(" ".join(f"{k}={v:.2f}" for k, v in res.metrics.items()))


@app.command()
def prune(
    recipe: Annotated[Path, typer.Argument(help="prune recipe (YAML)")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="run folder (default runs/prune/<name>)")] = None,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run folder")] = False,
) -> None:
    """Prune layers by a recipe (SGLP or a baseline), optionally heal by KD, report before/after."""
    from kdforge.prune.cli import prune_command

    prune_command(recipe, out, set_, overwrite)


def main(argv: list[str] | None = None) -> int:
    """Entry point: every user error is one line on stderr and exit code 2."""
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="kdforge")
        return rv if isinstance(rv, int) else 0
    except KdforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except click.UsageError as e:
        print(f"error: {e.format_message()}", file=sys.stderr)
        return 2
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
