"""The one door for weights and user models: safetensors, ``.pt``/``.pth`` state dicts, run folders, user code."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from kdforge.errors import KdforgeError

#: the Python entry-point group under which a package registers its own models (``name = "pkg.mod:factory"``)
ENTRY_POINT_GROUP = "kdforge.models"
#: keys under which training scripts commonly nest the state dict in a ``.pt`` file
_NESTED = ("state_dict", "model", "model_state_dict", "module", "net")
#: prefixes added by wrappers (DDP, torch.compile) and removed when every key carries them
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def weights_file(path: str | Path) -> Path:
    """The weights file a path names: the file itself, or a kdforge run folder's best (else last) checkpoint."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (p / "checkpoints" / name).is_file():
                return p / "checkpoints" / name
        raise KdforgeError(f"{str(p)!r} is a folder but not a kdforge run folder with weights (no "
                           "checkpoints/best.safetensors or checkpoints/last.safetensors); give a run folder, "
                           "a .safetensors file or a .pt/.pth state dict")
    raise KdforgeError(f"checkpoint not found: {str(p)!r} (give a .safetensors file, a .pt/.pth state dict or a "
                       "kdforge run folder; train one with 'kdforge train' first)")


def _is_safetensors(p: Path) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length, then a JSON header."""
    if p.suffix == ".safetensors":
        return True
    with open(p, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < p.stat().st_size


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file (safetensors or ``torch.save``'d state dict, loaded with weights_only)."""
    p = weights_file(path)
    if _is_safetensors(p):
        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise KdforgeError(f"cannot read checkpoint {str(p)!r}: not a complete safetensors file "
                               f"({_first_line(e)})") from None
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for a file it cannot read
        full = str(e).lower()
        why = ("it holds pickled Python objects (a whole model?), which torch.load(weights_only=True) refuses; "
               "save model.state_dict() instead" if "weights only" in full or "weights_only" in full
               else _first_line(e))
        raise KdforgeError(f"cannot read checkpoint {str(p)!r}: neither safetensors nor a torch state dict ({why})"
                           ) from None
    return _state_dict_of(obj, p)


def _state_dict_of(obj: Any, p: Path) -> dict[str, Tensor]:
    """The state dict in a loaded ``.pt`` object: the dict itself or one nested under a usual key."""
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
            sd = {str(k): v for k, v in obj.items()}
            for prefix in _WRAPPER_PREFIXES:
                if all(k.startswith(prefix) for k in sd):
                    sd = {k[len(prefix):]: v for k, v in sd.items()}
            return sd
        if isinstance(obj, dict):
            nested = next((obj[k] for k in _NESTED if isinstance(obj.get(k), dict)), None)
            if nested is not None:
                obj = nested
                continue
        break
    what = (f"a dict with keys {sorted(map(str, obj))[:5]}" if isinstance(obj, dict) else f"a {type(obj).__name__}")
    raise KdforgeError(f"checkpoint {str(p)!r} holds {what}, not a state dict of tensors (valid: "
                       f"model.state_dict(), or a dict holding it under one of {', '.join(_NESTED)})")


def head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier head: the last ``nn.Linear`` of the model."""
    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = name
    if last is None:
        return set()
    return {f"{last}.{k}" if last else k for k, _ in model.get_submodule(last).named_parameters(recurse=False)}


def load_weights(model: nn.Module, path: str | Path, strict: bool = True, new_head: bool = False) -> nn.Module:
    """Load weights (safetensors, ``.pt``/``.pth`` state dict, or a run folder) into ``model``.

    With ``new_head`` the classifier head keeps its fresh initialisation when its shape differs from the
    file's (ImageNet weights on your own classes). A shape mismatch or a key mismatch is one KdforgeError line.
    """
    p = weights_file(path)
    state = read_state_dict(p)
    name = type(model).__name__
    own = model.state_dict()
    if new_head:
        for k in head_keys(model):
            if k in state and tuple(state[k].shape) != tuple(own[k].shape):
                del state[k]
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        hint = ("; for pretrained weights on other classes set new_head: true" if k in head_keys(model)
                else "; was it trained with other model kwargs?")
        raise KdforgeError(f"checkpoint {str(p)!r} does not fit {name}: {k!r} has shape {list(state[k].shape)} in "
                           f"the file but {list(own[k].shape)} in the model ({len(bad)} of {len(own)} tensors "
                           f"differ{hint})")
    missing = _untied(model, set(own) - set(state), set(state))
    if new_head:
        missing -= head_keys(model)
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise KdforgeError(f"checkpoint {str(p)!r} does not fit {name}: {len(missing)} model keys missing from "
                           f"the file (first: {sorted(missing)[:3]}), {len(unexpected)} file keys unknown to the "
                           f"model (first: {unexpected[:3]}); is it a checkpoint of another architecture?")
    try:
        model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    except RuntimeError as e:
        raise KdforgeError(f"cannot load checkpoint {str(p)!r} into {name}: {_first_line(e)}") from None
    return model


def _untied(model: nn.Module, missing: set[str], present: set[str]) -> set[str]:
    """Missing keys minus those that share storage with a key the file holds (tied weights are saved once)."""
    if not missing:
        return missing
    groups: dict[int, set[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if v.numel():
            groups.setdefault(v.untyped_storage().data_ptr(), set()).add(k)
    tied = {k for g in groups.values() if g & present for k in g}
    return missing - tied


def user_factory(ref: str) -> Callable[..., nn.Module]:
    """The factory a ``module:function`` (or ``path/file.py:function``) reference names, imported from user code."""
    mod_name, _, attr = ref.rpartition(":")
    if not mod_name or not attr:
        raise KdforgeError(f"bad model reference {ref!r} (valid: 'package.module:function' or 'file.py:function')")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise KdforgeError(f"model file not found: {mod_name!r} (in {ref!r})")
            spec = importlib.util.spec_from_file_location(f"kdforge_user_{path.stem}", path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            cwd = str(Path.cwd())
            added = cwd not in sys.path
            if added:  # the user's own module next to the recipe, as `python -m` would find it
                sys.path.insert(0, cwd)
            try:
                module = importlib.import_module(mod_name)
            finally:
                if added:
                    sys.path.remove(cwd)
    except KdforgeError:
        raise
    except ImportError as e:
        raise KdforgeError(f"cannot import {mod_name!r} for model {ref!r}: {_first_line(e)} (run from the folder "
                           "that holds it, or install it)") from None
    except Exception as e:  # the user's module failed while importing
        raise KdforgeError(f"importing {mod_name!r} for model {ref!r} failed: {type(e).__name__}: "
                           f"{_first_line(e)}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise KdforgeError(f"{mod_name!r} has no function or class {attr!r} (it defines: {', '.join(public[:8])})")
    return fn


def entry_point_factory(name: str) -> Callable[..., nn.Module] | None:
    """The factory a package registered under ``name`` in the ``kdforge.models`` entry-point group, if any."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            try:
                return ep.load()
            except Exception as e:
                raise KdforgeError(f"model {name!r} (entry point {ep.value!r}) cannot be loaded: "
                                   f"{type(e).__name__}: {_first_line(e)}") from None
    return None


def entry_point_names() -> list[str]:
    """Names registered by installed packages in the ``kdforge.models`` entry-point group."""
    from importlib.metadata import entry_points

    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


def check_teacher_weights(method: dict[str, Any]) -> None:
    """Refuse a distillation teacher without weights unless the recipe says ``weights: random``."""
    for key in ("teacher", "teachers"):
        specs = method.get(key)
        for i, spec in enumerate(specs if isinstance(specs, list) else [specs]):
            if not isinstance(spec, dict) or not spec.get("model"):
                continue
            if spec.get("checkpoint") is None and spec.get("weights") != "random":
                where = f"method.{key}" + (f".{i}" if isinstance(specs, list) else "")
                raise KdforgeError(f"{where} ({spec['model']}) has no weights: give {where}.checkpoint (a "
                                   ".safetensors file, a .pt/.pth state dict or a kdforge run folder), or set "
                                   f"{where}.weights: random to distill from an untrained teacher on purpose")
            if spec.get("checkpoint") is not None and spec.get("weights") == "random":
                raise KdforgeError(f"method.{key}: both checkpoint and weights: random are given; keep one")


def _cache_file() -> Path:
    import os

    root = os.environ.get("KDFORGE_CACHE_DIR") or Path.home() / ".cache" / "kdforge"
    return Path(root) / "teacher-accuracy.json"


def teacher_val_accuracy(teacher: nn.Module, weights: str, val: Any, data_key: dict[str, Any],
                         batch_size: int = 256) -> float | None:
    """Top-1 (%) of a teacher on the validation split, measured once per (weights file, data) and cached."""
    import hashlib
    import json

    from kdforge.data import make_loader
    from kdforge.method import evaluate_classifier

    p = Path(weights)
    if val is None or not p.is_file():
        return None
    st = p.stat()
    key = hashlib.sha256(json.dumps([str(p.resolve()), st.st_size, st.st_mtime_ns, data_key], sort_keys=True,
                                    default=str).encode()).hexdigest()[:32]
    f = _cache_file()
    try:
        table = json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, ValueError):
        table = {}
    if isinstance(table.get(key), int | float):
        return float(table[key])
    top1 = evaluate_classifier(teacher, make_loader(val, batch_size, False))["top1"]
    table[key] = top1
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f".{f.name}.{id(table)}")
        tmp.write_text(json.dumps(table, indent=0))
        tmp.replace(f)
    except OSError:  # a read-only home: measured again next time, never a failed run
        pass
    return top1
