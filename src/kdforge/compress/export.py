"""Exports of a vision model: ONNX (dynamo exporter), torch.export (.pt2), safetensors with the kdforge record."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdforge.errors import KdforgeError

COMPRESS_FORMAT = "kdforge-compressed/1"
FILES = {"onnx": "model.onnx", "pt2": "model.pt2", "safetensors": "model.safetensors"}


def _batch_dim() -> tuple[dict[int, Any]]:
    return ({0: torch.export.Dim("batch", min=1, max=4096)},)


def export_onnx(model: nn.Module, shape: tuple[int, ...], path: Path) -> Path:
    """ONNX through ``torch.onnx.export(dynamo=True)`` with a dynamic batch; an op it lacks is one line."""
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise KdforgeError("ONNX export needs onnxscript and onnx: pip install 'kdforge[compress]' "
                           "(or drop onnx from export.formats)") from None
    x = torch.zeros(2, *shape)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            torch.onnx.export(model.eval(), (x,), str(path), dynamo=True, dynamic_shapes=_batch_dim(),
                              external_data=False)
    except Exception as e:
        raise KdforgeError(f"ONNX export of {type(model).__name__} failed (an op the exporter or runtime lacks?): "
                           f"{_root_cause(e)}") from None
    return path


def _root_cause(e: BaseException) -> str:
    """The innermost cause's first line, naming the op when the exporter has no ONNX function for it."""
    import re

    while e.__cause__ is not None:
        e = e.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    op = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)'", text)
    if op:
        return f"no ONNX function for op '{op.group(1)}' (use ops the exporter knows, or register one)"
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def export_pt2(model: nn.Module, shape: tuple[int, ...], path: Path) -> Path:
    """A ``torch.export`` program with a dynamic batch, saved as ``.pt2``."""
    try:
        ep = torch.export.export(model.eval(), (torch.zeros(2, *shape),), dynamic_shapes=_batch_dim())
    except Exception as e:
        raise KdforgeError(f"torch.export of {type(model).__name__} failed: "
                           f"{str(e).strip().splitlines()[0][:200]}") from None
    torch.export.save(ep, str(path))
    return path


def export_safetensors(model: nn.Module, path: Path, base: dict[str, Any], plan: dict[str, Any],
                       shape: tuple[int, ...], data: dict[str, Any] | None = None) -> Path:
    """Weights with the record that rebuilds the compressed model from its base (``load_compressed``).

    ``data``: the data config, so that ``kdforge eval model.safetensors`` evaluates on the same data.
    """
    from kdforge.engine.checkpoint import save_weights

    record = {"format": COMPRESS_FORMAT, "base": base, "plan": plan, "input_shape": list(shape)}
    meta = {"kdforge_compress": json.dumps(record), "kdforge_spec": "", "num_classes": str(base.get("num_classes")),
            "in_chans": str(base.get("in_chans")), "image_size": str(base.get("image_size") or "")}
    if data is not None:
        from kdforge.config import Recipe

        meta["recipe"] = Recipe.model_validate({"data": data}).model_dump_json()
    save_weights(model, path, meta)
    return path


def export_all(model: nn.Module, shape: tuple[int, ...], folder: Path, formats: list[str], base: dict[str, Any],
               plan: dict[str, Any], data: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write every requested format into ``folder``; returns format -> file."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for f in formats:
        p = folder / FILES[f]
        if f == "onnx":
            out[f] = export_onnx(model, shape, p)
        elif f == "pt2":
            out[f] = export_pt2(model, shape, p)
        else:
            out[f] = export_safetensors(model, p, base, plan, shape, data)
    return out


def load_compressed(path: str | Path) -> nn.Module:
    """Rebuild a compressed model from its safetensors file: base model, then the plan, then the weights."""
    from kdforge.engine.checkpoint import load_weights, read_metadata
    from kdforge.evaluate import rebuild_model

    p = Path(path)
    p = p / FILES["safetensors"] if p.is_dir() else p
    meta = read_metadata(p)
    if "kdforge_compress" not in meta:
        raise KdforgeError(f"{str(p)!r} is not a compressed model (no kdforge_compress record)")
    rec = json.loads(meta["kdforge_compress"])
    if rec.get("format") != COMPRESS_FORMAT:
        raise KdforgeError(f"unknown compressed-model format {rec.get('format')!r} (expected {COMPRESS_FORMAT})")
    model = rebuild_model(rec["base"])
    if hasattr(model, "kdforge_spec"):
        del model.kdforge_spec
    model = apply_plan(model, rec["plan"], tuple(rec["input_shape"]))
    load_weights(model, p)
    return model.eval()


def apply_plan(model: nn.Module, plan: dict[str, Any], shape: tuple[int, ...]) -> nn.Module:
    """Replay a candidate's plan (kept depth units, width-pruning history) on an unpruned model."""
    if "depth" in plan:
        from kdforge.prune.surgery import UnitSpec, prune_model

        units = [UnitSpec(**u) for u in plan["depth"]["units"]]
        model = prune_model(model, units, plan["depth"]["kept"], inplace=True)
    if "width" in plan:
        from kdforge.compress.candidates import replay_width

        model = replay_width(model.eval(), plan["width"]["history"], shape)
    return model
