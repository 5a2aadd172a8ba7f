"""docs/your-data.md, run as written: its files are written and its commands run, in order, in an empty folder."""

from __future__ import annotations

import json
import re
import runpy
import shlex
import sys
import time
from pathlib import Path

import pytest

from kdforge.cli import main

GUIDE = Path(__file__).parents[1] / "docs" / "your-data.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def guide_steps(text: str) -> list[tuple[str, str]]:
    """("file", "NAME\\nTEXT") for blocks headed ``# file: NAME``, ("run", COMMAND) for each line of a bash block."""
    steps: list[tuple[str, str]] = []
    for lang, body in BLOCK.findall(text):
        first, _, rest = body.partition("\n")
        if first.startswith("# file: "):
            steps.append(("file", first.removeprefix("# file: ").strip() + "\n" + rest))
        elif lang == "bash":
            steps += [("run", line.strip()) for line in body.splitlines() if line.strip()]
    return steps


def _run(cmd: str, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = shlex.split(cmd)
    if argv[0] == "kdforge":
        assert main(argv[1:]) == 0, cmd
        return
    assert argv[0] == "python", cmd
    if argv[1] == "-m":
        monkeypatch.setattr(sys, "argv", [argv[2], *argv[3:]])
        runpy.run_module(argv[2], run_name="__main__")
    else:
        monkeypatch.setattr(sys, "argv", argv[1:])
        runpy.run_path(argv[1], run_name="__main__")


def test_the_guide_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    steps = guide_steps(GUIDE.read_text())
    commands = [s for kind, s in steps if kind == "run"]
    assert commands[0].startswith("python -m kdforge.data.sample_images") and "kdforge train kd.yaml" in commands
    said: dict[str, str] = {}
    took: dict[str, float] = {}  # seconds per command, printed for the docs (never asserted: no timed tests)
    for kind, body in steps:
        if kind == "file":
            name, _, text = body.partition("\n")
            (tmp_path / name).write_text(text)
            continue
        t0 = time.perf_counter()
        _run(body, monkeypatch)
        took[body] = time.perf_counter() - t0
        out = capsys.readouterr()
        said[body] = out.out + out.err
    sys.modules.pop("my_nets", None)
    with capsys.disabled():  # one line in the test output: the time a reader waits
        print(f"\nguide: {len(took)} commands, {sum(took.values()):.0f} s in all; "
              + "; ".join(f"{c[:60]} {t:.1f} s" for c, t in took.items()))
    # the KD banner names the .pt teacher and its validation accuracy, which is the teacher run's own best
    banner = said["kdforge train kd.yaml"]
    line = next(x for x in banner.splitlines() if x.strip().startswith("weights"))
    teacher = json.loads((tmp_path / "runs" / "my-teacher" / "results.json").read_text())
    assert "teacher.pt" in line and f"val top1 {teacher['best_val_top1']:.2f} %" in line, (line, teacher)
    assert re.search(r"^epoch 12/12 ", banner, re.M)
    for run in ("my-kd", "my-student"):
        res = json.loads((tmp_path / "runs" / run / "results.json").read_text())
        assert 0 <= res["test_last"]["top1"] <= 100
    assert (tmp_path / "my-report" / "index.html").is_file()
    assert "tensor" in said["python use_student.py"]
