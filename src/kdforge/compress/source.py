"""The model a user brings (weights and a model name, or a run folder), its data and a fixed set of inputs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.compress.recipe import CompressRecipe
from kdforge.data import DataBundle, load_data
from kdforge.errors import KdforgeError


@dataclass
class Source:
    """The original model, the spec that rebuilds it untrained, its data and input shape."""

    model: nn.Module
    spec: dict[str, Any]
    data: DataBundle
    input_shape: tuple[int, int, int]
    where: str


def load_source(r: CompressRecipe) -> Source:
    """Load the recipe's model with its weights and its data; one line on a bad path or a mismatch."""
    data = load_data(r.data)
    shape = (data.in_chans, data.image_size, data.image_size)
    if r.run is not None:
        from kdforge.evaluate import load_deployable

        model, meta = load_deployable(r.run, "best")
        if "kdforge_pruned" in meta:
            raise KdforgeError(f"run {r.run!r} holds a layer-pruned model; compress starts from a whole model "
                               "(give the run of the model before pruning)")
        spec = json.loads(meta.get("kdforge_spec") or "{}")
        if spec.get("builder") != "model":
            raise KdforgeError(f"run {r.run!r} holds a {spec.get('builder') or 'model without a spec'!s} model; "
                               "compress handles image classifiers built by name (builder 'model')")
        where = str(r.run)
        model.kdforge_weights = where  # what a healing fit's banner names as the teacher's weights
    else:
        from kdforge.models import create_model

        m = r.model
        assert m is not None and m.checkpoint is not None
        # the one model door: .safetensors, .pt/.pth state dicts (weights_only), run folders; mismatches in one line
        model = create_model(m.model, data.num_classes, data.in_chans, m.checkpoint, image_size=data.image_size,
                             new_head=m.new_head, **m.kwargs)
        spec = {"builder": "model", "model": m.model, "kwargs": dict(m.kwargs), "num_classes": data.num_classes,
                "in_chans": data.in_chans, "image_size": data.image_size}
        where = str(m.checkpoint)
    if hasattr(model, "kdforge_spec"):
        del model.kdforge_spec
    check_input(model, shape, where)
    return Source(model.eval(), spec, data, shape, where)


@torch.no_grad()
def check_input(model: nn.Module, shape: tuple[int, ...], where: str) -> None:
    """The model must take a batch of the data's images and return logits."""
    model.eval()
    try:
        out = model(torch.zeros(2, *shape))
    except Exception as e:
        raise KdforgeError(f"model from {where} does not run on the data's images {tuple(shape)}: "
                           f"{str(e).splitlines()[0][:160]}") from None
    if not isinstance(out, Tensor) or out.dim() != 2:
        raise KdforgeError(f"model from {where} returns {type(out).__name__}, not logits of shape (batch, classes)")


def plain_batch(ds: Any, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` un-augmented samples of a split (seeded choice), as one batch."""
    import numpy as np

    from kdforge.prune.sglp import _plain

    idx = np.sort(np.random.default_rng(seed).permutation(len(ds))[: min(n, len(ds))])
    return _plain(ds, idx)
