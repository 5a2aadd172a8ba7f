"""PS-KD's per-sample buffer under DDP: 2 CPU processes (gloo) end an epoch with every sample's row on every rank."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from kdforge.distill.self_kd_baselines import PSKD
from kdforge.engine.trainer import _Fields

N, C = 10, 3


def _setup() -> tuple[PSKD, TensorDataset]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, C))
    data = TensorDataset(torch.randn(N, 1, 4, 4), torch.arange(N) % C)
    return PSKD(model, C, epochs=2), data


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        method, data = _setup()
        ds = _Fields(method.wrap_train_data(data), method.batch_fields)  # the engine's dict batches with indices
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        method.on_epoch_start(0)
        with torch.no_grad():
            for batch in DataLoader(ds, batch_size=2, sampler=sampler):
                method.training_step(batch, 0)
        torch.save({"past": method.past_probs, "seen": torch.tensor(list(iter(sampler)))},
                   Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # neither rank tears gloo down while the other still talks
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pskd_buffer_is_complete_and_identical_on_every_rank(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    method, data = _setup()
    with torch.no_grad():
        expect = F.softmax(method.model(data.tensors[0]), -1)  # no optimizer step ran: the same weights
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert set(got[0]["seen"].tolist()).isdisjoint(got[1]["seen"].tolist())  # each rank saw only its shard
    for g in got:
        assert torch.allclose(g["past"], expect, atol=1e-6)  # yet holds every sample's prediction
