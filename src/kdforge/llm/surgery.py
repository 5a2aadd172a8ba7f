"""Layer surgery on Hugging Face decoder-only LLMs: find the blocks, drop some, keep the config consistent."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import nn

from kdforge.errors import KdforgeError

# config entries with one value per layer (Qwen2/Gemma attention kinds, SmolLM3 NoPE flags) ...
PER_LAYER_LISTS = ("layer_types", "no_rope_layers", "attention_chunk_layers")
# ... and entries that list layer indices (Qwen-MoE dense layers)
LAYER_INDEX_LISTS = ("mlp_only_layers",)
_LAYER_PATHS = ("model.layers", "transformer.h", "layers", "h", "model.decoder.layers", "gpt_neox.layers")


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
    for name in PER_LAYER_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == n_before:
            setattr(config, name, [values[i] for i in keep])
    remap = {old: new for new, old in enumerate(keep)}
    for name in LAYER_INDEX_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)):
            setattr(config, name, [remap[int(i)] for i in values if int(i) in remap])
    plc = getattr(config, "per_layer_config", None)
    if isinstance(plc, dict) and plc:
        config.per_layer_config = {remap[int(k)]: v for k, v in plc.items() if int(k) in remap}
    prev = getattr(config, "kdforge_pruned", None)
    original = prev["original_layers"] if isinstance(prev, dict) else n_before
    base_keep = [prev["kept"][i] for i in keep] if isinstance(prev, dict) else keep
    config.kdforge_pruned = {"original_layers": original, "kept": base_keep}
