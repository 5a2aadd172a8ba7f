"""A tiny recipe for every registered method (digits, or Fashion pairs for CLIP), for whole-registry tests.

A method registered without an entry here fails :func:`tiny_recipe`: add one when registering a method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kdforge as kd
from kdforge.clip.model import build_clip
from kdforge.registry import METHODS

S: dict[str, Any] = {"model": "cnn_tiny"}
T: dict[str, Any] = {"model": "cnn_small", "kwargs": {"width": 4}}
TEXT = {"model": "small", "kwargs": {"width": 16, "depth": 1, "heads": 2, "max_len": 12}}
CLIP_T = {"embed_dim": 16, "image": {"model": "cnn_small", "kwargs": {"width": 4}}, "text": TEXT}
CLIP_S = {"embed_dim": 8, "image": {"model": "vit", "kwargs": {"patch": 7, "width": 16, "depth": 1, "heads": 2}},
          "text": TEXT}


def tiny_methods(clip_teacher: Path) -> dict[str, dict[str, Any]]:
    """The ``method`` section of each registered method's tiny recipe (``clip_teacher``: CLIP weights)."""
    crd = {"loss": "crd", "student_tap": "pool", "memory": "keyed", "feat_dim": 8, "num_negatives": 16}
    return {
        "supervised": {"model": S},
        "label_smoothing": {"model": S},
        "mixup": {"model": S},
        "cskd": {"model": S},
        "tfkd": {"model": S},
        "pskd": {"model": S},
        "byot": {"model": S},
        "mixskd": {"model": S, "disc_hidden": 8},
        "distill": {"teacher": T, "student": S, "terms": [{"loss": "ce"}, {"loss": "kd", "weight": 0.5}, crd]},
        "at": {"teacher": T, "student": S, "beta": 1},
        "cross_modal": {"teacher": T, "student": S, "student_view": {"kind": "lowres", "factor": 2}},
        "dml": {"peers": [S, {"model": "mlp", "kwargs": {"hidden": [16]}}], "deploy": 1},
        "kdcl": {"peers": [S, S], "view_shift": 1},
        "multi_teacher": {"teachers": [T, {"model": "mlp", "kwargs": {"hidden": [16]}}], "student": S},
        "aekd": {"teachers": [T, T], "student": S},
        "adversarial": {"teacher": T, "student": S, "adv_weight": 0.1, "hidden": 8},
        "dafl": {"teacher": T, "student": S, "batch_size": 16, "gen_width": 8, "latent_dim": 8, "lr_g": 0.02},
        "deepinversion": {"teacher": T, "student": S, "batch_size": 16, "synth_iters": 2, "synth_every": 2,
                          "pool_batches": 2},
        "clip": {"model": CLIP_T},
        "clip_kd": {"teacher": {**CLIP_T, "checkpoint": str(clip_teacher)}, "student": CLIP_S,
                    "weights": {"task": 1.0, "crd": 1.0, "fd": 100.0, "icl": 1.0}},
        "diffusion": {"model": {"model": "diffusion_unet", "kwargs": {"ch": 8, "grid": 8}},
                      "rounds": [{"kind": "rdd", "epochs": 1}], "rdd": {"queue": 64, "contrast": 16, "per_step": 8},
                      "features": {"model": "diffusion_featnet", "kwargs": {"width": 8},
                                   "checkpoint": str(featnet_weights(clip_teacher.parent / "featnet.safetensors"))}},
        "pdm": {"ids_per_batch": 4, "num_pos": 4, "model": {"width": 4, "prototypes": 2}},
        "audio_stage": {"model": S, "loss": "ls_focal", "epsilon": 0.06, "gamma": 0.3},
        # RL methods make their own batches (the data section is ignored); 2 engine steps per epoch
        "ppo": {"env": "CartPole-v1", "num_policies": 2, "num_envs": 2, "num_steps": 8, "update_epochs": 1,
                "num_minibatches": 2, "probe_states": 8, "eval_episodes": 1, "steps_per_epoch": 2},
        "dqn": {"env": "CartPole-v1", "num_policies": 2, "buffer_size": 64, "batch_size": 8, "learning_starts": 0,
                "train_frequency": 2, "target_network_frequency": 2, "probe_states": 8, "eval_episodes": 1,
                "steps_per_epoch": 2},
        "policy_distill": {"num_envs": 2, "collect_steps": 2, "batch_size": 8, "buffer_size": 64, "eval_episodes": 1,
                           "steps_per_epoch": 2},
    }


def featnet_weights(path: Path) -> Path:
    """An (untrained) feature classifier for ``diffusion``'s tiny RDD round."""
    if not path.is_file():
        from kdforge.diffusion.features import FeatureNet

        kd.save_weights(FeatureNet(1, 10, 8, 8), path)
    return path


def clip_teacher_weights(path: Path) -> Path:
    """An (untrained) CLIP teacher checkpoint for ``clip_kd``'s tiny recipe."""
    if not path.is_file():
        kd.save_weights(build_clip(CLIP_T, 1, 28), path)
    return path


def tiny_recipe(name: str, clip_teacher: Path, steps: int = 4, epochs: int = 1, val: bool = True,
                **train: Any) -> kd.Recipe:
    """A recipe of ``epochs`` epochs of ``steps`` batches of 16 for the method ``name``."""
    methods = tiny_methods(clip_teacher)
    if name not in methods:
        raise AssertionError(f"registered method {name!r} has no tiny recipe in tests/tiny_methods.py")
    clip = name.startswith("clip")
    data = {"name": "clip_fashion" if clip else "digits", "batch_size": 16, "limit_train": 16 * steps,
            "val_fraction": 0.1 if val else 0.0, "augment": False, "eval_batch_size": 512}
    if name == "pdm":  # two-modality ReID pairs: the synthetic pedestrians at 32×16
        data.update(name="reid_synthetic", resize=32)
    return kd.Recipe.from_dict({
        "name": f"tiny-{name}", "seed": 0, "data": data, "method": {"name": name, **methods[name]},
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01} if clip else {"lr": 0.05},
        "sched": {"name": "constant"},
        "train": {"epochs": epochs, "progress": "silent", "threads": 1, **train}})


def registered() -> list[str]:
    """Every registered method, sorted."""
    return sorted(METHODS.names())

