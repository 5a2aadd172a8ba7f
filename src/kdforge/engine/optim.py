"""Optimizers a method declares, built and stepped by the engine; handles for manual optimization.

A method lists its optimizers as :class:`OptimizerSpec` s (``Method.configure_optimizers``). The engine
builds each one (named parameter groups, weight-decay rule), sets its lr from the schedule, clips,
AMP-scales, synchronises it across processes, saves and resumes it. ``manual=True`` optimizers are
stepped by the method itself inside ``training_step`` through an :class:`OptimizerHandle`, the way
PyTorch Lightning's manual optimization works.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from kdforge.config import OptimConfig, SchedConfig, validate
from kdforge.engine.schedule import lr_factor
from kdforge.errors import KdforgeError

if TYPE_CHECKING:
    from kdforge.engine.trainer import Trainer

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


@dataclass
class OptimizerSpec:
    """One optimizer of a method.

    ``params``: a module or parameters; ``None`` means every trainable parameter no other spec claims.
    ``optim`` / ``sched``: keys that override the recipe's ``optim`` / ``sched`` sections for this
    optimizer (``None``: the recipe's). ``clip``: max gradient norm (``None``: ``train.grad_clip``;
    ``0``: none). ``manual``: stepped by the method through ``method.optimizer(name)``.
    """

    name: str = "main"
    params: nn.Module | Iterable[nn.Parameter] | None = None
    optim: dict[str, Any] | None = None
    sched: dict[str, Any] | None = None
    clip: float | None = None
    manual: bool = False
    #: a factor on the resolved lr (e.g. 0.1 for a backbone trained at a tenth of the head's lr)
    lr_scale: float = 1.0


def _no_decay(module_of: dict[int, nn.Module], name: str, p: nn.Parameter, rules: list[str]) -> bool:
    for rule in rules:
        if rule == "norm" and isinstance(module_of.get(id(p)), NORM_TYPES):
            return True
        if rule == "bias" and name.rsplit(".", 1)[-1] == "bias":
            return True
        if rule == "scalar" and p.ndim == 0:
            return True
        if rule not in ("norm", "bias", "scalar") and rule in name:
            return True
    return False


def param_groups(named: list[tuple[str, nn.Parameter]], root: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """One group with the configured weight decay and, if ``cfg.no_decay`` matches any, one without."""
    module_of = {id(p): m for m in root.modules() for p in m.parameters(recurse=False)}
    decay = [p for n, p in named if not _no_decay(module_of, n, p, cfg.no_decay)]
    plain = [p for n, p in named if _no_decay(module_of, n, p, cfg.no_decay)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def build_torch_optimizer(groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD, AdamW (decoupled decay) or Adam (L2 added to the gradient) over parameter groups."""
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """An optimizer over plain parameters with the recipe's settings (no parameter-name rules)."""
    return build_torch_optimizer([{"params": params, "weight_decay": cfg.weight_decay}], cfg)


class EngineOptimizer:
    """An optimizer the engine built: its torch optimizer, schedule, clipping and (fp16) scaler."""

    def __init__(self, name: str, named: list[tuple[str, nn.Parameter]], root: nn.Module, optim: OptimConfig,
                 sched: SchedConfig, clip: float | None, manual: bool, fp16: bool) -> None:
        self.name, self.manual, self.clip = name, manual, clip or None
        self.cfg, self.sched = optim, sched
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.opt = build_torch_optimizer(param_groups(named, root, optim), optim)
        # manual optimizers keep their own scaler; automatic ones use the accelerator's
        self.scaler = torch.amp.GradScaler("cuda") if (manual and fp16) else None
        self.steps = 0  # steps of this optimizer (manual ones may step several times per batch)

    def set_lr(self, step: int, steps_per_epoch: int, total_steps: int) -> None:
        """Set every group's lr from the schedule at engine step ``step``."""
        f = lr_factor(step, self.sched, steps_per_epoch, total_steps, self.cfg.lr)
        for g in self.opt.param_groups:
            g["lr"] = self.cfg.lr * f

    @property
    def lr(self) -> float:
        """The current lr of the first group."""
        return float(self.opt.param_groups[0]["lr"])

    def zero_grad(self) -> None:
        """Drop the gradients of this optimizer's parameters."""
        self.opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        """Optimizer (and scaler) state for the resumable checkpoint."""
        st: dict[str, Any] = {"opt": self.opt.state_dict(), "steps": self.steps}
        if self.scaler is not None:
            st["scaler"] = self.scaler.state_dict()
        return st

    def load_state_dict(self, st: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        if "opt" in st:  # a sharded run's optimizer state is in its DCP folder, loaded by the engine
            self.opt.load_state_dict(st["opt"])
        self.steps = int(st.get("steps", 0))
        if self.scaler is not None and "scaler" in st:
            self.scaler.load_state_dict(st["scaler"])


def sync_gradients(params: list[nn.Parameter]) -> None:
    """Average gradients over processes (for parameters outside DDP's reducer); a no-op in one process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    if world == 1:
        return
    # FSDP2 parameters (DTensors) were reduce-scattered in their backward already
    grads = [p.grad for p in params if p.grad is not None and not isinstance(p.grad, DTensor)]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat)
    flat /= world
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(synced)


class OptimizerHandle:
    """What ``method.optimizer(name)`` returns: backward and step that stay right under AMP and DDP.

    A manual optimizer's parameters do not require grad outside :meth:`toggle`, so the engine's
    automatic backward never touches them and DDP's reducer never sees them; :meth:`step` averages
    their gradients across processes itself.
    """

    def __init__(self, eo: EngineOptimizer, trainer: Trainer) -> None:
        self._eo, self._trainer = eo, trainer

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The underlying torch optimizer (read its state; do not step it directly)."""
        return self._eo.opt

    @property
    def lr(self) -> float:
        """The current learning rate of the first parameter group."""
        return self._eo.lr

    @contextmanager
    def toggle(self) -> Iterator[None]:
        """Let this optimizer's parameters require grad inside the block only."""
        params = self._eo.params
        for p in params:
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(False)

    def zero_grad(self) -> None:
        """Drop the gradients of this optimizer's parameters."""
        self._eo.zero_grad()

    def backward(self, loss: Tensor) -> None:
        """Backward of ``loss`` (scaled under fp16); gradients reach the parameters that require grad."""
        scaler = self._eo.scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def step(self) -> None:
        """Average gradients across processes, unscale, clip, set the lr from the schedule, step."""
        eo, t = self._eo, self._trainer
        sync_gradients(eo.params)
        eo.set_lr(t.global_step, t.steps_per_epoch, t.total_steps)
        if eo.scaler is not None:
            eo.scaler.unscale_(eo.opt)
        if eo.clip:
            torch.nn.utils.clip_grad_norm_(eo.params, eo.clip)
        if eo.scaler is not None:
            eo.scaler.step(eo.opt)
            eo.scaler.update()
        else:
            eo.opt.step()
        eo.steps += 1

    def update(self, closure: Callable[[], Tensor]) -> Tensor:
        """One whole update: toggle, zero grads, ``loss = closure()``, backward, step, zero grads; the loss."""
        with self.toggle():
            self.zero_grad()
            loss = closure()
            self.backward(loss)
            self.step()
            self.zero_grad()
        return loss.detach()

    def reset(self) -> None:
        """Forget the optimizer's state (moments, step counts), e.g. before optimising fresh pixels."""
        self._eo.opt.state.clear()
        self._eo.steps = 0


def resolve(spec_cfg: dict[str, Any] | None, base: Any, schema: type, where: str) -> Any:
    """The recipe section ``base`` with the spec's overrides applied and validated."""
    if not spec_cfg:
        return base
    return validate(schema, {**base.model_dump(), **spec_cfg}, prefix=where)


def named_of(params: nn.Module | Iterable[nn.Parameter], root: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name in ``root``, parameter) pairs for a module or parameters owned by ``root``."""
    names = {id(p): n for n, p in root.named_parameters(remove_duplicate=False)}
    plist = list(params.parameters()) if isinstance(params, nn.Module) else list(params)
    out, seen = [], set()
    for p in plist:
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) not in names:
            raise KdforgeError("an optimizer spec names a parameter that is not part of the method "
                               "(register its module as an attribute of the method)")
        out.append((names[id(p)], p))
    return out
