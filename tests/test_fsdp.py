"""FSDP2 with two gloo processes: equal to one process, resumed bit-identical, evaluated, failing in one line.

The processes are started the way torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
environment), so each rank's exit code and stderr can be read. Reference runs train the same global
batch unsharded in one process; in fp32 the sharded runs agree with them to float summation order.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_cases

CASES = Path(__file__).parent / "fsdp_cases.py"
# 2 x 32 rows reduce-scattered against 64 rows in one process: float sums in another order (≈1e-7 a step)
ATOL = 1e-5
LM_CASES = ["llama", "lm_fkl", "lm_jsd", "lm_on_policy", "heal"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args_of_rank: list[list[str]], nnodes: int = 1) -> list[subprocess.Popen]:
    """One process per rank, with the environment torchrun gives its workers."""
    world, port = len(args_of_rank), _free_port()
    procs = []
    for rank, args in enumerate(args_of_rank):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank % (world // nnodes)),
               "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world // nnodes), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
        procs.append(subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    """(exit code, stderr) of every rank."""
    out = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        out.append((p.returncode, err))
    return out


def run_ok(args_of_rank: list[list[str]]) -> None:
    for rc, err in finish(spawn(args_of_rank)):
        assert rc == 0, err[-3000:]


def _weights(path: Path) -> dict:
    return load_file(str(path / "checkpoints" / "last.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def equal_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every case in one 2-process launch (sharded) and in one process (the reference)."""
    out = tmp_path_factory.mktemp("fsdp")
    names = ["kd", "kd_sharded", "adv", *LM_CASES]
    procs = spawn([[str(CASES), str(out / "fsdp"), *names]] * 2)
    ref = subprocess.run([sys.executable, str(CASES), str(out / "one"), "--reference", *names],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-3000:]
    for rc, err in finish(procs):
        assert rc == 0, err[-3000:]
    return out


@pytest.mark.parametrize("case", ["kd", "kd_sharded", "adv", *LM_CASES])
def test_two_sharded_processes_equal_one_process(equal_runs: Path, case: str) -> None:
    """KD with the teacher whole and sharded, the adversarial method's side optimizer; a tiny Llama (teacher
    sharded) through the KD heal's method, LM distillation with chunked forward KL + CE, with JSD, on-policy
    (the sharded student generating), and heal_kd."""
    a, b = _weights(equal_runs / "fsdp" / case), _weights(equal_runs / "one" / case)
    diff = _max_diff(a, b)
    assert diff <= ATOL, f"{case}: max weight difference {diff:.2e}"
    # the runs did train: the weights moved from their (shared) initialisation by far more than the tolerance
    start = fsdp_cases.tiny_llama(2, 2).state_dict() if case in LM_CASES else None
    if start is not None:
        moved = {k: (a[k] - start[k]).abs().max().item() for k in a}
        assert max(moved.values()) > 100 * ATOL
        if case == "lm_on_policy":  # the run mixed the student's samples and the data's answers
            assert sorted(set(fsdp_cases.on_policy_steps())) == [False, True]
        if case == "heal":  # heal_kd freezes the embeddings and the head unless asked: sharded, they stay put
            assert moved["model.embed_tokens.weight"] == moved["lm_head.weight"] == 0.0
        else:
            assert moved["lm_head.weight"] > 100 * ATOL, "the head, used outside the forward, trained"


def test_the_sharded_state_holds_every_rank_shard_and_the_side_optimizer(equal_runs: Path) -> None:
    state = equal_runs / "fsdp" / "adv" / "checkpoints" / "state"
    assert sorted(p.name for p in (state / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    import torch.distributed.checkpoint as dcp

    keys = set(dcp.FileSystemReader(str(state / "dcp")).read_metadata().state_dict_metadata)
    assert any(k.startswith("model.disc.") for k in keys) and any(k.startswith("optim.disc.") for k in keys)
    assert not any(k.startswith("model.teacher.") for k in keys), "the frozen teacher is not resumable state"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_the_ema_is_kept_sharded_and_deployed(equal_runs: Path) -> None:
    """kd_sharded's train.ema: the average is saved as every rank's shard, and last.safetensors is the average."""
    import torch
    import torch.distributed.checkpoint as dcp

    run = equal_runs / "fsdp" / "kd_sharded"
    reader = dcp.FileSystemReader(str(run / "checkpoints" / "state" / "dcp"))
    keys = set(reader.read_metadata().state_dict_metadata)
    deployed = _weights(run)
    assert {k.removeprefix("ema.") for k in keys if k.startswith("ema.")} == set(deployed)
    # the deployed weights are the average, not the last step's (which equal 1 process's: the test above)
    trained = {k: torch.empty_like(v) for k, v in deployed.items()}
    dcp.load({"model": {f"student.{k}": v for k, v in trained.items()}}, storage_reader=reader, no_dist=True)
    assert _max_diff(trained, deployed) > 10 * ATOL


def test_size_wrap_keeps_a_language_models_embeddings_and_head_in_its_top_unit() -> None:
    """Tied embeddings (one tensor for input and head) and the chunked head must stay in the model's own unit."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdforge.config import FsdpConfig
    from kdforge.engine.fsdp import blocks

    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # a decoder layer holds 9,280 parameters, the embedding 16,384: by size alone it would be a unit too
    units = blocks(model, FsdpConfig(auto_wrap="size", min_params=9_000))
    assert [id(u) for u in units] == [id(layer) for layer in model.model.layers], [type(u).__name__ for u in units]


def _recipe_file(tmp: Path, case: str = "kd_sharded", teacher: Path | None = None) -> Path:
    r = fsdp_cases.recipe(case, reference=False)
    if teacher is not None:
        r["method"]["teacher"] = {"model": "mlp", "checkpoint": str(teacher)}
    path = tmp / "r.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def _rows(run: Path) -> list[dict[str, str]]:
    """metrics.csv without its timings."""
    import csv

    with open(run / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k not in ("epoch_time_s", "samples_per_s")}
                for row in csv.DictReader(f)]


def _train(*args: str) -> list[str]:
    return ["-m", "kdforge", "train", *args]


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    from kdforge.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_killed_sharded_run_resumes_bit_identical(equal_runs: Path, tmp_path: Path) -> None:
    """Killed (SIGKILL, both ranks) after its first step's checkpoint; resumed, it ends as the uninterrupted run."""
    full, killed = equal_runs / "fsdp" / "kd_sharded", tmp_path / "killed"
    procs = spawn([_train(str(_recipe_file(tmp_path)), "-o", str(killed))] * 2)
    state = killed / "checkpoints" / "state" / "trainer.pt"
    deadline = time.time() + 300
    while not state.is_file() and all(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    finish(procs)
    assert not (killed / "results.json").exists(), "the run must be killed in the middle"
    run_ok([_train(str(killed), "--resume")] * 2)
    a, b = _weights(full), _weights(killed)
    assert all((a[k] == b[k]).all() for k in a), "resumed sharded run differs from the uninterrupted one"
    assert _rows(full) == _rows(killed)
    assert not list(killed.rglob(".*fsdp_tmp")) and not list((killed / "checkpoints").glob(".state.*"))


def test_eval_of_a_sharded_run_reproduces_results_json(equal_runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """kdforge eval (one process, the gathered safetensors) measures what the two ranks measured."""
    run = equal_runs / "fsdp" / "kd_sharded"
    stored = json.loads((run / "results.json").read_text())
    assert stored["test_best"] is not None
    for which, key in (("last", "test_last"), ("best", "test_best")):
        res = json.loads(_cli(capsys, "eval", str(run), "--which", which, "--json"))
        assert {k: res[k] for k in stored[key]} == pytest.approx(stored[key], rel=1e-6, abs=1e-9)


def test_sharded_state_resumes_on_one_process_at_an_epoch_end(equal_runs: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """DCP reshards the 2-process state onto 1 process; the first epochs' rows are kept, training goes on."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(equal_runs / "fsdp" / "kd_sharded", run)
    before, weights = _rows(run), _weights(run)
    _cli(capsys, "train", str(run), "--resume", "--set", "train.epochs=3")
    after = _rows(run)
    assert after[:len(before)] == before and int(after[-1]["step"]) > int(before[-1]["step"])
    assert _max_diff(weights, _weights(run)) > 0, "the resumed process trained"
    import torch.distributed as dist

    assert not dist.is_initialized(), "the one-process group the run made is gone with it"


def test_a_failure_on_rank_1_only_is_one_line_and_every_rank_exits_2(tmp_path: Path) -> None:
    """Rank 1 cannot read its teacher (a file missing on one node); rank 0 is already waiting for it."""
    import torch
    from safetensors.torch import save_file

    from kdforge.models import create_model

    teacher = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in create_model("mlp", 10, 1, image_size=8).state_dict().items()},
              str(teacher))
    recipe = _recipe_file(tmp_path, "kd", teacher=teacher)
    base = _train(str(recipe), "-o", str(tmp_path / "run"), "--set")
    res = finish(spawn([[*base, f"method.teacher.checkpoint={teacher}"],
                        [*base, f"method.teacher.checkpoint={tmp_path / 'gone.safetensors'}"]]), timeout=120)
    assert [rc for rc, _ in res] == [2, 2], [err[-2000:] for _, err in res]
    lines = [line for _, err in res for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: rank 1 of 2: ") and "gone.safetensors" in lines[0]
    assert torch.distributed.is_available()


@pytest.mark.slow
def test_two_nodes_on_loopback_with_torchrun_share_one_run_folder(equal_runs: Path, tmp_path: Path) -> None:
    """torchrun --nnodes 2 (one process each, 127.0.0.1): hybrid sharding trains as one process; rank 0 writes."""
    port, run = _free_port(), tmp_path / "shared"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(i),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               str(CASES), str(run), "kd_hybrid"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for rc, err in finish(nodes):
        assert rc == 0, err[-3000:]
    diff = _max_diff(_weights(run / "kd_hybrid"), _weights(equal_runs / "one" / "kd"))
    assert diff <= ATOL, diff
    state = run / "kd_hybrid" / "checkpoints" / "state"
    assert sorted(p.name for p in state.iterdir()) == ["dcp", "rank0.pt", "rank1.pt", "trainer.pt"]
