"""Distilling a causal LM: the method (chunked token terms), where its text comes from, and one-call training.

Text sources, all step sources of the engine (``batch(step)`` depends only on the seed, the step and the
student's current weights, so a resumed run repeats the uninterrupted one bit for bit):

- :class:`PackedRows`: the data set's packed rows (off-policy).
- :func:`teacher_generations`: the teacher's greedy answers to the prompts, generated once and stored
  (sequence-level KD); they are then ordinary examples.
- :class:`OnPolicy`: with probability λ per step, the student samples answers to the batch's prompts and
  is trained on its own text (GKD's on-policy mixture); otherwise the data set's answers.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.config import Recipe
from kdforge.errors import KdforgeError
from kdforge.llm.losses import TokenLoss, chunked_token_loss, head_logits
from kdforge.llm.metrics import lm_forward, lm_logits, next_token_targets
from kdforge.llm.text import IGNORE, Example, Packed, pack
from kdforge.method import Method


# -- vocabularies ----------------------------------------------------------------------------
def _tok_name(tok: Any) -> str:
    return getattr(tok, "name_or_path", None) or type(tok).__name__


def check_vocab(student_tok: Any, teacher_tok: Any, student: nn.Module | None = None,
                teacher: nn.Module | None = None) -> int:
    """The shared vocabulary size, or one line naming both tokenizers when they differ.

    Rows of an output head beyond the tokenizer's size (padding for fast matmuls) are cropped by the
    losses; a head smaller than its tokenizer is refused.
    """
    from kdforge.llm.loading import vocab_size

    vs, vt = vocab_size(student_tok), vocab_size(teacher_tok)
    same = vs == vt
    if same and hasattr(student_tok, "get_vocab") and hasattr(teacher_tok, "get_vocab"):
        same = student_tok.get_vocab() == teacher_tok.get_vocab()
    if not same:
        raise KdforgeError(f"student tokenizer {_tok_name(student_tok)!r} ({vs:,} tokens) and teacher tokenizer "
                           f"{_tok_name(teacher_tok)!r} ({vt:,} tokens) differ: token-level distillation needs one "
                           "vocabulary (use sequence-level KD on decoded text instead)")
    for who, m in (("student", student), ("teacher", teacher)):
        head = m.get_output_embeddings() if m is not None else None
        if head is not None and head.weight.shape[0] < vs:
            raise KdforgeError(f"the {who}'s output head has {head.weight.shape[0]:,} rows, fewer than its "
                               f"tokenizer's {vs:,} tokens")
    return vs


# -- forward passes --------------------------------------------------------------------------
def _plain_head(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return (getattr(cfg, "final_logit_softcapping", None) is None and getattr(cfg, "logit_scale", None) is None
            and hasattr(model, "get_decoder") and model.get_output_embeddings() is not None)


def lm_hidden(model: nn.Module, batch: Tensor | dict[str, Tensor]) -> Tensor:
    """Final hidden states (B, L, H) after the last norm: the output head's input.

    They come from the model's own forward (the decoder's output, caught by a hook), never from calling the
    decoder alone: FSDP gathers a sharded model's embeddings, norm and head in the hooks of that forward.
    The forward's head runs on the last position only when the model allows it (``logits_to_keep``).
    """
    if isinstance(batch, dict) and "doc" not in batch:
        batch = batch["ids"]
    caught: list[Tensor] = []
    hook = model.get_decoder().register_forward_hook(lambda _m, _args, out: caught.append(out[0]))
    try:
        lm_forward(model, batch, **_last_position_only(model))
    finally:
        hook.remove()
    return caught[-1]


def _last_position_only(model: nn.Module) -> dict[str, int]:
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _gathered_head(model: nn.Module) -> nn.Module:
    """The output head, whose weight must be whole after the forward (a sharded root keeps it gathered)."""
    head = model.get_output_embeddings()
    if type(head.weight).__name__ == "DTensor":
        raise KdforgeError("the output head's weight is still sharded after the model's forward: under FSDP the "
                           "head must belong to the model's root unit, which keeps it gathered until backward "
                           "(kdforge's train.distributed: fsdp does this)")
    return head


def token_logits_fn(model: nn.Module, batch: Tensor | dict[str, Tensor], vocab: int | None) -> Any:
    """``idx -> logits`` at flat positions: from the hidden states and head (chunkable) or, for heads with a
    soft cap or scale, from the full logits."""
    if _plain_head(model):
        hidden = lm_hidden(model, batch)
        return head_logits(hidden, _gathered_head(model), vocab)
    logits = lm_logits(model, batch)
    flat = logits.reshape(-1, logits.shape[-1])[:, :vocab]
    return lambda idx: flat[idx]


def _device_batch(batch: Any, dev: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(dev)
    return {k: v.to(dev) for k, v in batch.items()}


class LMDistill(Method):
    """Token-level distillation of a causal LM: Σ_k w_k · term_k over the trained positions (chunked).

    ``terms``: (term, weight) pairs of :mod:`kdforge.llm.losses` (``lm_ce`` mixes in the data's
    cross-entropy). The teacher is live, or a top-k cache (``cache``, only for terms that need no more of
    the teacher than its top-k and the rest's mass). ``vocab`` crops padded head rows.
    """

    frozen_prefixes = ("teacher.",)

    def __init__(self, student: nn.Module, teacher: nn.Module | None, terms: Sequence[tuple[TokenLoss, float]],
                 cache: Any = None, vocab: int | None = None, chunk: int | None = None) -> None:
        super().__init__()
        if not terms:
            raise KdforgeError("LM distillation needs at least one loss term")
        needs_teacher = [t for t, _ in terms if not t.uses_targets]
        if needs_teacher and teacher is None and cache is None:
            raise KdforgeError("the KD terms need a teacher or a teacher cache")
        if cache is not None:
            full = [getattr(t, "registry_name", type(t).__name__) for t in needs_teacher if t.needs_full_teacher]
            if full:
                raise KdforgeError(f"{', '.join(full)} needs the teacher's whole distribution; a top-k teacher "
                                   "cache holds only its top-k tokens and the rest's mass (use lm_fkl or lm_skl, "
                                   "or the live teacher)")
        self.student, self.teacher, self.vocab, self.chunk = student, teacher, vocab, chunk
        self.terms = nn.ModuleList([t for t, _ in terms])
        self.weights = [float(w) for _, w in terms]
        self.names = [getattr(t, "registry_name", type(t).__name__) for t, _ in terms]
        object.__setattr__(self, "cache", cache)  # not a module: nothing of it is saved or moved
        self._no_split_modules = getattr(student, "_no_split_modules", None)

    def train(self, mode: bool = True) -> LMDistill:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def _teacher_fn(self, batch: Any) -> Any:
        if not any(not t.uses_targets for t in self.terms):
            return None
        if self.cache is not None:
            if not isinstance(batch, dict) or "rows" not in batch:
                raise KdforgeError("a teacher cache needs batches that carry their row ids")
            ids, log_p = self.cache.bucket_log_probs(batch["rows"], self.terms[0].T)
            dev = next(self.student.parameters()).device
            ids, log_p = ids.reshape(-1, ids.shape[-1]).to(dev), log_p.reshape(-1, log_p.shape[-1]).to(dev)
            return lambda idx: (ids[idx], log_p[idx])
        assert self.teacher is not None
        with torch.no_grad():
            return token_logits_fn(self.teacher, batch, self.vocab)

    def training_step(self, batch: Any, step: int) -> dict[str, Tensor]:
        batch = _device_batch(batch, next(self.student.parameters()).device)
        targets = next_token_targets(batch)
        student = token_logits_fn(self.student, batch, self.vocab)
        out = chunked_token_loss(list(zip(self.terms, self.weights, strict=True)), student, self._teacher_fn(batch),
                                 targets != IGNORE, targets, self.chunk)
        logs = {"loss": out[0]}
        logs.update({name: v.detach() for name, v in zip(self.names, out[1:], strict=True)})
        return logs

    def deployable(self) -> nn.Module:
        return self.student


# -- text sources ----------------------------------------------------------------------------
def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _sharded(model: nn.Module) -> bool:
    """Whether ``model`` is sharded with FSDP2 (``fully_shard``)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _step_generator(seed: int, step: int, salt: int = 0, rank: int | None = None) -> torch.Generator:
    rank = _rank() if rank is None else rank
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + rank) * 31 + salt)


class PackedRows:
    """Off-policy rows of a :class:`Packed` set: step ``s`` draws its rows from its own seed (exact resume)."""

    def __init__(self, packed: Packed, batch_size: int, seed: int = 0) -> None:
        self.packed, self.batch_size, self.seed = packed, batch_size, seed
        self.steps_per_epoch = max(1, len(packed) // batch_size)

    def rows(self, step: int) -> Tensor:
        """Which rows engine step ``step`` draws."""
        return torch.randint(0, len(self.packed), (self.batch_size,), generator=_step_generator(self.seed, step))

    def batch(self, step: int) -> dict[str, Tensor]:
        return self.packed.rows(self.rows(step))


class OnPolicy:
    """GKD's mixture: with probability ``lam`` a step trains on the student's own samples for its prompts.

    Each step draws ``batch_size`` examples (their prompts are the untrained leading tokens); an on-policy
    step lets the student sample up to ``max_new_tokens`` tokens per prompt at ``temperature`` (seeded by the
    step), and trains on prompt + sample with the sample's tokens in the loss. Off-policy steps use the
    examples' own answers. Both are packed one example per row of ``seq_len`` tokens.
    """

    def __init__(self, examples: Sequence[Example], student: nn.Module, batch_size: int, seq_len: int,
                 lam: float = 0.5, max_new_tokens: int = 32, temperature: float = 1.0, seed: int = 0,
                 eos_id: int | None = None, pad_id: int = 0) -> None:
        if not 0.0 <= lam <= 1.0:
            raise KdforgeError(f"on-policy fraction lam must be in [0, 1], got {lam}")
        if any(e.n_prompt == 0 for e in examples):
            raise KdforgeError("on-policy distillation needs prompts: every example needs untrained prompt tokens "
                               "(JSONL prompt/response or chat rows)")
        self.examples, self.student, self.batch_size, self.seq_len = list(examples), student, batch_size, seq_len
        self.lam, self.max_new_tokens, self.temperature, self.seed = lam, max_new_tokens, temperature, seed
        self.eos_id, self.pad_id = eos_id, pad_id
        self.steps_per_epoch = max(1, len(self.examples) // batch_size)

    def plan(self, step: int) -> tuple[list[int], bool]:
        """(example indices, whether the step is on-policy) of engine step ``step``.

        The indices differ between the processes of a launch; whether the step is on-policy does not
        (rank 0's draw): under FSDP every process must run the student's generation together.
        """
        idx = torch.randint(0, len(self.examples), (self.batch_size,), generator=_step_generator(self.seed, step))
        g = _step_generator(self.seed, step, rank=0)
        torch.randint(0, len(self.examples), (self.batch_size,), generator=g)  # rank 0's indices come first
        return idx.tolist(), bool(torch.rand((), generator=g) < self.lam)

    @torch.no_grad()
    def sample(self, prompt: list[int], step: int, row: int) -> list[int]:
        """The student's sampled continuation of ``prompt`` (up to and including its end-of-text token)."""
        model = self.student
        was = model.training
        model.eval()
        dev = next(model.parameters()).device
        room = max(1, min(self.max_new_tokens, self.seq_len - len(prompt)))
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(int(torch.randint(0, 2**62, (), generator=_step_generator(self.seed, step, 1 + row))))
            ids = torch.tensor([prompt], device=dev)
            # a student sharded over several processes: each runs forwards until all have finished (an FSDP
            # forward gathers the weights with the others)
            synced = _world() > 1 and _sharded(model)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=room, do_sample=True,
                                 temperature=self.temperature, top_k=0, top_p=1.0, pad_token_id=self.pad_id,
                                 eos_token_id=self.eos_id, synced_gpus=synced)
        model.train(was)
        gen = out[0, len(prompt):].tolist()
        if self.eos_id is not None and self.eos_id in gen:
            gen = gen[: gen.index(self.eos_id) + 1]
        return gen

    def batch(self, step: int) -> dict[str, Tensor]:
        idx, on = self.plan(step)
        chosen = [self.examples[i] for i in idx]
        if on:
            chosen = []
            for r, i in enumerate(idx):
                ex = self.examples[i]
                prompt = ex.ids[: min(ex.n_prompt, self.seq_len - 1)]
                gen = self.sample(prompt, step, r)
                chosen.append(Example(prompt + gen, [False] * len(prompt) + [True] * len(gen)))
        b = pack(chosen, self.seq_len, self.pad_id, one_per_row=True).rows(torch.arange(len(chosen)))
        b["on_policy"] = torch.tensor(on)
        return b


def _fingerprint(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.ids[: e.n_prompt]]).encode())
    return h.hexdigest()


@torch.no_grad()
def teacher_generations(teacher: nn.Module, examples: Sequence[Example], path: str | Path,
                        max_new_tokens: int = 64, eos_id: int | None = None, pad_id: int = 0) -> list[Example]:
    """Sequence-level KD text: the teacher's greedy answer to every prompt, generated once and stored in ``path``.

    A stored file is reused when it was made by the same teacher weights for the same prompts and
    length; otherwise it is refused in one line (delete it to regenerate).
    """
    from kdforge.cache.store import teacher_hash
    from kdforge.engine.checkpoint import atomic_write_text

    path = Path(path)
    ident = {"teacher": teacher_hash(teacher), "prompts": _fingerprint(examples), "max_new_tokens": max_new_tokens,
             "eos_id": eos_id}
    if path.is_file():
        lines = path.read_text().splitlines()
        head = json.loads(lines[0]) if lines else {}
        if head.get("identity") != ident:
            raise KdforgeError(f"teacher generations {str(path)!r} were made by another teacher, prompts or length; "
                               "delete the file to generate them again")
        rows = [json.loads(x) for x in lines[1:]]
        return [Example(r["prompt"] + r["answer"], [False] * len(r["prompt"]) + [True] * len(r["answer"]))
                for r in rows]
    was = teacher.training
    teacher.eval()
    dev = next(teacher.parameters()).device
    out, lines = [], [json.dumps({"identity": ident})]
    for ex in examples:
        prompt = ex.ids[: ex.n_prompt]
        if not prompt:
            raise KdforgeError("sequence-level KD needs prompts: every example needs untrained prompt tokens")
        ids = torch.tensor([prompt], device=dev)
        seq = teacher.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                               do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id)[0, len(prompt):].tolist()
        if eos_id is not None and eos_id in seq:
            seq = seq[: seq.index(eos_id) + 1]
        out.append(Example(prompt + seq, [False] * len(prompt) + [True] * len(seq)))
        lines.append(json.dumps({"prompt": prompt, "answer": seq}))
    teacher.train(was)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return out


# -- one call --------------------------------------------------------------------------------
def distill_recipe(steps: int = 50, lr: float = 5e-5, batch_size: int = 4, seed: int = 0, **train: Any) -> Recipe:
    """The engine recipe of an LM distillation in keyword form: AdamW, constant lr, grad clip 1.0."""
    from kdforge.config import MethodConfig, validate

    return validate(Recipe, {"name": "llm-distill", "seed": seed, "data": {"batch_size": batch_size},
                             "method": MethodConfig(name="llm-kd").model_dump(),
                             "optim": {"name": "adamw", "lr": lr, "weight_decay": 0.0}, "sched": {"name": "constant"},
                             "train": {"max_steps": steps, "grad_clip": 1.0, "progress": "never",
                                       "save_checkpoints": False, **train}})


def distill_lm(method: Method, source: Any, recipe: Recipe, run_dir: str | Path | None = None,
               resume: bool = False, callbacks: Sequence[Any] = ()) -> list[dict[str, float]]:
    """Train ``method`` on ``source`` through the engine; the logged values of every step run."""
    from kdforge.engine.callbacks import Callback
    from kdforge.engine.trainer import Trainer

    if recipe.train.max_steps is None:
        raise KdforgeError("LM distillation is step-based: set train.max_steps")
    logs: list[dict[str, float]] = []

    class _Logs(Callback):
        def on_step_end(self, trainer: Any, out: dict[str, Tensor]) -> None:
            logs.append({k: float(v.detach()) for k, v in out.items() if v.numel() == 1})

    teacher = getattr(method, "teacher", None)
    t_flags = [p.requires_grad for p in teacher.parameters()] if teacher is not None else []
    try:
        if teacher is not None:
            for p in teacher.parameters():
                p.requires_grad_(False)
        Trainer(method, None, recipe, run_dir=run_dir, resume=resume, source=source,
                callbacks=[_Logs(), *callbacks]).fit()
    finally:
        method.deployable().eval()
        if teacher is not None:
            teacher.eval()
            for p, f in zip(teacher.parameters(), t_flags, strict=True):
                p.requires_grad_(f)
    return logs
