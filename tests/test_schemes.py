"""KD-zoo schemes: short digits runs that lower the loss and deploy a model, plus each scheme's invariants."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdforge as kd
from kdforge.data import load_data
from kdforge.distill.adversarial import AdversarialKD, discriminator_loss
from kdforge.distill.attention import attention_map_loss, unfuse_attention
from kdforge.distill.cross_modal import View, ViewSpec, lowres
from kdforge.distill.data_free import DAFL, BNStatHook, DeepInversion, info_entropy_loss
from kdforge.distill.multi_teacher import kd_to_probs, min_norm_weights, soft_target
from kdforge.distill.online import DML, minlogit_teacher, mutual_kl
from kdforge.errors import KdforgeError
from kdforge.losses import kd_loss
from kdforge.method import DataInfo, Method, build_method
from tests.conftest import digits_recipe

DIGITS = DataInfo(10, 1, 8)
STUDENT = {"model": "cnn_tiny"}


def _engine(m: Method, n: int = 64, batch_size: int = 16, val_fraction: float = 0.0) -> kd.Trainer:
    """A Trainer around ``m`` on ``n`` digits (side networks step only inside the engine)."""
    r = digits_recipe({"name": "supervised", "model": STUDENT}, epochs=1, sched={"name": "constant"})
    r["data"].update(batch_size=batch_size, limit_train=n, val_fraction=val_fraction, augment=False)
    recipe = kd.Recipe.from_dict(r)
    return kd.Trainer(m, kd.load_data(recipe.data), recipe)


def _teacher(ck: Path) -> dict[str, Any]:
    return {"model": "cnn_small", "checkpoint": str(ck)}


def _schemes(ck: Path) -> dict[str, dict[str, Any]]:
    t = _teacher(ck)
    return {
        "dml": {"name": "dml", "peers": [STUDENT, {"model": "mlp"}]},
        "dml_alternating": {"name": "dml", "peers": [STUDENT, STUDENT], "update": "alternating", "deploy": 1},
        "kdcl": {"name": "kdcl", "peers": [STUDENT, STUDENT, {"model": "mlp"}], "view_shift": 1},
        "multi_teacher": {"name": "multi_teacher", "teachers": [t, {"model": "mlp"}], "student": STUDENT},
        "aekd": {"name": "aekd", "teachers": [t, t, {"model": "mlp"}], "student": STUDENT, "C": 0.6},
        "cross_modal": {"name": "cross_modal", "teacher": t, "student": STUDENT,
                        "student_view": {"kind": "lowres", "factor": 2},
                        "terms": [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9}]},
        "at": {"name": "at", "teacher": t, "student": STUDENT, "beta": 1},  # 8×8 maps, 4-channel student: small β
        "adversarial": {"name": "adversarial", "teacher": t, "student": STUDENT, "adv_weight": 0.1},
        "adversarial_features": {"name": "adversarial", "teacher": t, "student": STUDENT, "input": "features",
                                 "adv_weight": 0.1},
        "dafl": {"name": "dafl", "teacher": t, "student": STUDENT, "batch_size": 64, "gen_width": 32,
                 "lr_g": 0.02},
        "deepinversion": {"name": "deepinversion", "teacher": t, "student": STUDENT, "batch_size": 64,
                          "synth_iters": 15, "synth_every": 6, "flip": False},
    }


@pytest.mark.parametrize("scheme", ["dml", "dml_alternating", "kdcl", "multi_teacher", "aekd", "cross_modal", "at",
                                    "adversarial", "adversarial_features", "dafl", "deepinversion"])
def test_short_digits_run_lowers_loss_and_deploys(scheme: str, digits_teacher: Path, tmp_path: Path) -> None:
    method = _schemes(digits_teacher)[scheme]
    extra: dict[str, Any] = {}
    if scheme in ("dafl", "deepinversion"):
        extra = {"optim": {"name": "adamw", "lr": 0.01, "weight_decay": 0.0}}
    recipe = digits_recipe(method, epochs=3, **extra)
    recipe["data"].update(limit_train=384, val_fraction=0.1 if scheme not in ("dafl", "deepinversion") else 0.0)
    res = kd.train(kd.Recipe.from_dict(recipe), tmp_path / scheme)
    losses = [h["train_loss"] for h in res.history]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
    # the deployable's weights load into a fresh model of the deployed architecture
    spec = method["peers"][method.get("deploy", 0)] if "peers" in method else method["student"]
    ck = tmp_path / scheme / "checkpoints" / "last.safetensors"
    model = kd.create_model(spec["model"], 10, 1, image_size=8, checkpoint=ck)
    assert isinstance(model, nn.Module)
    assert res.test_last["top1"] > 15.0  # above chance (10 %) after 18 steps, data-free included
    if scheme.startswith(("dml", "kdcl")):
        n = len(method["peers"])
        assert all(f"train_acc_peer{k}" in res.history[-1] for k in range(n))


# -- online ------------------------------------------------------------------------------------------


def test_dml_identical_peers_have_zero_kl_and_deploy_the_chosen_peer() -> None:
    z = torch.randn(8, 10)
    assert mutual_kl([z, z.clone(), z.clone()], 0).abs() < 1e-6
    m = build_method({"name": "dml", "peers": [STUDENT, {"model": "mlp"}], "deploy": 1}, DIGITS)
    assert m.deployable() is m.peers[1]
    with pytest.raises(KdforgeError, match="at least 2"):
        DML([nn.Linear(2, 2)])


def test_dml_alternating_updates_one_peer_per_step() -> None:
    m = build_method({"name": "dml", "peers": [STUDENT, STUDENT], "update": "alternating"}, DIGITS)
    batch = (torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    out = m.training_step(batch, step=1)
    out["loss"].backward()
    assert all(p.grad is None for p in m.peers[0].parameters())
    assert all(p.grad is not None for p in m.peers[1].parameters())
    assert {"acc_peer0", "acc_peer1", "loss_peer1"} <= set(out)


def test_kdcl_minlogit_teacher() -> None:
    torch.manual_seed(0)
    logits = [torch.randn(6, 5) for _ in range(3)]
    y = torch.randint(0, 5, (6,))
    t = minlogit_teacher(logits, y)
    assert torch.allclose(t.gather(1, y[:, None]), torch.zeros(6, 1))
    for z in logits:
        assert (t <= z - z.gather(1, y[:, None]) + 1e-7).all()


# -- multi-teacher -----------------------------------------------------------------------------------


def test_averaging_identical_teachers_equals_single_teacher_kd() -> None:
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    for combine in ("prob", "logit"):
        avg = kd_to_probs(s, soft_target([t, t.clone(), t.clone()], 4.0, combine=combine), 4.0)
        assert torch.allclose(avg, kd_loss(s, t, 4.0), atol=1e-5)


def test_aekd_weights_lie_on_the_capped_simplex() -> None:
    torch.manual_seed(1)
    g = torch.randn(1, 8, 10)
    assert torch.allclose(min_norm_weights(g.repeat(4, 1, 1), cap=0.6), torch.full((4,), 0.25), atol=1e-6)
    for m in (2, 3, 5):
        w = min_norm_weights(torch.randn(m, 8, 10), cap=0.6)
        assert (w >= 0).all() and (w <= 0.6 + 1e-6).all() and abs(float(w.sum()) - 1) < 1e-5
    # two opposite gradients: the unconstrained min-norm point is (½, ½)
    assert torch.allclose(min_norm_weights(torch.stack([torch.ones(4), -torch.ones(4)]), cap=1.0),
                          torch.tensor([0.5, 0.5]), atol=1e-5)
    with pytest.raises(KdforgeError, match="too small"):
        build_method({"name": "aekd", "teachers": [STUDENT] * 2, "student": STUDENT, "C": 0.4}, DIGITS)


def test_multi_teacher_teachers_are_frozen_and_may_differ() -> None:
    m = build_method({"name": "multi_teacher", "teachers": [{"model": "cnn_small"}, {"model": "mlp"}],
                      "student": STUDENT}, DIGITS)
    m.train()
    assert not any(t.training for t in m.teachers) and m.student.training
    out = m.training_step((torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))), 0)
    out["loss"].backward()
    assert all(p.grad is None for p in m.teachers.parameters())
    assert not any(k.startswith("teachers.") for k in m.resumable_state())


# -- cross-modal -------------------------------------------------------------------------------------


def test_cross_modal_each_model_sees_its_view() -> None:
    m = build_method({"name": "cross_modal", "teacher": {"model": "cnn_small"}, "student": STUDENT,
                      "student_view": {"kind": "lowres", "factor": 4}}, DIGITS).eval()
    x = torch.randn(4, 1, 8, 8)
    student = m.deployable()
    seen: dict[str, torch.Tensor] = {}
    student.stem.register_forward_pre_hook(lambda mod, a: seen.__setitem__("s", a[0]))
    m.teacher.stem.register_forward_pre_hook(lambda mod, a: seen.__setitem__("t", a[0]))
    m.training_step((x, torch.zeros(4, dtype=torch.long)), 0)
    assert torch.allclose(seen["s"], lowres(x, 4)) and torch.equal(seen["t"], x)
    assert len(seen["s"][0, 0].unique()) <= 4  # a 2×2 image upsampled
    for kind in ("blur", "edge", "grayscale", "identity"):
        assert View(ViewSpec(kind=kind))(torch.randn(2, 3, 8, 8)).shape == (2, 3, 8, 8)


# -- attention ---------------------------------------------------------------------------------------


def test_attention_map_loss_zero_at_equality_and_head_averaged() -> None:
    a = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    assert attention_map_loss(a, a.clone()).abs() < 1e-6
    assert attention_map_loss(a, a.clone(), mode="mse").abs() < 1e-9
    b = torch.softmax(torch.randn(2, 3, 5, 5), -1)  # other head count: compared after head averaging
    assert attention_map_loss(a, b) > 0
    with pytest.raises(KdforgeError, match="token counts must match"):
        attention_map_loss(a, torch.softmax(torch.randn(2, 4, 6, 6), -1))


def test_attention_map_loss_on_timm_vits_through_distill() -> None:
    pytest.importorskip("timm")
    kw = {"img_size": 8, "patch_size": 2, "depth": 2, "global_pool": "avg", "class_token": False}
    teacher = kd.create_model("timm:vit_tiny_patch16_224", 10, 1, embed_dim=32, num_heads=4, **kw)
    student = kd.create_model("timm:vit_tiny_patch16_224", 10, 1, embed_dim=16, num_heads=2, **kw)
    assert unfuse_attention(teacher) >= 2 and unfuse_attention(student) >= 2
    term = kd.Term(kd.build_loss("attn_map"), 1.0, "blocks.1.attn.attn_drop", name="attn_map")
    m = kd.Distill(student, teacher, [kd.Term(kd.build_loss("ce")), term])
    out = m.training_step((torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))), 0)
    assert out["loss_attn_map"] > 0
    out["loss"].backward()
    assert student.blocks[1].attn.qkv.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_at_scheme_pairs_stage_outputs() -> None:
    m = build_method({"name": "at", "teacher": {"model": "cnn_small"}, "student": STUDENT}, DIGITS)
    at = next(t for t in m.terms if t.name == "at")
    assert at.student_taps == ["stage1", "stage2", "stage3"] and at.weight == 1000


# -- adversarial -------------------------------------------------------------------------------------


def test_discriminator_is_registered_and_optimised_in_alternation() -> None:
    m = build_method({"name": "adversarial", "teacher": {"model": "cnn_small"}, "student": STUDENT}, DIGITS)
    assert isinstance(m, AdversarialKD)
    t = _engine(m)
    disc = t.optimizers["disc"]
    assert disc.manual and {id(p) for p in disc.params} == {id(p) for p in m.disc.parameters()}
    assert isinstance(disc.opt, torch.optim.Adam) and disc.opt.param_groups[0]["betas"] == (0.5, 0.999)
    assert disc.opt.param_groups[0]["weight_decay"] == 0.0 and disc.clip is None
    assert not any(p.requires_grad for p in m.disc.parameters())  # out of autograd outside its update
    assert any(k.startswith("disc.") for k in m.resumable_state())
    before = [p.detach().clone() for p in m.disc.parameters()]
    t.train_steps(1)
    assert all(not torch.equal(a, b) for a, b in zip(before, m.disc.parameters(), strict=True))
    assert all(p.grad is None for p in m.disc.parameters())  # the student's loss does not train D
    assert all(p.grad is not None for p in m.student.parameters())
    assert disc.steps == 1 and len(t.state()["optimizers"]["disc"]["opt"]["state"]) == len(disc.params)
    with pytest.raises(KdforgeError, match="not running in the engine"):
        build_method({"name": "adversarial", "teacher": {"model": "cnn_small"}, "student": STUDENT},
                     DIGITS).training_step((torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)), 0)


def test_discriminator_step_is_torch_adam_on_the_discriminator_loss() -> None:
    torch.manual_seed(0)
    m = build_method({"name": "adversarial", "teacher": {"model": "cnn_small"}, "student": STUDENT,
                      "lr_d": 0.01}, DIGITS)
    t = _engine(m)
    ref = {k: v.clone() for k, v in m.disc.state_dict().items()}
    batch = next(iter(t._batches()))  # the batch of the first engine step
    m.train()
    with torch.no_grad():  # the student in train mode, as in the engine's step (BN batch statistics)
        s_in, t_in = m.student(batch[0]), m.teacher(batch[0])
    d = copy.deepcopy(m.disc).requires_grad_(True)
    opt = torch.optim.Adam(d.parameters(), lr=0.01, betas=(0.5, 0.999))
    discriminator_loss(d(t_in), d(s_in)).backward()
    opt.step()
    t.train_steps(1)
    assert any(not torch.equal(ref[k], v) for k, v in m.disc.state_dict().items())
    for (k, got), want in zip(m.disc.state_dict().items(), d.state_dict().values(), strict=True):
        assert torch.allclose(got, want, atol=1e-6), k


# -- data-free ---------------------------------------------------------------------------------------


def test_dafl_entropy_term_is_smallest_for_balanced_classes() -> None:
    uniform = torch.zeros(10, 10)
    assert info_entropy_loss(uniform).item() == pytest.approx(-math.log10(10), rel=1e-5)
    one_class = 20.0 * F.one_hot(torch.zeros(10, dtype=torch.long), 10).float()
    assert info_entropy_loss(one_class).item() > -0.01


def test_deepinversion_bn_term_is_zero_on_matched_statistics() -> None:
    bn = nn.BatchNorm2d(3).eval()
    x = torch.randn(8, 3, 5, 5) * 2 + 1
    bn.running_mean.copy_(x.mean((0, 2, 3)))
    bn.running_var.copy_(x.var((0, 2, 3), unbiased=False))
    hook = BNStatHook(bn)
    hook.active = True
    bn(x)
    assert hook.loss is not None and hook.loss.abs() < 1e-5
    bn(x + 1)
    assert hook.loss > 0.5


@pytest.mark.parametrize("name", ["dafl", "deepinversion"])
def test_data_free_methods_never_read_the_training_split(name: str, digits_teacher: Path) -> None:
    cfg = _schemes(digits_teacher)[name]
    cfg = dict(cfg, batch_size=16, **({"synth_iters": 2} if name == "deepinversion" else {}))
    m = build_method(cfg, DIGITS)
    assert isinstance(m, (DAFL, DeepInversion))
    m.setup(None)  # structurally: no batch is needed or looked at
    # through the engine: the training split is poisoned (NaN images); every tensor a model sees must be finite
    data = load_data(name="digits", val_fraction=0.0)
    n = 64
    poison = torch.full((n, 1, 8, 8), float("nan"))
    data.train = torch.utils.data.TensorDataset(poison, torch.zeros(n, dtype=torch.long))
    data.val = None

    def finite_only(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        assert torch.isfinite(args[0]).all(), "a real training image reached a model"

    m = build_method(cfg, DIGITS)
    m.student.register_forward_pre_hook(finite_only)
    m.teacher.register_forward_pre_hook(finite_only)
    recipe = kd.Recipe.from_dict(digits_recipe(cfg, epochs=1), ["data.val_fraction=0"])
    res = kd.Trainer(m, data, recipe).fit()
    assert math.isfinite(res.history[-1]["train_loss"])
    assert all(torch.isfinite(p).all() for p in m.student.parameters())
    assert all(torch.isfinite(b).all() for b in m.student.buffers())


def test_generator_is_a_manual_engine_optimizer_and_in_the_state(digits_teacher: Path) -> None:
    m = build_method(_schemes(digits_teacher)["dafl"], DIGITS)
    t = _engine(m)
    gen = t.optimizers["generator"]
    assert gen.manual and {id(p) for p in gen.params} == {id(p) for p in m.generator.parameters()}
    assert isinstance(gen.opt, torch.optim.Adam) and gen.lr == pytest.approx(0.02)
    assert not any(p.requires_grad for p in m.generator.parameters())
    assert all(p.requires_grad for p in m.student.parameters())
    before = [p.detach().clone() for p in m.generator.parameters()]
    t.train_steps(1)
    assert any(not torch.equal(a, b) for a, b in zip(before, m.generator.parameters(), strict=True))
    assert all(p.grad is None for p in m.generator.parameters()) and gen.steps == 1
    state = m.resumable_state()
    assert any(k.startswith("generator.") for k in state) and "generator" in t.state()["optimizers"]
    assert not any(k.startswith("teacher.") for k in state)
    assert F.softmax(m.teacher(m.synthesize(4)), -1).shape == (4, 10)


def test_deepinversion_pixels_are_a_reset_manual_optimizer_and_leave_the_student_alone(digits_teacher: Path) -> None:
    cfg = dict(_schemes(digits_teacher)["deepinversion"], batch_size=8, synth_iters=3, adi_weight=1.0)
    m = build_method(cfg, DIGITS)
    assert isinstance(m, DeepInversion)
    t = _engine(m)
    pix = t.optimizers["pixels"]
    assert pix.manual and pix.params == [m.pixels] and pix.opt.param_groups[0]["betas"] == (0.5, 0.9)
    assert (pix.cfg.name, pix.cfg.lr, pix.cfg.weight_decay, pix.sched.name) == ("adam", 0.05, 0.0, "constant")
    images, labels, parts = m.synthesize()
    assert images.shape == (8, 1, 8, 8) and labels.shape == (8,) and torch.isfinite(parts).all()
    assert pix.steps == 3 and int(pix.opt.state[m.pixels]["step"]) == 3
    # the adversarial (ADI) term runs the student, yet only the pixels get gradients
    assert all(p.grad is None for p in m.student.parameters())
    assert all(p.requires_grad for p in m.student.parameters())
    m.synthesize(iters=2)
    assert pix.steps == 2 and int(pix.opt.state[m.pixels]["step"]) == 2  # a fresh Adam per synthesis
    t.train_steps(1)
    assert int(m.filled) == 1 and "pool" in m.resumable_state() and "pixels" in m.resumable_state()
