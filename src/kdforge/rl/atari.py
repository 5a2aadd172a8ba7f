"""The ALE Atari wrappers: whole-game returns, an episodic life that does not reset the game, FIRE on reset.

Imported only when an ``ALE/`` environment is made (gymnasium and ale-py are optional). The order follows
CleanRL's ``ppo_atari.py`` / ``dqn_atari.py``: the raw game is measured first (:class:`GameReturn`, so the
reported returns are unclipped and span every life), then the standard preprocessing, then for training
:class:`EpisodicLife` and reward clipping; :class:`FireReset` for games that wait for FIRE.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

NOOP, FIRE = 0, 1


class GameReturn(gym.Wrapper):
    """Sums the raw reward of the whole game (every life); at its end puts the sum into ``info['game_return']``."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.game_return = 0.0

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        self.game_return = 0.0
        return self.env.reset(**kwargs)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, r, term, trunc, info = self.env.step(action)
        self.game_return += float(r)
        if term or trunc:
            info = {**info, "game_return": self.game_return}
        return obs, r, term, trunc, info


class EpisodicLife(gym.Wrapper):
    """A lost life ends the learner's episode (``terminated``) but not the game: the next reset plays on.

    Only a real game over (or a time limit) resets the game; after a lost life :meth:`reset` takes one
    no-op step instead, as the standard Atari wrappers do.
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.lives, self.game_over = 0, True

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, r, term, trunc, info = self.env.step(action)
        self.game_over = term or trunc
        lives = self.env.unwrapped.ale.lives()
        if 0 < lives < self.lives:
            term = True
        self.lives = lives
        return obs, r, term, trunc, info

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        if self.game_over:
            obs, info = self.env.reset(**kwargs)
        else:
            obs, _, term, trunc, info = self.env.step(NOOP)
            if term or trunc:  # the game ended on that step: report it, then start a new one
                ended = {k: v for k, v in info.items() if k == "game_return"}
                obs, info = self.env.reset(**kwargs)
                info = {**info, **ended}
        self.lives, self.game_over = self.env.unwrapped.ale.lives(), False
        return obs, info


class FireReset(gym.Wrapper):
    """Presses FIRE (then the next action) after every reset, for games that wait for it (Breakout, ...)."""

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        for a in (FIRE, 2):
            obs, _, term, trunc, _ = self.env.step(a)
            if term or trunc:
                obs, info = self.env.reset(**kwargs)
        return obs, info


def needs_fire(env: gym.Env) -> bool:
    """Whether a game has FIRE as action 1 (CleanRL applies :class:`FireReset` to those)."""
    meanings = env.unwrapped.get_action_meanings()
    return len(meanings) >= 3 and meanings[FIRE] == "FIRE"


def make_atari(env_id: str, train: bool) -> gym.Env:
    """An ALE game with the standard preprocessing: no-op reset ≤ 30, frame-skip 4 with max-pool, 84x84 grey,
    FIRE on reset where the game needs it, 4 stacked frames; with ``train`` also episodic life and rewards
    clipped to their sign. ``info['game_return']`` carries the raw return of every finished game."""
    from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation, TransformReward

    env: gym.Env = gym.make(env_id, frameskip=1, repeat_action_probability=0.25, full_action_space=False)
    env = GameReturn(env)
    env = AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84, terminal_on_life_loss=False,
                             grayscale_obs=True, scale_obs=False)
    if train:
        env = EpisodicLife(env)
    if needs_fire(env):
        env = FireReset(env)
    if train:
        env = TransformReward(env, lambda r: float(np.sign(r)))
    return FrameStackObservation(env, 4)
