"""Offline teacher → student policy distillation (Rusu et al., 2016) through the engine.

A trained or scripted teacher labels the states a behaviour policy visits (the teacher itself, or the
student — DAgger-style); the student learns KL(softmax(teacher/τ) ‖ softmax(student)) (``loss: kl``) or the
NLL of the teacher's greedy action (``loss: nll``) on minibatches from a replay memory of labelled states.
:class:`ScriptedCartPole` is a teacher that needs no training (500/500 on CartPole-v1).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdforge.config import Strict, validate
from kdforge.errors import KdforgeError
from kdforge.method import Method
from kdforge.registry import METHODS
from kdforge.rl.base import Episodes, check_eval_seeds, env_shape, evaluate_group
from kdforge.rl.envs import VecEnv, obs_tensor
from kdforge.rl.nets import build_group, encoder_kind


class ScriptedCartPole(nn.Module):
    """A hand-written CartPole controller as logits: push right iff θ + 0.5·θ' + 0.01·x + 0.1·x' > 0."""

    def __init__(self, margin: float = 10.0) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, obs: Tensor) -> Tensor:
        x, xd, th, thd = obs.unbind(-1)
        s = torch.sign(th + 0.5 * thd + 0.01 * x + 0.1 * xd)
        return torch.stack([-s, s], -1) * self.margin


def load_teacher(spec: str, env: str) -> nn.Module:
    """``scripted-cartpole``, or ``RUN[:m]``: member m (default 0) of an RL group's run folder or checkpoint."""
    if spec == "scripted-cartpole":
        if env != "CartPole-v1":
            raise KdforgeError(f"the scripted teacher plays CartPole-v1, not {env!r}")
        return ScriptedCartPole()
    from kdforge.evaluate import load_deployable

    path, _, member = spec.partition(":")
    group, _ = load_deployable(path, "last")
    if getattr(group, "kdforge_spec", {}).get("builder") != "rl":
        raise KdforgeError(f"teacher {path!r} is not an RL run (valid: scripted-cartpole or RUN[:member])")
    if group.kdforge_spec["env"] != env:
        raise KdforgeError(f"teacher {path!r} was trained on {group.kdforge_spec['env']!r}, not {env!r}")
    return group.members[int(member or 0)]


class PolicyDistillConfig(Strict):
    """``method: {name: policy_distill}``."""

    name: str = "policy_distill"
    env: str = "CartPole-v1"
    teacher: str = "scripted-cartpole"
    encoder: str = "auto"
    hidden: int = Field(64, ge=1)
    seed: int = 0
    tau: float = Field(1.0, gt=0)
    loss: Literal["kl", "nll"] = "kl"
    behaviour: Literal["teacher", "student"] = "teacher"
    #: random actions taken by the behaviour policy (covers states the teacher never visits)
    epsilon: float = Field(0.1, ge=0, le=1)
    num_envs: int = Field(4, ge=1)
    collect_steps: int = Field(8, ge=1)
    buffer_size: int = Field(20_000, ge=1)
    batch_size: int = Field(128, ge=1)
    steps_per_epoch: int = Field(100, ge=1)
    eval_episodes: int = Field(5, ge=1)
    eval_seed: int = 100_000  # test episodes (reported); validation episodes (pick best) on val_seed + i
    val_seed: int = 200_000


class LabelledStates:
    """The step source: behaviour steps whose states the teacher labels into a ring memory, then a minibatch."""

    def __init__(self, method: PolicyDistill) -> None:
        c = method.cfg
        self.method, self.cfg = method, c
        self.envs = VecEnv(c.env, c.num_envs, c.seed * 1000)
        self.g = torch.Generator().manual_seed(c.seed)
        shape = tuple(method.student.kdforge_spec["obs_shape"])
        self.obs = torch.zeros((c.buffer_size, *shape))
        self.target = torch.zeros((c.buffer_size, method.student.kdforge_spec["num_actions"]))
        self.pos = self.size = 0
        self.steps_per_epoch = c.steps_per_epoch
        self._cache: tuple[int, dict[str, Tensor]] | None = None
        self.val_set = Episodes("val", c.val_seed, c.eval_episodes)
        self.test_set = Episodes("test", c.eval_seed, c.eval_episodes)

    @torch.no_grad()
    def batch(self, step: int) -> dict[str, Tensor]:
        if self._cache is not None and self._cache[0] == step:
            return self._cache[1]
        c, m = self.cfg, self.method
        for _ in range(c.collect_steps):
            obs = obs_tensor(self.envs.obs, c.env)
            t_logits = m.teacher(obs)
            acting = m.teacher if c.behaviour == "teacher" else m.student.members[0]
            a = (t_logits if acting is m.teacher else acting(obs)).argmax(-1)
            rand = torch.randint(0, t_logits.shape[-1], a.shape, generator=self.g)
            a = torch.where(torch.rand(a.shape, generator=self.g) < c.epsilon, rand, a)
            for i in range(len(obs)):
                self.obs[self.pos], self.target[self.pos] = obs[i], t_logits[i]
                self.pos, self.size = (self.pos + 1) % c.buffer_size, min(self.size + 1, c.buffer_size)
            self.envs.step(a.numpy())
        i = torch.randint(0, self.size, (c.batch_size,), generator=self.g)
        out = {"obs": self.obs[i], "teacher": self.target[i]}
        self._cache = (step, out)
        return out

    def state_dict(self) -> dict[str, Any]:
        n = self.size
        return {"envs": self.envs.state_dict(), "g": self.g.get_state(), "obs": self.obs[:n].clone(),
                "target": self.target[:n].clone(), "pos": self.pos, "size": n}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.envs.load_state_dict(st["envs"])
        self.g.set_state(st["g"])
        n = int(st["size"])
        self.obs[:n], self.target[:n] = st["obs"], st["target"]
        self.pos, self.size, self._cache = int(st["pos"]), n, None


@METHODS.register("policy_distill")
class PolicyDistill(Method):
    """A student policy learns the teacher's action distribution on labelled states."""

    Config = PolicyDistillConfig
    uses_data: ClassVar[bool] = False
    frozen_prefixes = ("teacher.",)
    monitor = ("return", "max")

    def __init__(self, cfg: PolicyDistillConfig) -> None:
        super().__init__()
        check_eval_seeds(cfg)
        self.cfg = cfg
        obs_shape, num_actions = env_shape(cfg.env)
        spec = {"builder": "rl", "algo": "policy", "env": cfg.env, "k": 1, "obs_shape": list(obs_shape),
                "num_actions": num_actions, "encoder": encoder_kind(cfg.env, cfg.encoder), "hidden": cfg.hidden,
                "eval_episodes": cfg.eval_episodes, "eval_seed": cfg.eval_seed, "val_seed": cfg.val_seed}
        self.student = build_group(spec, [cfg.seed])
        self.teacher = load_teacher(cfg.teacher, cfg.env).eval().requires_grad_(False)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], info: Any = None) -> PolicyDistill:
        return cls(validate(PolicyDistillConfig, cfg, prefix="method"))

    def train(self, mode: bool = True) -> PolicyDistill:
        super().train(mode)
        self.teacher.eval()
        return self

    def step_source(self, recipe: Any) -> LabelledStates:
        return LabelledStates(self)

    def training_step(self, b: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        s = self.student.members[0](b["obs"])
        if self.cfg.loss == "nll":
            loss = F.cross_entropy(s, b["teacher"].argmax(-1))
        else:
            lt = F.log_softmax(b["teacher"] / self.cfg.tau, -1)
            loss = (lt.exp() * (lt - F.log_softmax(s, -1))).sum(-1).mean()
        agree = (s.argmax(-1) == b["teacher"].argmax(-1)).float().mean()
        return {"loss": loss, "agreement": agree.detach()}

    def deployable(self) -> nn.Module:
        return self.student

    def evaluate(self, loader: Any, trainer: Any, model: nn.Module) -> dict[str, float]:
        return evaluate_group(model, loader if isinstance(loader, Episodes) else None)


def teacher_return(env: str = "CartPole-v1", episodes: int = 5, seed: int = 100_000) -> float:
    """Mean greedy return of the scripted CartPole teacher (a reference number for the student)."""
    from kdforge.rl.base import play

    return float(np.mean(play(ScriptedCartPole(), env, episodes, seed)))
