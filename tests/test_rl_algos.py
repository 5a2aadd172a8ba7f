"""PPO and DQN groups through the engine: independence bit for bit, resume at a rollout boundary, smoke, eval."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("gymnasium")

import kdforge as kd
from kdforge.engine.callbacks import Callback
from kdforge.engine.trainer import Trainer, TrainingInterrupted
from kdforge.method import build_method

PPO = {"name": "ppo", "env": "CartPole-v1", "num_envs": 2, "num_steps": 16, "update_epochs": 2,
       "num_minibatches": 2, "eval_episodes": 1, "probe_states": 16, "steps_per_epoch": 2}
DQN = {"name": "dqn", "env": "CartPole-v1", "buffer_size": 200, "batch_size": 16, "learning_starts": 20,
       "train_frequency": 4, "target_network_frequency": 16, "eval_episodes": 1, "probe_states": 16,
       "steps_per_epoch": 5}
OPT = {"name": "adam", "lr": 1e-3, "eps": 1e-5, "weight_decay": 0.0}


def recipe(method: dict[str, Any], steps: int, **train: Any) -> kd.Recipe:
    return kd.Recipe.from_dict({"name": "rl", "seed": 0, "method": method, "optim": OPT,
                                "sched": {"name": "linear" if method["name"] == "ppo" else "constant"},
                                "train": {"max_steps": steps, "progress": "silent", "device": "cpu", **train}})


def fit(r: kd.Recipe, run_dir: Path | None = None, resume: bool = False, callbacks: tuple = ()) -> Any:
    method = build_method(r.method.model_dump(), None)  # type: ignore[arg-type]
    source = method.step_source(r)
    trainer = Trainer(method, None, r, run_dir=run_dir, resume=resume, source=source, callbacks=callbacks)
    return method, source, trainer.fit()


def params(method: Any, m: int) -> list[torch.Tensor]:
    return [p.detach().clone() for p in method.group.members[m].parameters()]


@pytest.mark.parametrize("algo", ["ppo", "dqn"])
def test_zero_weights_and_k1_reproduce_independent_runs_bit_for_bit(algo: str, one_thread: None) -> None:
    base, steps = (PPO, 3) if algo == "ppo" else (DQN, 12)
    seeds = [11, 12, 13]
    zero = {"aggregation": "attention", "lambda_dec": 0.0, "lambda_feat": 0.0}
    group, _, _ = fit(recipe({**base, "num_policies": 3, "policy_seeds": seeds, "distill": zero}, steps))
    for m, s in enumerate(seeds):
        # K = 1 with distillation switched on is also plain independent training
        alone, _, _ = fit(recipe({**base, "num_policies": 1, "policy_seeds": [s]}, steps))
        for a, b in zip(params(group, m), params(alone, 0), strict=True):
            assert torch.equal(a, b)
    # and distillation does change the policies
    opd, _, _ = fit(recipe({**base, "num_policies": 3, "policy_seeds": seeds}, steps))
    assert not all(torch.equal(a, b) for a, b in zip(params(opd, 0), params(group, 0), strict=True))


def test_ppo_rl_loss_reads_only_the_policy_s_own_slice() -> None:
    from kdforge.rl.nets import ActorCritic
    from kdforge.rl.ppo import PPOConfig, ppo_loss

    torch.manual_seed(0)
    net, c, mb = ActorCritic("mlp", (4,), 2, 8), PPOConfig(), 6
    x = torch.randn(3 * mb, 4, requires_grad=True)  # the union of 3 slices; this is policy 1's loss
    h = net.features(x)
    own = slice(mb, 2 * mb)
    loss, _ = ppo_loss(c, net.actor(h)[own], net.value(x[own], h[own]), torch.zeros(mb, dtype=torch.long),
                       torch.full((mb,), -0.7), torch.randn(mb), torch.randn(mb), torch.randn(mb))
    loss.backward()
    assert float(x.grad[own].abs().sum()) > 0
    assert float(x.grad[:mb].abs().sum() + x.grad[2 * mb:].abs().sum()) == 0.0


class _Stop(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, trainer: Any, row: dict, improved: bool) -> None:
        if trainer.epoch == self.epoch:
            raise KeyboardInterrupt


@pytest.mark.parametrize("algo", ["ppo", "dqn"])
def test_resume_at_a_rollout_boundary_gives_the_same_returns(algo: str, tmp_path: Path, one_thread: None) -> None:
    base, steps = (PPO, 6) if algo == "ppo" else (DQN, 30)
    r = recipe({**base, "num_policies": 2, "policy_seeds": [3, 4],
                "distill": {"aggregation": "attention", "ramp_up": 0.5}}, steps)
    full, src_full, _ = fit(r, tmp_path / "a")
    with pytest.raises(TrainingInterrupted):
        fit(r, tmp_path / "b", callbacks=(_Stop(1),))
    resumed, src_res, _ = fit(r, tmp_path / "b", resume=True)
    assert src_full.episodes and src_res.episodes == src_full.episodes
    for m in range(2):
        for a, b in zip(params(full, m), params(resumed, m), strict=True):
            assert torch.equal(a, b)
    if algo == "dqn":
        for ra, rb in zip(src_full.replays, src_res.replays, strict=True):
            assert ra.size == rb.size and torch.equal(ra.obs[:ra.size], rb.obs[:rb.size])


def test_ppo_opd_da_2k_steps_smoke(one_thread: None) -> None:
    m = {"name": "ppo", "env": "CartPole-v1", "num_policies": 3, "eval_episodes": 1, "steps_per_epoch": 4,
         "probe_states": 64}  # 4 envs x 128 steps x 4 rollouts = 2048 environment steps per policy
    rows: list[dict[str, float]] = []

    class _Rows(Callback):
        def on_step_end(self, trainer: Any, out: dict) -> None:
            rows.append({k: float(v) for k, v in out.items()})

    _, source, res = fit(recipe(m, 4), callbacks=(_Rows(),))
    assert source.env_steps == 2048 and len(rows) == 4
    for row in rows:
        assert all(math.isfinite(v) for k, v in row.items() if not k.startswith("ret")), row
    assert all(math.isfinite(rows[-1][f"ret{i}"]) for i in range(3))  # every policy finished episodes
    assert rows[-1]["dec"] > 0 and 0 < rows[-1]["attn_self"] < 1 and rows[-1]["js"] >= 0
    assert {f"return_p{i}" for i in range(3)} <= set(res.test_last)


def test_dqn_epsilon_schedule_and_boltzmann_distribution() -> None:
    from kdforge.rl.dqn import DQNConfig, epsilon

    c = DQNConfig(start_e=1.0, end_e=0.05, exploration_fraction=0.5)
    assert epsilon(c, 0, 1000) == 1.0
    assert epsilon(c, 250, 1000) == pytest.approx(0.525)
    assert epsilon(c, 500, 1000) == pytest.approx(0.05) and epsilon(c, 900, 1000) == pytest.approx(0.05)


def test_kdforge_train_and_eval_report_mean_return(tmp_path: Path) -> None:
    import yaml

    from kdforge.cli import main

    rec = {"name": "rl", "seed": 0, "method": {**PPO, "num_policies": 2, "eval_episodes": 2}, "optim": OPT,
           "sched": {"name": "linear"}, "train": {"max_steps": 2, "progress": "silent", "threads": 1}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(rec))
    assert main(["train", str(tmp_path / "r.yaml"), "--dry-run"]) == 0
    assert main(["train", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "run")]) == 0
    stored = json.loads((tmp_path / "run" / "results.json").read_text())
    assert main(["eval", str(tmp_path / "run"), "--which", "last"]) == 0
    from kdforge.evaluate import evaluate_source

    res = evaluate_source(tmp_path / "run", which="last")
    assert res["episodes"] == 2 and res["return"] == pytest.approx(stored["test_last"]["return"])
    assert res["return"] == pytest.approx((res["return_p0"] + res["return_p1"]) / 2) and res["model"] == "CartPole-v1"


def test_bad_rl_recipe_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(kd.KdforgeError, match="aggregation"):
        fit(recipe({**PPO, "distill": {"aggregation": "median"}}, 1))
    with pytest.raises(kd.KdforgeError, match="num_minibatches 3 must divide"):
        fit(recipe({**PPO, "num_minibatches": 3}, 1))
    with pytest.raises(kd.KdforgeError, match="unknown environment"):
        fit(recipe({**PPO, "env": "CartPole-v9"}, 1))
