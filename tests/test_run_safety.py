"""Run folders never lose data and faults are one line (issue 12's "What was seen" list, as regressions)."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kdforge.cli import main
from kdforge.engine import checkpoint as ck
from kdforge.engine.run_dir import LOCK, MARKER, CsvLog, prepare_run_dir, release_all
from kdforge.errors import KdforgeError
from tests.conftest import digits_recipe

MLP = {"name": "supervised", "model": {"model": "mlp", "kwargs": {"hidden": [16]}}}


def _recipe(tmp_path: Path, method: dict | None = None, epochs: int = 1, **extra: object) -> Path:
    r = digits_recipe(method or MLP, epochs=epochs, **extra)
    r["data"]["limit_train"] = 64
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def _err(capsys: pytest.CaptureFixture[str], code: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for n in needles:
        assert n in err, err
    return err


@pytest.fixture(autouse=True)
def _unlock() -> None:
    yield
    release_all()


# -- --overwrite ------------------------------------------------------------------------------------------
def test_overwrite_never_deletes_a_folder_kdforge_did_not_make(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                               ) -> None:
    photos = tmp_path / "x" / "photos"
    photos.mkdir(parents=True)
    (photos / "a.jpg").write_text("hi")
    _err(capsys, main(["train", str(_recipe(tmp_path)), "-o", str(tmp_path / "x"), "--overwrite"]),
         "not made by kdforge")
    assert (photos / "a.jpg").read_text() == "hi"


def test_overwrite_refuses_cwd_and_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    r = _recipe(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    (work / MARKER).write_text("")
    (work / "keep.txt").write_text("keep")
    monkeypatch.chdir(work)
    _err(capsys, main(["train", str(r), "-o", ".", "--overwrite"]), "current directory")
    _err(capsys, main(["train", str(r), "-o", "..", "--overwrite"]), "current directory")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / MARKER).write_text("")
    (tmp_path / "home" / "x").write_text("")
    _err(capsys, main(["train", str(r), "-o", str(tmp_path / "home"), "--overwrite"]), "home directory")
    assert (work / "keep.txt").read_text() == "keep"


def test_overwrite_failed_setup_restores_the_old_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", str(_recipe(tmp_path)), "-o", str(run)]) == 0
    before = sorted(p.name for p in run.iterdir())
    weights = (run / "checkpoints" / "last.safetensors").read_bytes()
    bad = _recipe(tmp_path, {"name": "supervised", "model": {"model": "mlp", "checkpoint": str(tmp_path / "none")}})
    _err(capsys, main(["train", str(bad), "-o", str(run), "--overwrite"]), "checkpoint not found")
    assert sorted(p.name for p in run.iterdir()) == before
    assert (run / "checkpoints" / "last.safetensors").read_bytes() == weights
    assert not list(tmp_path.glob(".run.old-*"))
    # a working replacement deletes the old run once it has checkpointed
    assert main(["train", str(_recipe(tmp_path)), "-o", str(run), "--overwrite", "--set", "seed=5"]) == 0
    assert not list(tmp_path.glob(".run.old-*")) and yaml.safe_load((run / "config.yaml").read_text())["seed"] == 5


def test_lease_api_commit_and_rollback(tmp_path: Path) -> None:
    run = tmp_path / "run"
    lease = prepare_run_dir(run)
    assert (run / MARKER).is_file() and lease.created
    (run / "old.txt").write_text("old")
    lease.release()
    lease = prepare_run_dir(run, overwrite=True)
    assert lease.aside is not None and (lease.aside / "old.txt").is_file() and not (run / "old.txt").exists()
    lease.rollback()
    assert (run / "old.txt").read_text() == "old"
    lease = prepare_run_dir(run, overwrite=True)
    aside = lease.aside
    lease.commit()
    assert aside is not None and not aside.exists() and not (run / "old.txt").exists()


def test_lock_stops_a_second_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / MARKER).write_text("")
    (run / "config.yaml").write_text("name: x\n")
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242'); print('locked', flush=True); time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run / LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        for kw in ({"overwrite": True}, {"resume": True}):
            with pytest.raises(KdforgeError, match="in use by another kdforge run") as e:
                prepare_run_dir(run, **kw)
            assert str(run) in str(e.value) and "\n" not in str(e.value)
        assert (run / "config.yaml").is_file()
    finally:
        holder.kill()
        holder.wait()


# -- output paths -------------------------------------------------------------------------------------------
def test_output_path_file_below_file_unwritable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = _recipe(tmp_path)
    f = tmp_path / "file"
    f.write_text("x")
    _err(capsys, main(["train", str(r), "-o", str(f)]), "is a file")
    _err(capsys, main(["train", str(r), "-o", str(f / "run")]), "is a file")
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            _err(capsys, main(["train", str(r), "-o", str(ro / "run")]), "not writable")
            _err(capsys, main(["bench", "kd-zoo", "--quick", "-o", str(ro / "b")]), "not writable")
        finally:
            ro.chmod(0o700)
    assert f.read_text() == "x"


# -- resume ---------------------------------------------------------------------------------------------
def test_resume_before_first_checkpoint_starts_over(tmp_path: Path) -> None:
    run = tmp_path / "run"
    prepare_run_dir(run).release()
    (run / "config.yaml").write_text("name: x\n")
    (run / "metrics.csv").write_text("epoch,loss\n0,1.0\n")
    (run / "tb").mkdir()
    lease = prepare_run_dir(run, resume=True)
    assert lease.fresh and not (run / "metrics.csv").exists() and (run / "config.yaml").is_file()
    lease.release()
    (run / "photo.jpg").write_text("x")  # not only run files: nothing is deleted, one clear line
    with pytest.raises(KdforgeError, match="cannot resume"):
        prepare_run_dir(run, resume=True)
    assert (run / "photo.jpg").exists()


def test_stray_temp_files_and_swap_window(tmp_path: Path) -> None:
    run = tmp_path / "run"
    prepare_run_dir(run).release()
    state = run / "checkpoints" / "state"
    m = torch.nn.Linear(2, 2)
    ck.save_state(state, m.state_dict(), {"epoch": 3})
    (run / "checkpoints" / ".last.safetensors.ab12cd_9").write_bytes(b"x" * 100)
    (run / "checkpoints" / ".state.zz99yy88").mkdir()
    (run / ".config.yaml.k2j3h4g5").write_text("partial")
    (run / "metrics.csv.tmp").write_text("partial")
    os.replace(state, run / "checkpoints" / ".state.old")  # killed between the two renames
    lease = prepare_run_dir(run, resume=True)
    assert not lease.fresh and state.is_dir() and not (run / "checkpoints" / ".state.old").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["state"]
    assert sorted(p.name for p in run.iterdir()) == sorted([MARKER, LOCK, "checkpoints"])
    assert ck.load_state(state)[1]["epoch"] == 3
    # both present: keep state, drop the old copy
    ck.save_state(state, m.state_dict(), {"epoch": 4})
    ck.save_state(run / "checkpoints" / "other", m.state_dict(), {"epoch": 1})
    os.replace(run / "checkpoints" / "other", run / "checkpoints" / ".state.old")
    ck.recover_state(state)
    assert ck.load_state(state)[1]["epoch"] == 4 and not (run / "checkpoints" / ".state.old").exists()


@pytest.mark.parametrize("name", ["trainer.pt", "method.safetensors"])
@pytest.mark.parametrize("damage", ["empty", "truncated", "deleted"])
def test_damaged_state_files_are_one_line(tmp_path: Path, name: str, damage: str) -> None:
    state = tmp_path / "state"
    ck.save_state(state, torch.nn.Linear(4, 4).state_dict(), {"epoch": 1, "x": torch.zeros(100)})
    f = state / name
    if damage == "deleted":
        f.unlink()
    else:
        f.write_bytes(b"" if damage == "empty" else f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(KdforgeError) as e:
        ck.load_state(state)
    assert name in str(e.value) and "\n" not in str(e.value)


def test_empty_trainer_state_is_not_reported_as_ctrl_c(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    run = tmp_path / "run"
    assert main(["train", str(_recipe(tmp_path, epochs=2)), "-o", str(run)]) == 0
    (run / "checkpoints" / "state" / "trainer.pt").write_bytes(b"")
    (run / "results.json").unlink()
    _err(capsys, main(["train", str(run), "--resume"]), "trainer.pt")


def test_disk_full_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "checkpoints" / "state"
    m = torch.nn.Linear(3, 3)
    ck.save_state(state, m.state_dict(), {"epoch": 1})
    ck.save_weights(m, tmp_path / "checkpoints" / "last.safetensors")
    before = (tmp_path / "checkpoints" / "last.safetensors").read_bytes()

    def full(*a: object, **k: object) -> None:
        Path(str(a[1])).write_bytes(b"\0" * 64)  # a partial file, then the disk fills
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_model", full)
    with pytest.raises(KdforgeError, match=r"disk full.*previous checkpoint is intact"):
        ck.save_weights(torch.nn.Linear(3, 3), tmp_path / "checkpoints" / "last.safetensors")
    monkeypatch.setattr("safetensors.torch.save_file", lambda t, p, *a, **k: full(None, p))
    with pytest.raises(KdforgeError, match="disk full"):
        ck.save_state(state, m.state_dict(), {"epoch": 2})
    assert (tmp_path / "checkpoints" / "last.safetensors").read_bytes() == before
    assert ck.load_state(state)[1]["epoch"] == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.safetensors", "state"]
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(KdforgeError, match="disk full"):
        ck.atomic_write_text(tmp_path / "results.json", "{}")
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoints"]


# -- one-line errors --------------------------------------------------------------------------------------
def test_corrupt_metrics_csv(tmp_path: Path) -> None:
    p = tmp_path / "metrics.csv"
    for text in ("epoch,loss\n0,1.0,9,9\n", "epoch,loss\nabc,1\n", "\0\0\0garbage", "epoch,loss\n0,x\n"):
        p.write_text(text)
        with pytest.raises(KdforgeError, match=r"metrics.csv.*corrupt") as e:
            CsvLog(p).truncate_after(0)
        assert "\n" not in str(e.value)


def test_corrupt_and_wrong_teacher(tmp_path: Path, digits_teacher: Path) -> None:
    from kdforge.models import create_model

    bad = tmp_path / "t.safetensors"
    bad.write_bytes(digits_teacher.read_bytes()[:300])
    with pytest.raises(KdforgeError, match="cannot read checkpoint") as e:
        create_model("cnn_small", 10, 1, checkpoint=bad)
    assert "does not fit" not in str(e.value)
    with pytest.raises(KdforgeError, match=r"does not fit SmallCNN: '[\w.]+' has shape \[") as e:
        create_model("cnn_small", 10, 1, checkpoint=digits_teacher, width=8)


def test_imagefolder_corrupt_image_and_unknown_class(tmp_path: Path) -> None:
    from PIL import Image

    from kdforge.config import DataConfig
    from kdforge.data import load_data

    for split, classes in (("train", ["a", "b"]), ("val", ["a", "b"])):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / c / "0.png")
    (tmp_path / "train" / "a" / "1.png").write_bytes(b"not an image")
    data = load_data(DataConfig(name="imagefolder", root=str(tmp_path), resize=8, val_fraction=0))
    with pytest.raises(KdforgeError, match=r"cannot read image .*1.png"):
        [data.train[i] for i in range(len(data.train))]
    (tmp_path / "val" / "c").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "c" / "0.png")
    with pytest.raises(KdforgeError, match="classes that train lacks"):
        load_data(DataConfig(name="imagefolder", root=str(tmp_path), resize=8))


def test_download_without_network_is_one_line_and_creates_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import urllib.error
    import urllib.request

    def offline(*a: object, **k: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(urllib.request.OpenerDirector, "open", offline)
    monkeypatch.chdir(tmp_path)
    r = _recipe(tmp_path, data={"name": "cifar10", "download": True})
    _err(capsys, main(["train", str(r), "--dry-run"]), "downloading CIFAR10", "data.root")
    assert not (tmp_path / "data").exists()


def test_cil_cli_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def cil(data: dict, *args: str) -> int:
        p = tmp_path / "c.yaml"
        p.write_text(yaml.safe_dump({"cil": {"learner": "finetune"}, "data": {"name": "digits"}, **data}))
        return main(["cil", str(p), *args])

    _err(capsys, cil({"optim": {"lr": float("nan")}}), "'optim.lr'", "finite")
    _err(capsys, cil({"train": {"epochs": 0}}), "'train.epochs'")
    _err(capsys, cil({"train": {"epochs": True}}), "'train.epochs'")
    _err(capsys, cil({}, "--set", "cil.tasks=-1"), "'cil.tasks'")
    _err(capsys, cil({"lr": 0.1}), "'lr' moved to optim.lr")
    f = tmp_path / "f"
    f.write_text("x")
    _err(capsys, cil({}, "-r", str(f)), "is a file")
    run = tmp_path / "run"
    assert main(["train", str(_recipe(tmp_path)), "-o", str(run)]) == 0
    _err(capsys, cil({}, "-r", str(run)), "'kdforge train' run")


def test_model_kwarg_typo_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = _recipe(tmp_path, {"name": "supervised", "model": {"model": "cnn_small"}})
    _err(capsys, main(["train", str(r), "--dry-run", "--set", "method.model.kwargs.widht=64"]),
         "'widht'", "did you mean 'width'")
    _err(capsys, main(["train", str(r), "--dry-run", "--set", "train.epochs=true"]), "'train.epochs'")
    _err(capsys, main(["train", str(r), "--dry-run", "--set", "method.model.model=torchvision:resnet18",
                       "--set", "method.model.kwargs.bogus=1"]), "torchvision:resnet18")
    assert main(["train", str(r), "--dry-run", "--set", "optim.lr=1e-3"]) == 0


# -- benches ------------------------------------------------------------------------------------------
@pytest.fixture
def toy_bench(monkeypatch: pytest.MonkeyPatch) -> str:
    from kdforge.bench import load_benches
    from kdforge.bench.common import bar_chart, write_json

    def run(out: Path | None = None, quick: bool = False) -> Path:
        assert out is not None
        bar_chart(["a", "b"], [1.0, 2.0], [0.1, 0.1], out / "toy.png", title="toy")
        write_json(out / "toy.json", {"quick": quick})
        (out / "toy.md").write_text(f"# Toy benchmark\n\n| a | b |\n| --- | --- |\n| {int(quick)} | 2 |\n")
        return out / "toy.md"

    reg = load_benches()
    monkeypatch.setitem(reg._items, "toy", run)
    return "toy"


def test_bench_quick_never_publishes_and_is_labelled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     toy_bench: str, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    docs = tmp_path / "docs" / "benchmarks"
    docs.mkdir(parents=True)
    page = "# Toy benchmark\n\nold table\n\n<!-- analysis:start -->\nHand-written analysis.\n<!-- analysis:end -->\n"
    (docs / "toy.md").write_text(page)
    _err(capsys, main(["bench", "toy", "--quick", "--publish"]), "never published")
    assert main(["bench", "toy", "--quick"]) == 0
    md = (tmp_path / "runs" / "bench" / "toy" / "toy.md").read_text()
    assert md.startswith("# Toy benchmark (smoke run)")
    assert (docs / "toy.md").read_text() == page and not (docs / "toy.png").exists()
    assert main(["bench", "toy", "--publish"]) == 0
    published = (docs / "toy.md").read_text()
    assert "| 0 | 2 |" in published and "Hand-written analysis." in published and "old table" not in published
    assert (docs / "toy.png").is_file() and (docs / "toy.json").is_file()


def test_published_pages_have_an_analysis_block() -> None:
    from kdforge.bench import load_benches
    from kdforge.bench.common import PUBLISHED, analysis_block

    root = Path(__file__).resolve().parents[1]
    for name in load_benches().names():
        page = root / PUBLISHED / f"{name}.md"
        if page.is_file():
            assert analysis_block(page.read_text()) is not None, f"{page} has no analysis block"


# -- every command an error message suggests exists ----------------------------------------------------------
def _suggested_commands() -> set[str]:
    import kdforge  # noqa: F401 - registers everything
    from kdforge.bench import load_benches
    from kdforge.registry import DATASETS, LOSSES, METHODS, MODELS, Registry

    regs: list[Registry] = [MODELS, DATASETS, METHODS, LOSSES, load_benches()]
    try:
        from kdforge.continual.learner import LEARNERS

        regs.append(LEARNERS)
    except ImportError:  # pragma: no cover - the continual package is being rewritten
        pass
    texts = []
    for reg in regs:
        with pytest.raises(KdforgeError) as e:
            reg.get("zzz-no-such-name")
        texts.append(str(e.value))
    src = Path(__file__).resolve().parents[1] / "src" / "kdforge"
    texts += [p.read_text() for p in src.rglob("*.py")]
    found = set()
    for t in texts:
        for m in re.finditer(r"'kdforge ([a-z][a-z-]*(?: [a-z][a-z-]*)?(?: --[a-z-]+)*)'", t):
            found.add(m.group(1))
    return found


def test_every_suggested_command_exists(capsys: pytest.CaptureFixture[str]) -> None:
    cmds = _suggested_commands()
    assert "list models" in cmds
    for cmd in sorted(cmds):
        words = cmd.split()
        flags = [w for w in words if w.startswith("--")]
        code = main([*[w for w in words if not w.startswith("--")][:2], "--help"]) if words[0] != "list" else \
            main(words)
        out = capsys.readouterr()
        assert code == 0, f"'kdforge {cmd}' suggested by an error message does not work: {out.err}"
        if flags:
            main([words[0], "--help"])
            help_text = capsys.readouterr().out
            assert all(f in help_text for f in flags), f"'kdforge {cmd}': no such option"
