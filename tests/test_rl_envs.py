"""Environments: snapshots restore every game exactly; MinAtar and ALE through the engine; offline distillation."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")

import kdforge as kd
from kdforge.engine.trainer import Trainer
from kdforge.method import build_method
from kdforge.rl.envs import MINATAR_GAMES, VecEnv

OPT = {"name": "adam", "lr": 1e-3, "eps": 1e-5, "weight_decay": 0.0}


def _fit(method: dict[str, Any], steps: int) -> tuple[Any, Any]:
    r = kd.Recipe.from_dict({"name": "rl", "seed": 0, "method": method, "optim": OPT, "sched": {"name": "constant"},
                             "train": {"max_steps": steps, "progress": "silent", "device": "cpu"}})
    m = build_method(r.method.model_dump(), None)  # type: ignore[arg-type]
    return m, Trainer(m, None, r, source=m.step_source(r)).fit()


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Acrobot-v1", *(f"MinAtar/{g}-v1" for g in MINATAR_GAMES)])
def test_snapshot_restores_the_same_future(env_id: str) -> None:
    pytest.importorskip("minatar") if env_id.startswith("MinAtar") else None
    v = VecEnv(env_id, 2, 3)
    rng = np.random.default_rng(0)
    for _ in range(40):
        v.step(rng.integers(0, v.num_actions, 2))
    buf = io.BytesIO()
    torch.save(v.state_dict(), buf)  # plain tensors and numbers: loads with weights_only
    buf.seek(0)
    st = torch.load(buf, weights_only=True)
    acts = rng.integers(0, v.num_actions, (200, 2))
    a = [v.step(x)[:2] for x in acts]
    other = VecEnv(env_id, 2, 99)  # different seeds: everything must come from the snapshot
    other.load_state_dict(st)
    b = [other.step(x)[:2] for x in acts]
    assert all(np.array_equal(p[0], q[0]) and np.array_equal(p[1], q[1]) for p, q in zip(a, b, strict=True))
    assert v.pop_finished() == other.pop_finished()


def test_minatar_dqn_and_ppo_groups_run() -> None:
    pytest.importorskip("minatar")
    dqn = {"name": "dqn", "env": "MinAtar/Breakout-v1", "num_policies": 2, "buffer_size": 100, "batch_size": 8,
           "learning_starts": 16, "train_frequency": 4, "eval_episodes": 1, "probe_states": 8, "steps_per_epoch": 8,
           "distill": {"tau": 1.0, "q_standardize": True}}
    m, res = _fit(dqn, 8)
    assert m.group.kdforge_spec["encoder"] == "minatar" and np.isfinite(res.test_last["return"])
    ppo = {"name": "ppo", "env": "MinAtar/Asterix-v1", "num_policies": 2, "num_envs": 2, "num_steps": 8,
           "eval_episodes": 1, "probe_states": 8, "steps_per_epoch": 1}
    _, res = _fit(ppo, 1)
    assert np.isfinite(res.test_last["return"])


def test_ale_atari_preprocessing_smoke() -> None:
    pytest.importorskip("ale_py")
    pytest.importorskip("cv2")
    from kdforge.rl.envs import make_env

    env = make_env("ALE/Pong-v5", 0)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8
    ppo = {"name": "ppo", "env": "ALE/Pong-v5", "num_policies": 2, "num_envs": 1, "num_steps": 8,
           "num_minibatches": 2, "update_epochs": 1, "probe_states": 4, "steps_per_epoch": 1}
    m, _ = one_step(ppo)
    assert m.group.kdforge_spec["encoder"] == "nature" and m.group.members[0].dim == 512


def one_step(method: dict[str, Any]) -> tuple[Any, dict[str, float]]:
    """One engine step without the evaluation episodes (a full Atari episode is too long for a smoke test)."""
    r = kd.Recipe.from_dict({"name": "rl", "seed": 0, "method": method, "optim": OPT, "sched": {"name": "constant"},
                             "train": {"max_steps": 1, "progress": "silent", "device": "cpu"}})
    m = build_method(r.method.model_dump(), None)  # type: ignore[arg-type]
    out = Trainer(m, None, r, source=m.step_source(r)).train_steps(1)
    assert np.isfinite(out["loss"]) and out["dec"] >= 0
    return m, out


def test_offline_distillation_from_the_scripted_teacher() -> None:
    from kdforge.rl.distill import teacher_return

    assert teacher_return(episodes=2) == 500.0
    # DAgger-style: the student acts, the teacher labels (teacher-generated data needs ~2x the steps here)
    m = {"name": "policy_distill", "teacher": "scripted-cartpole", "behaviour": "student", "steps_per_epoch": 150,
         "eval_episodes": 3}
    _, res = _fit(m, 150)
    assert res.test_last["return"] >= 400  # a random policy gets ~20
    with pytest.raises(kd.KdforgeError, match="scripted teacher plays CartPole"):
        _fit({**m, "env": "Acrobot-v1"}, 1)
