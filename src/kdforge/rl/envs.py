"""Environments: gymnasium classic control, MinAtar and ALE Atari, a synchronous vector of them, snapshots.

gymnasium, MinAtar (GPL-3.0) and ale-py (GPL-2.0) are optional (``pip install 'kdforge[rl]'``) and are
imported only when an environment is made. :class:`VecEnv` steps its environments one after the other and
resets a finished one in the same step (its first observation replaces the last one, as CleanRL's PPO
expects); its :meth:`~VecEnv.state_dict` captures every environment's dynamic state and random generator,
so a run resumed at a rollout boundary continues the very same episodes.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdforge.errors import KdforgeError

MINATAR_GAMES = ("Breakout", "SpaceInvaders", "Asterix", "Freeway", "Seaquest")
CLASSIC = ("CartPole-v1", "Acrobot-v1")


def _gym() -> Any:
    try:
        import gymnasium
    except ImportError:
        raise KdforgeError("RL environments need gymnasium: pip install 'kdforge[rl]' "
                           "(gymnasium, minatar, ale-py)") from None
    return gymnasium


def make_env(env_id: str, seed: int, train: bool = True) -> Any:
    """A seeded gymnasium environment: ``CartPole-v1``, ``Acrobot-v1``, ``MinAtar/<Game>-v1``, ``ALE/<Game>-v5``.

    ALE games get the standard preprocessing (no-op reset ≤ 30, frame-skip 4 with max-pool, 84x84 grey,
    FIRE on reset where needed, 4 stacked frames; with ``train``: episodic life that does not reset the
    game, and rewards clipped to their sign): see :mod:`kdforge.rl.atari`.
    """
    gym = _gym()
    if env_id.startswith("MinAtar/"):
        try:
            import minatar.gym as mg
        except ImportError:
            raise KdforgeError(f"{env_id!r} needs MinAtar (GPL-3.0, an optional extra): pip install minatar") from None
        if env_id not in gym.registry:
            mg.register_envs()
        game = env_id.split("/", 1)[1].split("-", 1)[0]
        if game not in MINATAR_GAMES:
            raise KdforgeError(f"unknown MinAtar game {game!r} (valid: {', '.join(MINATAR_GAMES)})")
        env = gym.make(env_id)
    elif env_id.startswith("ALE/"):
        try:
            import ale_py
        except ImportError:
            raise KdforgeError(f"{env_id!r} needs ale-py (GPL-2.0, an optional extra): pip install ale-py "
                               "opencv-python-headless") from None
        gym.register_envs(ale_py)
        from kdforge.rl.atari import make_atari

        env = make_atari(env_id, train)
    else:
        if env_id not in gym.registry:
            raise KdforgeError(f"unknown environment {env_id!r} (valid: {', '.join(CLASSIC)}, "
                               f"MinAtar/<{'|'.join(MINATAR_GAMES)}>-v1, ALE/<Game>-v5)")
        env = gym.make(env_id)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    return env


def obs_tensor(obs: Any, env_id: str) -> Tensor:
    """A batch of observations as a float tensor in the layout the networks take (MinAtar: channels first)."""
    x = torch.as_tensor(np.asarray(obs), dtype=torch.float32)
    if env_id.startswith("MinAtar/"):
        x = x.permute(0, 3, 1, 2)
    return x


class VecEnv:
    """``n`` copies of one environment stepped in turn; a finished one is reset in the same step.

    ``finished`` collects the (return, length in agent steps) of finished episodes: unclipped whole
    games on ALE (every life, from ``info['game_return']``; a lost life ends only the learner's episode),
    the plain episode elsewhere. ``final_obs`` holds each environment's last observation before any
    reset of the latest step (the true next observation a replay buffer stores).
    """

    def __init__(self, env_id: str, n: int, seed: int) -> None:
        seed = seed % 2**31  # MinAtar's RandomState takes seeds below 2**32
        self.env_id, self.n, self.seed = env_id, n, seed
        self.atari = env_id.startswith("ALE/")
        self.envs = [make_env(env_id, seed + i) for i in range(n)]
        self.num_actions = int(self.envs[0].action_space.n)
        self._obs = np.stack([e.reset(seed=seed + i)[0] for i, e in enumerate(self.envs)])
        self.final_obs = self._obs
        self._ret = np.zeros(n)
        self._len = np.zeros(n, dtype=np.int64)
        self.finished: list[tuple[float, int]] = []

    @property
    def obs(self) -> np.ndarray:
        """The current observation of every environment."""
        return self._obs

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Step every environment: (next observations after any reset, rewards, terminated, truncated)."""
        obs, final = [], []
        rew = np.zeros(self.n, dtype=np.float32)
        term_a, trunc_a = np.zeros(self.n, dtype=np.float32), np.zeros(self.n, dtype=np.float32)
        for i, e in enumerate(self.envs):
            o, r, term, trunc, info = e.step(int(actions[i]))
            rew[i], term_a[i], trunc_a[i] = r, term, trunc
            self._ret[i] += r
            self._len[i] += 1
            final.append(o)
            if term or trunc:
                o, reset_info = e.reset()
                info = {**reset_info, **info}
                if not self.atari:
                    self._end(i, float(self._ret[i]))
            if self.atari and "game_return" in info:
                self._end(i, float(info["game_return"]))
            obs.append(o)
        self._obs, self.final_obs = np.stack(obs), np.stack(final)
        return self._obs, rew, term_a, trunc_a

    def _end(self, i: int, ret: float) -> None:
        self.finished.append((ret, int(self._len[i])))
        self._ret[i], self._len[i] = 0.0, 0

    def pop_finished(self) -> list[tuple[float, int]]:
        """The (return, length) of the episodes finished since the last call."""
        out, self.finished = self.finished, []
        return out

    def state_dict(self) -> dict[str, Any]:
        """Every environment's dynamic state and generator, the current observations and running returns."""
        return {"envs": [snapshot(e) for e in self.envs], "obs": torch.from_numpy(np.array(self._obs)),
                "ret": torch.from_numpy(self._ret.copy()), "len": torch.from_numpy(self._len.copy()),
                "finished": [list(f) for f in self.finished]}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` captured."""
        for e, s in zip(self.envs, st["envs"], strict=True):
            restore(e, s)
        self._obs = st["obs"].numpy().copy()
        self._ret, self._len = st["ret"].numpy().copy(), st["len"].numpy().copy()
        self.finished = [(float(r), int(n)) for r, n in st["finished"]]


# -- snapshots of an environment's state, in plain tensors and numbers (loadable with weights_only) ------------
_SIMPLE = (type(None), bool, int, float, str)


def _pack(v: Any) -> Any:
    if isinstance(v, _SIMPLE):
        return v
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return {"__nd__": torch.from_numpy(np.array(v)), "dtype": str(v.dtype)}
    if isinstance(v, np.random.Generator):
        return {"__gen__": json.dumps(v.bit_generator.state)}
    if isinstance(v, np.random.RandomState):
        kind, keys, pos, has_gauss, gauss = v.get_state()
        return {"__rs__": [str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if isinstance(v, list | tuple):
        return {"__seq__": [_pack(x) for x in v], "tuple": isinstance(v, tuple)}
    if type(v).__module__.startswith("minatar"):  # a game object: its attributes are its state
        return {"__obj__": _pack_attrs(v)}
    raise TypeError


def _pack_attrs(obj: Any) -> dict[str, Any]:
    out = {}
    wrapper = not type(obj).__module__.startswith("minatar") and hasattr(obj, "unwrapped") and hasattr(obj, "env")
    for k, v in vars(obj).items():
        if (k == "env" and wrapper) or k in ("_saved_kwargs", "spec", "_previous_data"):
            continue
        try:
            out[k] = _pack(v)
        except TypeError:
            continue  # spaces, renderers, constants: not dynamic state
    return out


def _unpack(cur: Any, v: Any) -> Any:
    if not isinstance(v, dict):
        return v
    if "__nd__" in v:
        return v["__nd__"].numpy().astype(v["dtype"]).copy()
    if "__gen__" in v:
        cur.bit_generator.state = json.loads(v["__gen__"])
        return cur
    if "__rs__" in v:
        kind, keys, pos, has_gauss, gauss = v["__rs__"]
        cur.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        return cur
    if "__seq__" in v:
        items = [_unpack(None, x) for x in v["__seq__"]]
        return tuple(items) if v["tuple"] else items
    if "__obj__" in v:
        _restore_attrs(cur, v["__obj__"])
        return cur
    return v


def _restore_attrs(obj: Any, st: dict[str, Any]) -> None:
    for k, v in st.items():
        setattr(obj, k, _unpack(getattr(obj, k, None), v))


def snapshot(env: Any) -> list[dict[str, Any]]:
    """The dynamic state of every wrapper layer and the base environment (numbers, arrays, generators)."""
    layers, x = [], env
    while True:
        layers.append(_pack_attrs(x))
        if not hasattr(x, "env"):
            return layers
        x = x.env


def restore(env: Any, layers: list[dict[str, Any]]) -> None:
    """Put an environment back in the state :func:`snapshot` captured."""
    x = env
    for st in layers:
        _restore_attrs(x, st)
        x = getattr(x, "env", None)
