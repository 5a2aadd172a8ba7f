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


def _guide_command() -> list[str]:
    import shlex

    cmd = re.search(r"### The same run as one command\n\n```bash\n(.*?)```", DOC.read_text(), re.S).group(1)  # type: ignore[union-attr]
    return shlex.split(cmd.replace("\\\n", " "))


def test_the_guide_command_trains_what_the_python_trains(tmp_path: Path, capsys) -> None:
    """`kdforge llm-distill` (the guide's command, on a tiny Llama) ends with the weights of the Python API run."""
    import torch
    from safetensors.torch import load_file

    from kdforge.cli import main
    from kdforge.llm import load_causal_lm, pack, prune_decoder_layers, read_jsonl, split_examples, tokenize_example
    from kdforge.llm.cli import parse_loss
    from kdforge.llm.distill import LMDistill, PackedRows, check_vocab, distill_lm, distill_recipe

    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Q{i}: {i}+{i}=", "response": f"{2 * i}."}) for i in range(20)))
    args = _guide_command()
    assert args[:3] == ["kdforge", "llm-distill", "smollm2"]
    args = [*args[1:2], "tiny:4", str(data), "-o", str(tmp_path / "cli"), *args[6:]]
    args[args.index("--drop-layers") + 1] = "1,3"
    args[args.index("--steps") + 1] = "3"
    args[args.index("--seq-len") + 1] = "64"
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "llm-distill: 3 steps" in out and "val perplexity" in out
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["val_ppl_student"] > 1
    # the same run through the Python API of section 2
    teacher, tok = load_causal_lm("tiny:4")
    student = prune_decoder_layers(teacher, [0, 2])
    ex = [tokenize_example(tok, r, template="auto") for r in read_jsonl(data)]
    train, _ = split_examples(ex, eval_fraction=0.1, seed=0)
    terms = [parse_loss("lm_jsd:beta=0.5"), parse_loss("lm_ce:weight=0.1")]
    method = LMDistill(student, teacher, terms, vocab=check_vocab(tok, tok, student, teacher))
    distill_lm(method, PackedRows(pack(train, seq_len=64), 4, 0), distill_recipe(3, 1e-4, 4, 0))
    got = load_file(str(tmp_path / "cli" / "student" / "model.safetensors"))
    want = student.state_dict()
    assert set(got) <= set(want) and len(got) > 0
    assert all(torch.equal(got[k], want[k]) for k in got)
    assert not all(torch.equal(got[k], teacher.state_dict()[k]) for k in got if k in teacher.state_dict())


def test_llm_distill_bad_flags_are_one_line(tmp_path: Path, capsys) -> None:
    from kdforge.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")

    def err(args: list[str], needle: str) -> None:
        assert main(["llm-distill", "tiny:4", str(data), "-o", str(tmp_path / "o"), *args]) == 2
        e = capsys.readouterr().err.strip()
        assert needle in e and "\n" not in e, e

    err(["--drop-layers", "1", "--loss", "lm_fkk"], "unknown LM loss term 'lm_fkk' (valid: lm_ce, lm_fkl")
    err(["--drop-layers", "1", "--loss", "lm_jsd:beta"], "'beta' is not key=number")
    err(["--drop-layers", "1", "--loss", "lm_jsd:beta=2"], "beta must be in [0, 1]")
    err([], "give exactly one of --student")
    err(["--drop-layers", "9"], "decoder layers 0..3")
    err(["--drop-layers", "x"], "give layer indices separated by commas")
    assert main(["llm-distill", "tiny:4", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "o"),
                 "--drop-layers", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
