"""The shape every distillation loss shares, and how recipes build one by name."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from torch import Tensor, nn

from kdforge.errors import KdforgeError
from kdforge.registry import LOSSES

LossInputs = Literal["labels", "logits", "features"]

#: the ``compat`` value of a paper's own form (every loss and method accepts it, and it is the default)
PAPER = "paper"


def check_compat(owner: str, compat: str | Sequence[str], allowed: Sequence[str]) -> frozenset[str]:
    """Validate a ``compat`` key: ``paper`` or the sources whose code conventions to reproduce.

    A string is one source; a list names several independent code quirks (CLIP-KD's ``mfd``, ``gd``).
    Returns the set of non-paper values, empty for ``paper``.
    """
    values = [compat] if isinstance(compat, str) else list(compat)
    for v in values:
        if v != PAPER and v not in allowed:
            raise ValueError(f"{owner}: compat must be one of {', '.join((PAPER, *allowed))}, got {v!r}")
    if not isinstance(compat, str) and PAPER in values and len(values) > 1:
        raise ValueError(f"{owner}: compat 'paper' cannot be combined with {sorted(set(values) - {PAPER})}")
    return frozenset(v for v in values if v != PAPER)


def compat_source(owner: str, compat: str | Sequence[str], allowed: Sequence[str]) -> str:
    """The one code base a loss follows: ``paper`` or one of ``allowed``; a list names it as its only element.

    For losses whose sources are alternative conventions (not independent quirks): two at once is refused.
    """
    chosen = check_compat(owner, compat, allowed)
    if len(chosen) > 1:
        raise ValueError(f"{owner}: compat names one code base here, got {sorted(chosen)}")
    return next(iter(chosen), PAPER)


def check_reduction(owner: str, reduction: str, allowed: Sequence[str]) -> str:
    """Validate a torchdistill-style ``reduction`` key (one line naming the valid values)."""
    if reduction not in allowed:
        raise ValueError(f"{owner}: reduction must be one of {', '.join(allowed)}, got {reduction!r}")
    return reduction


def deprecated_key(old: str, new: str) -> None:
    """One-line note that a recipe key is an old spelling of ``compat`` (still accepted for now)."""
    warnings.warn(f"{old} is deprecated; use {new}", FutureWarning, stacklevel=3)


class DistillLoss(nn.Module):
    """Base class of loss terms: plain tensors in, a scalar out.

    ``inputs`` says what the Distill method passes to ``forward``:

    - ``"labels"``: ``forward(student_logits, targets)``
    - ``"logits"``: ``forward(student_logits, teacher_logits)`` (plus ``targets=`` when
      ``needs_targets``)
    - ``"features"``: ``forward(student_feats, teacher_feats)``, lists of tapped tensors in the
      order of the term's ``student_tap`` / ``teacher_tap``.

    Losses with trainable parts (connectors) create them in :meth:`setup` from example
    tensors; they are then trained with the student and never deployed.
    """

    inputs: ClassVar[LossInputs] = "logits"
    needs_targets: ClassVar[bool] = False

    def setup(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> None:
        """Create shape-dependent modules from one example of the inputs (default: nothing)."""

    def set_epoch(self, epoch: int) -> None:
        """Hook for schedules inside a loss, e.g. DKD's warm-up (default: nothing)."""

    #: the run's length in epochs when known (set by the method; for warm-ups scaled to the run)
    total_epochs: int | None = None

    def bind(self, student: nn.Module, teacher: nn.Module, student_taps: Sequence[str],
             teacher_taps: Sequence[str]) -> None:
        """Hook to read the networks themselves before :meth:`setup`, e.g. OFD's teacher BN (default: nothing)."""


def build_loss(name: str, **kwargs: Any) -> DistillLoss:
    """Build a registered loss; an unknown option names the valid ones."""
    cls = LOSSES.get(name)
    params = inspect.signature(cls).parameters
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    valid = [k for k, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for key in kwargs:
        if not accepts_any and key not in valid:
            raise KdforgeError(f"loss {name!r} has no option {key!r} "
                               f"(valid: {', '.join(valid) or 'none'})")
    try:
        loss = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise KdforgeError(f"loss {name!r}: {e}") from None
    loss.registry_name = name
    return loss
