"""eTag's defaults (the spec's generator lr) and ablation switches: each switch removes its term."""

from __future__ import annotations

import torch

from kdforge.continual.etag import ETag, GeneratorStep, SolverStep
from kdforge.continual.learner import TaskInfo, TrainCfg, make_backbone
from kdforge.continual.protocol import CILSplit

SPLIT = CILSplit(10, 2, 2, 4, seed=0)


def _etag(**kw: object) -> ETag:
    torch.manual_seed(0)
    net, dim = make_backbone("cnn_small", 1, 8, width=4)
    lrn = ETag(net, dim, SPLIT, TrainCfg(epochs=1), gen_hidden=16, gen_latent=4, aux_width=8, **kw)  # type: ignore[arg-type]
    lrn.setup(torch.rand(2, 1, 8, 8))
    return lrn


def _stages(lrn: ETag, t: int) -> list[object]:
    return [s.method for s in lrn.stages(TaskInfo(t, SPLIT, None))]  # type: ignore[arg-type]


def _solver_terms(lrn: ETag, t: int) -> set[str]:
    step = _stages(lrn, t)[0]
    assert isinstance(step, SolverStep)
    step.train()
    with torch.no_grad():
        out = step.training_step((torch.rand(4, 1, 8, 8), torch.tensor([4, 5, 4, 5])), 0)
    return set(out) - {"loss"}


def test_defaults_follow_the_spec() -> None:
    lrn = _etag()
    assert lrn.gen_lr == 1e-4  # the appendix's generator lr (the code's default is 1e-3)
    stages = list(lrn.stages(TaskInfo(0, SPLIT, None)))  # type: ignore[arg-type]
    assert [type(s.method) for s in stages] == [SolverStep, GeneratorStep] and stages[1].lr == 1e-4
    assert _solver_terms(lrn, 2) == {"ce_cur", "ce_old", "ed", "e"}


def test_embedding_kd_switch_removes_the_heads_distillation() -> None:
    assert _solver_terms(_etag(embedding_kd=False), 2) == {"ce_cur", "ce_old", "e"}


def test_replay_switch_removes_generated_features_and_the_generator_stage() -> None:
    lrn = _etag(replay=False)
    assert _solver_terms(lrn, 2) == {"ce_cur", "ed", "e"}
    assert [type(m) for m in _stages(lrn, 1)] == [SolverStep]


def test_aux_heads_switch_removes_rotation_ss_and_embedding_kd() -> None:
    lrn = _etag(aux_heads=False)
    assert len(lrn.heads) == 0
    assert _solver_terms(lrn, 2) == {"ce_cur", "ce_old", "e"}
    step = _stages(lrn, 0)[0]
    out = step.training_step((torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])), 0)  # type: ignore[attr-defined]
    assert set(out) == {"ce", "loss"}  # task 0: no SS term without heads
    assert set(_solver_terms(_etag(), 0)) == {"ce", "ss"}


def test_task_oriented_switch_removes_the_generators_ce_terms() -> None:
    for flag, expected in ((True, {"rec", "kl", "tc", "to", "gd"}), (False, {"rec", "kl", "gd"})):
        gen_step = _stages(_etag(task_oriented=flag), 2)[1]
        assert isinstance(gen_step, GeneratorStep)
        gen_step.train()
        out = gen_step.training_step((torch.rand(4, 1, 8, 8), torch.tensor([4, 5, 4, 5])), 0)
        assert set(out) - {"loss"} == expected
