"""All-gather with gradients: 2 CPU processes (gloo) reproduce the single-process CLIP-KD loss and gradients."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdforge.clip.losses import ClipKDLoss
from kdforge.engine.gather import gather, gather_no_grad, world

N, D_IN, D_S, D_T = 8, 6, 4, 5
WEIGHTS = {"task": 1.0, "crd": 1.0, "fd": 2000.0, "gd": 1e3, "icl": 1.0, "afd": 1.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup() -> tuple[torch.nn.Module, torch.nn.Module, ClipKDLoss, tuple[torch.Tensor, ...]]:
    """Student 'towers' (linear maps), the loss module and one global batch, all from one seed."""
    torch.manual_seed(0)
    enc_i, enc_t = torch.nn.Linear(D_IN, D_S), torch.nn.Linear(D_IN, D_S)
    loss = ClipKDLoss(D_S, D_T, WEIGHTS)
    x, t = torch.randn(N, D_IN), torch.randn(N, D_IN)
    tv = torch.nn.functional.normalize(torch.randn(N, D_T), dim=-1)
    ts = torch.nn.functional.normalize(torch.randn(N, D_T), dim=-1)
    return enc_i, enc_t, loss, (x, t, tv, ts)


def _step(rows: slice) -> tuple[float, dict[str, torch.Tensor]]:
    enc_i, enc_t, loss, (x, t, tv, ts) = _setup()
    out = loss(enc_i(x[rows]), enc_t(t[rows]), torch.tensor(14.0), tv[rows], ts[rows], 20.0)
    out["loss"].backward()
    mods = {"enc_i": enc_i, "enc_t": enc_t, "loss": loss}
    grads = {f"{m}.{k}": p.grad.clone() for m, mod in mods.items() for k, p in mod.named_parameters()}
    return float(out["loss"].detach()), grads


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        assert world() == (rank, 2)
        half = N // 2
        loss, grads = _step(slice(rank * half, (rank + 1) * half))
        for g in grads.values():  # what DDP does to parameter gradients
            dist.all_reduce(g)
            g /= 2
        # ragged shards gather in rank order
        part = torch.arange(3 + rank, dtype=torch.float32).unsqueeze(1) + 10 * rank
        ragged = gather_no_grad(part)
        torch.save({"loss": loss, "grads": grads, "ragged": ragged}, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # neither rank tears gloo down while the other still talks
    finally:
        dist.destroy_process_group()


def test_world_size_one_gather_is_identity() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert gather(x) is x and world() == (0, 1)


def test_two_process_gather_equals_single_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ref_loss, ref_grads = _step(slice(0, N))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert abs(got["loss"] - ref_loss) < 1e-5 * max(1.0, abs(ref_loss))
        assert set(got["grads"]) == set(ref_grads)
        for k, g in ref_grads.items():
            assert torch.allclose(got["grads"][k], g, rtol=1e-4, atol=1e-6), k
        expect = torch.tensor([0.0, 1, 2, 10, 11, 12, 13]).unsqueeze(1)
        assert torch.equal(got["ragged"], expect)
