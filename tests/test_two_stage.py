"""FT and AB in two stages (the papers' default) via kdforge.run.fit: what each stage trains, resume across them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kdforge as kd
from conftest import digits_recipe
from kdforge.data import load_data
from kdforge.engine.checkpoint import load_weights
from kdforge.errors import KdforgeError
from kdforge.losses.feature import ABLoss, FTLoss
from kdforge.method import DataInfo, build_method
from kdforge.run import stage_recipe

STAGES = ["stage1", "stage2", "stage3"]


def _recipe(loss: str, taps: str | list[str], epochs: int = 2, **kw: object) -> kd.Recipe:
    method = {"name": "distill", "teacher": {"model": "cnn_small", "kwargs": {"width": 8}},
              "student": {"model": "cnn_small", "kwargs": {"width": 4}},
              "terms": [{"loss": "ce"}, {"loss": loss, "weight": 1.0, "student_tap": taps, "teacher_tap": taps, **kw}]}
    r = digits_recipe(method, epochs=epochs)
    r["data"].update(limit_train=128, augment=False)
    return kd.Recipe.from_dict(r)


def _build(recipe: kd.Recipe) -> tuple[kd.Distill, kd.DataBundle]:
    torch.manual_seed(recipe.seed)
    data = load_data(recipe.data)
    return build_method(recipe.method.model_dump(), DataInfo(data.num_classes, data.in_chans, data.image_size)), data


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def _stage(method: kd.Distill, data: kd.DataBundle, recipe: kd.Recipe, name: str) -> None:
    method.enter_stage(name)
    stage = next(s for s in method.stages(recipe.train.epochs) if s.name == name)
    kd.Trainer(method, data, stage_recipe(recipe, stage)).fit()


def test_stages_and_init_epochs_scale_with_the_run() -> None:
    ft = FTLoss()
    assert ft.two_stage and [ft.init_stage_epochs(e) for e in (240, 40, 8, 3)] == [30, 5, 1, 1]
    assert FTLoss(init_epochs=7).init_stage_epochs(240) == 7
    assert not FTLoss(stages="one").two_stage and not ABLoss(stages="one").two_stage
    with pytest.raises(ValueError, match="stages"):
        ABLoss(stages="three")
    m, _ = _build(_recipe("ft", "stage3", epochs=40))
    assert [(s.name, s.epochs) for s in m.stages(40)] == [("ft-init", 5), ("main", None)]
    m1, _ = _build(_recipe("ft", "stage3", stages="one"))
    assert list(m1.stages(40)) == []


def test_ft_init_loss_is_the_paraphraser_reconstruction() -> None:
    torch.manual_seed(0)
    loss = FTLoss()
    t = torch.randn(3, 6, 4, 4)
    loss.setup([torch.randn(3, 4, 4, 4)], [t])
    _, recon = loss.paraphrasers[0](t)
    assert loss.init_loss(None, [t]).item() == pytest.approx(((recon - t) ** 2).mean().item(), rel=1e-6)
    # the main stage uses the frozen encoder's factor, no reconstruction term
    s = torch.randn(3, 4, 4, 4)
    loss.set_phase("main")
    fs = F.normalize(loss.translators[0](s).flatten(1), dim=1)
    ft = F.normalize(loss.paraphrasers[0].encoder(t).flatten(1), dim=1)
    assert loss([s], [t]).item() == pytest.approx((fs - ft).abs().mean().item(), rel=1e-6)


def test_ft_stage1_trains_only_the_paraphraser_and_stage2_keeps_it_frozen() -> None:
    recipe = _recipe("ft", "stage3")
    m, data = _build(recipe)
    term = m.terms[1].loss
    m.enter_stage("ft-init")
    trainer = kd.Trainer(m, data, stage_recipe(recipe, m.stages(2)[0]))  # set-up builds the connectors
    assert {n for n, p in m.named_parameters() if p.requires_grad} == \
        {f"terms.1.loss.paraphrasers.{n}" for n, _ in term.paraphrasers.named_parameters()}
    before_student, before_para, before_trans = _snapshot(m.student), _snapshot(term.paraphrasers), \
        _snapshot(term.translators)
    trainer.fit()
    assert _changed(before_student, m.student) == set()  # weights and BatchNorm statistics
    assert _changed(before_trans, term.translators) == set()
    assert _changed(before_para, term.paraphrasers) == set(before_para)  # every paraphraser tensor moved
    before_student, before_para = _snapshot(m.student), _snapshot(term.paraphrasers)
    _stage(m, data, recipe, "main")
    assert _changed(before_para, term.paraphrasers) == set()  # frozen, eval-mode BatchNorm
    assert any(k.endswith("weight") for k in _changed(before_student, m.student))


def test_ab_stage1_trains_the_student_up_to_the_taps_and_the_connectors_only() -> None:
    recipe = _recipe("ab", STAGES)
    m, data = _build(recipe)
    term = m.terms[1].loss
    m.enter_stage("ab-init")
    trainer = kd.Trainer(m, data, stage_recipe(recipe, m.stages(2)[0]))
    trained = {n for n, p in m.named_parameters() if p.requires_grad}
    assert {n for n in trained if n.startswith("student.")} == \
        {f"student.{n}" for n, _ in m.student.named_parameters() if not n.startswith("fc.")}
    assert {n for n in trained if n.startswith("terms.")} == {f"terms.1.loss.{n}" for n, _ in term.named_parameters()}
    before, before_c = _snapshot(m.student), _snapshot(term.connectors)
    trainer.fit()
    changed = _changed(before, m.student)
    assert changed and not any(k.startswith("fc.") for k in changed)  # no CE: the classifier does not move
    assert any(k.startswith("stem") for k in changed) and _changed(before_c, term.connectors)
    before, before_c = _snapshot(m.student), _snapshot(term.connectors)
    _stage(m, data, recipe, "main")
    assert any(k.startswith("fc.") for k in _changed(before, m.student))
    assert _changed(before_c, term.connectors) == set()  # the AB term is off after the init stage
    assert all(not p.requires_grad for p in term.parameters())


def test_a_two_stage_recipe_outside_the_stage_driver_is_refused() -> None:
    recipe = _recipe("ab", STAGES)
    m, data = _build(recipe)
    with pytest.raises(KdforgeError, match="trains in stages"):
        kd.Trainer(m, data, recipe)


def test_train_runs_both_stages_in_their_folders_and_resumes_across_them(tmp_path: Path) -> None:
    recipe = _recipe("ft", "stage3", epochs=2)
    res = kd.train(recipe, tmp_path / "a")
    a = tmp_path / "a"
    assert sorted(p.name for p in (a / "stages").iterdir()) == ["00-ft-init", "01-main"]
    assert json.loads((a / "stages.json").read_text())["order"] == ["ft-init", "main"]
    assert res.run_dir == a / "stages" / "01-main" and res.epochs == 2
    assert json.loads((a / "results.json").read_text())["test_last"] == res.test_last
    # stage 1 finished, stage 2 never started: a resume trains stage 2 from stage 1's result, bit-identical
    b = tmp_path / "b"
    shutil.copytree(a, b)
    shutil.rmtree(b / "stages" / "01-main")
    shutil.rmtree(b / "checkpoints")
    index = json.loads((b / "stages.json").read_text())
    index["finished"].pop("main")
    (b / "stages.json").write_text(json.dumps(index))
    res_b = kd.train(kd.Recipe.from_yaml(b / "config.yaml"), b, resume=True)
    assert res_b.test_last == res.test_last
    wa, wb = kd.create_model("cnn_small", 10, 1, width=4), kd.create_model("cnn_small", 10, 1, width=4)
    load_weights(wa, a / "checkpoints" / "last.safetensors")
    load_weights(wb, b / "checkpoints" / "last.safetensors")
    assert all(torch.equal(x, y) for x, y in zip(wa.state_dict().values(), wb.state_dict().values(), strict=True))
    # a finished staged run resumes to "nothing to do"; a fresh start in its folder is refused
    assert kd.train(recipe, a, resume=True).test_last == res.test_last
    with pytest.raises(KdforgeError, match="already exists"):
        kd.train(recipe, a)
