"""Zero-shot classification with prompt templates, and image↔text retrieval recall@K."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def build_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """One prompt list per class: every template (with ``{}``) filled with the class name."""
    return [[t.format(c) for t in templates] for c in class_names]


@torch.no_grad()
def class_weights(model: nn.Module, prompts: Sequence[Sequence[str]]) -> Tensor:
    """(C, d): normalise(mean_t normalise(E_T(template_t(class)))) for each class."""
    flat = [p for ps in prompts for p in ps]
    emb = F.normalize(model.encode_text(flat).float(), dim=-1)
    sizes = [len(ps) for ps in prompts]
    means = torch.stack([chunk.mean(0) for chunk in emb.split(sizes)])
    return F.normalize(means, dim=-1)


@torch.no_grad()
def image_embeddings(model: nn.Module, images: Iterable[Tensor], device: torch.device | None = None) -> Tensor:
    """Normalised image embeddings of batches of images, concatenated."""
    was = model.training
    model.eval()
    out = [F.normalize(model.encode_image(x if device is None else x.to(device)).float(), dim=-1) for x in images]
    model.train(was)
    return torch.cat(out)


@torch.no_grad()
def zero_shot_accuracy(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], prompts: Sequence[Sequence[str]],
                       topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k zero-shot accuracy (%) of ``model`` over (image, class label) batches."""
    was = model.training
    model.eval()
    w = class_weights(model, prompts)
    dev = w.device
    hits = {k: 0 for k in topk}
    n = 0
    for x, y in loader:
        v = F.normalize(model.encode_image(x.to(dev)).float(), dim=-1)
        pred = (100.0 * v @ w.T).topk(max(topk), dim=1).indices
        for k in topk:
            hits[k] += int((pred[:, :k] == y.to(dev).unsqueeze(1)).any(1).sum())
        n += len(y)
    model.train(was)
    return {f"top{k}": 100.0 * hits[k] / max(n, 1) for k in topk}


def retrieval_recall(img: Tensor, txt: Tensor, positives: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image→text and text→image recall@K (%) of normalised embeddings.

    ``positives`` (n_img, n_txt) marks the correct pairs: the identity for one caption per image,
    or several captions per image (COCO), or identical caption strings (templated captions).
    A query scores a hit at K when any positive is among its K most similar items.
    """
    sim = img @ txt.T
    pos = positives.to(torch.bool)
    out: dict[str, float] = {}
    for name, s, p in (("i2t", sim, pos), ("t2i", sim.T, pos.T)):
        order = s.argsort(dim=1, descending=True)
        ranked = p.gather(1, order)
        for k in ks:
            out[f"{name}_R@{k}"] = 100.0 * ranked[:, :k].any(1).float().mean().item()
    return out


def unique_captions(captions: Sequence[str]) -> tuple[list[str], Tensor]:
    """The distinct caption strings of paired (image k, caption k) lists, and positives (n_img, n_unique).

    Identical strings have identical embeddings, so a gallery with repeats would rank them in
    arbitrary order; retrieval over templated captions therefore ranks each distinct string once.
    """
    unique = list(dict.fromkeys(captions))
    ids = {c: i for i, c in enumerate(unique)}
    t = torch.tensor([ids[c] for c in captions])
    return unique, t.unsqueeze(1) == torch.arange(len(unique)).unsqueeze(0)
