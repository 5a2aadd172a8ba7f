"""Evaluate a trained model from a run folder or a safetensors checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from kdforge.config import DataConfig, Recipe, apply_overrides, validate
from kdforge.data import load_data, make_loader
from kdforge.engine.checkpoint import load_weights, read_metadata
from kdforge.errors import KdforgeError
from kdforge.metrics import evaluate
from kdforge.models import create_model


def load_deployable(source: str | Path, which: str = "best") -> tuple[nn.Module, dict[str, str]]:
    """The deployable model stored in a run folder (``best``/``last``) or a checkpoint file."""
    p = Path(source)
    if p.is_dir():
        ck = p / "checkpoints" / f"{which}.safetensors"
        if not ck.is_file():
            raise KdforgeError(f"{str(p)!r} has no checkpoints/{which}.safetensors "
                               "(give a run folder written by 'kdforge train' or a .safetensors file)")
        p = ck
    elif not p.is_file():
        raise KdforgeError(f"no run folder or checkpoint at {str(p)!r}")
    meta = read_metadata(p)
    if "kdforge_pruned" in meta:  # a layer-pruned model: rebuild its kept structure first
        from kdforge.prune.surgery import load_pruned

        base = json.loads(meta["kdforge_pruned"])["base"]
        meta = {**meta, "kdforge_model": base["model"], "num_classes": str(base["num_classes"]),
                "in_chans": str(base.get("in_chans", 3)), "image_size": str(base.get("image_size") or "")}
        return load_pruned(p), meta
    if not meta.get("kdforge_model"):
        raise KdforgeError(f"checkpoint {str(p)!r} lacks kdforge metadata (model name); "
                           "load it with kdforge.create_model(..., checkpoint=...) instead")
    model = create_model(meta["kdforge_model"], int(meta["num_classes"]), int(meta["in_chans"]),
                         image_size=int(meta["image_size"]) if meta.get("image_size") else None,
                         **json.loads(meta.get("kdforge_model_kwargs", "{}")))
    load_weights(model, p)
    return model.eval(), meta


def evaluate_source(source: str | Path, data: str | None = None, split: str = "test", which: str = "best",
                    overrides: list[str] | None = None) -> dict[str, float]:
    """Accuracy of a stored model on a data set (by default the one it was trained on)."""
    model, meta = load_deployable(source, which)
    base = Recipe.model_validate_json(meta["recipe"]).data.model_dump() if meta.get("recipe") else {}
    if data:
        base["name"] = data
    base["augment"] = False
    cfg = validate(DataConfig, apply_overrides({"data": base}, overrides or [])["data"], prefix="data")
    bundle = load_data(cfg)
    if split not in ("test", "val", "train"):
        raise KdforgeError(f"bad split {split!r} (valid: test, val, train)")
    ds = getattr(bundle, split)
    if ds is None:
        raise KdforgeError(f"data set {cfg.name!r} has no {split} split here (set data.val_fraction > 0)")
    if bundle.num_classes != int(meta["num_classes"]) or bundle.in_chans != int(meta["in_chans"]):
        raise KdforgeError(f"model expects {meta['num_classes']} classes and {meta['in_chans']} channels; "
                           f"{cfg.name!r} has {bundle.num_classes} and {bundle.in_chans}")
    trained = int(meta["image_size"]) if meta.get("image_size") else bundle.image_size
    if bundle.image_size != trained:
        raise KdforgeError(f"model was trained on {trained}x{trained} inputs; {cfg.name!r} gives "
                           f"{bundle.image_size}x{bundle.image_size} (set data.resize or data.pad_to)")
    res = evaluate(model, make_loader(ds, cfg.eval_batch_size, train=False))
    return {**res, "model": meta["kdforge_model"], "data": cfg.name, "split": split}  # type: ignore[dict-item]
