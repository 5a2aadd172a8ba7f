"""docs/llm-distill.md: the page's code runs as written on a tiny random Llama and a JSONL file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")

DOC = Path(__file__).resolve().parents[1] / "docs" / "llm-distill.md"


def test_the_guide_runs(tmp_path: Path, capsys) -> None:
    code = re.search(r"## 2\. The whole run\n\n```python\n(.*?)```", DOC.read_text(), re.S).group(1)  # type: ignore[union-attr]
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Q{i}: {i}+{i}=", "response": f"{2 * i}."}) for i in range(20)))
    env = {"TEACHER": "tiny:4", "DATA": str(data), "STEPS": 3, "RUN_DIR": str(tmp_path / "run"),
           "OUT_DIR": str(tmp_path / "out")}
    exec(compile(code, str(DOC), "exec"), env)
    assert len(env["logs"]) == 3 and (tmp_path / "run").is_dir()
    assert "val perplexity" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert back.config.num_hidden_layers == 3
