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
