"""FSDP2 (torch's ``fully_shard`` over a DeviceMesh): the engine's one sharding path, CPU (gloo) and CUDA (nccl).

Accelerate launches the processes, owns the process group, the device and the fp16 scaler; the sharding
itself is torch's API on both devices, so the path the CPU tests run is the path GPU users run (Accelerate's
own FSDP2 preparation skips the CPU). A method is sharded part by part: every trainable child (the student,
connectors, discriminators, generators) per block and then as a whole; a frozen teacher
(``Method.frozen_prefixes``) stays whole on every rank, or is sharded too with ``reshard_after_forward``
(``train.fsdp.shard_teacher``). Checkpoints are :mod:`torch.distributed.checkpoint` folders (each rank
writes its shard); the deployable model is gathered into one plain copy for evaluation and safetensors.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from kdforge.config import EmaConfig, FsdpConfig, TrainConfig
from kdforge.engine.ema import Ema
from kdforge.errors import KdforgeError

if TYPE_CHECKING:
    from kdforge.engine.trainer import Trainer

CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def check(t: TrainConfig, cpu: bool) -> None:
    """Refuse, before any work and in one line, what FSDP2 cannot do with this recipe."""
    cfg = t.fsdp or FsdpConfig()
    if cfg.sharding == "no_shard":
        raise KdforgeError("train.fsdp.sharding 'no_shard' keeps a whole model on every process, which is "
                           "train.distributed: ddp (valid with fsdp: full, shard_grad_op, hybrid)")
    if cfg.cpu_offload and cpu:
        raise KdforgeError("train.fsdp.cpu_offload moves GPU shards to the CPU; training on the CPU there is "
                           "nothing to offload (set it false)")


def ensure_process_group(device: torch.device) -> bool:
    """A one-process group when the run was not launched (FSDP2 needs a group even for one process); made one?"""
    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def device_mesh(device: torch.device, sharding: str) -> Any:
    """The mesh to shard over: every process (1-D), or nodes x local processes for ``hybrid`` (HSDP)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if sharding != "hybrid":
        return init_device_mesh(device.type, (world,))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world % local:
        raise KdforgeError(f"train.fsdp.sharding 'hybrid' needs the same number of processes on every node "
                           f"({world} processes, {local} on this node)")
    return init_device_mesh(device.type, (world // local, local), mesh_dim_names=("replicate", "shard"))


def blocks(model: nn.Module, cfg: FsdpConfig) -> list[nn.Module]:
    """The sub-modules sharded one by one before the whole (``train.fsdp.auto_wrap``), innermost first.

    ``transformer``: the classes in a Hugging Face model's ``_no_split_modules`` (decoder layers), else the
    model's stages (``feature_names`` with parameters: residual stages of the own zoo, timm, torchvision),
    else the items of its ModuleLists. ``size``: modules holding ``min_params`` parameters not yet in a
    block. ``none``: the whole model only.
    """
    if cfg.auto_wrap == "none":
        return []
    if cfg.auto_wrap == "size":
        return _by_size(model, cfg.min_params, _embeddings(model))
    found: list[nn.Module] = []
    names = set(getattr(model, "_no_split_modules", None) or ())
    if names:
        found = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    if not found:
        for name in getattr(model, "feature_names", None) or ():
            try:
                m = model.get_submodule(name)
            except AttributeError:
                continue
            if m is not model and any(True for _ in m.parameters()):
                found.append(m)
    if not found:
        found = [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst
                 if any(True for _ in m.parameters())]
    order = {id(m): i for i, m in enumerate(model.modules())}
    unique = list({id(m): m for m in found}.values())
    return sorted(unique, key=lambda m: -order[id(m)])  # descendants before their ancestors


def _embeddings(model: nn.Module) -> set[int]:
    """A language model's input and output embeddings: used outside its forward by chunked losses, often tied."""
    found = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            m = getattr(model, getter)() if hasattr(model, getter) else None
        except NotImplementedError:
            m = None
        if m is not None:
            found.add(id(m))
    return found


def _by_size(model: nn.Module, min_params: int, keep: set[int]) -> list[nn.Module]:
    """Modules holding ``min_params`` parameters not yet in a unit; the modules in ``keep`` (and the modules
    holding them) stay in the root's unit."""
    out: list[nn.Module] = []

    def visit(m: nn.Module) -> tuple[int, bool]:
        below = [visit(c) for c in m.children()]
        n = sum(p.numel() for p in m.parameters(recurse=False)) + sum(k for k, _ in below)
        kept = id(m) in keep or any(k for _, k in below)
        if n >= min_params and m is not model and not kept:
            out.append(m)
            return 0, False
        return n, kept

    visit(model)
    return out


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


class Sharding:
    """A method sharded in place with FSDP2, with the plain copy of its deployable model and sharded checkpoints."""

    def __init__(self, method: nn.Module, t: TrainConfig, device: torch.device) -> None:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

        self.cfg = t.fsdp or FsdpConfig()
        self._own_group = ensure_process_group(device)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.mesh = device_mesh(device, self.cfg.sharding)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
        self.mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else \
            MixedPrecisionPolicy()
        self.offload = CPUOffloadPolicy() if self.cfg.cpu_offload else OffloadPolicy()
        self.method = method
        if self.world > 1:  # every rank shards its own copy: start from rank 0's weights, as DDP does
            for v in method.state_dict().values():
                dist.broadcast(v.data, src=0)
        # the deployable model's plain twin: evaluated and saved after every gather (all ranks hold it)
        self.plain = copy.deepcopy(method.deployable())
        self._fresh_at: int | None = None
        self.ema: ShardedEma | None = None  # train.ema: the average kept sharded like the model
        prefixes = tuple(p.rstrip(".") for p in getattr(method, "frozen_prefixes", ()))
        self.whole: list[nn.Module] = []  # frozen teachers kept whole on every rank
        self.units: list[nn.Module] = []  # every module fully_shard was applied to
        self.teachers: list[nn.Module] = []  # sharded teachers' top units, released after every step
        for name, child in method.named_children():
            if not _has_params(child):
                continue
            if name in prefixes and not self.cfg.shard_teacher:
                self.whole.append(child)
                continue
            top = len(self.units)
            self._shard_tree(child, reshard=True if name in prefixes else self.cfg.sharding != "shard_grad_op")
            if name in prefixes:
                self.teachers += self.units[top:]
        if any(True for _ in method.parameters(recurse=False)):
            ignored = {p for m in self.whole for p in m.parameters()}
            self._shard(method, reshard=False, ignored=ignored)

    def _shard(self, module: nn.Module, reshard: bool, ignored: set[nn.Parameter] | None = None) -> None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(module, mesh=self.mesh, reshard_after_forward=reshard, mp_policy=self.mp,
                    offload_policy=self.offload, ignored_params=ignored or None)
        self.units.append(module)

    def _shard_tree(self, model: nn.Module, reshard: bool) -> None:
        """Each block, then the model; a container's items one by one (its own forward never runs).

        The model's own unit (embeddings, final norm, output head of a language model) stays gathered from
        its forward to the end of the backward, FSDP's rule for a root: a language-model loss applies the head
        to the hidden states in chunks after the forward, and backward needs these weights first anyway.
        """
        if isinstance(model, CONTAINERS):
            for child in model.children():
                if _has_params(child):
                    self._shard_tree(child, reshard)
            return
        for b in blocks(model, self.cfg):
            self._shard(b, reshard)
        self._shard(model, reshard=False)

    def release_teachers(self) -> None:
        """Free the gathered top units of sharded teachers (kept whole through the step for chunked losses)."""
        for m in self.teachers:
            m.reshard()

    def close(self) -> None:
        """Drop the one-process group this run made (a launch's group belongs to the launch)."""
        if self._own_group and dist.is_initialized():
            dist.destroy_process_group()
        self._own_group = False

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (no reduce-scatter) inside the block: the micro-batches of an accumulation."""
        for m in self.units:
            m.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for m in self.units:
                m.set_requires_gradient_sync(True, recurse=False)

    def refresh(self, step: int) -> nn.Module:
        """Gather the deployable model's weights into the plain copy (a collective; once per engine step)."""
        if self._fresh_at == step:
            return self.plain
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.method.deployable(), options=StateDictOptions(full_state_dict=True))
        self.plain.load_state_dict(full)
        # buffers (BatchNorm statistics) are per rank under FSDP: rank 0's rule, as DDP broadcasts them
        if self.world > 1:
            for b in self.plain.buffers():
                dist.broadcast(b.data, src=0)
        if self.ema is not None:
            self.ema.refresh()
        self._fresh_at = step
        return self.plain

    def make_ema(self, cfg: EmaConfig) -> ShardedEma:
        """The EMA of the deployable model, sharded as it is (``train.ema``)."""
        self.ema = ShardedEma(self.method.deployable(), self.plain, cfg, self.world)
        return self.ema

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, directory: Path, trainer: Trainer) -> None:
        """Write the resumable state: DCP shards of the method and optimizers, each rank's RNG, rank 0's counters."""
        import torch.distributed.checkpoint as dcp

        from kdforge.engine.checkpoint import atomic_dir_swap, save_torch
        from kdforge.engine.trainer import rng_state

        tmp = directory.with_name(f".{directory.name}.fsdp_tmp")  # a temp name recover_state() clears
        if self.rank == 0:
            from kdforge.engine.checkpoint import _mkdir, _remove

            _mkdir(directory.parent)
            _remove(tmp)
            tmp.mkdir()
        dist.barrier()
        model_sd, optim_sd, stated = self._state_dicts(trainer)
        parts = {"model": model_sd, "optim": optim_sd}
        if self.ema is not None:
            parts["ema"] = self.ema.avg
        dcp.save(parts, checkpoint_id=str(tmp / "dcp"))
        save_torch(tmp / f"rank{self.rank}.pt", {"rng": rng_state(), "sums": {
            k: v.detach().cpu() for k, v in trainer._sums.items()}, "counts": list(trainer._counts)})
        dist.barrier()
        if self.rank == 0:
            st = trainer.state()
            st["optimizers"] = {k: {kk: vv for kk, vv in v.items() if kk != "opt"} for k, v in st["optimizers"].items()}
            st["sharded"] = {"world": self.world, "optimizers_with_state": stated}
            save_torch(tmp / "trainer.pt", st)
            atomic_dir_swap(tmp, directory)
        dist.barrier()

    def _state_dicts(self, trainer: Trainer, stated: list[str] | None = None) -> tuple[dict, dict, list[str]]:
        """The method's trainable state and each optimizer's, keyed by parameter names (DTensor shards)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        frozen = tuple(getattr(self.method, "frozen_prefixes", ()))
        model_sd = {k: v for k, v in get_model_state_dict(self.method).items() if not k.startswith(frozen)}
        if stated is None:  # saving: optimizers that have stepped (a fresh one's state would be a dummy step)
            stated = [k for k, o in trainer.optimizers.items() if o.opt.state]
        optim_sd = {k: get_optimizer_state_dict(self.method, trainer.optimizers[k].opt) for k in stated}
        return model_sd, optim_sd, stated

    def load(self, directory: Path, trainer: Trainer) -> dict[str, Any]:
        """Read what :meth:`save` wrote (on this or another world size); the trainer state to hand to ``load_state``."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from kdforge.engine.checkpoint import load_torch

        st = load_torch(directory / "trainer.pt")
        sharded = st.get("sharded")
        if not isinstance(sharded, dict):
            raise KdforgeError(f"{str(directory)!r} holds the state of a run without train.distributed: fsdp; "
                               "resume it with the recipe's own train.distributed")
        if int(sharded["world"]) != self.world and int(st["batch_in_epoch"]):
            raise KdforgeError(f"this run was saved inside an epoch by {sharded['world']} processes; resume it with "
                               f"{sharded['world']} processes (another count can resume from an epoch's end)")
        missing = set(st["optimizers"]) ^ set(trainer.optimizers)
        if missing:
            raise KdforgeError(f"resume state has optimizers {sorted(st['optimizers'])}, this method declares "
                               f"{sorted(trainer.optimizers)}")
        model_sd, optim_sd, stated = self._state_dicts(trainer, list(sharded["optimizers_with_state"]))
        parts = {"model": model_sd, "optim": optim_sd}
        if self.ema is not None and "ema" in st:  # read in place into the average's shards
            parts["ema"] = self.ema.avg
        try:
            dcp.load(parts, checkpoint_id=str(directory / "dcp"))
        except Exception as e:  # DCP raises its own CheckpointException, carrying every rank's traceback
            raise KdforgeError(f"cannot read the sharded state in {str(directory / 'dcp')!r}: "
                               f"{str(e).strip().splitlines()[0][:160]}") from None
        set_model_state_dict(self.method, model_sd, options=StateDictOptions(strict=False))
        for k in stated:
            set_optimizer_state_dict(self.method, trainer.optimizers[k].opt, optim_sd[k])
        own = directory / f"rank{self.rank}.pt"
        if own.is_file() and int(sharded["world"]) == self.world:
            mine = load_torch(own)
            st["rng"], st["sums"], st["counts"] = mine["rng"], mine["sums"], mine["counts"]
        self._fresh_at = None
        return st


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a plain tensor is its own)."""
    return t.to_local() if hasattr(t, "to_local") else t


class ShardedEma:
    """``train.ema`` under FSDP2: the average of each parameter kept as a DTensor sharded like the parameter.

    Each rank averages its own shards (one foreach lerp per update, no communication); buffers (BatchNorm
    statistics) are averaged per rank and rank 0's are deployed, as for the model itself. ``model`` is a
    plain copy, gathered with the model's plain copy (:meth:`Sharding.refresh`), that evaluation and the
    saved weights read. The shards are saved in the run's DCP checkpoint; ``state_dict`` holds the count.
    """

    decay = Ema.decay  # the unsharded EMA's decay rule (warmup included)

    def __init__(self, sharded: nn.Module, plain: nn.Module, cfg: EmaConfig, world: int) -> None:
        self.cfg, self.world, self.updates = cfg, world, 0
        self.avg = {k: v.detach().clone() for k, v in sharded.state_dict().items()}
        self.model = copy.deepcopy(plain).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current (sharded) weights."""
        d, now = self.decay(self.updates), model.state_dict()
        avg, new = [], []
        for k, e in self.avg.items():
            if e.dtype.is_floating_point:
                avg.append(_local(e))
                new.append(_local(now[k].detach()))
            else:
                _local(e).copy_(_local(now[k]))
        if avg:
            torch._foreach_lerp_(avg, new, 1 - d)
        self.updates += 1

    def refresh(self) -> None:
        """Gather the average into the plain copy (a collective on every rank)."""
        full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in self.avg.items()}
        self.model.load_state_dict(full)
        if self.world > 1:
            for b in self.model.buffers():
                dist.broadcast(b.data, src=0)

    def state_dict(self) -> dict[str, Any]:
        """The update count (the averaged shards are in the run's DCP checkpoint)."""
        return {"updates": self.updates, "sharded": True}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        """Restore the update count (:meth:`Sharding.load` read the shards)."""
        self.updates = int(st["updates"])
