"""All-gather with gradients across processes, so batch-level losses (contrastive, relational) see the global batch.

Torch only: losses, methods and the engine all use it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; backward sums the rank losses' gradients.

    Every rank computes the same global loss, and DDP *averages* parameter gradients over ranks. The
    backward all-reduce (sum) of the incoming gradient therefore hands each rank W × dL/d(its shard),
    and DDP's average turns that into exactly the single-process gradient of the global loss.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        rank, size = world()
        ctx.rank, ctx.n = rank, x.shape[0]
        sizes = [torch.zeros((), dtype=torch.long, device=x.device) for _ in range(size)]
        dist.all_gather(sizes, torch.tensor(x.shape[0], device=x.device))
        ctx.sizes = [int(s) for s in sizes]
        m = max(ctx.sizes)  # ragged last batches: pad to the largest shard, then trim
        pad = torch.zeros((m - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        buf = [torch.empty((m, *x.shape[1:]), dtype=x.dtype, device=x.device) for _ in range(size)]
        dist.all_gather(buf, torch.cat([x, pad]).contiguous())
        return torch.cat([b[:s] for b, s in zip(buf, ctx.sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start: start + ctx.n]


def gather(x: Tensor) -> Tensor:
    """All-gather ``x`` (N_local, ...) into (N_global, ...) with gradients; identity in one process."""
    if world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: Tensor) -> Tensor:
    """All-gather a tensor that needs no gradient (teacher features)."""
    if world()[1] == 1:
        return x
    with torch.no_grad():
        return _GatherWithGrad.apply(x.detach())
