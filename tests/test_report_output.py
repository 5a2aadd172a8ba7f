"""What a user sees of a run: the start banner, epoch lines, the run-folder format (and older folders),
the KD report, the cil output, and the CLI's help, version and shipped recipes."""

from __future__ import annotations

import csv
import glob
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib
import yaml

import kdforge as kd
from kdforge.cli import main
from kdforge.engine.callbacks import Callback
from kdforge.engine.run_format import read_metrics, read_results, upgrade_rows
from kdforge.engine.trainer import FitResult, Trainer, TrainingInterrupted, seed_everything
from kdforge.errors import KdforgeError
from kdforge.profile import count_params
from kdforge.report.run_report import curve_panels, write_run_report
from tests.conftest import digits_recipe

ROOT = Path(__file__).parents[1]
KD = {"name": "distill", "teacher": {"model": "mlp", "kwargs": {"hidden": [256, 128]}}, "student": {"model": "mlp"},
      "terms": [{"loss": "ce", "weight": 1.0}, {"loss": "kd", "weight": 0.9, "T": 4}]}


def _kd_recipe(epochs: int = 3, progress: str = "auto") -> kd.Recipe:
    r = digits_recipe(KD, epochs=epochs)
    r["train"].update(progress=progress, threads=1)
    return kd.Recipe.from_dict(r)


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 3-epoch KD run on digits, trained with progress 'auto' (no terminal); its folder and stderr."""
    import contextlib
    import io

    run = tmp_path_factory.mktemp("kd") / "run"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        kd.train(_kd_recipe(), run)
    return run, err.getvalue()


def test_banner_and_epoch_lines_without_a_terminal(kd_run: tuple[Path, str]) -> None:
    run, err = kd_run
    lines = err.splitlines()
    head = "\n".join(lines[:8])
    student_params = read_results(run / "results.json")["info"]["params"]
    for needle in ("method distill", "student  mlp", "teacher  mlp", "frozen", "1 x ce + 0.9 x kd",
                   "digits: 1,294 train, 144 val, 359 test; batch 64", "cpu, fp32, 1 process, 1 thread",
                   "21 per epoch, 63 in total (3 epochs)", f"{student_params / 1e3:.1f} k params"):
        assert needle in head, (needle, head)
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert [line.split()[1] for line in epoch_lines] == ["1/3", "2/3", "3/3"]
    assert all(" lr " in line and "samples/s" in line for line in epoch_lines)
    assert all("ETA " in line for line in epoch_lines[:-1]) and "ETA" not in epoch_lines[-1]


def test_run_folder_format_epochs_from_one_accuracies_in_percent(kd_run: tuple[Path, str]) -> None:
    run, _ = kd_run
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert all(len(r["epoch_time_s"].split(".")[-1]) <= 3 for r in rows)  # rounded where people read it
    accs = [float(r["train_acc"]) for r in rows]
    assert all(5 < a <= 100 for a in accs) and accs[-1] > accs[0]  # %, not a fraction
    res = json.loads((run / "results.json").read_text())
    assert res["format"] == 2 and res["epochs"] == 3
    vals = [float(r["val_top1"]) for r in rows]
    assert res["best_epoch"] == 1 + vals.index(max(vals))  # counted from 1, as the csv
    assert res["history"][0]["epoch"] == 1
    info = res["info"]
    assert info["teacher"] == "mlp" and info["model"] == "mlp" and info["flops"] > 0
    assert info["params"] < info["teacher_params"]  # a (256, 128) teacher, a (128, 64) student
    report = (run / "report.md").read_text()
    assert f"(epoch {res['best_epoch']})" in report


def _as_format_1(src: Path, dst: Path) -> None:
    """What kdforge wrote before format 2: epochs from 0, train accuracy a fraction, no format key."""
    shutil.copytree(src, dst)
    with (src / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["epoch"] = str(int(r["epoch"]) - 1)
        r["train_acc"] = repr(float(r["train_acc"]) / 100)
    with (dst / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    res = json.loads((src / "results.json").read_text())
    del res["format"], res["info"]
    res["best_epoch"] -= 1
    for h in res["history"]:
        h["epoch"] -= 1
        h["train_acc"] /= 100
    (dst / "results.json").write_text(json.dumps(res))


def test_older_run_folders_read_and_resume_in_todays_format(kd_run: tuple[Path, str], tmp_path: Path) -> None:
    new, _ = kd_run
    old = tmp_path / "old"
    _as_format_1(new, old)
    for a_row, b_row in zip(read_metrics(old / "metrics.csv"), read_metrics(new / "metrics.csv"), strict=True):
        assert a_row == pytest.approx(b_row)
    a, b = FitResult.from_json(read_results(old / "results.json")), FitResult.from_json(
        json.loads((old / "results.json").read_text()))
    want = json.loads((new / "results.json").read_text())
    assert a.best_epoch == b.best_epoch == want["best_epoch"]
    assert [h["epoch"] for h in b.history] == [1, 2, 3]
    assert b.history[-1]["train_acc"] == pytest.approx(want["history"][-1]["train_acc"])
    report = write_run_report(old).read_text()
    assert f"best val top1 | {want['best_value']:.2f} (epoch {want['best_epoch']})" in report
    # continuing the old folder to 4 epochs: one consistent file (epochs 1..4, accuracies in %)
    r = _kd_recipe(epochs=4, progress="silent")
    res = kd.train(r, old, resume=True)
    rows = read_metrics(old / "metrics.csv")
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4] and res.epochs == 4
    assert all(5 < row["train_acc"] <= 100 for row in rows)


def test_upgrade_rows_leaves_format_2_alone() -> None:
    rows = [{"epoch": "1", "train_acc": "55.0"}]
    assert upgrade_rows(rows) is rows
    assert upgrade_rows([{"epoch": "0", "train_acc_peer1": "0.5", "val_top1": "50"}]) == [
        {"epoch": "1", "train_acc_peer1": "50.0", "val_top1": "50"}]


class _StopAtEpoch(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_start(self, trainer: Trainer) -> None:
        if trainer.epoch == self.epoch:
            raise KeyboardInterrupt


def test_resume_is_announced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kdforge.data import load_data
    from kdforge.method import DataInfo, build_method

    r = kd.Recipe.from_dict(digits_recipe({"name": "supervised", "model": {"model": "mlp"}}, epochs=3))
    r.train.progress = "auto"

    def trainer(resume: bool, callbacks: tuple = ()) -> Trainer:
        seed_everything(r.seed)
        data = load_data(r.data)
        m = build_method(r.method.model_dump(), DataInfo(data.num_classes, data.in_chans, data.image_size))
        return Trainer(m, data, r, tmp_path / "run", resume=resume, callbacks=callbacks)

    with pytest.raises(TrainingInterrupted):
        trainer(False, (_StopAtEpoch(2),)).fit()
    capsys.readouterr()
    t = trainer(True)
    res = t.fit()
    err = capsys.readouterr().err
    assert "resuming from epoch 3, step 42" in err and err.count("\nepoch ") == 1 and res.epochs == 3
    assert res.info["params"] == count_params(t.method.deployable()) > 0


def test_kd_report_names_models_terms_and_plots_each_term(kd_run: tuple[Path, str]) -> None:
    run, _ = kd_run
    text = (run / "report.md").read_text()
    assert "- student: `mlp`" in text and "- teacher: `mlp` (hidden=[256, 128])" in text
    assert "| ce | 1.0 | — |" in text and "| kd | 0.9 | T=4 |" in text
    rows = read_metrics(run / "metrics.csv")
    assert {"train_loss_ce", "train_loss_kd"} <= set(rows[0])
    # the weighted sum of the terms is the logged total
    for row in rows:
        assert row["train_loss"] == pytest.approx(row["train_loss_ce"] + 0.9 * row["train_loss_kd"], rel=1e-4)
    assert [p[0] for p in curve_panels(rows, "top1")] == ["train_loss", "val_top1", "val_loss", "lr"]
    assert [p[0] for p in curve_panels([{"epoch": 1, "train_loss": 1.0}])] == ["train_loss"]
    assert (run / "curves.png").stat().st_size > 10_000


def test_cli_help_version_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr()
    assert "Usage: kdforge" in out.out and "recipes" in out.out and "error" not in out.err
    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"kdforge {kd.__version__}"
    assert main(["report", "a", "b"]) == 2
    assert "pass -o SITE" in capsys.readouterr().err


def test_every_recipe_ships_and_can_be_listed_and_copied(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = ROOT / "src" / "kdforge"
    files = {p.relative_to(pkg).as_posix() for p in (pkg / "recipes").rglob("*") if p.is_file()}
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["kdforge"]
    shipped = {f for pat in patterns for f in glob.glob(pat, root_dir=pkg, recursive=True)}
    assert {f for f in files if f.endswith((".yaml", ".safetensors"))} <= shipped
    # the checkout's recipes/ is a symlink to the packaged folder, tracked by git as a link
    assert (ROOT / "recipes").is_symlink() and (ROOT / "recipes").resolve() == (pkg / "recipes").resolve()
    ls = subprocess.run(["git", "ls-files", "-s", "recipes"], cwd=ROOT, capture_output=True, text=True)
    if ls.returncode == 0 and ls.stdout:
        assert ls.stdout.startswith("120000 ")
    assert main(["recipes"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[:-1]]
    assert sorted(listed) == sorted(f.removeprefix("recipes/").removesuffix(".yaml") for f in files
                                    if f.endswith(".yaml"))
    monkeypatch.chdir(tmp_path)
    assert main(["recipes", "demo", "--copy", "mine"]) == 0
    kd_yaml = yaml.safe_load((tmp_path / "mine" / "demo" / "kd.yaml").read_text())
    # the shipped teacher came along, named relative to the copied recipe
    assert (tmp_path / "mine" / "demo" / kd_yaml["method"]["teacher"]["checkpoint"]).is_file()
    before = (tmp_path / "mine" / "demo" / "kd.yaml").read_text()
    (tmp_path / "mine" / "demo" / "kd.yaml").write_text(before + "# edited\n")
    capsys.readouterr()
    assert main(["recipes", "demo", "--copy", "mine"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "mine" / "demo" / "kd.yaml").read_text().endswith("# edited\n")
    assert main(["recipes", "dmeo"]) == 2 and "did you mean 'demo'" in capsys.readouterr().err
    # outside a checkout, a README path names the packaged recipe
    assert main(["train", "recipes/demo/student.yaml", "--dry-run"]) == 0
    assert "is valid" in capsys.readouterr().out


def test_cil_says_what_it_does_and_labels_its_matrix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "cil.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "cil-t", "data": {"name": "digits", "batch_size": 64, "val_fraction": 0.0},
        "optim": {"name": "adam", "lr": 1e-3}, "train": {"epochs": 1, "threads": 1},
        "cil": {"learner": "finetune", "base": 4, "increment": 3, "tasks": 2, "model": "mlp"}}))
    assert main(["cil", str(recipe), "-r", str(tmp_path / "run")]) == 0
    out = capsys.readouterr()
    assert "learner finetune" in out.err and "3 tasks: 4 base classes, then 2 x 3 new classes" in out.err
    assert "1 epoch on the base task" in out.err and "x 1 epoch," in out.err  # not "1 epochs"
    # the folder each task trains in is named as it is on disk
    (folder,) = re.findall(r"task 2/3 \(folder (stages/[^,]+), numbered from 0 in stage names\)", out.err)
    assert "task1" in folder and (tmp_path / "run" / folder / "metrics.csv").is_file()
    assert "average incremental accuracy" in out.out and "last accuracy" in out.out and " %" in out.out
    assert "average incremental accuracy (tasks weighted equally)" in out.out and "_" not in out.out.splitlines()[-2]
    lines = out.out.splitlines()
    assert lines[0].startswith("accuracy (%) on each task's test classes (columns) after learning task t (rows)")
    assert lines[1].split() == ["task", "1", "task", "2", "task", "3"]
    assert [line.split()[:2] for line in lines[2:5]] == [["after", "1"], ["after", "2"], ["after", "3"]]
    assert lines[2].split()[3:] == ["-", "-"] and math.isfinite(float(lines[4].split()[-1]))


def test_bad_recipes_pattern_is_one_line() -> None:
    from kdforge.recipe_files import select

    with pytest.raises(KdforgeError, match=r"areas: .*demo"):
        select(["nothing-like-this"])
