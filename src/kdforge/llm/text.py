"""Text for language models: corpora by name, token rows, calibration/evaluation splits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdforge.errors import KdforgeError


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
