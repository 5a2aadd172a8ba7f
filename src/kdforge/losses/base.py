"""The shape every distillation loss shares, and how recipes build one by name."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from torch import Tensor, nn

from kdforge.errors import KdforgeError
from kdforge.registry import LOSSES

LossInputs = Literal["labels", "logits", "features"]


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
