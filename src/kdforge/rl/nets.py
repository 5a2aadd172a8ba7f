"""Policy and Q networks (encoder + head) and the group of K of them that is evaluated and exported."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.errors import KdforgeError

ENCODERS = ("auto", "mlp", "minatar", "nature")


def layer_init(layer: nn.Module, std: float = math.sqrt(2), bias: float = 0.0) -> nn.Module:
    """Orthogonal weights with gain ``std`` and constant bias (CleanRL's initialisation)."""
    nn.init.orthogonal_(layer.weight, std)
    if layer.bias is not None:
        nn.init.constant_(layer.bias, bias)
    return layer


def encoder_kind(env_id: str, kind: str) -> str:
    """The encoder an environment gets with ``auto``: MLP for vectors, small CNN for MinAtar, Nature CNN for ALE."""
    if kind not in ENCODERS:
        raise KdforgeError(f"unknown encoder {kind!r} (valid: {', '.join(ENCODERS)})")
    if kind != "auto":
        return kind
    return "minatar" if env_id.startswith("MinAtar/") else "nature" if env_id.startswith("ALE/") else "mlp"


def make_encoder(kind: str, obs_shape: tuple[int, ...], hidden: int) -> tuple[nn.Module, int]:
    """(encoder, feature size D): mlp 2 x ``hidden`` tanh; minatar conv 16@3x3 → FC 128; nature: Nature CNN → 512."""
    if kind == "mlp":
        d = int(math.prod(obs_shape))
        return nn.Sequential(nn.Flatten(), layer_init(nn.Linear(d, hidden)), nn.Tanh(),
                             layer_init(nn.Linear(hidden, hidden)), nn.Tanh()), hidden
    if kind == "minatar":
        c, h, w = obs_shape
        return nn.Sequential(layer_init(nn.Conv2d(c, 16, 3)), nn.ReLU(), nn.Flatten(),
                             layer_init(nn.Linear(16 * (h - 2) * (w - 2), 128)), nn.ReLU()), 128
    if kind == "nature":
        c = obs_shape[0]
        return nn.Sequential(_Scale(1 / 255), layer_init(nn.Conv2d(c, 32, 8, stride=4)), nn.ReLU(),
                             layer_init(nn.Conv2d(32, 64, 4, stride=2)), nn.ReLU(),
                             layer_init(nn.Conv2d(64, 64, 3)), nn.ReLU(), nn.Flatten(),
                             layer_init(nn.Linear(64 * 7 * 7, 512)), nn.ReLU()), 512
    raise KdforgeError(f"unknown encoder {kind!r} (valid: mlp, minatar, nature)")


class _Scale(nn.Module):
    def __init__(self, s: float) -> None:
        super().__init__()
        self.s = s

    def forward(self, x: Tensor) -> Tensor:
        return x * self.s


class ActorCritic(nn.Module):
    """PPO's network: features h = E(s), action logits O(s) = W_a h + b_a and a value V(s).

    The value reads the same h for CNN encoders (CleanRL's Atari PPO); with the MLP encoder it has
    its own 2 x ``hidden`` tanh trunk, as in CleanRL's classic-control PPO.
    """

    def __init__(self, kind: str, obs_shape: tuple[int, ...], num_actions: int, hidden: int = 64) -> None:
        super().__init__()
        self.encoder, self.dim = make_encoder(kind, obs_shape, hidden)
        self.actor = layer_init(nn.Linear(self.dim, num_actions), std=0.01)
        self.critic_encoder = make_encoder(kind, obs_shape, hidden)[0] if kind == "mlp" else None
        self.critic = layer_init(nn.Linear(self.dim, 1), std=1.0)

    def features(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def value(self, x: Tensor, h: Tensor) -> Tensor:
        """V(s) [B] from the state ``x`` and its features ``h``."""
        return self.critic(self.critic_encoder(x) if self.critic_encoder is not None else h).flatten()

    def forward(self, x: Tensor) -> Tensor:
        return self.actor(self.encoder(x))


class QNetwork(nn.Module):
    """DQN's network: features h = E(s), Q-values O(s) = W h + b."""

    def __init__(self, kind: str, obs_shape: tuple[int, ...], num_actions: int, hidden: int = 64) -> None:
        super().__init__()
        self.encoder, self.dim = make_encoder(kind, obs_shape, hidden)
        self.head = layer_init(nn.Linear(self.dim, num_actions), std=1.0)

    def features(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


class PolicyGroup(nn.Module):
    """K policies (independent weights); ``forward(x)`` gives every member's action outputs, [K, B, A]."""

    def __init__(self, members: list[nn.Module], spec: dict[str, Any]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.kdforge_spec = dict(spec)

    def __len__(self) -> int:
        return len(self.members)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([m(x) for m in self.members])


def build_group(spec: dict[str, Any], seeds: list[int] | None = None) -> PolicyGroup:
    """The group a spec describes (``builder: rl``); member m is initialised from ``seeds[m]`` when given."""
    cls = {"ppo": ActorCritic, "dqn": QNetwork, "policy": QNetwork}[spec["algo"]]
    members = []
    for m in range(int(spec["k"])):
        with torch.random.fork_rng(devices=[]):
            if seeds is not None:
                torch.manual_seed(seeds[m])
            members.append(cls(spec["encoder"], tuple(spec["obs_shape"]), int(spec["num_actions"]),
                               int(spec["hidden"])))
    return PolicyGroup(members, spec)
