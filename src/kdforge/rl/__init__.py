"""Reinforcement learning: PPO and DQN groups with online policy distillation (OPD-DA), offline policy distillation.

gymnasium, MinAtar and ale-py are optional (``pip install 'kdforge[rl]'``); importing this package needs none.
"""

from kdforge.rl import distill, dqn, ppo  # noqa: F401 - registers the methods
from kdforge.rl.group import DecisionAttention, DistillConfig
from kdforge.rl.ppo import PPOConfig, PPOGroup

__all__ = ["DecisionAttention", "DistillConfig", "PPOConfig", "PPOGroup"]
