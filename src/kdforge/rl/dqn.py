"""DQN with replay and a target network for a group of K policies, with online policy distillation.

Read top to bottom like CleanRL's ``dqn.py``: the hyper-parameters (:class:`DQNConfig`), the replay
buffer, the step source (:class:`DQNSteps`: one engine step = ``train_frequency`` ε-greedy environment
steps per policy, then one minibatch sampled from each policy's own replay), then the update
(:meth:`DQNGroup.training_step`: each policy's TD loss against its own target network; the group's
decision loss on Boltzmann distributions softmax(Q/τ) of the online networks and its feature loss on the
union of the K minibatches; distillation never enters the TD target). Optimizers, checkpoints and resume
(environments, replay buffers, exploration schedule) are the engine's.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdforge.config import validate
from kdforge.registry import METHODS
from kdforge.rl.base import GroupConfig, GroupMethod, GroupSteps
from kdforge.rl.envs import obs_tensor
from kdforge.rl.group import attention_stats, boltzmann, group_step, ramp_up


class DQNConfig(GroupConfig):
    """``method: {name: dqn}``; defaults are CleanRL's CartPole DQN (lr and optimizer are in the recipe)."""

    name: str = "dqn"
    num_envs: int = Field(1, ge=1)
    buffer_size: int = Field(10_000, ge=1)
    gamma: float = Field(0.99, ge=0, le=1)
    #: target network: soft-update rate (1.0: hard copy) every ``target_network_frequency`` environment steps
    target_tau: float = Field(1.0, gt=0, le=1)
    target_network_frequency: int = Field(500, ge=1)
    batch_size: int = Field(128, ge=1)
    start_e: float = Field(1.0, ge=0, le=1)
    end_e: float = Field(0.05, ge=0, le=1)
    #: fraction of the run's environment steps over which ε falls linearly from start_e to end_e
    exploration_fraction: float = Field(0.5, gt=0, le=1)
    learning_starts: int = Field(10_000, ge=0)
    train_frequency: int = Field(10, ge=1)
    td_loss: Literal["huber", "mse"] = "huber"
    #: CleanRL (default): done = terminated, a time-limit truncation bootstraps from the stored final
    #: observation; false: a truncation is terminal as well (no bootstrap)
    bootstrap_truncated: bool = True
    max_grad_norm: float = Field(10.0, ge=0)


class Replay:
    """A ring buffer of one policy's transitions (observations stored as uint8 for image games)."""

    def __init__(self, capacity: int, obs_shape: tuple[int, ...], image: bool) -> None:
        dt = torch.uint8 if image else torch.float32
        self.obs = torch.zeros((capacity, *obs_shape), dtype=dt)
        self.next_obs = torch.zeros((capacity, *obs_shape), dtype=dt)
        self.actions = torch.zeros(capacity, dtype=torch.long)
        self.rewards = torch.zeros(capacity)
        self.dones = torch.zeros(capacity)
        self.capacity, self.pos, self.size = capacity, 0, 0

    def add(self, obs: Tensor, next_obs: Tensor, actions: Tensor, rewards: Tensor, dones: Tensor) -> None:
        for i in range(len(actions)):
            p = self.pos
            self.obs[p], self.next_obs[p] = obs[i], next_obs[i]
            self.actions[p], self.rewards[p], self.dones[p] = actions[i], rewards[i], dones[i]
            self.pos, self.size = (p + 1) % self.capacity, min(self.size + 1, self.capacity)

    def sample(self, n: int, g: torch.Generator) -> dict[str, Tensor]:
        i = torch.randint(0, self.size, (n,), generator=g)
        return {"obs": self.obs[i].float(), "next_obs": self.next_obs[i].float(), "actions": self.actions[i],
                "rewards": self.rewards[i], "dones": self.dones[i]}

    def state_dict(self) -> dict[str, Any]:
        n = self.size
        return {"obs": self.obs[:n].clone(), "next_obs": self.next_obs[:n].clone(), "actions": self.actions[:n].clone(),
                "rewards": self.rewards[:n].clone(), "dones": self.dones[:n].clone(), "pos": self.pos, "size": n}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        n = int(st["size"])
        for k in ("obs", "next_obs", "actions", "rewards", "dones"):
            getattr(self, k)[:n] = st[k]
        self.pos, self.size = int(st["pos"]), n


def epsilon(cfg: DQNConfig, env_step: int, total_env_steps: int) -> float:
    """The linear exploration schedule: start_e → end_e over ``exploration_fraction`` of the run's env steps."""
    span = max(1.0, cfg.exploration_fraction * total_env_steps)
    return max(cfg.end_e, cfg.start_e + (cfg.end_e - cfg.start_e) * env_step / span)


class DQNSteps(GroupSteps):
    """The step source: ε-greedy steps of every policy in its own environments into its own replay, then a sample."""

    def __init__(self, method: DQNGroup, total_updates: int) -> None:
        super().__init__(method)
        c = method.cfg
        shape = tuple(method.group.kdforge_spec["obs_shape"])
        image = not c.env.startswith(("CartPole", "Acrobot"))
        self.replays = [Replay(c.buffer_size, shape, image) for _ in method.seeds]
        self.total_env_steps = total_updates * c.train_frequency * c.num_envs

    @torch.no_grad()
    def batch(self, step: int) -> dict[str, Any]:
        if self._cache is not None and self._cache[0] == step:
            return self._cache[1]
        c = self.cfg
        eps = epsilon(c, self.env_steps, self.total_env_steps)
        for m, (net, envs, g, rb) in enumerate(zip(self.method.group.members, self.envs, self.gens, self.replays,
                                                   strict=True)):
            for i in range(c.train_frequency):
                obs = obs_tensor(envs.obs, c.env)
                greedy = net(obs).argmax(-1)
                explore = torch.rand(c.num_envs, generator=g) < eps
                random = torch.randint(0, envs.num_actions, (c.num_envs,), generator=g)
                a = torch.where(explore, random, greedy)
                _, r, term, trunc = envs.step(a.numpy())
                # CleanRL: the true next observation (not the reset one); done = terminated, so a
                # time-limit truncation bootstraps from its final observation
                done = term if c.bootstrap_truncated else np.maximum(term, trunc)
                rb.add(obs, obs_tensor(envs.final_obs, c.env), a, torch.from_numpy(r), torch.from_numpy(done))
                for ret, _ in envs.pop_finished():
                    self.episodes.append((self.env_steps + (i + 1) * c.num_envs, m, ret))
        self.env_steps += c.train_frequency * c.num_envs
        learn = self.env_steps > c.learning_starts
        out: dict[str, Any] = {"recent_return": self.recent_returns(), "learn": torch.tensor(learn),
                               "epsilon": torch.tensor(eps), "env_steps": torch.tensor(float(self.env_steps))}
        if learn:
            samples = [rb.sample(c.batch_size, g) for rb, g in zip(self.replays, self.gens, strict=True)]
            out.update({k: torch.stack([s[k] for s in samples]) for k in samples[0]})  # [K, b, ...]
        self._cache = (step, out)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "replays": [rb.state_dict() for rb in self.replays]}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        super().load_state_dict(st)
        for rb, s in zip(self.replays, st["replays"], strict=True):
            rb.load_state_dict(s)


@METHODS.register("dqn")
class DQNGroup(GroupMethod):
    """K DQN policies trained online together; distillation acts on Boltzmann distributions of their Q-values."""

    Config = DQNConfig
    algo = "dqn"

    def __init__(self, cfg: DQNConfig) -> None:
        super().__init__(cfg)
        self.cfg: DQNConfig = cfg
        self.clip = cfg.max_grad_norm
        # each policy's target network: a copy of its weights kept as buffers (resumed, never optimized)
        self._names = [n for n, _ in self.group.members[0].named_parameters()]
        for m, net in enumerate(self.group.members):
            for n, p in net.named_parameters():
                self.register_buffer(self._target_key(m, n), p.detach().clone())
        self.total_updates = 1

    @staticmethod
    def _target_key(m: int, name: str) -> str:
        return f"target{m}_" + name.replace(".", "_")

    def target_q(self, m: int, x: Tensor) -> Tensor:
        """Q-values of policy m's target network."""
        weights = {n: getattr(self, self._target_key(m, n)) for n in self._names}
        return torch.func.functional_call(self.group.members[m], weights, (x,))

    @classmethod
    def from_config(cls, cfg: dict[str, Any], info: Any = None) -> DQNGroup:
        return cls(validate(DQNConfig, cfg, prefix="method"))

    def step_source(self, recipe: Any) -> DQNSteps:
        self.total_updates = recipe.train.max_steps or recipe.train.epochs * self.cfg.steps_per_epoch
        return DQNSteps(self, self.total_updates)

    def distribution(self, out: Tensor) -> Tensor:
        return boltzmann(out, self.dist.tau, self.dist.q_standardize).exp()

    def training_step(self, b: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        c, d, members = self.cfg, self.dist, self.group.members
        out: dict[str, Tensor] = {"epsilon": b["epsilon"], "env_steps": b["env_steps"]}
        for m, r in enumerate(b["recent_return"]):
            out[f"ret{m}"] = r
        if step % 100 == 0:  # the homogenisation monitor every 100 train steps (DQN steps are cheap)
            out["js"] = torch.tensor(self.homogenisation())
        if not bool(b["learn"]):
            out["loss"] = torch.zeros(())
            return out
        K, n = b["actions"].shape
        distil = d.active() and K > 1
        w = ramp_up(step, d.ramp_up * self.total_updates)
        names = self.optimizer_names()
        with ExitStack() as stack:
            for name in names:
                h = self.optimizer(name)
                stack.enter_context(h.toggle())
                h.zero_grad()
            x = torch.cat(list(b["obs"])) if distil else None
            feats, outs, td, qs = [], [], [], []
            total = torch.zeros(())
            for m, net in enumerate(members):
                with torch.no_grad():  # the TD target: the target network, never the group
                    target_max = self.target_q(m, b["next_obs"][m]).max(-1).values
                    td_target = b["rewards"][m] + c.gamma * target_max * (1 - b["dones"][m])
                if x is not None:
                    h_all = net.features(x)
                    q_all = net.head(h_all)
                    feats.append(h_all)
                    outs.append(q_all)
                    q = q_all[m * n:(m + 1) * n]
                else:
                    q = net(b["obs"][m])
                old_val = q.gather(1, b["actions"][m][:, None]).flatten()
                loss_m = (F.smooth_l1_loss if c.td_loss == "huber" else F.mse_loss)(old_val, td_target)
                total = total + loss_m
                td.append(loss_m.detach())
                qs.append(old_val.detach().mean())
            if distil:
                hs, os_ = torch.stack(feats, 1), torch.stack(outs, 1)
                dec, feat, alpha = group_step(d, hs, os_, self.attention, b["recent_return"].nan_to_num(-1e9))
                total = total + w * (d.lambda_dec * dec.sum() + d.lambda_feat * feat.sum())
                out.update({"dec": dec.mean().detach(), "feat": feat.mean().detach(), **attention_stats(alpha)})
            h.backward(total)  # one backward of the whole group's loss
            for name in names:
                h = self.optimizer(name)
                h.step()  # each policy's own clipping and Adam state
                h.zero_grad()
        # the target networks follow every target_network_frequency environment steps
        every = max(1, c.target_network_frequency // (c.train_frequency * c.num_envs))
        if step % every == 0:
            with torch.no_grad():
                for m, net in enumerate(members):
                    for n, p in net.named_parameters():
                        tp = getattr(self, self._target_key(m, n))
                        tp.copy_(c.target_tau * p + (1.0 - c.target_tau) * tp)
        out.update({"loss": total.detach() / K, "td_loss": torch.stack(td).mean(), "q": torch.stack(qs).mean(),
                    "w": torch.tensor(w if distil else 0.0)})
        return out
