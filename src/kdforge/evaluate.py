"""Evaluate a trained model from a run folder or a safetensors checkpoint.

The checkpoint header says what rebuilds the deployable model (``kdforge_spec``: builder ``model`` →
:func:`kdforge.models.create_model`, builder ``clip`` → the CLIP builder; layer-pruned models have
their own header) and which method trained it; the model is scored with that method's
``evaluate``, so ``kdforge eval RUN`` reproduces the test metrics in ``RUN/results.json``
(``--which last`` for ``test_last``, ``best`` for ``test_best``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from kdforge.config import DataConfig, Recipe, apply_overrides, validate
from kdforge.data import load_data, make_loader
from kdforge.engine.checkpoint import load_weights, read_metadata
from kdforge.errors import KdforgeError
from kdforge.method import Method, evaluate_classifier
from kdforge.models import create_model
from kdforge.registry import METHODS

Evaluation = Callable[[nn.Module, DataLoader], dict[str, float]]


def checkpoint_path(source: str | Path, which: str = "best") -> tuple[Path, str]:
    """The checkpoint file of a run folder (``best``, or ``last`` where no best is kept) or the file itself."""
    p = Path(source)
    if p.is_dir():
        ck = p / "checkpoints" / f"{which}.safetensors"
        if which == "best" and not ck.is_file() and (p / "checkpoints" / "last.safetensors").is_file():
            return p / "checkpoints" / "last.safetensors", "last"  # no validation split: only "last" is kept
        if not ck.is_file():
            from kdforge.engine.run_dir import describe_folder, run_kind

            if run_kind(p) not in (None, "train"):
                raise KdforgeError(f"{describe_folder(p)}; it has no checkpoints/{which}.safetensors to load")
            raise KdforgeError(f"{str(p)!r} has no checkpoints/{which}.safetensors "
                               "(give a run folder written by 'kdforge train' or a .safetensors file)")
        return ck, which
    if not p.is_file():
        raise KdforgeError(f"no run folder or checkpoint at {str(p)!r}")
    return p, p.stem


def rebuild_model(spec: dict[str, Any]) -> nn.Module:
    """An untrained model from a checkpoint's ``kdforge_spec`` (builders ``model`` and ``clip``)."""
    builder = spec.get("builder")
    if builder == "model":
        model = create_model(spec["model"], int(spec["num_classes"]), int(spec["in_chans"]),
                             image_size=int(spec["image_size"]) if spec.get("image_size") else None,
                             **spec.get("kwargs", {}))
        if spec.get("view"):  # cross-modal students see their input view when deployed too
            from kdforge.distill.cross_modal import View, ViewSpec, attach_view

            attach_view(model, View(ViewSpec(**spec["view"])))
        model.kdforge_spec = dict(spec)
        return model
    if builder == "clip":
        from kdforge.clip.method import rebuild_clip

        return rebuild_clip(spec)
    if builder == "reid":
        from kdforge.reid.model import rebuild_reid

        return rebuild_reid(spec)
    if builder == "rl":
        from kdforge.rl.nets import build_group

        return build_group(spec)
    raise KdforgeError(f"unknown model builder {builder!r} in the checkpoint's kdforge_spec (valid: model, clip, reid)")


def load_deployable(source: str | Path, which: str = "best") -> tuple[nn.Module, dict[str, str]]:
    """The deployable model stored in a run folder (``best``/``last``) or a checkpoint file, and its header."""
    p, used = checkpoint_path(source, which)
    meta = {**read_metadata(p), "checkpoint": used}
    if "kdforge_pruned" in meta:  # a layer-pruned model: rebuild its kept structure first
        from kdforge.prune.surgery import load_pruned

        base = json.loads(meta["kdforge_pruned"])["base"]
        meta = {**meta, "kdforge_model": base["model"], "num_classes": str(base["num_classes"]),
                "in_chans": str(base.get("in_chans", 3)), "image_size": str(base.get("image_size") or "")}
        return load_pruned(p), meta
    if "kdforge_compress" in meta:  # a compressed model (kdforge compress): rebuilt from its base and plan
        from kdforge.compress.export import load_compressed

        return load_compressed(p), meta
    spec = json.loads(meta.get("kdforge_spec") or "{}")
    if spec:
        model = rebuild_model(spec)
    elif meta.get("kdforge_model"):  # a header without a spec: the model by name
        model = create_model(meta["kdforge_model"], int(meta["num_classes"]), int(meta["in_chans"]),
                             image_size=int(meta["image_size"]) if meta.get("image_size") else None,
                             **json.loads(meta.get("kdforge_model_kwargs", "{}")))
    else:
        who = f"method {meta['method']!r}" if meta.get("method") else "its writer"
        raise KdforgeError(f"checkpoint {str(p)!r} cannot be rebuilt: {who} stored no model spec (kdforge_spec); "
                           "build the model in Python and load the weights with kdforge.engine.checkpoint.load_weights")
    load_weights(model, p)
    return model.eval(), meta


def method_evaluation(name: str | None) -> Evaluation:
    """The evaluation of the method ``name`` (its ``evaluate``), applied to a given model and loader.

    A method's ``evaluate`` scores the model it is given; it runs here on an instance built without
    its networks (``Method.__init__`` only), so a checkpoint is evaluated without its teachers.
    """
    cls = METHODS.get(name) if name else None
    if cls is None or cls.evaluate is Method.evaluate:
        return lambda model, loader: evaluate_classifier(model, loader)
    method = cls.__new__(cls)
    Method.__init__(method)
    no_engine = SimpleNamespace(acc=None)  # one process, the model's own device and precision
    return lambda model, loader: method.evaluate(loader, no_engine, model)  # type: ignore[arg-type]


def evaluate_source(source: str | Path, data: str | None = None, split: str = "test", which: str = "best",
                    overrides: list[str] | None = None) -> dict[str, Any]:
    """The trained method's metrics of a stored model on a data set (by default the one it was trained on)."""
    if split not in ("test", "val", "train"):
        raise KdforgeError(f"bad split {split!r} (valid: test, val, train)")
    model, meta = load_deployable(source, which)
    if getattr(model, "kdforge_spec", {}).get("builder") == "rl":  # episodes in its environment, not a data set
        from kdforge.rl.base import split_episodes

        res = method_evaluation(meta.get("method"))(model, split_episodes(model.kdforge_spec, split))  # type: ignore[arg-type]
        return {**res, "model": model.kdforge_spec["env"], "method": meta.get("method", ""),
                "checkpoint": meta["checkpoint"]}
    base = Recipe.model_validate_json(meta["recipe"]).data.model_dump() if meta.get("recipe") else {}
    if data:
        base["name"] = data
    base["augment"] = False
    cfg = validate(DataConfig, apply_overrides({"data": base}, overrides or [])["data"], prefix="data")
    bundle = load_data(cfg)
    ds = getattr(bundle, split)
    if ds is None:
        raise KdforgeError(f"data set {cfg.name!r} has no {split} split here (set data.val_fraction > 0)")
    spec = json.loads(meta.get("kdforge_spec") or "{}")
    if spec.get("builder", "model") == "model" and meta.get("num_classes"):
        classes = int(spec.get("num_classes", meta["num_classes"]))
        chans = int(spec.get("in_chans", meta["in_chans"]))
        if bundle.num_classes != classes or bundle.in_chans != chans:
            raise KdforgeError(f"model expects {classes} classes and {chans} channels; "
                               f"{cfg.name!r} has {bundle.num_classes} and {bundle.in_chans}")
    size = spec.get("image_size") or meta.get("image_size")
    trained = int(size) if size else bundle.image_size
    if bundle.image_size != trained:
        raise KdforgeError(f"model was trained on {trained}x{trained} inputs; {cfg.name!r} gives "
                           f"{bundle.image_size}x{bundle.image_size} (set data.resize or data.pad_to)")
    res = method_evaluation(meta.get("method"))(model, make_loader(ds, cfg.eval_batch_size, train=False))
    name = spec.get("model") or meta.get("kdforge_model") or spec.get("builder", "")
    return {**res, "model": name, "method": meta.get("method", ""), "checkpoint": meta["checkpoint"],
            "data": cfg.name, "split": split}
