"""Prunable units of residual CNNs and decoder-only LLMs; removing them; saving and reloading pruned models."""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from kdforge.errors import KdforgeError

PRUNED_FORMAT = "kdforge-pruned/1"


@dataclass(frozen=True)
class UnitSpec:
    """One prunable unit: its module path, the container holding it and its index there."""

    name: str
    container: str | None
    index: int
    removable: bool
    reason: str = ""


def _container_of(model: nn.Module, name: str) -> tuple[str | None, int]:
    parent, _, last = name.rpartition(".")
    if not last.isdigit() or not parent:  # children of the root module cannot be swapped out
        return None, -1
    mod = model.get_submodule(parent) if parent else model
    if isinstance(mod, (nn.Sequential, nn.ModuleList)):
        return parent, int(last)
    return None, -1


def _resnet_stages(model: nn.Module) -> list[str]:
    """Names of ``layer1``, ``layer2``, ... stages that are nn.Sequential of blocks."""
    out = []
    for i in range(1, 10):
        m = getattr(model, f"layer{i}", None)
        if not isinstance(m, nn.Sequential):
            break
        out.append(f"layer{i}")
    return out


def find_units(model: nn.Module, names: Sequence[str] | None = None, example: Tensor | None = None) -> list[UnitSpec]:
    """The ordered prunable units of ``model``: LLM decoder layers, ResNet stem + blocks, or given names.

    ResNet blocks with a downsample path change the shape and are pinned; for user-given names an
    example input decides: a unit whose input and output shapes differ is pinned.
    """
    from kdforge.llm import decoder_layers

    if names is None:
        found = decoder_layers(model, required=False)
        if found is not None:
            path, layers = found
            return [UnitSpec(f"{path}.{i}", path, i, True) for i in range(len(layers))]
        stages = _resnet_stages(model)
        if not stages:
            kids = ", ".join(f"{n} ({type(m).__name__})" for n, m in list(model.named_children())[:6])
            raise KdforgeError(f"cannot find prunable units in {type(model).__name__} (its modules: {kids or 'none'}):"
                               " the surgery handles decoder layers of causal LMs and ResNet-style stages; give "
                               "'units' (module names of residual blocks inside an nn.Sequential or nn.ModuleList)")
        stem = "stem" if hasattr(model, "stem") else "maxpool" if hasattr(model, "maxpool") else None
        units = [UnitSpec(stem, None, -1, False, "stem")] if stem else []
        for st in stages:
            for i, block in enumerate(getattr(model, st)):
                ds = getattr(block, "downsample", None)
                if ds is not None:
                    units.append(UnitSpec(f"{st}.{i}", st, i, False, "shape-changing (downsample)"))
                else:
                    units.append(UnitSpec(f"{st}.{i}", st, i, True))
        return units
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[Any, Any]] = {}
    if example is not None:
        shapes = _io_shapes(model, list(names), example)
    units = []
    for n in names:
        if n not in modules:
            from kdforge.errors import closest

            raise KdforgeError(f"no module named {n!r} in {type(model).__name__}{closest(n, modules)}")
        cont, idx = _container_of(model, n)
        if cont is None:
            units.append(UnitSpec(n, None, -1, False, "not inside an nn.Sequential/nn.ModuleList"))
        elif n in shapes and shapes[n][0] != shapes[n][1]:
            units.append(UnitSpec(n, cont, idx, False, f"shape-changing {shapes[n][0]} -> {shapes[n][1]}"))
        else:
            units.append(UnitSpec(n, cont, idx, True))
    return units


@torch.no_grad()
def _io_shapes(model: nn.Module, names: list[str], example: Tensor) -> dict[str, tuple[Any, Any]]:
    from kdforge.taps import FeatureTaps

    was = model.training
    model.eval()
    with FeatureTaps(model, names, mode="input") as ti, FeatureTaps(model, names) as to:
        model(example)
        out = {n: (tuple(ti[n].shape), tuple(to[n].shape)) for n in names if n in ti and n in to}
    model.train(was)
    return out


def pinned_indices(units: Sequence[UnitSpec], extra: Iterable[int | str] = ()) -> set[int]:
    """Indices of units that must survive: the non-removable ones plus ``extra`` (indices or names)."""
    by_name = {u.name: i for i, u in enumerate(units)}
    pinned = {i for i, u in enumerate(units) if not u.removable}
    for p in extra:
        if isinstance(p, str) and not p.lstrip("-").isdigit():
            if p not in by_name:
                from kdforge.errors import closest

                raise KdforgeError(f"pinned unit {p!r} is not a prunable unit{closest(p, by_name)}")
            pinned.add(by_name[p])
        else:
            i = int(p)
            if not -len(units) <= i < len(units):
                raise KdforgeError(f"pinned unit index {i} is out of range (there are {len(units)} units)")
            pinned.add(i % len(units))
    return pinned


def _check_keep(units: Sequence[UnitSpec], keep: Iterable[int]) -> set[int]:
    keep = {int(i) for i in keep}
    bad = [units[i].name for i in range(len(units)) if i not in keep and not units[i].removable]
    if bad:
        raise KdforgeError(f"cannot remove pinned units: {', '.join(bad)}")
    return keep


def _rebuilt(model: nn.Module, units: Sequence[UnitSpec], keep: set[int]) -> dict[str, nn.Module]:
    """New containers holding only the kept children, keyed by container path."""
    by_cont: dict[str, set[int]] = {}
    for i, u in enumerate(units):
        if u.container is not None and i not in keep:
            by_cont.setdefault(u.container, set()).add(u.index)
    out = {}
    for path, drop in by_cont.items():
        cont = model.get_submodule(path)
        kept = [m for j, m in enumerate(cont) if j not in drop]
        out[path] = nn.Sequential(*kept) if isinstance(cont, nn.Sequential) else nn.ModuleList(kept)
    return out


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, last = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, last, module)


@contextlib.contextmanager
def removed(model: nn.Module, units: Sequence[UnitSpec], keep: Iterable[int]) -> Iterator[nn.Module]:
    """Temporarily run ``model`` without the units not in ``keep`` (the same module objects, restored after)."""
    keep = _check_keep(units, keep)
    new = _rebuilt(model, units, keep)
    old = {p: model.get_submodule(p) for p in new}
    try:
        for p, m in new.items():
            _set_module(model, p, m)
        yield model
    finally:
        for p, m in old.items():
            _set_module(model, p, m)


def prune_model(model: nn.Module, units: Sequence[UnitSpec], keep: Iterable[int], inplace: bool = False) -> nn.Module:
    """A copy of ``model`` with only the kept units; kept weights are bit-identical, HF configs updated."""
    from kdforge.llm import decoder_layers, prune_decoder_layers

    keep = _check_keep(units, keep)
    out = model if inplace else copy.deepcopy(model)
    found = decoder_layers(out, required=False)
    if found is not None and all(u.container == found[0] for u in units):
        return prune_decoder_layers(out, sorted(units[i].index for i in keep), inplace=True)
    for p, m in _rebuilt(out, units, keep).items():
        _set_module(out, p, m)
    return out


def random_init_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """A fresh copy of ``model`` with every parameter re-initialised (Kaiming-normal convs), seeded once."""
    from kdforge.models.cifar_resnet import init_weights

    fresh = copy.deepcopy(model)
    gen_state = torch.get_rng_state()
    torch.manual_seed(seed)
    for m in fresh.modules():
        if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
            m.reset_parameters()
    init_weights(fresh)
    torch.set_rng_state(gen_state)
    return fresh


# -- saving ------------------------------------------------------------------------------------
def pruned_record(units: Sequence[UnitSpec], keep: Iterable[int], base: dict[str, Any]) -> dict[str, Any]:
    """The kept structure: how to rebuild the pruned model from its base model."""
    keep = sorted(int(i) for i in keep)
    return {"format": PRUNED_FORMAT, "base": base, "units": [asdict(u) for u in units], "kept": keep,
            "removed": [i for i in range(len(units)) if i not in set(keep)],
            "kept_names": [units[i].name for i in keep]}


def save_pruned(model: nn.Module, out_dir: str | Path, record: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` (the record in its header) and ``pruned.yaml`` into ``out_dir``."""
    from kdforge.engine.checkpoint import atomic_write_text, save_weights

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / "model.safetensors", {"kdforge_pruned": json.dumps(record)})
    atomic_write_text(out / "pruned.yaml", yaml.safe_dump(record, sort_keys=False))
    return out


def load_pruned(path: str | Path) -> nn.Module:
    """Rebuild a pruned CNN from a folder written by :func:`save_pruned` (or its safetensors file)."""
    from kdforge.engine.checkpoint import load_weights, read_metadata
    from kdforge.models import create_model

    p = Path(path)
    weights = p / "model.safetensors" if p.is_dir() else p
    if not weights.is_file():
        raise KdforgeError(f"no pruned model at {str(p)!r} (expected a folder with model.safetensors)")
    meta = read_metadata(weights)
    if "kdforge_pruned" in meta:
        record = json.loads(meta["kdforge_pruned"])
    elif (weights.parent / "pruned.yaml").is_file():
        record = yaml.safe_load((weights.parent / "pruned.yaml").read_text())
    else:
        raise KdforgeError(f"{str(weights)!r} has no kept-structure record (pruned.yaml)")
    if record.get("format") != PRUNED_FORMAT:
        raise KdforgeError(f"unknown pruned-model format {record.get('format')!r} (expected {PRUNED_FORMAT})")
    b = record["base"]
    model = create_model(b["model"], int(b["num_classes"]), int(b.get("in_chans", 3)),
                         image_size=b.get("image_size"), **b.get("kwargs", {}))
    units = [UnitSpec(**u) for u in record["units"]]
    model = prune_model(model, units, record["kept"], inplace=True)
    load_weights(model, weights)
    return model.eval()
