"""Runs the FSDP test cases in one process of a launch, or as the 1-process reference.

``python tests/fsdp_cases.py OUT [--reference] CASE...``: each case trains into ``OUT/CASE`` through the
engine (the recipe path ``kdforge train`` takes, or a Trainer over a step source for the language model).
Under a launch the cases use ``train.distributed: fsdp``; ``--reference`` runs them unsharded in one
process with the launch's global batch (2 processes x 32 = 64 samples per step).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

WORLD = 2  # the launch the reference stands for

BASE: dict[str, Any] = {
    "seed": 0, "data": {"name": "digits", "batch_size": 32, "augment": False, "limit_train": 256,
                        "val_fraction": 0.125},
    "optim": {"lr": 0.1}, "train": {"epochs": 2, "progress": "never", "threads": 1},
}
TEACHER = {"model": "mlp", "weights": "random"}
STUDENT = {"model": "mlp", "kwargs": {"hidden": [32]}}
KD = {"name": "distill", "teacher": TEACHER, "student": STUDENT,
      "terms": [{"loss": "ce", "weight": 1.0}, {"loss": "kd", "weight": 0.9, "T": 4}]}
ADV = {"name": "adversarial", "teacher": TEACHER, "student": STUDENT,
       "input": "logits", "adv_weight": 0.5, "lr_d": 1e-3}
# size-based wrap: the MLPs' linear layers become FSDP units of their own (blocks, then the root)
FSDP = {"auto_wrap": "size", "min_params": 500}


def recipe(case: str, reference: bool) -> dict[str, Any]:
    """The recipe dict of an image case, sharded or as the 1-process reference."""
    r = copy.deepcopy(BASE)
    r["name"] = case
    r["method"] = copy.deepcopy(ADV if case == "adv" else KD)  # kd, kd_sharded, kd_hybrid: KD
    if case == "kd_sharded":  # also the uninterrupted run of the kill-and-resume test; deploys an EMA
        r["train"]["save_every_steps"] = 1
        r["train"]["ema"] = {"decay": 0.9, "warmup": True}
    if reference:
        r["data"]["batch_size"] *= WORLD
    else:
        r["train"]["distributed"] = "fsdp"
        r["train"]["fsdp"] = {**FSDP, "shard_teacher": case == "kd_sharded"}
        if case == "kd_hybrid":  # nodes x processes per node: replicated across nodes, sharded inside one
            r["train"]["fsdp"]["sharding"] = "hybrid"
    return r


class Slices:
    """A fixed global batch of token rows per step; each rank trains on its contiguous slice."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows
        self.steps_per_epoch = rows.shape[0]

    def batch(self, step: int) -> torch.Tensor:
        """Rows of step ``step`` for this rank."""
        g = self.rows[step % self.steps_per_epoch]
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        n = g.shape[0] // world
        return g[rank * n:(rank + 1) * n]


def tiny_llama(layers: int, seed: int) -> torch.nn.Module:
    """A random LlamaForCausalLM small enough for a test (vocabulary 64, width 32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).float()


LM_ROWS = (4, 4, 16)  # steps x global rows (2 a rank) x tokens


def _lm_train(reference: bool) -> dict[str, Any]:
    """The engine settings of the language-model cases: 4 steps, FSDP with the teacher sharded unless a reference."""
    train: dict[str, Any] = {"max_steps": 4, "grad_clip": 1.0, "threads": 1, "save_checkpoints": True}
    if not reference:
        train.update(distributed="fsdp", fsdp={"shard_teacher": True})
    return train


def _damped(recipe: Any) -> Any:
    """AdamW with eps 1e-6: a gradient entry near 0 (≈ eps) turns its float-order noise into an lr-sized step."""
    return recipe.model_copy(update={"optim": recipe.optim.model_copy(update={"eps": 1e-6})})


def run_llama(out: Path, reference: bool) -> None:
    """KD of a 2-layer student from a 3-layer teacher through the KD heal's method on a Trainer (teacher sharded)."""
    from kdforge.config import Recipe
    from kdforge.engine.trainer import Trainer
    from kdforge.llm.heal import LogitDistill
    teacher, student = tiny_llama(3, 1), tiny_llama(2, 2)
    for p in teacher.parameters():
        p.requires_grad_(False)
    rows = torch.randint(0, 64, LM_ROWS, generator=torch.Generator().manual_seed(3))
    r = Recipe.from_dict({"name": "llama", "seed": 0, "data": {"batch_size": 2},
                          "method": {"name": "llm-kd"}, "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0},
                          "sched": {"name": "constant"}, "train": {**_lm_train(reference), "progress": "never"}})
    Trainer(LogitDistill(student, teacher, T=2.0), None, r, run_dir=out, source=Slices(rows)).fit()


def run_lm_distill(case: str, out: Path, reference: bool) -> None:
    """``distill_lm`` with chunked token losses (chunks of 8 of 30 positions a rank, recomputed in backward).

    ``lm_fkl``: forward KL at T=2 plus the data's cross-entropy; ``lm_jsd``: generalized JSD (beta 0.5).
    """
    from kdforge.llm.distill import LMDistill, distill_lm, distill_recipe
    from kdforge.losses import build_loss

    teacher, student = tiny_llama(3, 1), tiny_llama(2, 2)
    terms = [(build_loss("lm_fkl", T=2.0), 1.0), (build_loss("lm_ce"), 0.5)] if case == "lm_fkl" else \
        [(build_loss("lm_jsd", beta=0.5), 1.0)]
    rows = torch.randint(0, 64, LM_ROWS, generator=torch.Generator().manual_seed(4))
    distill_lm(LMDistill(student, teacher, terms, chunk=8), Slices(rows),
               _damped(distill_recipe(steps=4, lr=1e-3, batch_size=2, **_lm_train(reference))), run_dir=out)


def _on_policy(student: Any) -> Any:
    """The on-policy case's source: 12 examples of 5 prompt and 6 answer tokens, 2 a step, λ 0.5, seed 1."""
    from kdforge.llm.distill import OnPolicy
    from kdforge.llm.text import Example

    ids = torch.randint(0, 64, (12, 11), generator=torch.Generator().manual_seed(6)).tolist()
    examples = [Example(row, [False] * 5 + [True] * 6) for row in ids]
    return OnPolicy(examples, student, batch_size=2, seq_len=16, lam=0.5, max_new_tokens=6, seed=1)


def on_policy_steps() -> list[bool]:
    """Which of the on-policy case's 4 steps train on the student's samples."""
    return [_on_policy(None).plan(step)[1] for step in range(4)]


def run_on_policy(out: Path, reference: bool) -> None:
    """GKD's on-policy mixture (λ 0.5) with reverse KL: the sharded student samples its answers with ``generate``.

    Prompts of 5 tokens, answers (the data's or 6 sampled ones) of 6: every rank trains as many positions.
    The reference trains one process on every rank's batch, each built as that rank builds it.
    """
    from unittest import mock

    from kdforge.llm.distill import LMDistill, distill_lm, distill_recipe
    from kdforge.losses import build_loss

    teacher, student = tiny_llama(3, 1), tiny_llama(2, 2)
    source = _on_policy(student)
    if reference:
        one_rank = source.batch

        def every_rank(step: int) -> dict[str, torch.Tensor]:
            parts = []
            for rank in range(WORLD):
                with mock.patch("torch.distributed.is_initialized", return_value=True), \
                        mock.patch("torch.distributed.get_rank", return_value=rank), \
                        mock.patch("torch.distributed.get_world_size", return_value=1):
                    parts.append(one_rank(step))
            return {k: torch.cat([p[k] for p in parts]) if parts[0][k].ndim else parts[0][k] for k in parts[0]}

        source.batch = every_rank  # type: ignore[method-assign]
    method = LMDistill(student, teacher, [(build_loss("lm_rkl"), 1.0)], chunk=8)
    distill_lm(method, source, _damped(distill_recipe(steps=4, lr=1e-3, batch_size=2, **_lm_train(reference))),
               run_dir=out)


def run_heal(out: Path, reference: bool) -> None:
    """``heal_kd`` (embeddings frozen, its own rank-seeded calibration rows, teacher sharded).

    The reference trains one process on the rows both ranks draw at every step.
    """
    from unittest import mock

    from kdforge.llm import heal

    teacher, student = tiny_llama(3, 1), tiny_llama(2, 2)
    blocks = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(5))
    recipe = _damped(heal.heal_recipe(steps=4, lr=1e-3, batch_size=2, **_lm_train(reference)))
    if not reference:
        heal.heal_kd(student, teacher, blocks, T=2.0, ce_weight=0.5, recipe=recipe, run_dir=out)
        return

    class EveryRank(heal.CalibrationBlocks):
        """The rows of every rank of the launch, in rank order."""

        def batch(self, step: int) -> torch.Tensor:
            picked = []
            for rank in range(WORLD):
                with mock.patch("torch.distributed.is_initialized", return_value=True), \
                        mock.patch("torch.distributed.get_rank", return_value=rank):
                    picked.append(self.blocks[self.rows(step)])
            return torch.cat(picked)

    with mock.patch.object(heal, "CalibrationBlocks", EveryRank):
        heal.heal_kd(student, teacher, blocks, T=2.0, ce_weight=0.5, recipe=recipe, run_dir=out)


def main(argv: list[str]) -> None:
    from kdforge.config import Recipe
    from kdforge.run import train

    out, reference = Path(argv[0]), "--reference" in argv
    for case in [a for a in argv[1:] if not a.startswith("--")]:
        if case == "llama":
            run_llama(out / case, reference)
        elif case in ("lm_fkl", "lm_jsd"):
            run_lm_distill(case, out / case, reference)
        elif case == "heal":
            run_heal(out / case, reference)
        elif case == "lm_on_policy":
            run_on_policy(out / case, reference)
        else:
            train(Recipe.from_dict(recipe(case, reference)), out / case)


if __name__ == "__main__":
    from kdforge.engine import launch

    launch.join()
    main(sys.argv[1:])
    launch.leave()  # wait for every rank before tearing the group down (a rank exiting early aborts its peer)
