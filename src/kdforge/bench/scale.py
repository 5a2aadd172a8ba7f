"""``kdforge bench scale``: what FSDP2 holds per process and costs per step against DDP, with 2 and 4 gloo processes.

KD of an MLP student (hidden 512, 512) from a larger MLP teacher (hidden 1024 x 3) on the digits data,
SGD with momentum, fp32, 32 samples per process per step. For each world size W the bench starts W
processes on this machine (gloo over loopback, as torchrun would) and trains the same recipe under DDP,
FSDP2 with the teacher whole and FSDP2 with the teacher sharded; it reports per-process bytes of the
student's parameters, gradients and optimizer state and of the teacher's parameters (tensors held after
the last step, shards counted locally), the median step time, and the largest difference of the final
student weights from one unsharded process trained on the same global batch (W x 32).
No BatchNorm in these models: per-process batch statistics would make any sharding differ from one process.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kdforge.bench import BENCHES
from kdforge.bench.common import bench_dir, machine_note, markdown_table, write_json
from kdforge.engine.callbacks import Callback

COMMAND = "OMP_NUM_THREADS=1 taskset -c 0 kdforge bench scale --publish"  # all ranks on one pinned core
WORLDS = (2, 4)
MODES = ("ddp", "fsdp", "fsdp-shard-teacher")
PER_RANK_BATCH = 32

BASE: dict[str, Any] = {
    "seed": 0, "data": {"name": "digits", "batch_size": PER_RANK_BATCH, "augment": False, "val_fraction": 0.1,
             "limit_train": 1280},  # a multiple of 2 x 32 and 4 x 32: no rank pads its last batch
    "method": {"name": "distill", "teacher": {"model": "mlp", "weights": "random", "kwargs": {"hidden": [1024] * 3}},
               "student": {"model": "mlp", "kwargs": {"hidden": [512, 512]}},
               "terms": [{"loss": "ce", "weight": 1.0}, {"loss": "kd", "weight": 0.9, "T": 4}]},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "sched": {"name": "constant"},
    "train": {"max_steps": 40, "progress": "silent", "threads": 1, "save_checkpoints": False},
}


def recipe(mode: str, world: int, steps: int) -> dict[str, Any]:
    """The bench recipe under ``mode`` (``one``: unsharded, one process, the global batch of ``world``)."""
    r = copy.deepcopy(BASE)
    r["name"] = f"scale-{mode}-{world}"
    r["train"]["max_steps"] = steps
    if mode == "one":
        r["data"]["batch_size"] = PER_RANK_BATCH * world
    elif mode.startswith("fsdp"):
        r["train"]["distributed"] = "fsdp"
        r["train"]["fsdp"] = {"shard_teacher": mode == "fsdp-shard-teacher"}
    return r


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _bytes(ts: Any) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in ts if t is not None)


def held(trainer: Any) -> dict[str, int]:
    """Bytes this process holds: student parameters, their gradients, optimizer state; teacher parameters."""
    m = trainer.method
    student = list(m.student.parameters())
    state = [v for o in trainer.optimizers.values() for s in o.opt.state.values() for v in s.values()
             if isinstance(v, torch.Tensor) and v.numel() > 1]
    return {"student_params": _bytes(student), "student_grads": _bytes(p.grad for p in student),
            "optimizer": _bytes(state), "teacher_params": _bytes(m.teacher.parameters())}


class _StepTimes(Callback):
    """Wall time of every optimizer step (the first steps carry the lazy set-up)."""

    def __init__(self) -> None:
        self.t = [time.perf_counter()]

    def on_step_end(self, trainer: Any, out: Any) -> None:
        self.t.append(time.perf_counter())


def train_one(mode: str, world: int, steps: int, weights_out: Path | None) -> dict[str, Any]:
    """Train one recipe in this process (one rank of a launch, or alone); its bytes, step times and weights."""
    from kdforge.config import Recipe
    from kdforge.data import load_data
    from kdforge.engine.trainer import Trainer, seed_everything
    from kdforge.method import DataInfo, build_method

    r = Recipe.from_dict(recipe(mode, world, steps))
    seed_everything(r.seed)  # as kdforge.run.train: every mode and the reference start from the same weights
    data = load_data(r.data)
    method = build_method(r.method.model_dump(), DataInfo(data.num_classes, data.in_chans, data.image_size))
    times = _StepTimes()
    trainer = Trainer(method, data, r, callbacks=[times])
    trainer.fit()
    dt = [b - a for a, b in zip(times.t[1:], times.t[2:], strict=False)][2:]  # without the first 3 steps
    res = {"held": held(trainer), "step_ms": 1000 * statistics.median(dt), "steps": steps}
    if weights_out is not None and trainer.main:
        from kdforge.engine.checkpoint import save_weights

        save_weights(trainer.deployable(), weights_out)
    return res


def _worker(out: Path, world: int, steps: int) -> None:
    """One rank: every mode in turn; rank 0 writes the results and weights."""
    from kdforge.engine import launch

    launch.join()
    rank = int(os.environ["RANK"])
    rows = {}
    for mode in MODES:
        res = train_one(mode, world, steps, out / f"w{world}-{mode}.safetensors")
        rows[mode] = res
    if rank == 0:
        (out / f"w{world}.json").write_text(json.dumps(rows))
    launch.leave()


def _launch(out: Path, world: int, steps: int) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "kdforge.bench.scale", str(out), str(world),
                                       str(steps)], env=env, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate()[1] for p in procs]
    bad = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode]
    if bad:
        raise RuntimeError(f"scale bench: ranks {bad} failed:\n{errs[bad[0][0]][-3000:]}")


def _max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return max((x[k] - y[k]).abs().max().item() for k in x)


def markdown(result: dict[str, Any]) -> str:
    """The page: the table per world size and what it shows."""
    mib = 1 / 2**20
    rows = []
    for w in result["worlds"]:
        runs = result["runs"][str(w)]
        ddp_ms = runs["ddp"]["step_ms"]
        for mode in MODES:
            h, r = runs[mode]["held"], runs[mode]
            rows.append({"processes": w, "mode": mode,
                         "student params MiB": f"{h['student_params'] * mib:.3f}",
                         "grads MiB": f"{h['student_grads'] * mib:.3f}",
                         "optimizer MiB": f"{h['optimizer'] * mib:.3f}",
                         "teacher MiB": f"{h['teacher_params'] * mib:.3f}",
                         "step ms": f"{r['step_ms']:.1f}", "step / DDP": f"{r['step_ms'] / ddp_ms:.2f}",
                         "max |w - w_1proc|": f"{r['max_diff']:.1e}"})
    return "\n".join([
        "# Sharding: FSDP2 against DDP on the CPU", "",
        f"Command: `{result['command']}` ({result['wall_s']:.0f} s). Machine: {result['machine']}.",
        "`taskset -c 0` pins the whole bench to ONE core with one thread per process, so the W processes "
        "share one core: step times measure the work of all ranks on that core and the collectives' overhead, "
        "not a speed-up.", "",
        f"KD, MLP teacher (hidden 1024 x 3, {result['teacher_params']:,} parameters, frozen) -> MLP student "
        f"(hidden 512, 512, {result['student_params']:,} parameters), digits, SGD momentum 0.9, fp32, "
        f"{PER_RANK_BATCH} samples per process per step, {result['steps']} steps, seed 0 (one seed: the table "
        "is about bytes and equality, the step times are medians of steps 4 on, one run each).", "",
        "Bytes are the tensors each process holds after the last step (parameters, their gradients, the "
        "momentum buffers; a DTensor counts its local shard). DDP's own gradient buckets (about one more "
        "copy of the gradients) are not counted. `fsdp` keeps the teacher whole on every process; "
        "`fsdp-shard-teacher` shards it too (`train.fsdp.shard_teacher: true`). The last column is the "
        "largest difference of the final student weights from one process trained unsharded on the same "
        "global batch.", "",
        markdown_table(rows), "",
    ])


@BENCHES.register("scale")
def run(out: Path | None = None, quick: bool = False) -> Path:
    """Per-process bytes, step time and equality of FSDP2 against DDP with 2 and 4 gloo processes."""
    t0 = time.perf_counter()
    out = bench_dir("scale", out)
    out.mkdir(parents=True, exist_ok=True)
    steps = 8 if quick else BASE["train"]["max_steps"]
    worlds = WORLDS[:1] if quick else WORLDS
    result: dict[str, Any] = {"command": COMMAND, "steps": steps, "worlds": list(worlds), "runs": {}}
    for w in worlds:
        print(f"scale: {w} processes", file=sys.stderr, flush=True)
        train_one("one", w, steps, out / f"w{w}-one.safetensors")
        _launch(out, w, steps)
        runs = json.loads((out / f"w{w}.json").read_text())
        for mode in MODES:
            runs[mode]["max_diff"] = _max_diff(out / f"w{w}-{mode}.safetensors", out / f"w{w}-one.safetensors")
        result["runs"][str(w)] = runs
    from kdforge.models import create_model
    from kdforge.profile import count_params

    result["teacher_params"] = count_params(create_model("mlp", 10, 1, image_size=8, hidden=(1024,) * 3))
    result["student_params"] = count_params(create_model("mlp", 10, 1, image_size=8, hidden=(512, 512)))
    result["machine"] = machine_note()
    result["wall_s"] = time.perf_counter() - t0
    write_json(out / "scale.json", result)
    md = out / "scale.md"
    md.write_text(markdown(result))
    print(md.read_text())
    return md


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
