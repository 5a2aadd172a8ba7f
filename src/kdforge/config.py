"""Recipes: pydantic schemas, YAML loading and ``--set key=value`` overrides."""

from __future__ import annotations

import copy
import types
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from kdforge.errors import KdforgeError, closest


class Strict(BaseModel):
    """A schema that rejects unknown keys, booleans where numbers belong and text where integers or booleans do.

    Floats stay lax on purpose: YAML reads ``1e-3`` as the string "1e-3", which pydantic parses.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _strict_scalars(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, f in cls.model_fields.items():
            key = f.alias or name
            if key in data:
                bad = _scalar_mismatch(f.annotation, data[key])
                if bad:
                    raise PydanticCustomError("strict_scalar", "{want}", {"field": key, "want": bad,
                                                                          "value": repr(data[key])[:60]})
        return data


def _scalar_mismatch(ann: Any, value: Any) -> str:
    """Why ``value`` must not be coerced to the field type ``ann`` ('' if it may be validated as usual)."""
    if value is None:
        return ""
    origin, args = get_origin(ann), get_args(ann)
    if origin in (Union, types.UnionType):
        opts = [a for a in args if a is not type(None)]
        if len(opts) == 1:
            return _scalar_mismatch(opts[0], value)
        return ""
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        elems = [a for a in args if a is not Ellipsis]
        for i, v in enumerate(value):
            elem = elems[min(i, len(elems) - 1)] if elems else Any
            bad = _scalar_mismatch(elem, v)
            if bad:
                return f"item {i}: {bad}"
        return ""
    if ann is bool and not isinstance(value, bool):
        return "should be true or false"
    if ann is int and (isinstance(value, (bool, str)) or (isinstance(value, float) and not value.is_integer())):
        return "should be a whole number"
    if ann is float and isinstance(value, bool):
        return "should be a number"
    return ""


class ModelSpec(Strict):
    """A model by name (``resnet20``, ``timm:NAME``, ``torchvision:NAME``, ``module:function``) and its weights."""

    #: a registered name, ``timm:NAME``, ``torchvision:NAME``, or your own ``package.module:function`` / ``file.py:fn``
    model: str
    #: weights: a .safetensors file, a .pt/.pth state dict (loaded with weights_only) or a kdforge run folder
    checkpoint: str | None = None
    #: ``random``: a distillation teacher with no checkpoint is meant to be untrained (otherwise it is refused)
    weights: Literal["random"] | None = None
    #: keep a fresh classifier head where the checkpoint's has another number of classes (pretrained weights)
    new_head: bool = False
    #: keyword arguments of the model's factory
    kwargs: dict[str, Any] = Field(default_factory=dict)


class DataConfig(Strict):
    """Which data set, how it is split, augmented and batched."""

    #: data set: fashion_mnist_subset (embedded), digits, fashion_mnist, cifar10, cifar100, imagefolder, npz, ...
    #: ('kdforge list datasets')
    name: str = "fashion_mnist_subset"
    #: folder of the data (imagefolder: the folder holding train/ and val/, optionally test/; npz: the .npz file)
    root: str | None = None
    #: let torchvision download a named data set into root
    download: bool = False
    #: share of the training set held out, seeded, as the validation split (picks the best checkpoint); 0: none
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    #: seed of that split
    split_seed: int = Field(0, ge=0)
    #: zero-pad images to this side length
    pad_to: int | None = Field(None, ge=1, le=4096)
    #: resize images to this side length (imagefolder: the crop size, default 224)
    resize: int | None = Field(None, ge=1, le=4096)
    #: training augmentation (random crops and flips)
    augment: bool = True
    #: training batch size (per process)
    batch_size: int = Field(128, ge=1)
    #: batch size of validation and test
    eval_batch_size: int = Field(512, ge=1)
    #: DataLoader worker processes
    num_workers: int = Field(0, ge=0)
    #: train on the first N samples only (quick runs)
    limit_train: int | None = Field(None, ge=1)
    #: K recorded (replayable) augmented views per training sample, drawn from (view_seed, sample, view);
    #: each epoch trains on one of them (kdforge.data.replay; what a teacher cache is built on)
    views: int | None = Field(None, ge=1, le=4096)
    #: seed of the recorded views
    view_seed: int = Field(0, ge=0)


class OptimConfig(Strict):
    """Optimizer: SGD (momentum, Nesterov), AdamW (decoupled decay) or Adam (coupled L2, as many papers use)."""

    #: optimizer
    name: Literal["sgd", "adamw", "adam"] = "sgd"
    #: peak learning rate
    lr: float = Field(0.05, gt=0, allow_inf_nan=False)
    #: SGD momentum
    momentum: float = Field(0.9, ge=0, allow_inf_nan=False)
    #: SGD with Nesterov momentum
    nesterov: bool = False
    #: weight decay (decoupled for adamw)
    weight_decay: float = Field(5e-4, ge=0, allow_inf_nan=False)
    #: Adam/AdamW betas
    betas: tuple[float, float] = (0.9, 0.999)
    #: Adam/AdamW epsilon
    eps: float = Field(1e-8, gt=0, allow_inf_nan=False)
    #: parameters without weight decay: "norm" (normalisation layers), "bias" (biases), "scalar" (0-d
    #: parameters such as CLIP's logit scale), or a substring of the parameter's name
    no_decay: list[str] = Field(default_factory=list)


class SchedConfig(Strict):
    """Learning-rate schedule, set every optimizer step, with optional linear warm-up.

    ``relative`` is a table of ``[epoch, factor]`` rows: the lr is ``factor`` of the last row whose
    epoch is at most the current fractional epoch (the "steps with relative LRs" policy).
    """

    #: schedule of the learning rate over the run
    name: Literal["constant", "step", "multistep", "cosine", "linear", "relative"] = "cosine"
    #: linear warm-up from 0 over this many (fractional) epochs
    warmup_epochs: float = Field(0.0, ge=0, allow_inf_nan=False)
    #: step: decay every this many epochs
    step_size: int = Field(30, ge=1)
    #: multistep: the epochs at which the lr is multiplied by gamma
    milestones: list[int] = Field(default_factory=list)
    #: step, multistep: the decay factor
    gamma: float = Field(0.1, gt=0, allow_inf_nan=False)
    #: cosine, linear: the final learning rate
    min_lr: float = Field(0.0, ge=0, allow_inf_nan=False)
    #: relative: [epoch, factor] rows
    relative: list[tuple[float, float]] = Field(default_factory=list)


class FsdpConfig(Strict):
    """FSDP through Accelerate (GPUs): how the trained model is sharded, and whether a frozen teacher is too."""

    #: FSDP sharding strategy
    sharding: Literal["full", "shard_grad_op", "no_shard", "hybrid"] = "full"
    #: what becomes one FSDP unit: transformer blocks, modules above min_params, or the whole model
    auto_wrap: Literal["transformer", "size", "none"] = "transformer"
    #: auto_wrap size: parameters per unit
    min_params: int = Field(100_000, ge=1)
    #: keep parameters on the CPU between uses
    cpu_offload: bool = False
    #: shard the frozen teacher too
    shard_teacher: bool = False


class EmaConfig(Strict):
    """An exponential moving average of the deployable model's weights (and buffers)."""

    #: EMA decay per update
    decay: float = Field(0.9999, gt=0, lt=1)
    #: update the EMA every N optimizer steps
    every: int = Field(1, ge=1)
    #: evaluate (and deploy) the EMA weights
    evaluate: bool = True
    #: decay min(decay, (1 + n) / (10 + n)) at update n, so the initial weights fade from the average (without
    #: it, n updates keep a share decay^n of them: 10 % after 2,300 updates at 0.999)
    warmup: bool = False


class TrainConfig(Strict):
    """Loop settings: epochs or steps, device, precision, accumulation, logging, checkpoints."""

    #: passes over the training set
    epochs: int = Field(10, ge=1)
    #: stop after this many optimizer steps instead
    max_steps: int | None = Field(None, ge=1)
    #: auto: CUDA if present, else MPS, else CPU
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    #: mixed precision: bf16 or fp16 autocast (fp16 with loss scaling)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    #: accumulate gradients over N batches per optimizer step
    grad_accum: int = Field(1, ge=1)
    #: clip the gradient norm to this value
    grad_clip: float | None = Field(None, gt=0, allow_inf_nan=False)
    #: write a metrics row (metrics.csv, TensorBoard) every N steps
    log_every: int = Field(20, ge=1)
    #: evaluate on the validation split every N epochs (and after the last)
    eval_every: int = Field(1, ge=1)
    #: write checkpoints/best, last and the resumable state
    save_checkpoints: bool = True
    #: also checkpoint every N steps (long epochs)
    save_every_steps: int | None = Field(None, ge=1)
    #: a NaN/inf loss: stop with one line, or skip that step
    nonfinite: Literal["stop", "skip"] = "stop"
    #: keep an exponential moving average of the weights
    ema: EmaConfig | None = None
    #: the progress bar: auto (on a terminal), always or never; the banner and epoch lines print in these three
    #: modes, and only silent (for scripts and benchmarks that print their own lines) prints nothing
    progress: Literal["auto", "always", "never", "silent"] = "auto"
    #: torch CPU threads (one per run makes CPU runs reproducible across machines)
    threads: int | None = Field(None, ge=1)
    #: DDP: allow parameters without gradients in a step
    find_unused_parameters: bool = False
    #: with several processes: DDP or FSDP
    distributed: Literal["ddp", "fsdp"] = "ddp"
    #: FSDP settings
    fsdp: FsdpConfig | None = None


class MethodConfig(BaseModel):
    """The method by name; its own keys are checked by the method's schema."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())
    name: str = "supervised"


R = TypeVar("R", bound="RecipeFile")


class RecipeFile(Strict):
    """A YAML recipe: validated from a dict or a file after ``--set`` overrides, written back as YAML."""

    # keys a resumed run may change (where it runs and how it prints), per section
    resume_free: ClassVar[dict[str, tuple[str, ...]]] = {
        "train": ("device", "progress", "threads", "log_every"), "data": ("num_workers", "eval_batch_size")}

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any], overrides: list[str] | None = None) -> R:
        """Validate a dict (after ``key=value`` overrides), or fail in one line."""
        return validate(cls, apply_overrides(copy.deepcopy(data), overrides or []))

    @classmethod
    def from_yaml(cls: type[R], path: str | Path, overrides: list[str] | None = None) -> R:
        """Load and validate a YAML recipe (with ``key=value`` overrides)."""
        return cls.from_dict(resolve_files(load_yaml(path), Path(path).parent), overrides)

    def to_yaml(self) -> str:
        """The resolved recipe as YAML text (``config.yaml`` of a run folder)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def identity(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues."""
        d = self.model_dump(mode="json")
        for section, keys in self.resume_free.items():
            for k in keys:
                d.get(section, {}).pop(k, None)
        return d


class Recipe(RecipeFile):
    """A whole run: data, method, optimizer, schedule and loop."""

    #: the run's name: default folder runs/NAME
    name: str = "run"
    #: the one seed of everything random in the run
    seed: int = Field(0, ge=0, lt=2**31)
    #: the data set and its splits
    data: DataConfig = Field(default_factory=DataConfig)
    #: what is trained and how: name plus the method's own keys (see methods)
    method: MethodConfig = Field(default_factory=MethodConfig)
    #: the optimizer
    optim: OptimConfig = Field(default_factory=OptimConfig)
    #: the learning-rate schedule
    sched: SchedConfig = Field(default_factory=SchedConfig)
    #: the loop: epochs, device, precision, checkpoints, progress
    train: TrainConfig = Field(default_factory=TrainConfig)



def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with ``safe_load``; a missing or malformed file is a KdforgeError."""
    p = Path(path)
    if not p.is_file():
        raise KdforgeError(f"recipe file not found: {str(p)!r} (give a path to a .yaml recipe)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise KdforgeError(f"recipe {str(p)!r} is not valid YAML{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise KdforgeError(f"recipe {str(p)!r} must be a mapping of keys, not {type(data).__name__}")
    return data


#: recipe keys that name a file: a relative path missing from the current folder is read next to the recipe
FILE_KEYS = ("checkpoint",)


def resolve_files(data: Any, base: Path) -> Any:
    """Resolve relative file keys against the recipe's folder where the current folder lacks them (in place)."""
    if isinstance(data, dict):
        for k, v in data.items():
            if k in FILE_KEYS and isinstance(v, str) and v and not Path(v).is_absolute() and not Path(v).exists():
                there = base / v
                if there.exists():
                    data[k] = str(there.resolve())
            else:
                resolve_files(v, base)
    elif isinstance(data, list):
        for v in data:
            resolve_files(v, base)
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) to a nested dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise KdforgeError(f"--set expects key=value (e.g. optim.lr=0.1), got {item!r}")
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part) if isinstance(node, dict) else None
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise KdforgeError(f"--set {key}: {'.'.join(parts[: i + 1])!r} is not a section")
            node = nxt
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError:
            node[parts[-1]] = raw
    return data


def validate(schema: type[BaseModel], data: Any, prefix: str = "") -> Any:
    """Validate ``data`` against ``schema``; the first error becomes a one-line KdforgeError."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise KdforgeError(describe_error(schema, e, prefix)) from None


def describe_error(schema: type[BaseModel], err: ValidationError, prefix: str = "") -> str:
    """One line for the first error: the key, what is wrong, and what would be valid."""
    first = err.errors()[0]
    loc = [str(x) for x in first["loc"]]
    if first["type"] == "strict_scalar":
        ctx = first.get("ctx") or {}
        loc.append(str(ctx.get("field")))
        key = ".".join([prefix, *loc] if prefix else loc)
        return f"bad value for {key!r}: {ctx.get('value')} ({ctx.get('want')})"
    key = ".".join([prefix, *loc] if prefix else loc)
    if first["type"] == "extra_forbidden":
        valid = sorted(_fields_at(schema, loc[:-1]))
        return (f"unknown key {key!r}{closest(loc[-1], valid)} "
                f"(valid keys here: {', '.join(valid)})")
    if first["type"] == "missing":
        return f"missing key {key!r}"
    msg = first["msg"]
    if first["type"] == "literal_error":
        return f"bad value for {key!r}: {first.get('input')!r}; {msg[0].lower() + msg[1:]}"
    return f"bad value for {key!r}: {first.get('input')!r} ({msg})"


def _fields_at(schema: type[BaseModel], loc: list[str]) -> list[str]:
    """Field names of the nested schema at ``loc`` (best effort, for error messages)."""
    cur: Any = schema
    for part in loc:
        if part.isdigit():
            continue
        field = getattr(cur, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        cands = [ann, *args, *[a for x in args for a in getattr(x, "__args__", ())]]
        cur = next((c for c in cands if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if cur is None:
            return []
    return list(getattr(cur, "model_fields", {}))
