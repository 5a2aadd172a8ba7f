"""MixSKD and the self-KD baselines: helpers, loss terms, gradient routing, deployment, resume, short runs."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import kdforge as kd
from kdforge.distill.self_kd import (
    MixSKD,
    disc_bce,
    interpolate,
    kl_t,
    mixup_ce,
    plan_stages,
    sample_mixup,
)
from kdforge.distill.self_kd_baselines import (
    BYOT,
    PSKD,
    byot_loss,
    cskd_loss,
    same_class_partners,
    soft_ce,
    tfkd_loss,
    virtual_teacher,
)
from kdforge.engine.checkpoint import load_state
from kdforge.engine.trainer import _Fields
from kdforge.errors import KdforgeError
from kdforge.method import DataInfo, Method, build_method
from kdforge.profile import count_params
from tests.conftest import digits_recipe

INFO = DataInfo(10, 1, 8)
SMALL = {"model": "cnn_small"}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """8×8 inputs are too small for two threads to pay off, and a busy machine makes two much slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _mixskd(**cfg: object) -> MixSKD:
    torch.manual_seed(0)
    m = build_method({"name": "mixskd", "model": SMALL, **cfg}, INFO)
    m.setup(_batch())
    return m  # type: ignore[return-value]


class _Record(kd.Callback):
    """Every step's outputs, as floats."""

    def __init__(self) -> None:
        self.outs: list[dict[str, float]] = []

    def on_step_end(self, trainer: kd.Trainer, out: dict[str, torch.Tensor]) -> None:
        self.outs.append({k: float(v.detach().float().mean()) for k, v in out.items()})


def _engine(m: Method, n: int = 64, batch_size: int = 16, epochs: int = 1, callbacks: tuple = (),
            **recipe: object) -> kd.Trainer:
    """A Trainer around ``m`` on ``n`` un-augmented digits (manual optimizers step only inside the engine)."""
    r = digits_recipe({"name": "supervised", "model": SMALL}, epochs=epochs, sched={"name": "constant"}, **recipe)
    r["data"].update(batch_size=batch_size, limit_train=n, val_fraction=0.0, augment=False)
    r["train"]["eval_every"] = 1000
    rec = kd.Recipe.from_dict(r)
    return kd.Trainer(m, kd.load_data(rec.data), rec, callbacks=callbacks)


# -- helpers ---------------------------------------------------------------------------------------
def test_mixup_with_lambda_one_gives_the_original_batch() -> None:
    x, _ = _batch()
    perm = torch.randperm(len(x))
    assert torch.equal(interpolate(x, 1.0, perm), x)
    assert torch.equal(interpolate(x, 0.0, perm), x[perm])
    assert torch.allclose(interpolate(x, 0.3, torch.arange(len(x))), x)


def test_interpolation_helper_and_mixup_ce() -> None:
    x, y = _batch()
    perm = torch.randperm(len(x))
    assert torch.allclose(interpolate(x, 0.3, perm), 0.3 * x + 0.7 * x[perm])
    z = torch.randn(len(x), 10)
    want = 0.3 * F.cross_entropy(z, y) + 0.7 * F.cross_entropy(z, y[perm])
    assert torch.allclose(mixup_ce(z, y, 0.3, perm), want)
    same = torch.full_like(y, 4)
    assert torch.allclose(mixup_ce(z, same, 0.3, perm), F.cross_entropy(z, same))


def test_sample_mixup_draws_one_beta_lambda_and_a_permutation() -> None:
    torch.manual_seed(0)
    draws = [sample_mixup(8, 0.4) for _ in range(400)]
    lams = torch.tensor([d[0] for d in draws])
    assert ((lams >= 0) & (lams <= 1)).all()
    assert abs(float(lams.mean()) - 0.5) < 0.05  # Beta(α, α) is symmetric
    assert float((lams < 0.1).float().mean()) > 0.15  # α = 0.4: U-shaped, much mass near the ends
    assert all(sorted(d[1].tolist()) == list(range(8)) for d in draws[:20])


def test_pskd_batches_carry_sample_indices_through_the_engine() -> None:
    m = PSKD(kd.create_model("cnn_small", 10, 1), 10, epochs=2)
    assert m.batch_fields == ("index",) and PSKD(nn.Linear(2, 2), 2, source="snapshot").batch_fields == ()
    t = _engine(m, n=48)
    first = next(iter(t.train_loader))
    assert set(first) == {"x", "y", "index"}
    t.train_steps(1)
    assert m.past_probs is not None and m.past_probs.shape == (48, 10)
    written = m.past_probs.sum(-1) > 0  # exactly the rows of the samples the step saw
    assert set(written.nonzero().flatten().tolist()) == set(first["index"].tolist())


# -- loss terms on crafted tensors -----------------------------------------------------------------
def test_kl_t_zero_on_itself_scaled_by_t2_and_stop_gradient() -> None:
    z = torch.randn(6, 10, dtype=torch.float64)
    assert float(kl_t(z, z, 3.0)) == pytest.approx(0.0, abs=1e-12)
    s = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    p_t, log_p_s = F.softmax(t / 3, -1), F.log_softmax(s / 3, -1)
    want = 9.0 * (p_t * (p_t.log() - log_p_s)).sum(-1).mean()
    loss = kl_t(s, t, 3.0)
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-10) and float(loss.detach()) > 0
    loss.backward()
    assert s.grad is not None and t.grad is None


def test_disc_bce_against_one_hot_targets() -> None:
    assert float(disc_bce(torch.zeros(4, 2), 0)) == pytest.approx(math.log(2))
    confident = torch.tensor([[20.0, -20.0]])
    assert float(disc_bce(confident, 0)) < 1e-6 and float(disc_bce(confident, 1)) > 10


def test_mixskd_terms_vanish_at_lambda_one_in_eval_and_train_mode() -> None:
    m = _mixskd()
    x, y = _batch()
    perm = torch.randperm(len(x))
    for mode in (False, True):
        m.train(mode)
        with torch.no_grad():
            v = m.views(x, 1.0, perm)
            terms = m.loss_terms(v, y, 1.0, perm)
        assert float(terms["fea"]) < 1e-10
        for zi, zm in zip(v.zi, v.zm, strict=True):
            assert torch.allclose(zi, zm, atol=1e-5)
        for zi, zm in zip(v.zi[:-1], v.zm[:-1], strict=True):
            assert float(kl_t(zi, zm, 3.0) + kl_t(zm, zi, 3.0)) < 1e-8


def test_exits_have_the_last_stage_shape_for_zoo_and_library_backbones() -> None:
    cases = [("cnn_small", 1, 8, 3), ("resnet8", 3, 32, 3), ("wrn_16_1", 3, 32, 3),
             ("torchvision:resnet18", 3, 32, 4), ("timm:resnet18", 3, 32, 4)]
    for name, chans, size, stages in cases:
        torch.manual_seed(0)
        model = kd.create_model(name, 10, chans)
        m = MixSKD(model, 10)
        x = torch.randn(2, chans, size, size)
        m.setup((x, torch.zeros(2, dtype=torch.long)))
        assert m.exits is not None and m.self_teacher is not None
        assert m.exits.num_exits == stages, name
        logits, maps = m.exits(model, x)
        assert len(logits) == len(maps) == stages
        assert len({tuple(a.shape) for a in maps}) == 1, name
        assert m.self_teacher.fuse.in_channels == stages * maps[-1].shape[1]
        assert all(z.shape == (2, 10) for z in logits)


def test_stage_plan_rejects_a_backbone_whose_stages_do_not_chain() -> None:
    class Forked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)
            self.fc = nn.Linear(4, 10)
            self.feature_names = ["stem", "a", "b"]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stem(x)
            return self.fc(self.a(h).mean((2, 3)) + self.b(h).mean((2, 3)))

    with pytest.raises(KdforgeError, match="plain chain"):
        plan_stages(Forked(), torch.randn(2, 1, 8, 8))


def test_byot_loss_on_crafted_tensors() -> None:
    deep = torch.randn(4, 10)
    maps = [torch.zeros(4, 2, 3, 3) + 0.5, torch.zeros(4, 2, 3, 3)]
    y = torch.randint(0, 10, (4,))
    t = byot_loss([deep.clone(), deep], maps, y, alpha=0.3, feat_weight=0.03, T=3.0)
    assert float(t["feat"]) == pytest.approx(0.5 * math.sqrt(18), rel=1e-6)  # plain L2 norm, not squared
    p = F.softmax(deep / 3, -1)
    assert float(t["soft"]) == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-5)
    ce = F.cross_entropy(deep, y)
    assert float(t["ce"]) == pytest.approx(float(ce + 0.7 * ce), rel=1e-5)
    assert float(t["loss"]) == pytest.approx(float(t["ce"] + 0.3 * t["soft"] + 0.03 * t["feat"]), rel=1e-6)


def test_cskd_pairs_within_the_batch_by_class() -> None:
    y = torch.tensor([0, 0, 1, 1, 1, 2])
    partner, has = same_class_partners(y, torch.Generator().manual_seed(0))
    assert has.tolist() == [True, True, True, True, True, False]
    for i in range(5):
        assert int(partner[i]) != i and int(y[partner[i]]) == int(y[i])
    logits = torch.randn(3, 10)[y]  # one logit row per class: partners agree exactly
    t = cskd_loss(logits, y, partner, has, T=4.0, lam=1.0)
    assert float(t["cls"]) == pytest.approx(0.0, abs=1e-7)
    assert float(t["loss"]) == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-6)


def test_tfkd_virtual_teacher_and_variants() -> None:
    y = torch.tensor([2, 7])
    p = virtual_teacher(y, 10, a=0.9)
    assert torch.allclose(p.sum(-1), torch.ones(2)) and float(p[0, 2]) == pytest.approx(0.9)
    assert float(p[0, 3]) == pytest.approx(0.1 / 9)
    at_teacher = p.log()  # logits whose softmax is the virtual teacher: the paper regulariser is 0
    assert float(tfkd_loss(at_teacher, y, "paper", 0.9, 20.0, 0.1)["reg"]) == pytest.approx(0.0, abs=1e-6)
    code = tfkd_loss(at_teacher, y, "code", 0.9, 20.0, 0.1)["reg"]  # softmax(p/T) is nearly uniform
    assert float(code) > 1e-3
    skl = tfkd_loss(at_teacher, y, "skl", 0.9, 20.0)
    assert float(skl["loss"]) == pytest.approx(float(soft_ce(at_teacher / 20, p) / 20), rel=1e-6)


# -- gradient routing --------------------------------------------------------------------------------
def test_self_teacher_gets_gradients_only_from_its_mixup_ce() -> None:
    m = _mixskd()
    x, y = _batch()
    lam, perm = 0.6, torch.randperm(len(x))
    assert m.self_teacher is not None
    for term in ("kl", "fea", "adv", "ce"):
        m.zero_grad(set_to_none=True)
        m.loss_terms(m.views(x, lam, perm), y, lam, perm)[term].backward()
        assert all(p.grad is None or not p.grad.any() for p in m.self_teacher.parameters()), term
    m.zero_grad(set_to_none=True)
    m.loss_terms(m.views(x, lam, perm), y, lam, perm)["mix"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.self_teacher.parameters())


def test_discriminators_train_only_in_their_own_step() -> None:
    m = _mixskd(adv_mode="minimax")
    assert m.discriminators is not None
    d_params = list(m.discriminators.parameters())
    t = _engine(m)
    disc = t.optimizers["disc"]
    assert disc.manual and {id(p) for p in disc.params} == {id(p) for p in d_params}
    assert not any(id(p) in {id(q) for q in t.optimizers["main"].params} for p in d_params)
    assert isinstance(disc.opt, torch.optim.Adam) and disc.opt.param_groups[0]["betas"] == (0.5, 0.999)
    assert not any(p.requires_grad for p in d_params)  # out of autograd outside their own update
    assert any(k.startswith("discriminators.") for k in m.resumable_state())
    before = [p.detach().clone() for p in d_params]
    out = t.train_steps(1)
    assert "loss_disc" in out and math.isfinite(out["loss_disc"]) and disc.steps == 1
    assert any(not torch.equal(a, p) for a, p in zip(before, d_params, strict=True))  # D took its step
    assert all(p.grad is None for p in d_params)  # the network's loss never reaches D
    assert any(p.grad is not None for p in m.model.parameters())
    x, y = _batch()
    m.zero_grad(set_to_none=True)
    m.loss_terms(m.views(x, 0.5, torch.randperm(16)), y, 0.5, torch.randperm(16))["adv"].backward()
    assert all(p.grad is None for p in d_params)
    assert any(p.grad is not None and p.grad.any() for p in m.model.parameters())  # features are pushed


def test_discriminator_learns_to_separate_in_minimax_mode() -> None:
    rec = _Record()
    _engine(_mixskd(adv_mode="minimax", disc_lr=1e-2), n=128, batch_size=32, epochs=8, callbacks=(rec,)).fit()
    losses = [o["loss_disc"] for o in rec.outs]
    assert len(losses) == 32 and min(losses[-5:]) < losses[0]


def test_code_mode_keeps_random_discriminators_frozen_and_code_compat_preset() -> None:
    m = _mixskd(compat="official")
    assert m.adv_mode == "code" and m.weights["mix"] == 0.0
    assert m.discriminators is not None
    assert [s.name for s in m.configure_optimizers()] == ["main"]  # no discriminator optimizer
    before = [p.detach().clone() for p in m.discriminators.parameters()]
    m.train()
    for i in range(3):
        m.training_step(_batch(seed=i), i)["loss"].backward()
    assert all(torch.equal(a, p) for a, p in zip(before, m.discriminators.parameters(), strict=True))
    assert all(p.grad is None for p in m.discriminators.parameters())
    with pytest.raises(KdforgeError, match="code_compat"):
        build_method({"name": "mixskd", "model": SMALL, "compat": "official", "adv_mode": "minimax"}, INFO)
    with pytest.raises(KdforgeError, match="unknown key"):
        build_method({"name": "mixskd", "model": SMALL, "adv": "off"}, INFO)
    off = _mixskd(adv_mode="off")
    assert off.discriminators is None and float(off.training_step(_batch(), 0)["loss_adv"]) == 0.0


def test_mixskd_resume_continues_the_minimax_game_exactly(tmp_path: Path) -> None:
    def recipe(epochs: int) -> kd.Recipe:
        return kd.Recipe.from_dict(digits_recipe({"name": "mixskd", "model": SMALL}, epochs=epochs,
                                                 sched={"name": "constant"}),
                                   ["data.limit_train=192"])

    kd.train(recipe(3), tmp_path / "full")
    kd.train(recipe(2), tmp_path / "cut")
    kd.train(recipe(3), tmp_path / "cut", resume=True)
    sa, ta = load_state(tmp_path / "full" / "checkpoints" / "state")
    sb, tb = load_state(tmp_path / "cut" / "checkpoints" / "state")
    assert any(k.startswith("discriminators.") for k in sa)
    assert ta["optimizers"]["disc"]["steps"] == tb["optimizers"]["disc"]["steps"] == 3 * 3  # 3 epochs of 3 batches
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    da, db = ta["optimizers"]["disc"]["opt"]["state"], tb["optimizers"]["disc"]["opt"]["state"]
    assert da.keys() == db.keys()
    assert all(torch.equal(da[k][n], db[k][n]) for k in da for n in ("exp_avg", "exp_avg_sq"))


# -- deployment ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mixskd", "byot"])
def test_deployable_is_the_plain_backbone(name: str) -> None:
    torch.manual_seed(0)
    m = build_method({"name": name, "model": SMALL}, INFO)
    x, _ = _batch()
    _engine(m).train_steps(1)
    plain = kd.create_model("cnn_small", 10, 1)
    dep = m.deployable()
    assert count_params(dep) == count_params(plain) < count_params(m)
    assert dep.state_dict().keys() == plain.state_dict().keys()
    assert all(not mod._forward_hooks for mod in dep.modules())  # no taps left behind
    dep.eval()
    with torch.no_grad():
        before = dep(x)
        m.exits = None  # dropping the exits does not change the backbone's output
        assert torch.equal(dep(x), before)


# -- PS-KD state -------------------------------------------------------------------------------------
def test_pskd_targets_schedule_and_buffer_round_trip() -> None:
    m = PSKD(kd.create_model("cnn_small", 10, 1), 10, epochs=4)
    base = torch.utils.data.TensorDataset(torch.randn(20, 1, 8, 8), torch.randint(0, 10, (20,)))
    assert m.wrap_train_data(base) is base and m.indexed and m.past_probs is not None
    assert m.alpha_t(1) == pytest.approx(0.8 * 2 / 4)
    ds = _Fields(base, m.batch_fields)  # what the engine gives a method with batch_fields
    batch = torch.utils.data.default_collate([ds[i] for i in range(8)])
    m.train()
    m.on_epoch_start(0)
    x, y, idx = batch["x"], batch["y"], batch["index"]
    assert torch.equal(m.targets(x, y, idx), F.one_hot(y, 10).float())
    m.training_step(batch, 0)
    stored = m.past_probs[:8].clone()
    assert torch.allclose(stored.sum(-1), torch.ones(8)) and not m.past_probs[8:].any()
    m.on_epoch_start(1)
    want = 0.6 * F.one_hot(y, 10).float() + 0.4 * stored
    assert torch.allclose(m.targets(x, y, idx), want)
    m2 = PSKD(kd.create_model("cnn_small", 10, 1), 10, epochs=4)
    m2.wrap_train_data(base)
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2.past_probs, m.past_probs)


def _pskd_recipe(epochs: int, source: str) -> kd.Recipe:
    method = {"name": "pskd", "model": SMALL, "epochs": 3, "source": source}
    return kd.Recipe.from_dict(digits_recipe(method, epochs=epochs, sched={"name": "constant"}))


@pytest.mark.parametrize("source", ["indexed", "snapshot"])
def test_pskd_resume_matches_an_uninterrupted_run(tmp_path: Path, source: str) -> None:
    train = kd.train
    full = train(_pskd_recipe(3, source), tmp_path / "full")
    train(_pskd_recipe(2, source), tmp_path / "cut")
    resumed = train(_pskd_recipe(3, source), tmp_path / "cut", resume=True)
    assert resumed.test_last == full.test_last
    a = load_file(str(tmp_path / "full" / "checkpoints" / "last.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoints" / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = load_file(str(tmp_path / "full" / "checkpoints" / "state" / "method.safetensors"))
    sb = load_file(str(tmp_path / "cut" / "checkpoints" / "state" / "method.safetensors"))
    assert ("past_probs" in sa) == (source == "indexed")
    assert not any(k.startswith("prev.") for k in sa)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pskd_indexed_source_needs_the_data_hook() -> None:
    recipe = _pskd_recipe(1, "indexed")
    method = build_method(recipe.method.model_dump(), DataInfo(10, 1, 8))
    with pytest.raises(KdforgeError, match="wrap_train_data"):
        method.on_epoch_start(0)


def test_pskd_horizon_defaults_to_the_runs_epochs(tmp_path: Path) -> None:
    method = PSKD(kd.create_model("cnn_small", 10, 1), 10)
    with pytest.raises(KdforgeError, match=r"method\.epochs"):
        method.alpha_t(0)
    recipe = kd.Recipe.from_dict(digits_recipe({"name": "pskd", "model": SMALL}, epochs=5))
    info = DataInfo(10, 1, 8)
    built = build_method(recipe.method.model_dump(), info)
    kd.Trainer(built, kd.load_data(recipe.data), recipe)
    assert built.total_epochs == 5
    assert built.alpha_t(0) == pytest.approx(0.8 / 5) and built.alpha_t(4) == pytest.approx(0.8)
    pinned = build_method({"name": "pskd", "model": SMALL, "epochs": 10}, info)
    pinned.total_epochs = 5
    assert pinned.alpha_t(4) == pytest.approx(0.8 * 5 / 10)  # an explicit horizon wins


# -- short runs --------------------------------------------------------------------------------------
METHODS = {
    "mixskd": {}, "byot": {}, "cskd": {}, "tfkd": {}, "pskd": {"epochs": 4}, "mixup": {}, "label_smoothing": {},
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_short_digits_run_lowers_the_loss(name: str, tmp_path: Path) -> None:
    method = {"name": name, "model": SMALL, **METHODS[name]}
    res = kd.train(kd.Recipe.from_dict(digits_recipe(method, epochs=4)), tmp_path / name)
    # PS-KD's soft-target CE grows with α_t; its hard-label CE is the comparable curve
    losses = [h["train_loss_ce" if name == "pskd" else "train_loss"] for h in res.history]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    assert res.test_last["top1"] > 50.0


def test_mixskd_overfits_32_images_with_finite_terms() -> None:
    rec = _Record()
    t = _engine(_mixskd(), n=32, batch_size=32, epochs=120, callbacks=(rec,),
                optim={"name": "adam", "lr": 3e-3, "weight_decay": 0.0})
    t.fit()
    assert len(rec.outs) == 120 and all(math.isfinite(v) for o in rec.outs for v in o.values())
    assert rec.outs[-1]["loss"] < 0.5 * rec.outs[0]["loss"]


def test_mixskd_recipe_reports_per_exit_accuracy() -> None:
    res = kd.train(kd.Recipe.from_dict(digits_recipe({"name": "mixskd", "model": SMALL}, epochs=1)))
    row = res.history[0]
    for key in ("train_loss_ce", "train_loss_mix", "train_loss_kl", "train_loss_fea", "train_loss_adv",
                "train_loss_disc", "train_acc_exit1", "train_acc_exit2", "train_acc_self_teacher"):
        assert key in row, key
    assert isinstance(build_method({"name": "byot", "model": SMALL}, INFO), BYOT)


def test_cifar100_mixskd_recipe_has_the_spec_defaults_and_runs_one_step() -> None:
    r = kd.Recipe.from_yaml(Path(__file__).resolve().parent.parent / "recipes" / "cifar100" / "mixskd_resnet18.yaml")
    assert (r.data.name, r.data.batch_size, r.train.epochs) == ("cifar100", 64, 205)
    assert (r.sched.name, r.sched.warmup_epochs, r.sched.milestones) == ("multistep", 5, [105, 155])
    assert (r.optim.lr, r.optim.nesterov, r.optim.weight_decay) == (0.1, True, 5e-4)
    torch.manual_seed(0)
    m = build_method(r.method.model_dump(), DataInfo(100, 3, 32))
    assert isinstance(m, MixSKD) and (m.alpha, m.T, m.adv_mode) == (0.4, 3.0, "minimax")
    images = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,)))
    data = kd.DataBundle(images, None, images, 100, 3, 32, [str(i) for i in range(100)])
    r.train.progress = "never"
    out = kd.Trainer(m, data, r).train_steps(1)
    assert math.isfinite(out["loss"]) and m.exits is not None and m.exits.num_exits == 4
