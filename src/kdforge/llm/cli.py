"""``kdforge llm-distill``: distil a causal LM on a JSONL file from the command line (the guide's Python, as flags)."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdforge.errors import KdforgeError

_NUMBER = re.compile(r"^-?(\d+\.?\d*|\.\d+)([eE]-?\d+)?$")


@dataclass
class DistillArgs:
    """Everything ``kdforge llm-distill`` takes; defaults are the guide's."""

    teacher: str
    data: Path
    out: Path
    student: str | None = None
    drop_layers: list[int] = field(default_factory=list)
    losses: list[str] = field(default_factory=lambda: ["lm_fkl"])
    steps: int = 50
    lr: float = 1e-4
    batch_size: int = 4
    seq_len: int = 256
    template: str = "auto"
    eval_fraction: float = 0.1
    on_policy: float = 0.0
    max_new_tokens: int = 64
    chunk: int | None = None
    seed: int = 0
    resume: bool = False
    overwrite: bool = False

    def command(self) -> str:
        """The ``kdforge llm-distill`` line of these arguments (its flags that differ from the defaults)."""
        import shlex

        parts = ["kdforge", "llm-distill", self.teacher, str(self.data), "-o", str(self.out)]
        default = DistillArgs(self.teacher, self.data, self.out)
        for name, flag in (("student", "--student"), ("steps", "--steps"), ("lr", "--lr"),
                           ("batch_size", "--batch-size"), ("seq_len", "--seq-len"), ("template", "--template"),
                           ("eval_fraction", "--eval-fraction"), ("on_policy", "--on-policy"),
                           ("max_new_tokens", "--max-new-tokens"), ("chunk", "--chunk"), ("seed", "--seed")):
            if getattr(self, name) != getattr(default, name):
                parts += [flag, str(getattr(self, name))]
        if self.drop_layers:
            parts += ["--drop-layers", ",".join(map(str, self.drop_layers))]
        if self.losses != default.losses:
            for spec in self.losses:
                parts += ["--loss", spec]
        return shlex.join(parts)


def parse_loss(spec: str) -> tuple[Any, float]:
    """``NAME[:key=value,...]`` → (loss term, weight); ``weight`` is the mixing weight (default 1), the rest the
    term's keywords: ``lm_jsd:beta=0.5``, ``lm_ce:weight=0.1``, ``lm_fkl:T=2``."""
    from kdforge.llm import losses  # noqa: F401 - registers the lm_* terms
    from kdforge.losses import build_loss
    from kdforge.registry import LOSSES

    name, _, rest = spec.partition(":")
    if not name.startswith("lm_") or name not in LOSSES.names():
        valid = ", ".join(n for n in sorted(LOSSES.names()) if n.startswith("lm_"))
        raise KdforgeError(f"--loss {spec!r}: unknown LM loss term {name!r} (valid: {valid})")
    kw: dict[str, float] = {}
    for part in filter(None, rest.split(",")):
        key, eq, value = part.partition("=")
        if not eq or not _NUMBER.match(value.strip()):
            raise KdforgeError(f"--loss {spec!r}: {part!r} is not key=number (e.g. lm_jsd:beta=0.5,weight=1)")
        kw[key.strip()] = float(value)
    weight = kw.pop("weight", 1.0)
    try:
        return build_loss(name, **kw), weight
    except (TypeError, ValueError) as e:
        raise KdforgeError(f"--loss {spec!r}: {e}") from None


def distill_command(a: DistillArgs) -> dict[str, Any]:
    """Load, build the student, train through the engine, evaluate, save; returns what ``summary.json`` holds."""
    from kdforge.engine.run_dir import RunInterrupted, check_run_folder, interrupted
    from kdforge.llm import (
        load_causal_lm,
        pack,
        prune_decoder_layers,
        read_jsonl,
        split_examples,
        tokenize_example,
    )
    from kdforge.llm.distill import LMDistill, OnPolicy, PackedRows, check_vocab, distill_recipe

    if (a.student is None) == (not a.drop_layers):
        raise KdforgeError("give exactly one of --student (a model to train) or --drop-layers (the teacher with "
                           "those decoder layers removed)")
    if not a.data.is_file():
        raise KdforgeError(f"data file {str(a.data)!r} does not exist (a JSONL file of prompt/response, messages "
                           "or text rows)")
    if not 0.0 <= a.on_policy <= 1.0:
        raise KdforgeError(f"--on-policy must be in [0, 1], got {a.on_policy}")
    terms = [parse_loss(s) for s in a.losses]
    check_run_folder(a.out, "llm-distill", overwrite=a.overwrite, resume=a.resume, legacy=_legacy_out)  # before loading
    t0 = time.perf_counter()
    teacher, tok = load_causal_lm(a.teacher)
    if a.student is None:
        n = len(teacher.get_decoder().layers)
        bad = [i for i in a.drop_layers if not 0 <= i < n]
        if bad or len(set(a.drop_layers)) >= n:
            raise KdforgeError(f"--drop-layers {a.drop_layers}: the teacher has decoder layers 0..{n - 1} and must "
                               "keep at least one")
        student, s_tok = prune_decoder_layers(teacher, [i for i in range(n) if i not in set(a.drop_layers)]), tok
    else:
        student, s_tok = load_causal_lm(a.student)
    vocab = check_vocab(s_tok, tok, student, teacher)
    examples = [tokenize_example(tok, r, template=a.template) for r in read_jsonl(a.data)]
    train, val = split_examples(examples, eval_fraction=a.eval_fraction, seed=a.seed)
    if not train:
        raise KdforgeError(f"{str(a.data)!r} has no training examples after holding out {a.eval_fraction:.0%}")
    pad = getattr(tok, "pad_token_id", None) or 0
    packed = pack(train, seq_len=a.seq_len, pad_id=pad)
    method = LMDistill(student, teacher, terms, vocab=vocab, chunk=a.chunk)
    source: Any = PackedRows(packed, a.batch_size, a.seed)
    if a.on_policy > 0:
        source = OnPolicy(train, student, a.batch_size, a.seq_len, a.on_policy, a.max_new_tokens, seed=a.seed,
                          eos_id=getattr(tok, "eos_token_id", None), pad_id=pad)
    # checkpoints, so that a killed or interrupted run resumes (--resume); the run's report.md comes from the command
    recipe = distill_recipe(a.steps, a.lr, a.batch_size, a.seed, save_checkpoints=True)
    try:
        return _distill(a, method, source, recipe, student, s_tok, teacher, train, val, pad, t0)
    except RunInterrupted as e:  # resumable once the engine saved a checkpoint; before that nothing was kept
        kept = a.resume or (a.out / "run" / "checkpoints" / "state").is_dir()
        raise interrupted(e, a.command() + (" --resume" if kept else " --overwrite" if a.overwrite else "")) from None


def _distill(a: DistillArgs, method: Any, source: Any, recipe: Any, student: Any, s_tok: Any, teacher: Any,
             train: list[Any], val: list[Any], pad: int, t0: float) -> dict[str, Any]:
    """The run itself, in its folder ``a.out`` (locked; a failure before the first checkpoint leaves nothing)."""
    from kdforge.engine.checkpoint import atomic_write_text
    from kdforge.engine.run_dir import open_run
    from kdforge.llm import pack, perplexity, save_causal_lm
    from kdforge.llm.distill import distill_lm
    from kdforge.run import with_report

    with open_run(a.out, "llm-distill", overwrite=a.overwrite, resume=a.resume, legacy=_legacy_out):
        logs = distill_lm(method, source, recipe, run_dir=a.out / "run", resume=a.resume and (a.out / "run").is_dir(),
                          callbacks=with_report())
        res: dict[str, Any] = {"teacher": a.teacher, "student": a.student or f"teacher without layers {a.drop_layers}",
                               "losses": a.losses, "steps": a.steps, "train_examples": len(train),
                               # a resumed run saw only the steps after its checkpoint: its first loss is not its own
                               "first_loss": logs[0]["loss"] if logs and not a.resume else None,
                               "last_loss": logs[-1]["loss"] if logs else None}
        if a.resume:
            prev = _previous(a.out)
            res.update({k: prev[k] for k in ("first_loss", "last_loss") if res[k] is None and k in prev})
        if val:
            held = pack(val, seq_len=a.seq_len, pad_id=pad)
            res.update({"val_examples": len(val), "val_ppl_student": perplexity(student, held),
                        "val_ppl_teacher": perplexity(teacher, held)})
        save_causal_lm(student, s_tok, a.out / "student")
        res["seconds"] = time.perf_counter() - t0
        atomic_write_text(a.out / "summary.json", json.dumps(res, indent=2) + "\n")
        return res


def _legacy_out(path: Path) -> bool:
    """An llm-distill folder written before run folders recorded their kind: the engine's run/ beside summary.json."""
    return (path / "run" / ".kdforge-run").is_file() and all(
        p.name in ("run", "student", "summary.json") for p in path.iterdir())


def _previous(out: Path) -> dict[str, Any]:
    """The summary.json a finished run left (a resumed finished run reports its losses), or nothing."""
    try:
        prev = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return prev if isinstance(prev, dict) else {}
