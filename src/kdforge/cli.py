"""The ``kdforge`` command: demo, train, eval, bench, report, list."""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

try:  # typer >= 0.20 vendors its own click
    from typer._click import exceptions as click
except ImportError:  # pragma: no cover
    from click import exceptions as click  # type: ignore[no-redef]

from kdforge.errors import KdforgeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="kdforge: make deep models small and fast (distillation, pruning, continual).")

SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a recipe key: --set optim.lr=0.1")]


def _version(value: bool) -> None:
    if value:
        from kdforge import __version__

        typer.echo(f"kdforge {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """kdforge: make deep models small and fast (distillation, pruning, continual)."""


def _recipe_path(path: Path) -> Path:
    """A recipe path as given, or the packaged recipe it names (``recipes/AREA/NAME.yaml`` outside a checkout)."""
    from kdforge.recipe_files import resolve_recipe

    return resolve_recipe(path)


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

    if resume and not recipe.exists() and recipe.suffix not in (".yaml", ".yml"):
        raise KdforgeError(f"cannot resume {str(recipe)!r}: no such run folder (the run stopped before it started); "
                           f"start it again: kdforge train RECIPE -o {recipe}")
    if resume and recipe.is_dir():
        from kdforge.engine.run_dir import describe_folder, run_kind

        if run_kind(recipe) not in (None, "train"):
            raise KdforgeError(f"cannot resume with 'kdforge train': {describe_folder(recipe)}")
        out = out or recipe
        recipe = recipe / "config.yaml"
        if not recipe.is_file():
            raise KdforgeError(f"cannot resume {str(out)!r}: it has no config.yaml (the run stopped before it "
                               "started); start it again: kdforge train RECIPE -o " + str(out))
    recipe = _recipe_path(recipe)
    r = Recipe.from_yaml(recipe, set_)
    from kdforge.models.loading import check_teacher_weights

    check_teacher_weights(r.method.model_dump())
    if dry_run:
        res = run_dry(r)
        typer.echo(f"recipe {str(recipe)!r} is valid; one step: " + ", ".join(f"{k}={v:.4f}" for k, v in res.items()))
        return
    run_dir = out or Path("runs") / r.name
    from kdforge.engine.run_dir import check_writable_dir

    check_writable_dir(run_dir, "run folder")  # before data and model are built
    t0 = time.perf_counter()
    result = run_train(r, run_dir, resume=resume, overwrite=overwrite)
    key = result.monitor
    last = result.test_last.get(key)
    line = f"test {key} {last:.2f} (last)" if last is not None else "done"
    if result.test_best is not None and result.test_best.get(key) is not None:
        line += f", {result.test_best[key]:.2f} (best by val, epoch {result.best_epoch})"
    elif result.best_epoch < 0:
        line += " (no validation split: only the last checkpoint is kept)"
    if not _is_main_rank():  # the end of a run is said once for the launch, not once per process
        return
    typer.echo(f"{line}; run folder: {run_dir}")
    end_lines(run_dir, time.perf_counter() - t0, [f"kdforge eval {run_dir}", f"kdforge report {run_dir.parent} -o "
                                                  "report", f"tensorboard --logdir {run_dir.parent}"])


def end_lines(run_dir: Path | None, seconds: float, next_cmds: list[str]) -> None:
    """The last lines of a command that ran something: wall time, where the report is, what to run next."""
    from kdforge.engine.callbacks import fmt_duration

    report = next((run_dir / f for f in ("report.md", "report.html") if run_dir and (run_dir / f).is_file()), None)
    typer.echo(f"wall time {fmt_duration(seconds)}" + (f"; report: {report}" if report else ""))
    if next_cmds:
        typer.echo("next: " + "   ".join(next_cmds))


@app.command("eval")
def eval_(
    source: Annotated[Path, typer.Argument(help="run folder or .safetensors checkpoint")],
    data: Annotated[str | None, typer.Option(help="data set name (default: the one it was trained on)")] = None,
    split: Annotated[str, typer.Option(help="test, val or train")] = "test",
    which: Annotated[str, typer.Option(help="best or last (run folders; best falls back to last where a run "
                                              "kept no best)")] = "best",
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object (for scripts)")] = False,
) -> None:
    """Evaluate a trained model with its method's metrics (as in results.json: test_best or test_last)."""
    from kdforge.evaluate import evaluate_source

    if which not in ("best", "last"):
        raise KdforgeError(f"bad --which {which!r} (valid: best, last)")
    res = evaluate_source(source, data, split, which, [f"data.{s}" if not s.startswith("data.") else s
                                                        for s in (set_ or [])])
    if as_json:
        typer.echo(json.dumps(res))
        return
    from kdforge.report.units import format_metric

    about = ", ".join(f"{k} {res[k]}" for k in ("model", "method") if res.get(k) is not None)
    typer.echo(f"{source} ({res.get('checkpoint', which)} checkpoint" + (f"; {about}" if about else "") + ")")
    metrics = {k: v for k, v in res.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    typer.echo(f"{res.get('split', split)} split of {res.get('data', 'its data')}: "
               + "   ".join(format_metric(k, v) for k, v in metrics.items()))


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="run folder")] = Path("runs/demo"),
    seeds: Annotated[int, typer.Option(min=1, max=1000, help="number of paired student seeds")] = 5,
    overwrite: Annotated[bool, typer.Option(help="replace an existing demo folder")] = False,
    quick: Annotated[bool, typer.Option(help="tiny budget, for smoke tests")] = False,
    threads: Annotated[int | None, typer.Option(help="torch threads per run (train.threads)")] = None,
) -> None:
    """Shipped teacher, student alone and KD student on the embedded Fashion-MNIST subset; prints the table."""
    from kdforge.demo import run_demo

    run_demo(out, seeds=seeds, overwrite=overwrite, quick=quick, threads=threads)


@app.command()
def report(
    dirs: Annotated[list[Path], typer.Argument(help="a run folder; with -o: run folders, runs/, runs/bench/NAME, "
                                                    "docs/benchmarks (searched recursively)")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write one static HTML page here "
                                                                  "(OUT/index.html, images in OUT/assets)")] = None,
    title: Annotated[str, typer.Option(help="the page's title (with -o)")] = "kdforge report",
    overwrite: Annotated[bool, typer.Option(help="with -o: replace an existing kdforge folder of another kind")
                         ] = False,
) -> None:
    """Rewrite report.md and curves.png of a run folder; with -o, one offline HTML page over runs and benchmarks."""
    if out is None:
        if len(dirs) > 1:
            raise KdforgeError(f"{len(dirs)} folders given: without -o only one run folder's report.md is rewritten; "
                               "pass -o SITE to build one HTML page over them all")
        from kdforge.report.run_report import write_run_report

        typer.echo(str(write_run_report(dirs[0])))
        return
    from kdforge.engine.run_dir import open_run
    from kdforge.report.site import build_site

    with open_run(out, "report", resume="auto", overwrite=overwrite, legacy=lambda p: (p / ".kdforge-site").is_file(),
                  resume_cmd=f"kdforge report {' '.join(map(str, dirs))} -o {out}"):
        page = build_site(dirs, out, title)
    typer.echo(str(page))


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
        typer.echo(f"{name:24s} {doc[0].replace('``', '') if doc else ''}")  # docstring markup is not for people


@app.command()
def recipes(
    names: Annotated[list[str] | None, typer.Argument(help="areas, recipes or globs: demo, prune/sglp-digits-resnet20, "
                                                        "'cifar100/kd_*' (default: all)")] = None,
    copy: Annotated[Path | None, typer.Option("--copy", help="copy them to DIR/AREA/NAME.yaml (with the weights "
                                                               "they name), to edit and train")] = None,
    overwrite: Annotated[bool, typer.Option(help="with --copy: replace existing files")] = False,
) -> None:
    """List the recipes shipped in the package, or copy them into a folder."""
    from kdforge.recipe_files import copy_recipes, select

    chosen = select(names)
    if copy is None:
        for r in chosen:
            typer.echo(f"{r.name:42s} {r.summary[:100]}")
        first = next((r for r in chosen if r.name == "demo/kd"), chosen[0])
        typer.echo(f"{plural(len(chosen), 'recipe')}; run one: {recipe_command(first.name)} (a checkout's path "
                   "or the packaged copy); copy: kdforge recipes NAME --copy DIR")
        return
    written = copy_recipes(chosen, copy, overwrite)
    typer.echo(f"copied {plural(len(written), 'file')} to {copy}")


#: the command that runs a shipped recipe of each area (the rest: kdforge train)
AREA_COMMANDS = {"audio": "kdforge audio", "continual": "kdforge cil", "prune": "kdforge prune",
                 "cache": "kdforge cache build"}


def recipe_command(name: str) -> str:
    """The command that runs the shipped recipe ``AREA/NAME``."""
    return f"{AREA_COMMANDS.get(name.split('/', 1)[0], 'kdforge train')} recipes/{name}.yaml"


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 recipe``, ``2 recipes``, ``1,024 files``."""
    return f"{n:,} {word if n == 1 else many or word + 's'}"


@app.command()
def bench(
    name: Annotated[str, typer.Argument(help="benchmark name ('kdforge list benches')")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="where to write (default runs/bench/NAME)")] = None,
    quick: Annotated[bool, typer.Option(help="tiny budget, a smoke run (never published)")] = False,
    publish: Annotated[bool, typer.Option(help="also update docs/benchmarks/NAME.{md,json,png}")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing kdforge folder of another kind at --out")
                         ] = False,
) -> None:
    """Run a named benchmark; writes runs/bench/NAME (or --out), and with --publish the docs page."""
    from kdforge.bench.common import run_bench

    typer.echo(str(run_bench(name, out, quick=quick, publish=publish, overwrite=overwrite)))


@app.command()
def cil(
    recipe: Annotated[Path, typer.Argument(help="class-incremental recipe (recipes/continual/*.yaml)")],
    run_dir: Annotated[Path | None, typer.Option("--run-dir", "-r", help="save every stage here; resumes")] = None,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing kdforge folder (of any kind) at -r")] = False,
) -> None:
    """Run an exemplar-free class-incremental recipe and print its accuracy matrix and metrics."""
    from kdforge.continual.driver import run
    from kdforge.continual.recipe import CilRecipe

    r = CilRecipe.from_yaml(_recipe_path(recipe), set_)
    if run_dir is not None:
        from kdforge.continual.driver import _legacy_run
        from kdforge.engine.run_dir import check_run_folder

        check_run_folder(run_dir, "cil", overwrite=overwrite, resume="auto", legacy=_legacy_run)
    c = r.cil
    typer.echo(f"kdforge cil {r.name}: learner {c.learner}, backbone {c.model}, data {r.data.name}; "
               f"{c.tasks + 1} tasks: {c.base} base classes, then {c.tasks} x {c.increment} new classes; "
               f"{plural(c.base_epochs or r.train.epochs, 'epoch')} on the base task, "
               f"{r.train.epochs} on each later one"
               + (f"; run folder {run_dir} (a rerun resumes)" if run_dir else ""), err=True)
    res = run(r, run_dir, callbacks=[_cil_status(c.tasks + 1)], overwrite=overwrite,
              resume_cmd=f"kdforge cil {recipe} -r {run_dir}")
    n = len(res.matrix)
    typer.echo("accuracy (%) on each task's test classes (columns) after learning task t (rows):")
    typer.echo(" " * 10 + "".join(f"{f'task {j + 1}':>9s}" for j in range(n)))
    for t, row in enumerate(res.matrix):
        typer.echo(f"{f'after {t + 1}':10s}" + "".join(f"{'-':>9s}" if v is None else f"{v:9.2f}" for v in row))
    from kdforge.report.units import readable, unit

    typer.echo("; ".join(f"{readable(k)} {v:.2f}{(' ' + unit(k)) if unit(k) else ''}" for k, v in res.metrics.items()))
    typer.echo("time per task (s): " + " ".join(f"{s:.1f}" for s in res.task_time_s))


@app.command()
def audio(
    recipe: Annotated[Path, typer.Argument(help="audio recipe (src/kdforge/recipes/audio/*.yaml)")],
    run_dir: Annotated[Path | None, typer.Option("--run-dir", "-r", help="save every stage here; resumes")] = None,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing kdforge folder (of any kind) at -r")] = False,
) -> None:
    """Run an audio recipe (its stages, then late fusion); print each stage's and the fusion's test metrics."""
    from kdforge.audio.recipe import AudioRecipe, check_run_dir
    from kdforge.audio.recipe import run as run_audio

    r = AudioRecipe.from_yaml(_recipe_path(recipe), set_)
    check_run_dir(run_dir, overwrite)
    res = run_audio(r, run_dir, overwrite=overwrite, resume_cmd=f"kdforge audio {recipe} -r {run_dir}")
    for name, m in res.stages.items():
        t = m.get("test", {})
        typer.echo(f"{name:14s} " + " ".join(f"{k}={t[k]:.2f}" for k in ("top1", "top5", "mca", "ece") if k in t))
    for label in ("uniform", "published", "searched"):
        if label in res.fusion:
            t, w = res.fusion[label]["test"], res.fusion[label]["weights"]
            typer.echo(f"fused {label:8s} ({', '.join(f'{x:.2f}' for x in w)}) top1={t['top1']:.2f} mca={t['mca']:.2f}")


@app.command()
def regdb(
    recipe: Annotated[Path, typer.Argument(help="a RegDB recipe (src/kdforge/recipes/reid/regdb_resnet50.yaml)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder of the trial runs and the summary")] = Path(
        "runs/regdb"),
    trials: Annotated[str, typer.Option(help="RegDB splits to run: 1-10, 1,3,5 or one number")] = "1-10",
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option(help="retrain trials that already have results")] = False,
) -> None:
    """Train a RegDB recipe on each official split, test both directions, print the mean over the trials."""
    from kdforge.config import Recipe
    from kdforge.reid.regdb import parse_trials, run_trials

    chosen = parse_trials(trials)
    res = run_trials(Recipe.from_yaml(_recipe_path(recipe), set_), out, chosen, overwrite)
    m = res["mean"]
    for prefix, label in (("", "visible→thermal"), ("i2v_", "thermal→visible")):
        typer.echo(f"{label}: " + ", ".join(f"{k} {m[prefix + k]['mean']:.2f} ± {m[prefix + k]['std']:.2f}"
                                             for k in ("rank1", "mAP", "mINP") if prefix + k in m))
    typer.echo(f"{len(chosen)} trial(s); summary: {out / 'regdb.md'}")


@app.command("audio-predict")
def audio_predict(
    run_dir: Annotated[Path, typer.Argument(help="a finished audio run folder (kdforge audio RECIPE -r FOLDER)")],
    audio_file: Annotated[Path, typer.Argument(help="WAV (or any format soundfile reads), any sample rate")],
    stage: Annotated[str | None, typer.Option(help="which stage's model (default: the last fused one)")] = None,
    top: Annotated[int, typer.Option(min=1, max=100_000, help="how many classes to print")] = 5,
) -> None:
    """Classify your own audio file with a trained audio run (resampled to the run's rate, 5 views)."""
    from kdforge.audio.recipe import predict_run

    for name, p in predict_run(run_dir, audio_file, stage, top):
        typer.echo(f"{p:.4f}  {name}")


def _cil_status(tasks: int) -> object:
    """An engine callback that says which task and stage of a class-incremental run is training."""
    from kdforge.engine.callbacks import Callback

    class CilStatus(Callback):
        def on_init(self, trainer: object) -> None:
            trainer.brief_banner = True  # type: ignore[attr-defined]  # one line per stage, not the full banner
            name = trainer.recipe.name  # type: ignore[attr-defined]
            stage = name.rsplit("-task", 1)[-1]
            if trainer.main and trainer.recipe.train.progress != "silent":  # type: ignore[attr-defined]
                task = int(stage.split("-", 1)[0]) + 1 if stage[:1].isdigit() else "?"
                run_dir = trainer.run_dir  # type: ignore[attr-defined]
                where = f"folder stages/{run_dir.name}, " if run_dir is not None else ""
                print(f"task {task}/{tasks} ({where}numbered from 0 in stage names)", file=sys.stderr, flush=True)

    return CilStatus()


@app.command()
def prune(
    recipe: Annotated[Path, typer.Argument(help="prune recipe (YAML)")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="run folder (default runs/prune/<name>)")] = None,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run folder")] = False,
    resume: Annotated[bool, typer.Option(help="continue a prune run of the same recipe at -o (its stored analysis, "
                                               "its heal from the last checkpoint)")] = False,
) -> None:
    """Prune layers by a recipe (SGLP or a baseline), optionally heal by KD, report before/after."""
    from kdforge.prune.cli import prune_command

    prune_command(_recipe_path(recipe), out, set_, overwrite, resume)


@app.command()
def compress(
    recipe: Annotated[Path, typer.Argument(help="compress recipe (recipes/compress/*.yaml)")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="folder (default runs/compress/<name>)")] = None,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing compress folder")] = False,
) -> None:
    """Compress a model to a budget (depth/width pruning healed by KD), export it and gate it (exit 1 if it fails)."""
    from kdforge.compress.cli import compress_command

    compress_command(_recipe_path(recipe), out, set_, overwrite)


@app.command("llm-distill")
def llm_distill(
    teacher: Annotated[str, typer.Argument(help="teacher: smollm2, a HF folder or hub id, a .gguf file, tiny:N")],
    data: Annotated[Path, typer.Argument(help="JSONL: prompt/response, prompt/completion, messages or text rows")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder: run/ (the engine's), student/, summary.json")],
    student: Annotated[str | None, typer.Option(help="student to train (same sources as the teacher)")] = None,
    drop_layers: Annotated[str | None, typer.Option(help="or: the teacher without these decoder layers, e.g. 3,7,11")
                           ] = None,
    loss: Annotated[list[str] | None, typer.Option(help="NAME[:key=value,...], repeatable: lm_jsd:beta=0.5 "
                                                        "lm_ce:weight=0.1 (default lm_fkl)")] = None,
    steps: Annotated[int, typer.Option(min=1)] = 50,
    lr: Annotated[float, typer.Option(min=0.0)] = 1e-4,
    batch_size: Annotated[int, typer.Option(min=1)] = 4,
    seq_len: Annotated[int, typer.Option(min=2)] = 256,
    template: Annotated[str, typer.Option(help="auto (the tokenizer's chat template if any) or plain")] = "auto",
    eval_fraction: Annotated[float, typer.Option(min=0.0, max=0.9, help="whole examples held out for perplexity")
                             ] = 0.1,
    on_policy: Annotated[float, typer.Option(help="GKD's λ: share of steps on the student's own samples")] = 0.0,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="on-policy sample length")] = 64,
    chunk: Annotated[int | None, typer.Option(min=1, help="tokens per loss chunk (default: 64 MB of logits)")] = None,
    seed: int = 0,
    resume: Annotated[bool, typer.Option(help="continue the run in OUT (same flags; from its last checkpoint)")
                      ] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing kdforge folder (of any kind) at -o")] = False,
) -> None:
    """Distil a causal LM on a JSONL file: the LM distillation guide as one command (student, losses, on-policy)."""
    from kdforge.errors import KdforgeError
    from kdforge.llm.cli import DistillArgs, distill_command

    try:
        drop = [int(x) for x in drop_layers.split(",") if x.strip()] if drop_layers else []
    except ValueError:
        raise KdforgeError(f"--drop-layers {drop_layers!r}: give layer indices separated by commas, e.g. 3,7,11"
                           ) from None
    res = distill_command(DistillArgs(teacher, data, out, student, drop, loss or ["lm_fkl"], steps, lr, batch_size,
                                      seq_len, template, eval_fraction, on_policy, max_new_tokens, chunk, seed, resume,
                                      overwrite))
    ppl = (f"; val perplexity {res['val_ppl_student']:.2f} (teacher {res['val_ppl_teacher']:.2f})"
           if "val_ppl_student" in res else "")
    first, last = (f"{res[k]:.4f}" if res.get(k) is not None else "?" for k in ("first_loss", "last_loss"))
    typer.echo(f"llm-distill: {res['steps']} steps, loss {first} → {last}{ppl}; student saved to {out / 'student'}")


@app.command()
def sample(
    run: Annotated[Path, typer.Argument(help="diffusion run folder or .safetensors checkpoint")],
    n: Annotated[int, typer.Option("-n", help="number of samples")] = 64,
    seed: Annotated[int, typer.Option(min=0, max=2**63 - 1, help="seed of the initial noise")] = 0,
    steps: Annotated[int | None, typer.Option(help="DDIM steps (default: the model's own; a distilled model "
                                                    "samples only with its own)")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="folder (default RUN/samples)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace a grid of the same name (steps, seed, n) in the sample "
                                                  "folder, or a kdforge folder of another kind at -o")] = False,
) -> None:
    """Sample a diffusion model with DDIM: a PNG grid and the samples as .npz."""
    from kdforge.diffusion.sample import sample_run

    png, npz = sample_run(run, n, seed, steps, out, overwrite=overwrite)
    typer.echo(f"{png}\n{npz}")


@app.command()
def fid(
    samples: Annotated[Path, typer.Argument(help="the .npz written by kdforge sample (e.g. -n 50000)")],
    inception: Annotated[Path, typer.Option(help="local FID Inception weights (pytorch-fid's "
                                                 "pt_inception-2015-12-05-6726825d.pth); nothing is downloaded")],
    reference: Annotated[str, typer.Option(help="'cifar10' (its 50k training images from --root), a .npz of "
                                                "mu/sigma (fid_stats_cifar10_train.npz) or of images")] = "cifar10",
    root: Annotated[Path, typer.Option(help="data folder holding CIFAR-10 (for --reference cifar10)")] = Path("data"),
    batch_size: Annotated[int, typer.Option(min=1, help="images per Inception batch")] = 200,
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
) -> None:
    """FID of diffusion samples against a reference, in the FID Inception (pool3) from a local weights file."""
    from kdforge.diffusion.metrics import fid as compute_fid

    r = compute_fid(samples, inception, reference, root, batch_size, device)
    typer.echo(f"FID {r['fid']:.3f} ({r['samples']} samples vs {reference})")


def _cache_commands() -> None:
    from kdforge.cache.cli import cache_app  # typer and the standard library only; the commands import lazily

    app.add_typer(cache_app, name="cache")


_cache_commands()

def _one_line(msg: str) -> str:
    """A message on one line; an error re-raised from a DataLoader worker keeps only its own last line."""
    lines = [line.strip() for line in msg.splitlines() if line.strip()]
    if "Original Traceback" in msg and lines:
        last = lines[-1]
        return last.split(": ", 1)[1] if last.startswith("kdforge.errors.KdforgeError: ") else last
    return " ".join(lines)


def _is_main_rank() -> bool:
    """Whether this process is rank 0 of a launch (or not launched at all)."""
    import os

    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def _settle_runs(ok: bool) -> None:
    """Run folders this command replaced: keep the new run if it worked, else put the old one back."""
    from kdforge.engine import run_dir

    (run_dir.commit_pending if ok else run_dir.rollback_pending)()
    run_dir.release_all()


def _speaks_on_ctrl_c(fn: Any) -> Any:
    """A command body that prints the one "interrupted ...; resume with: ..." line on Ctrl-C (typer would exit
    130 silently) and turns an EOFError (a truncated file) into a one-line error instead of typer's "Aborted"."""
    if getattr(fn, "_kdforge_ctrl_c", False):
        return fn

    @functools.wraps(fn)
    def body(*args: Any, **kwargs: Any) -> Any:
        from kdforge.engine.run_dir import RunInterrupted

        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as e:
            if _is_main_rank():
                print(str(e) if isinstance(e, RunInterrupted) and str(e) else "interrupted", file=sys.stderr)
            raise typer.Exit(130) from None
        except EOFError as e:
            raise KdforgeError(f"a file ended early (truncated?): {e or 'EOFError'}") from None

    body._kdforge_ctrl_c = True  # type: ignore[attr-defined]
    return body


def _wrap_commands(t: typer.Typer) -> None:
    for c in t.registered_commands:
        c.callback = _speaks_on_ctrl_c(c.callback)
    for g in t.registered_groups:
        if g.typer_instance is not None:
            _wrap_commands(g.typer_instance)


def main(argv: list[str] | None = None) -> int:
    """Entry point: every user error is one line on stderr and exit code 2 (on every rank of a launch)."""
    from kdforge.engine import launch

    _wrap_commands(app)
    try:
        launch.join()  # before any work: a rank failing early must not leave the others at the rendezvous
        rv = app(args=argv, standalone_mode=False, prog_name="kdforge")
        _settle_runs(ok=True)
        launch.leave()
        return rv if isinstance(rv, int) else 0
    except KdforgeError as e:
        _settle_runs(ok=False)
        line = launch.error_line(_one_line(str(e)))  # a failure all ranks share: rank 0 speaks; else the rank itself
        if line is not None:
            print(line, file=sys.stderr)
        return 2
    except click.UsageError as e:
        if not e.format_message().strip():  # no arguments: the help was printed, there is no error to add
            return 0
        print(f"error: {e.format_message()}", file=sys.stderr)
        return 2
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt) as e:
        from kdforge.engine.run_dir import RunInterrupted

        cause = e if isinstance(e, RunInterrupted) else e.__cause__ or e.__context__
        if _is_main_rank():
            print(str(cause) if isinstance(cause, RunInterrupted) else "interrupted", file=sys.stderr)
        return 130
    except Exception:
        _settle_runs(ok=False)
        if launch.peer_failed():  # a collective broke because another rank failed: that rank has spoken
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
