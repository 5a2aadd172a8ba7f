"""Language-model metrics: next-token loss, perplexity, tokens/s, greedy agreement, lm-eval-harness."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.errors import KdforgeError


def lm_logits(model: nn.Module, ids: Tensor | dict[str, Tensor]) -> Tensor:
    """Logits of a causal LM (no KV cache) for token-id rows, or a packed batch (dict with ``positions``, ``doc``)."""
    return lm_forward(model, ids).logits


def lm_forward(model: nn.Module, ids: Tensor | dict[str, Tensor], **extra: Any) -> Any:
    """The model's output for token-id rows or a packed batch (no KV cache; ``extra``: more forward arguments)."""
    if isinstance(ids, dict) and "doc" not in ids:
        ids = ids["ids"]
    if isinstance(ids, Tensor):
        return model(input_ids=ids, use_cache=False, **extra)
    from kdforge.llm.text import block_causal_mask

    impl = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa")
    if impl not in ("sdpa", "eager"):
        raise KdforgeError(f"packed batches need attention 'sdpa' or 'eager' (4-D masks), the model uses {impl!r}")
    dtype = next(model.parameters()).dtype
    mask = block_causal_mask(ids["doc"], dtype, boolean=impl == "sdpa")
    return model(input_ids=ids["ids"], position_ids=ids["positions"], attention_mask=mask, use_cache=False, **extra)


def next_token_targets(batch: Tensor | dict[str, Tensor]) -> Tensor:
    """(B, L) next token per position, -100 where nothing is predicted (last position, prompts, across documents)."""
    if isinstance(batch, dict):
        if "targets" in batch:
            return batch["targets"]
        batch = batch["ids"]
    return F.pad(batch[:, 1:], (0, 1), value=-100)


def lm_loss(model: nn.Module, ids: Tensor | dict[str, Tensor]) -> Tensor:
    """Mean next-token cross-entropy of a batch (token-id rows or a packed batch)."""
    logits = lm_logits(model, ids).float()
    return F.cross_entropy(logits.flatten(0, 1), next_token_targets(ids).to(logits.device).flatten(),
                           ignore_index=-100)


@torch.no_grad()
def perplexity(model: nn.Module, blocks: Tensor | Any, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over rows of token ids, or over the trained tokens of a :class:`Packed`."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        if isinstance(blocks, Tensor):
            batch: Any = blocks[i: i + batch_size].to(dev)
        else:
            batch = {k: v.to(dev) for k, v in blocks.rows(torch.arange(i, min(i + batch_size, len(blocks)))).items()}
        logits = lm_logits(model, batch).float()
        tgt = next_token_targets(batch).flatten()
        nll += float(F.cross_entropy(logits.flatten(0, 1), tgt, ignore_index=-100, reduction="sum"))
        count += int((tgt != -100).sum())
    model.train(was)
    return math.exp(min(nll / max(count, 1), 700.0))


@torch.no_grad()
def greedy_agreement(student: nn.Module, teacher: nn.Module, prompts: Tensor, new_tokens: int = 32,
                     pad_id: int = 0) -> float:
    """Share of the teacher's greedy continuation tokens that the student's argmax predicts on the same prefixes.

    The teacher continues each prompt (rows of equal length) greedily for ``new_tokens`` tokens; the
    student reads the teacher's sequence (teacher forcing) and its top-1 next token is compared with the
    teacher's at every generated position.
    """
    flags = student.training, teacher.training
    student.eval()
    teacher.eval()
    dev = next(teacher.parameters()).device
    p = prompts.to(dev)
    seq = teacher.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
    n = p.shape[1]
    pred = lm_logits(student, seq[:, :-1].to(next(student.parameters()).device)).argmax(-1)[:, n - 1:]
    student.train(flags[0])
    teacher.train(flags[1])
    return float((pred.cpu() == seq[:, n:].cpu()).float().mean())


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
