"""What PPO and DQN groups share: the recipe keys, the K networks, their optimizers, evaluation, the probe set.

An RL method makes its own batches (``uses_data = False``; :meth:`step_source` gives the engine a
:class:`~kdforge.engine.trainer.StepSource` of rollouts or replay samples); one engine step is one
rollout (PPO) or one train step (DQN). Every policy has its own manual optimizer (its own gradient
clipping and Adam state), so a group trained with zero distillation weights is K independent runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from kdforge.config import Strict
from kdforge.engine.optim import OptimizerSpec
from kdforge.errors import KdforgeError
from kdforge.method import Method
from kdforge.rl.envs import VecEnv, make_env, obs_tensor
from kdforge.rl.group import DecisionAttention, DistillConfig, mean_pairwise_js
from kdforge.rl.nets import PolicyGroup, build_group, encoder_kind


@dataclass(frozen=True)
class Episodes:
    """An RL evaluation split: ``episodes`` episodes on environment seeds ``seed``, ``seed + 1``, ...

    A step source offers two (``val_set``, ``test_set``; the engine passes them to ``evaluate`` as it
    passes a data set's loaders): ``best`` is picked on the validation episodes only, and the reported
    test episodes (also ``kdforge eval``'s) are never seen before.
    """

    split: str
    seed: int
    episodes: int


def split_episodes(spec: dict[str, Any], split: str) -> Episodes:
    """The test or validation episodes a checkpoint's spec names (``kdforge eval --split``)."""
    if split == "train":
        raise KdforgeError("an RL run has no train split to evaluate (valid: test, val)")
    if split == "val" and "val_seed" not in spec:
        raise KdforgeError("this checkpoint predates separate validation episodes (no val_seed): use --split test")
    return Episodes(split, int(spec["val_seed" if split == "val" else "eval_seed"]), int(spec["eval_episodes"]))


def check_eval_seeds(cfg: Any, prefix: str = "method") -> None:
    """Refuse validation episode seeds that overlap the test episode seeds."""
    n = cfg.eval_episodes
    if abs(cfg.val_seed - cfg.eval_seed) < n:
        raise KdforgeError(f"{prefix}.val_seed {cfg.val_seed} overlaps the test episodes on seeds "
                           f"{cfg.eval_seed}..{cfg.eval_seed + n - 1} (keep |val_seed - eval_seed| >= eval_episodes)")


class GroupSteps:
    """What the PPO and DQN step sources share: each policy's environments and generator, its finished episodes.

    All randomness lives in per-policy generators and environment states held here, so a resumed run
    (``state_dict`` at a step boundary) continues exactly; subclasses add their own state.
    """

    def __init__(self, method: GroupMethod) -> None:
        c = method.cfg
        self.method, self.cfg = method, c
        self.envs = [VecEnv(c.env, c.num_envs, s * 1000) for s in method.seeds]
        self.gens = [torch.Generator().manual_seed(s) for s in method.seeds]
        self.steps_per_epoch = c.steps_per_epoch
        self.env_steps = 0  # per policy
        self.episodes: list[tuple[int, int, float]] = []  # (env steps per policy when it ended, policy, return)
        self._cache: tuple[int, dict[str, Any]] | None = None  # the engine may ask for one step's batch twice
        self.val_set = Episodes("val", c.val_seed, c.eval_episodes)
        self.test_set = Episodes("test", c.eval_seed, c.eval_episodes)

    def recent_returns(self, window: int = 10) -> Tensor:
        """Each policy's mean return over its last ``window`` finished episodes (NaN before the first)."""
        out = []
        for m in range(len(self.envs)):
            r = [ret for _, p, ret in self.episodes if p == m][-window:]
            out.append(float(np.mean(r)) if r else float("nan"))
        return torch.tensor(out)

    def state_dict(self) -> dict[str, Any]:
        return {"envs": [e.state_dict() for e in self.envs], "gens": [g.get_state() for g in self.gens],
                "env_steps": self.env_steps, "episodes": [list(e) for e in self.episodes]}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        for e, s in zip(self.envs, st["envs"], strict=True):
            e.load_state_dict(s)
        for g, s in zip(self.gens, st["gens"], strict=True):
            g.set_state(s)
        self.env_steps = int(st["env_steps"])
        self.episodes = [(int(a), int(b), float(r)) for a, b, r in st["episodes"]]
        self._cache = None

class GroupConfig(Strict):
    """Recipe keys every RL group method has."""

    env: str = "CartPole-v1"
    num_policies: int = Field(3, ge=1, le=64)
    #: one seed per policy (network init, environments, sampling); default: drawn from the recipe's seed
    policy_seeds: list[int] | None = None
    encoder: str = "auto"
    hidden: int = Field(64, ge=1)
    #: engine steps (PPO rollouts / DQN train steps) per engine epoch: evaluation and checkpoint cadence
    steps_per_epoch: int = Field(10, ge=1)
    eval_episodes: int = Field(5, ge=1)
    #: test episodes play on seeds eval_seed + i (reported, and kdforge eval's); validation episodes, which
    #: pick ``best``, on val_seed + i: disjoint sets
    eval_seed: int = 100_000
    val_seed: int = 200_000
    probe_states: int = Field(256, ge=1)
    distill: DistillConfig = Field(default_factory=DistillConfig)


def env_shape(env_id: str) -> tuple[tuple[int, ...], int]:
    """(observation shape in the networks' layout, number of actions) of an environment."""
    e = make_env(env_id, 0)
    try:
        x = obs_tensor(np.asarray(e.observation_space.sample())[None], env_id)
        return tuple(x.shape[1:]), int(e.action_space.n)
    finally:
        e.close()


def probe_set(env_id: str, n: int, seed: int) -> Tensor:
    """``n`` states visited by a uniformly random policy (the fixed probe set of the homogenisation monitor)."""
    env, rng, out = VecEnv(env_id, 1, seed), np.random.default_rng(seed), []
    for _ in range(n):
        out.append(env.obs[0])
        env.step(rng.integers(0, env.num_actions, 1))
    return obs_tensor(np.stack(out), env_id)


@torch.no_grad()
def play(model: nn.Module, env_id: str, episodes: int, seed: int, epsilon: float = 0.0) -> list[float]:
    """Returns of ``episodes`` full episodes of one network acting greedily (argmax; ε-greedy if ``epsilon``).

    ALE games are played without episodic life and with unclipped rewards (the whole game's raw return).
    """
    rng, out = np.random.default_rng(seed), []
    dev = next(model.parameters(), torch.zeros(())).device
    for i in range(episodes):
        env = make_env(env_id, seed + i, train=False)
        obs, _ = env.reset(seed=seed + i)
        total, done = 0.0, False
        while not done:
            if epsilon and rng.random() < epsilon:
                a = int(rng.integers(env.action_space.n))
            else:
                a = int(model(obs_tensor(np.asarray(obs)[None], env_id).to(dev)).argmax(-1))
            obs, r, term, trunc, info = env.step(a)
            total += float(r)
            done = term or trunc
            if done and "game_return" in info:  # ALE: the raw game, FIRE steps of the reset included
                total = float(info["game_return"])
        env.close()
        out.append(total)
    return out


def evaluate_group(group: nn.Module, split: Episodes | None = None) -> dict[str, float]:
    """Mean return per policy over deterministic evaluation episodes, and of all; ``split`` None: the test
    episodes of the group's spec (``eval_seed``, ``eval_episodes``)."""
    spec = group.kdforge_spec
    split = split or Episodes("test", int(spec["eval_seed"]), int(spec["eval_episodes"]))
    n = split.episodes
    was = group.training
    group.eval()
    per = [play(m, spec["env"], n, split.seed) for m in group.members]
    group.train(was)
    means = [float(np.mean(r)) for r in per]
    res = {"return": float(np.mean(means)), "return_best": max(means), "episodes": float(n)}
    res.update({f"return_p{m}": v for m, v in enumerate(means)})
    return res


class GroupMethod(Method, ABC):
    """K policies of one algorithm learning online together, with the decision-attention module when asked."""

    uses_data: ClassVar[bool] = False
    automatic_optimization = False
    monitor = ("return", "max")
    algo: ClassVar[str] = ""
    #: max gradient norm of each policy's own optimizer (the algorithm's ``max_grad_norm``)
    clip: float | None = None

    def __init__(self, cfg: GroupConfig) -> None:
        super().__init__()
        self.cfg = cfg
        k = cfg.num_policies
        check_eval_seeds(cfg)
        if cfg.policy_seeds is not None and len(cfg.policy_seeds) != k:
            raise KdforgeError(f"method.policy_seeds has {len(cfg.policy_seeds)} seeds for num_policies={k}")
        self.seeds = list(cfg.policy_seeds) if cfg.policy_seeds is not None else \
            [int(s) for s in torch.randint(0, 2**20, (k,))]
        obs_shape, num_actions = env_shape(cfg.env)
        spec = {"builder": "rl", "algo": self.algo, "env": cfg.env, "k": k, "obs_shape": list(obs_shape),
                "num_actions": num_actions, "encoder": encoder_kind(cfg.env, cfg.encoder), "hidden": cfg.hidden,
                "eval_episodes": cfg.eval_episodes, "eval_seed": cfg.eval_seed, "val_seed": cfg.val_seed}
        self.group: PolicyGroup = build_group(spec, self.seeds)
        self.dist = cfg.distill
        self.attention: DecisionAttention | None = None
        if self.dist.active() and self.dist.aggregation == "attention" and k > 1:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seeds[0] + 7)
                self.attention = DecisionAttention(self.group.members[0].dim, self.dist.attn_dim,
                                                   self.dist.include_self, self.dist.attn_scale)
        self.register_buffer("probe", probe_set(cfg.env, cfg.probe_states, cfg.eval_seed + 7919), persistent=False)

    def configure_optimizers(self) -> list[OptimizerSpec]:
        specs = [OptimizerSpec(f"policy{m}", p, manual=True, clip=self.clip or 0)
                 for m, p in enumerate(self.group.members)]
        if self.attention is not None:
            specs.append(OptimizerSpec("attention", self.attention, manual=True, clip=0))
        return specs

    def optimizer_names(self) -> list[str]:
        """Every manual optimizer's name (policies first, then the attention)."""
        return [f"policy{m}" for m in range(len(self.group))] + (["attention"] if self.attention is not None else [])

    def deployable(self) -> PolicyGroup:
        return self.group

    def distribution(self, out: Tensor) -> Tensor:
        """Action probabilities from the members' outputs (PPO: softmax of logits; DQN: Boltzmann)."""
        return out.softmax(-1)

    @torch.no_grad()
    def homogenisation(self) -> float:
        """Mean pairwise Jensen–Shannon divergence of the policies' action distributions on the probe set."""
        return mean_pairwise_js(self.distribution(self.group(self.probe)))

    def evaluate(self, loader: Any, trainer: Any, model: nn.Module) -> dict[str, float]:
        """Deterministic episodes of every policy: the validation or test :class:`Episodes` the engine passes
        (``kdforge eval`` passes none: the test episodes of the checkpoint's spec)."""
        return evaluate_group(model, loader if isinstance(loader, Episodes) else None)

    @abstractmethod
    def step_source(self, recipe: Any) -> Any:
        """The engine's step source of this algorithm (rollouts for PPO, replay samples for DQN)."""
