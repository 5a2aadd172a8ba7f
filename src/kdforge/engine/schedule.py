"""Optimizers and per-step learning-rate schedules built from a recipe."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from kdforge.config import OptimConfig, SchedConfig


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD or AdamW over the given parameters."""
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: SchedConfig, steps_per_epoch: int, epochs: int, base_lr: float) -> float:
    """Multiplier of the base lr after ``step`` optimizer steps: linear warm-up, then the schedule."""
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    epoch = step / steps_per_epoch
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":
        return cfg.gamma ** int(epoch // cfg.step_size)
    if cfg.name == "multistep":
        return cfg.gamma ** sum(int(epoch) >= m for m in cfg.milestones)
    total = max(1, epochs * steps_per_epoch - warm)
    progress = min(1.0, (step - warm) / total)
    floor = cfg.min_lr / base_lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(opt: torch.optim.Optimizer, cfg: SchedConfig, steps_per_epoch: int, epochs: int,
                    base_lr: float) -> LambdaLR:
    """A LambdaLR stepped once per optimizer step."""
    return LambdaLR(opt, lambda s: lr_factor(s, cfg, steps_per_epoch, epochs, base_lr))
