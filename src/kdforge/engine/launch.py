"""Processes of one launch (torchrun, accelerate launch): join the group first, fail together in one line.

Every rank joins the process group before it builds anything, so a rank that fails early (a teacher
checkpoint missing on one node) cannot leave the others waiting at the rendezvous. A failing rank writes
its message to the launch's key-value store; rank 0 speaks for a failure it shares, a rank whose failure
is its own speaks for itself, and a rank that fails because a peer went away exits 2 in silence.
"""

from __future__ import annotations

import os
import time

import torch.distributed as dist

KEY = "kdforge/error/{}"
WAIT_FOR_RANK0 = 5.0  # seconds; rank 0 usually fails the same way within this; else a rank speaks itself


def launched() -> bool:
    """Whether this process is one of several started by a launcher (``WORLD_SIZE`` > 1 with a rendezvous)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ


def join() -> None:
    """Initialise the launch's process group now (through Accelerate, which picks gloo or nccl)."""
    if launched() and not (dist.is_available() and dist.is_initialized()):
        import torch
        from accelerate import PartialState

        # without a GPU Accelerate treats the launch as several CPU processes (gloo) only when told cpu=True
        PartialState(cpu=not torch.cuda.is_available())


def _store() -> dist.Store | None:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError):
        return None


def error_line(msg: str) -> str | None:
    """What this rank prints for its failure ``msg`` (``None``: rank 0 says it); publishes ``msg`` to the others."""
    store = _store()
    if store is None:
        return f"error: {msg}"
    rank = dist.get_rank()
    try:
        store.set(KEY.format(rank), msg)
        if rank == 0:
            return f"error: {msg}"
        deadline = time.monotonic() + WAIT_FOR_RANK0
        while not store.check([KEY.format(0)]):  # polled: a timed-out store.wait logs C++ warnings
            if time.monotonic() > deadline:
                raise TimeoutError
            time.sleep(0.05)
        if store.get(KEY.format(0)).decode() == msg:
            return None
    except (RuntimeError, TimeoutError, dist.DistStoreError):  # rank 0 did not fail (in time), or its store is gone
        pass
    return f"error: rank {rank} of {dist.get_world_size()}: {msg}"


def peer_failed() -> bool:
    """Whether another rank of this launch has reported a failure (ours is then only its echo)."""
    store = _store()
    if store is None:
        return False
    me = dist.get_rank()
    try:
        return any(store.check([KEY.format(r)]) for r in range(dist.get_world_size()) if r != me)
    except (RuntimeError, dist.DistStoreError):
        return False


def leave() -> None:
    """End a launched process that succeeded: wait for every rank, then close the group in order.

    A rank that simply exits while a peer is still writing its run folder tears gloo down under the peer's
    feet ("terminate called without an active exception", SIGABRT), and the launcher then kills the peer.
    """
    if not (launched() and dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
