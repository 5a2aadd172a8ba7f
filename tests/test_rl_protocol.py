"""RL protocol: validation episodes apart from test episodes, CleanRL's DQN truncation, Atari game returns."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")

import kdforge as kd
from kdforge.engine.trainer import Trainer
from kdforge.method import build_method
from kdforge.rl import base as rl_base
from kdforge.rl.envs import VecEnv

OPT = {"name": "adam", "lr": 1e-3, "eps": 1e-5, "weight_decay": 0.0}


def _recipe(method: dict[str, Any], steps: int) -> Any:
    return kd.Recipe.from_dict({"name": "rl", "seed": 0, "method": method, "optim": OPT,
                                "sched": {"name": "constant"},
                                "train": {"max_steps": steps, "progress": "never", "device": "cpu"}})


def test_best_is_chosen_on_validation_episodes_and_reported_on_unseen_test_episodes(monkeypatch: Any) -> None:
    seen: list[int] = []
    real_play = rl_base.play

    def recording(model: Any, env_id: str, episodes: int, seed: int, epsilon: float = 0.0) -> list[float]:
        seen.extend(range(seed, seed + episodes))
        return real_play(model, env_id, episodes, seed, epsilon)

    monkeypatch.setattr(rl_base, "play", recording)
    r = _recipe({"name": "ppo", "num_policies": 2, "num_envs": 2, "num_steps": 16, "eval_episodes": 2,
                 "probe_states": 8, "steps_per_epoch": 1}, 2)
    m = build_method(r.method.model_dump(), None)  # type: ignore[arg-type]
    res = Trainer(m, None, r, source=m.step_source(r)).fit()
    # 2 epochs of validation (2 policies x 2 episodes on seeds 200000..1), then the test (100000..1)
    assert seen[:8] == [200_000, 200_001] * 4
    assert set(seen[8:]) == {100_000, 100_001}
    # the numbers themselves, recomputed by playing the final group on each seed set
    model = m.deployable()
    mean = lambda seed: float(np.mean([np.mean(real_play(p, "CartPole-v1", 2, seed)) for p in model.members]))
    assert res.history[-1]["val_return"] == pytest.approx(mean(200_000), abs=0.01)
    assert res.test_last["return"] == pytest.approx(mean(100_000), abs=0.01)
    # kdforge eval (no split given) plays the test episodes
    assert m.evaluate(None, None, model)["return"] == pytest.approx(res.test_last["return"])


def test_overlapping_validation_and_test_seeds_are_refused() -> None:
    with pytest.raises(kd.KdforgeError, match=r"val_seed 100003 overlaps the test episodes on seeds 100000\.\.100004"):
        build_method({"name": "ppo", "eval_episodes": 5, "val_seed": 100_003}, None)  # type: ignore[arg-type]


def test_ppo_minibatch_of_one_with_advantage_normalisation_is_refused() -> None:
    bad = {"name": "ppo", "num_envs": 1, "num_steps": 4, "num_minibatches": 4}
    with pytest.raises(kd.KdforgeError, match="minibatches of one transition"):
        build_method(bad, None)  # type: ignore[arg-type]
    build_method({**bad, "norm_adv": False}, None)  # type: ignore[arg-type]  # no normalisation: no NaN


@pytest.mark.parametrize("bootstrap", [True, False])
def test_dqn_stores_the_final_observation_and_bootstraps_at_a_time_limit(bootstrap: bool) -> None:
    import gymnasium as gym

    from kdforge.rl.dqn import DQNSteps

    r = _recipe({"name": "dqn", "num_policies": 1, "buffer_size": 16, "batch_size": 2, "learning_starts": 100,
                 "train_frequency": 1, "probe_states": 4, "start_e": 1.0, "end_e": 1.0,
                 "bootstrap_truncated": bootstrap, "policy_seeds": [5]}, 4)
    m = build_method(r.method.model_dump(), None)  # type: ignore[arg-type]
    src = DQNSteps(m, 4)
    vec = src.envs[0]
    limit = 3  # a time limit the random actions reach long before the pole falls
    vec.envs = [gym.wrappers.TimeLimit(gym.make("CartPole-v1").unwrapped, limit)]
    vec._obs = np.stack([vec.envs[0].reset(seed=11)[0]])
    for s in range(limit):
        src.batch(s)
    rb = src.replays[0]
    # the same actions replayed on an independent CartPole from the same seed
    ref = gym.make("CartPole-v1")
    o, _ = ref.reset(seed=11)
    for t in range(limit):
        assert torch.allclose(rb.obs[t], torch.as_tensor(o))
        o, _, term, _, _ = ref.step(int(rb.actions[t]))
        assert not term
        assert torch.allclose(rb.next_obs[t], torch.as_tensor(o))  # the final observation, not the reset one
    assert rb.dones[:limit].tolist() == [0.0, 0.0, 0.0 if bootstrap else 1.0]
    assert not torch.allclose(torch.as_tensor(vec.obs[0]), torch.as_tensor(o))  # the env itself was reset


def test_atari_training_reports_whole_unclipped_games_and_a_lost_life_does_not_reset_the_game(
        monkeypatch: Any) -> None:
    ale_py = pytest.importorskip("ale_py")
    pytest.importorskip("cv2")
    raw: list[float] = []
    real_step = ale_py.env.AtariEnv.step

    def recording(self: Any, action: Any) -> Any:
        out = real_step(self, action)
        raw.append(float(out[1]))
        return out

    monkeypatch.setattr(ale_py.env.AtariEnv, "step", recording)
    v = VecEnv("ALE/Breakout-v5", 1, 3)
    ale = v.envs[0].unwrapped.ale
    assert ale.lives() == 5
    raw.clear()  # the reset's steps belong to the game too
    raw_game = 0.0
    rng = np.random.default_rng(0)
    lives_seen, clipped = [], []
    for _ in range(5000):
        _, rew, term, trunc = v.step(rng.integers(0, v.num_actions, 1))
        clipped.append(float(rew[0]))
        if term[0] or trunc[0]:
            lives_seen.append(ale.lives())
        if v.finished:
            break
    raw_game = sum(raw)
    (ret, length), = v.pop_finished()
    # a lost life ended the learner's episode 4 times without resetting the game (5, 4, ... lives)
    assert lives_seen[:4] == [4, 3, 2, 1]
    assert ret == pytest.approx(raw_game) and length == len(clipped)
    assert set(clipped) <= {0.0, 1.0}  # the learner sees clipped rewards


def test_kdforge_eval_plays_the_split_it_is_asked_for(tmp_path: Any) -> None:
    import json

    from kdforge.evaluate import evaluate_source
    from kdforge.run import train

    r = _recipe({"name": "ppo", "num_policies": 2, "num_envs": 2, "num_steps": 16, "eval_episodes": 2,
                 "probe_states": 8, "steps_per_epoch": 1}, 1)
    train(r, tmp_path / "run")
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    val_row = res["history"][-1]
    assert evaluate_source(tmp_path / "run", split="test", which="last")["return"] == pytest.approx(
        res["test_last"]["return"], abs=0.01)
    assert evaluate_source(tmp_path / "run", split="val", which="last")["return"] == pytest.approx(
        val_row["val_return"], abs=0.01)
    with pytest.raises(kd.KdforgeError, match="no train split"):
        evaluate_source(tmp_path / "run", split="train")
