"""PPO with GAE for a group of K policies, with online policy distillation (OPD-DA and its baselines).

Read top to bottom like CleanRL's ``ppo.py``: the hyper-parameters (:class:`PPOConfig`), the rollout
(:class:`PPORollouts`, the engine's step source: one engine step = one rollout of ``num_steps`` x
``num_envs`` per policy, GAE, and the minibatch orders of the update), then the update
(:meth:`PPOGroup.training_step`: ``update_epochs`` passes over aligned minibatches; per policy the
clipped surrogate, clipped value loss and entropy bonus on its own slice; the group's decision and
feature losses on the union of the K slices; one backward; one step of each policy's own optimizer).
Optimizers, the linear lr annealing (``sched: linear``), checkpoints and resume are the engine's.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from kdforge.config import validate
from kdforge.errors import KdforgeError
from kdforge.registry import METHODS
from kdforge.rl.base import GroupConfig, GroupMethod, GroupSteps
from kdforge.rl.envs import obs_tensor
from kdforge.rl.group import attention_stats, group_step, ramp_up


class PPOConfig(GroupConfig):
    """``method: {name: ppo}``; defaults are CleanRL's CartPole PPO (lr, Adam eps and annealing are in the recipe)."""

    name: str = "ppo"
    num_envs: int = Field(4, ge=1)
    num_steps: int = Field(128, ge=1)
    gamma: float = Field(0.99, ge=0, le=1)
    gae_lambda: float = Field(0.95, ge=0, le=1)
    update_epochs: int = Field(4, ge=1)
    num_minibatches: int = Field(4, ge=1)
    norm_adv: bool = True
    clip_coef: float = Field(0.2, gt=0)
    clip_vloss: bool = True
    ent_coef: float = Field(0.01, ge=0)
    vf_coef: float = Field(0.5, ge=0)
    max_grad_norm: float = Field(0.5, ge=0)


class PPORollouts(GroupSteps):
    """The step source: rollouts of every policy in its own vectorised environments, with GAE.

    All randomness (environments, action sampling, minibatch orders) comes from per-policy generators
    held here, so a resumed run (``state_dict`` at a rollout boundary) continues exactly.
    """

    def __init__(self, method: PPOGroup) -> None:
        super().__init__(method)
        self.next_done = [torch.zeros(method.cfg.num_envs) for _ in method.seeds]

    @torch.no_grad()
    def batch(self, step: int) -> dict[str, Any]:
        if self._cache is not None and self._cache[0] == step:  # the engine's example batch was this one
            return self._cache[1]
        c, group = self.cfg, self.method.group
        T, E = c.num_steps, c.num_envs
        parts: dict[str, list[Tensor]] = {k: [] for k in ("obs", "actions", "logprobs", "advantages", "returns",
                                                          "values", "perm")}
        for m, (net, envs, g) in enumerate(zip(group.members, self.envs, self.gens, strict=True)):
            next_obs, next_done = obs_tensor(envs.obs, c.env), self.next_done[m]
            obs = torch.zeros((T, E, *next_obs.shape[1:]))
            actions, logprobs, rewards, dones, values = (torch.zeros(T, E) for _ in range(5))
            for t in range(T):
                obs[t], dones[t] = next_obs, next_done
                h = net.features(next_obs)
                logits, values[t] = net.actor(h), net.value(next_obs, h)
                a = torch.multinomial(logits.softmax(-1), 1, generator=g).flatten()
                actions[t] = a.float()
                logprobs[t] = logits.log_softmax(-1).gather(1, a[:, None]).flatten()
                o, r, term, trunc = envs.step(a.numpy())
                rewards[t] = torch.from_numpy(r)
                next_obs, next_done = obs_tensor(o, c.env), torch.from_numpy(np.maximum(term, trunc))  # CleanRL
            for ret, _ in envs.pop_finished():
                self.episodes.append((self.env_steps + T * E, m, ret))
            self.next_done[m] = next_done
            # GAE (done[t] marks obs[t] as the first state of a new episode)
            next_value = net.value(next_obs, net.features(next_obs))
            advantages, lastgaelam = torch.zeros(T, E), torch.zeros(E)
            for t in reversed(range(T)):
                if t == T - 1:
                    nextnonterminal, nextvalues = 1.0 - next_done, next_value
                else:
                    nextnonterminal, nextvalues = 1.0 - dones[t + 1], values[t + 1]
                delta = rewards[t] + c.gamma * nextvalues * nextnonterminal - values[t]
                advantages[t] = lastgaelam = delta + c.gamma * c.gae_lambda * nextnonterminal * lastgaelam
            parts["obs"].append(obs.reshape(T * E, *obs.shape[2:]))
            parts["actions"].append(actions.reshape(-1).long())
            parts["logprobs"].append(logprobs.reshape(-1))
            parts["advantages"].append(advantages.reshape(-1))
            parts["returns"].append((advantages + values).reshape(-1))
            parts["values"].append(values.reshape(-1))
            parts["perm"].append(torch.stack([torch.randperm(T * E, generator=g) for _ in range(c.update_epochs)]))
        self.env_steps += T * E
        out: dict[str, Any] = {k: torch.stack(v) for k, v in parts.items()}  # [K, N, ...]; perm [K, epochs, N]
        out["recent_return"] = self.recent_returns()
        out["env_steps"] = torch.tensor(float(self.env_steps))
        self._cache = (step, out)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "next_done": [d.clone() for d in self.next_done]}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        super().load_state_dict(st)
        self.next_done = [d.clone() for d in st["next_done"]]


def ppo_loss(c: PPOConfig, logits: Tensor, newvalue: Tensor, a: Tensor, oldlogprob: Tensor, adv: Tensor,
             returns: Tensor, values: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """One policy's PPO loss on its own transitions: clipped surrogate + c_v · clipped value loss − c_e · entropy."""
    logp = logits.log_softmax(-1)
    newlogprob = logp.gather(1, a[:, None]).flatten()
    entropy = -(logp.exp() * logp).sum(-1).mean()
    logratio = newlogprob - oldlogprob
    ratio = logratio.exp()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > c.clip_coef).float().mean()
    if c.norm_adv:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    pg_loss = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - c.clip_coef, 1 + c.clip_coef)).mean()
    if c.clip_vloss:
        v_clipped = values + torch.clamp(newvalue - values, -c.clip_coef, c.clip_coef)
        v_loss = 0.5 * torch.max((newvalue - returns) ** 2, (v_clipped - returns) ** 2).mean()
    else:
        v_loss = 0.5 * ((newvalue - returns) ** 2).mean()
    loss = pg_loss - c.ent_coef * entropy + c.vf_coef * v_loss
    return loss, {"pg_loss": pg_loss.detach(), "v_loss": v_loss.detach(), "entropy": entropy.detach(),
                  "approx_kl": approx_kl, "clipfrac": clipfrac}


@METHODS.register("ppo")
class PPOGroup(GroupMethod):
    """K PPO policies trained online together: independent (λ = 0), OPD-mean, leader, DML or OPD-DA."""

    Config = PPOConfig
    algo = "ppo"

    def __init__(self, cfg: PPOConfig) -> None:
        n = cfg.num_envs * cfg.num_steps
        if n % cfg.num_minibatches:
            raise KdforgeError(f"method.num_minibatches {cfg.num_minibatches} must divide num_envs x num_steps = {n}")
        if cfg.norm_adv and n // cfg.num_minibatches < 2:
            raise KdforgeError(f"method.num_minibatches {cfg.num_minibatches} makes minibatches of one transition "
                               f"(num_envs x num_steps = {n}); advantage normalisation needs at least 2 "
                               "(use num_minibatches <= n/2, or norm_adv: false)")
        super().__init__(cfg)
        self.cfg: PPOConfig = cfg
        self.clip = cfg.max_grad_norm
        self.total_updates = 1

    @classmethod
    def from_config(cls, cfg: dict[str, Any], info: Any = None) -> PPOGroup:
        return cls(validate(PPOConfig, cfg, prefix="method"))

    def step_source(self, recipe: Any) -> PPORollouts:
        self.total_updates = recipe.train.max_steps or recipe.train.epochs * self.cfg.steps_per_epoch
        return PPORollouts(self)

    def training_step(self, b: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        c, d, members = self.cfg, self.dist, self.group.members
        K, N = b["actions"].shape
        mb = N // c.num_minibatches
        distil = d.active() and K > 1
        w = ramp_up(step, d.ramp_up * self.total_updates)
        names = self.optimizer_names()
        logs: dict[str, list[Tensor]] = {}
        for epoch in range(c.update_epochs):
            for start in range(0, N, mb):
                idx = b["perm"][:, epoch, start:start + mb]  # [K, mb]: minibatches aligned across policies
                own = [b["obs"][m][idx[m]] for m in range(K)]
                with ExitStack() as stack:
                    for name in names:
                        h = self.optimizer(name)
                        stack.enter_context(h.toggle())
                        h.zero_grad()
                    x = torch.cat(own) if distil else None
                    feats, outs, total = [], [], torch.zeros(())
                    for m, net in enumerate(members):
                        if x is not None:  # every policy sees the union; its RL loss uses its own slice
                            h_all = net.features(x)
                            h_own = h_all[m * mb:(m + 1) * mb]
                            feats.append(h_all)
                            outs.append(net.actor(h_all))
                            logits = outs[-1][m * mb:(m + 1) * mb]
                        else:
                            h_own = net.features(own[m])
                            logits = net.actor(h_own)
                        newvalue = net.value(own[m], h_own)
                        i = idx[m]
                        loss_m, stats = ppo_loss(c, logits, newvalue, b["actions"][m][i], b["logprobs"][m][i],
                                                 b["advantages"][m][i], b["returns"][m][i], b["values"][m][i])
                        total = total + loss_m
                        for k, v in stats.items():
                            logs.setdefault(k, []).append(v)
                    if distil:
                        hs, os_ = torch.stack(feats, 1), torch.stack(outs, 1)  # [B, K, D], [B, K, A]
                        dec, feat, alpha = group_step(d, hs, os_, self.attention, b["recent_return"].nan_to_num(-1e9))
                        total = total + w * (d.lambda_dec * dec.sum() + d.lambda_feat * feat.sum())
                        logs.setdefault("dec", []).append(dec.mean().detach())
                        logs.setdefault("feat", []).append(feat.mean().detach())
                        for k, v in attention_stats(alpha).items():
                            logs.setdefault(k, []).append(v)
                    logs.setdefault("total", []).append(total.detach())
                    h.backward(total)  # one backward of the whole group's loss
                    for name in names:
                        h = self.optimizer(name)
                        h.step()  # each policy's own clipping and Adam state
                        h.zero_grad()
        out = {k: torch.stack(v).mean() for k, v in logs.items()}
        out["loss"] = out.pop("total") / K  # per policy: RL loss + w·(λ_dec L_dec + λ_feat L_feat)
        out["w"] = torch.tensor(w if distil else 0.0)
        out["js"] = torch.tensor(self.homogenisation())
        out["env_steps"] = b["env_steps"]
        for m, r in enumerate(b["recent_return"]):
            out[f"ret{m}"] = r
        return out
