"""Learning-rate schedules as pure functions of the optimizer step.

The engine sets every parameter group's lr from ``lr_factor`` before each step, so a schedule has no
state of its own: a resumed run continues it exactly, and a run resumed with more epochs re-plans it
for the new total.
"""

from __future__ import annotations

import math

from kdforge.config import SchedConfig


def lr_factor(step: int, cfg: SchedConfig, steps_per_epoch: int, total_steps: int, base_lr: float) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based): linear warm-up, then the schedule."""
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    epoch = step / max(steps_per_epoch, 1)
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":
        return cfg.gamma ** int(epoch // cfg.step_size)
    if cfg.name == "multistep":
        return cfg.gamma ** sum(int(epoch) >= m for m in cfg.milestones)
    if cfg.name == "relative":
        factor = 1.0
        for start, f in sorted(cfg.relative):
            if epoch >= start:
                factor = f
        return factor
    span = max(1, total_steps - warm)
    progress = min(1.0, (step - warm) / span)
    floor = cfg.min_lr / base_lr
    if cfg.name == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
