"""The run-folder layer every command uses (open_run): kinds, refusals, overwrite aside, rollback, lock, Ctrl-C."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from kdforge.engine.run_dir import (
    LOCK,
    MARKER,
    RunInterrupted,
    describe_folder,
    open_run,
    release_all,
    run_kind,
)
from kdforge.errors import KdforgeError


@pytest.fixture(autouse=True)
def _unlock() -> None:
    yield
    release_all()


def test_marker_records_the_kind_and_readers_name_it(tmp_path: Path) -> None:
    d = tmp_path / "p"
    with open_run(d, "prune") as lease:
        (lease / "results.json").write_text("{}")
    assert run_kind(d) == "prune"
    assert "kind: prune" in (d / MARKER).read_text()
    assert "'kdforge prune' run" in describe_folder(d) and "kdforge eval" in describe_folder(d)
    old = tmp_path / "old"
    old.mkdir()
    (old / MARKER).write_text("made by kdforge; 'kdforge train --overwrite' may replace this folder\n")
    assert run_kind(old) == "train"  # a marker from before the kinds
    assert run_kind(tmp_path) is None and "not made by kdforge" in describe_folder(tmp_path)


def test_existing_folder_refused_with_its_kind_and_overwrite_replaces_any_kind(tmp_path: Path) -> None:
    d = tmp_path / "run"
    with open_run(d, "train") as lease:
        (lease / "results.json").write_text("old")
    with pytest.raises(KdforgeError, match=r"already exists.*'kdforge train' run.*--overwrite"):
        with open_run(d, "prune"):
            pass
    with open_run(d, "prune", overwrite=True) as lease:
        # until the first durable write the old run waits aside, next to the folder
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".run.old-")]
        (lease / "results.json").write_text("new")
    assert (d / "results.json").read_text() == "new" and run_kind(d) == "prune"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.old-")]


def test_failed_setup_puts_the_old_run_back_and_leaves_nothing_blocking(tmp_path: Path) -> None:
    d = tmp_path / "run"
    with open_run(d, "cil") as lease:
        (lease / "result.json").write_text("old")
    with pytest.raises(KdforgeError, match="bad recipe"):
        with open_run(d, "prune", overwrite=True) as lease:
            (lease / "half").write_text("x")
            raise KdforgeError("bad recipe")
    assert (d / "result.json").read_text() == "old" and run_kind(d) == "cil" and not (d / "half").exists()
    new = tmp_path / "new"
    with pytest.raises(KdforgeError):
        with open_run(new, "prune"):
            raise KdforgeError("bad recipe")
    assert not new.exists()  # the corrected retry starts clean
    with open_run(new, "prune") as lease:
        (lease / "results.json").write_text("{}")


def test_resume_of_another_kind_says_what_it_is(tmp_path: Path) -> None:
    d = tmp_path / "a"
    with open_run(d, "audio") as lease:
        (lease / "stages.json").write_text("{}")
    with pytest.raises(KdforgeError, match=r"'kdforge audio' run.*audio-predict"):
        with open_run(d, "train", resume=True):
            pass
    with open_run(d, "audio", resume="auto") as lease:  # a rerun of the same kind continues it
        assert lease.resumed and (d / "stages.json").is_file()


def test_lock_refuses_a_second_writer(tmp_path: Path) -> None:
    d = tmp_path / "c"
    with open_run(d, "cache") as lease:
        (lease / "x").write_text("1")
    fd = os.open(d / LOCK, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process writing it
    try:
        with pytest.raises(KdforgeError, match="in use by another kdforge run"):
            with open_run(d, "cache", resume="auto"):
                pass
    finally:
        os.close(fd)


def test_ctrl_c_is_one_resume_line(tmp_path: Path) -> None:
    d = tmp_path / "r"
    with pytest.raises(RunInterrupted) as e:
        with open_run(d, "cil", resume_cmd=f"kdforge cil R.yaml -r {d}"):
            raise KeyboardInterrupt
    assert str(e.value) == f"interrupted; resume with: kdforge cil R.yaml -r {d}"
    with pytest.raises(RunInterrupted) as e:
        with open_run(tmp_path / "s", "cil", resume_cmd="kdforge cil R.yaml -r S"):
            raise RunInterrupted("interrupted at epoch 2, step 5; resume with: kdforge train X --resume")
    assert str(e.value) == "interrupted at epoch 2, step 5; resume with: kdforge cil R.yaml -r S"


def test_the_engine_imports_no_report_or_profile_module() -> None:
    import ast

    engine = Path(__file__).resolve().parents[1] / "src" / "kdforge" / "engine"
    for f in engine.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [
                a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert not any(n.startswith(("kdforge.report", "kdforge.profile")) for n in names), (f.name, names)
