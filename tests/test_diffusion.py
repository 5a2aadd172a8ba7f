"""kdforge.diffusion: the spec's invariants (schedule, DDIM, PD target, RDD terms, queue, gradient routing, smoke)."""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kdforge as kd
from kdforge.data import DataBundle, load_data
from kdforge.diffusion import (
    CosineGrid,
    Diffusion,
    PixelMemory,
    SmallUNet,
    cfd_loss,
    is_p2p_loss,
    memory_p2p_loss,
    sampling_grid,
)
from kdforge.diffusion.features import FeatureNet
from kdforge.diffusion.method import RoundConfig, round_names
from kdforge.diffusion.metrics import class_coverage, classifier_is, frechet_distance

pytestmark = pytest.mark.usefixtures("one_thread")


# -- schedule and sampler ---------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [8, 64, 1024])
def test_cosine_grid_is_strictly_decreasing_with_clamped_betas(grid: int) -> None:
    s = CosineGrid(grid)
    ab = s.alpha_bar
    assert len(ab) == grid + 1 and bool((ab[1:] < ab[:-1]).all())
    assert bool((s.beta <= 0.999 + 1e-15).all()) and float(ab[-1]) > 0
    assert float(ab[-1]) == pytest.approx(1e-3 * float(ab[-2]), rel=1e-9)  # the clamped last β
    u = lambda i: math.cos(((i + 1) / (grid + 1) + 0.008) / 1.008 * math.pi / 2) ** 2
    for i in (0, grid // 2, grid - 1):  # the closed form wherever the clamp is inactive
        assert float(ab[i]) == pytest.approx(u(i) / math.cos(0.008 / 1.008 * math.pi / 2) ** 2, rel=1e-9)


def test_a_halved_level_sees_the_teachers_even_grid_points() -> None:
    g, t = 64, 8
    teacher = sampling_grid(g, t)
    student = sampling_grid(g, t // 2)
    assert student == teacher[::2]
    s = CosineGrid(g)
    z = torch.zeros(1, dtype=torch.float64)
    for k in range(t // 2 + 1):  # student step k at scale 2ts is the teacher's step 2k
        assert torch.equal(s.alpha_at(k * 2 * (g // t), z), s.alpha_at(2 * k * (g // t), z))


def test_ddim_step_with_the_true_x_reproduces_the_forward_process_in_float64() -> None:
    s = CosineGrid(64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64)
    for a, b in [(64, 32), (10, 3), (1, 0), (64, 0)]:
        torch.testing.assert_close(s.ddim_step(s.noise(x, eps, a), x, a, b), s.noise(x, eps, b), atol=1e-10, rtol=0)


@pytest.mark.parametrize("pred", ["x", "eps", "v"])
def test_prediction_types_convert_to_the_same_x(pred: str) -> None:
    s = CosineGrid(64)
    x, eps = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.randn(3, 1, 4, 4, dtype=torch.float64)
    i = torch.tensor([1, 30, 64])
    z = s.noise(x, eps, i)
    a, sg = s.alpha_at(i, z), s.sigma_at(i, z)
    out = {"x": x, "eps": eps, "v": a * eps - sg * x}[pred]
    torch.testing.assert_close(s.to_x(out, z, i, pred), x, atol=1e-8, rtol=0)


def test_pd_target_makes_one_step_land_on_the_teachers_two_steps() -> None:
    torch.manual_seed(0)
    s = CosineGrid(64)
    teacher = SmallUNet(1, 8, (1, 2), 1, grid=64).double().eval()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    for t, ts in [(2, 8), (8, 8), (4, 16)]:
        a, a1, a2 = t * ts, (t - 1) * ts, (t - 2) * ts
        z = s.noise(x, torch.randn_like(x), a)
        with torch.no_grad():
            z1 = s.ddim_step(z, teacher(z, torch.full((4,), a)), a, a1)
            z2 = s.ddim_step(z1, teacher(z1, torch.full((4,), a1)), a1, a2)
        x_t = s.pd_target(z, z2, a, a2)
        torch.testing.assert_close(s.ddim_step(z, x_t, a, a2), z2, atol=1e-6, rtol=0)
        # an oracle teacher (it returns the true x) makes the target the true x
        z1 = s.ddim_step(z, x, a, a1)
        torch.testing.assert_close(s.pd_target(z, s.ddim_step(z1, x, a1, a2), a, a2), x, atol=1e-8, rtol=0)


def test_distilled_models_refuse_other_step_counts_and_samples_are_seeded(tmp_path: Path) -> None:
    from kdforge.diffusion import ddim_sample

    torch.manual_seed(0)
    net = SmallUNet(1, 8, (1,), 1, grid=16)
    a = ddim_sample(net, 6, (1, 8, 8), steps=3, seed=5)
    assert torch.equal(a, ddim_sample(net, 6, (1, 8, 8), steps=3, seed=5)) and a.abs().max() <= 1
    net.steps.fill_(4)
    with pytest.raises(kd.KdforgeError, match="distilled to 4 sampling steps"):
        ddim_sample(net, 2, (1, 8, 8), steps=2)
    assert ddim_sample(net, 2, (1, 8, 8)).shape == (2, 1, 8, 8)


def test_rounds_must_halve_an_even_step_count() -> None:
    rounds = [RoundConfig(kind="pd", epochs=1)] * 3
    assert [n for n, _, _ in round_names(8, 64, rounds)] == ["pd-4", "pd-2", "pd-1"]
    with pytest.raises(kd.KdforgeError, match=r"rounds\.3.*1 steps"):
        round_names(8, 64, [*rounds, RoundConfig(kind="rdd", epochs=1)])
    with pytest.raises(kd.KdforgeError, match="ddpm round trains the full grid"):
        round_names(8, 64, [RoundConfig(kind="ddpm", epochs=1)])


# -- the relational terms ---------------------------------------------------------------------------------
def test_cfd_is_nonnegative_zero_at_tau_one_and_shift_invariant() -> None:
    g = torch.Generator().manual_seed(0)
    v_s, v_t = torch.randn(6, 20, generator=g), torch.randn(6, 20, generator=g)
    assert float(cfd_loss(v_s, v_t)) > 0
    assert float(cfd_loss(v_t, v_t, tau=1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(cfd_loss(v_s + 3.0, v_t - 2.0)) == pytest.approx(float(cfd_loss(v_s, v_t)), rel=1e-5)
    # the temperature sharpens the teacher only: the optimum is softmax(v_T / τ)
    assert float(cfd_loss(v_t / 0.9, v_t, tau=0.9)) == pytest.approx(0.0, abs=1e-6)


def _is_loop(a_s: torch.Tensor, a_t: torch.Tensor, tau: float, pairs: str) -> float:
    b, c, h, w = a_s.shape
    s = F.normalize(a_s.reshape(b, c, -1), dim=1)
    t = F.normalize(a_t.reshape(b, c, -1), dim=1)
    total, count = 0.0, 0
    for i, j in itertools.product(range(b), range(b)):
        if pairs == "self" and i != j:
            continue
        for p in range(h * w):
            pt = F.softmax(t[i, :, p] @ t[j] / tau, 0)
            ps = F.softmax(s[i, :, p] @ s[j] / tau, 0)
            total += float((pt * (pt.log() - ps.log())).sum())
            count += 1
    return total / count


@pytest.mark.parametrize("pairs", ["all", "self"])
def test_is_p2p_matches_its_definition_and_invariances(pairs: str) -> None:
    g = torch.Generator().manual_seed(1)
    a_s, a_t = torch.randn(3, 5, 2, 2, generator=g), torch.randn(3, 5, 2, 2, generator=g)
    v = float(is_p2p_loss(a_s, a_t, 0.7, pairs))
    assert v > 0 and v == pytest.approx(_is_loop(a_s, a_t, 0.7, pairs), rel=1e-5)  # divides by B²·HW (B·HW)
    assert float(is_p2p_loss(a_t, a_t, 1.0, pairs)) == pytest.approx(0.0, abs=1e-6)
    scale = torch.rand(3, 1, 2, 2, generator=g) + 0.1  # a positive rescaling of every pixel vector
    assert float(is_p2p_loss(a_t * scale, a_t, 1.0, pairs)) == pytest.approx(0.0, abs=1e-6)
    perm = torch.tensor([2, 0, 1])
    assert float(is_p2p_loss(a_s[perm], a_t[perm], 0.7, pairs)) == pytest.approx(v, rel=1e-5)


def test_memory_enqueues_real_teacher_pixels_with_the_codes_pointer_rule() -> None:
    c, b = 16, 3  # 12 distinct one-hot pixel vectors in 16 channels
    a_t = torch.eye(c)[:12].reshape(b, 2, 2, c).permute(0, 3, 1, 2).contiguous()  # pixel (b, p) = e_{b·4+p}
    pixels = a_t.permute(0, 2, 3, 1).reshape(-1, c)
    mem = PixelMemory(c, size=10, per_step=4, contrast=5)
    torch.testing.assert_close(mem.queue.norm(dim=1), torch.ones(10))
    assert mem.contrast_idx.tolist() == torch.linspace(0, 9, 5).round().long().tolist()
    rows = mem.enqueue(a_t)
    assert int(mem.ptr) == 4 and torch.equal(mem.queue[:4], rows)
    assert all(any(torch.equal(r, p) for p in pixels) for r in rows)  # each row is a real teacher pixel
    mem.enqueue(a_t)
    assert int(mem.ptr) == 8
    before = mem.queue[:8].clone()
    last = mem.enqueue(a_t)  # 8 + 4 >= 10: the last 4 rows, pointer back to 0 (no wrap-around)
    assert int(mem.ptr) == 0 and torch.equal(mem.queue[-4:], last) and torch.equal(mem.queue[:6], before[:6])
    torch.testing.assert_close(mem.queue.norm(dim=1), torch.ones(10))
    compat = PixelMemory(c, size=100, per_step=12, compat=True)
    got = compat.enqueue(a_t)
    assert not all(any(torch.equal(r, p) for p in pixels) for r in got)  # the code's view(C, -1) scrambles them


def test_memory_relation_is_zero_for_an_identity_head_and_equal_maps() -> None:
    g = torch.Generator().manual_seed(0)
    a_t = torch.randn(2, 6, 2, 2, generator=g)
    q = F.normalize(torch.randn(7, 6, generator=g), dim=1)
    assert float(memory_p2p_loss(a_t, a_t, q)) == pytest.approx(0.0, abs=1e-6)
    assert float(memory_p2p_loss(torch.randn(2, 6, 2, 2, generator=g), a_t, q)) > 0


# -- the method through the engine ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def featnet_ck(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("feat") / "featnet.safetensors"
    kd.save_weights(FeatureNet(1, 10, 8, 8), path)
    return path


def _data(n: int = 64) -> DataBundle:
    b = load_data(name="digits_pm1", val_fraction=0.0, augment=False)
    b.train = torch.utils.data.Subset(b.train, range(n))
    b.test = torch.utils.data.Subset(b.test, range(64))
    return b


def _recipe(rounds: list[dict], featnet: Path | None, epochs: int = 1, **train: object) -> kd.Recipe:
    unet = {"model": "diffusion_unet", "kwargs": {"ch": 8, "mult": [1, 2], "grid": 16}}
    method = {"name": "diffusion", "model": unet, "rounds": rounds, "rdd": {"queue": 64, "contrast": 16, "per_step": 8}}
    if featnet is not None:
        method["features"] = {"model": "diffusion_featnet", "kwargs": {"width": 8}, "checkpoint": str(featnet)}
    return kd.Recipe.from_dict({"name": "t", "seed": 0, "data": {"name": "digits_pm1", "batch_size": 32},
                                "method": method, "optim": {"name": "adam", "lr": 1e-3, "weight_decay": 0.0},
                                "train": {"epochs": epochs, "progress": "silent", "device": "cpu", **train}})


def _method(recipe: kd.Recipe) -> Diffusion:
    torch.manual_seed(0)
    return kd.method.build_method(recipe.method.model_dump(), kd.DataInfo(10, 1, 8))  # type: ignore[return-value]


def test_student_is_conditioned_on_the_grid_index_of_its_own_step(featnet_ck: Path) -> None:
    m = _method(_recipe([{"kind": "rdd", "epochs": 1}], featnet_ck))
    assert m.teacher is not None and m.teacher.level == (16, 1) and m.student.level == (8, 2)
    seen: dict[str, list[torch.Tensor]] = {"s": [], "t": []}
    m.student.register_forward_hook(lambda mod, inp, out: seen["s"].append(inp[1]))
    m.teacher.register_forward_hook(lambda mod, inp, out: seen["t"].append(inp[1]))
    x = torch.rand(32, 1, 8, 8) * 2 - 1
    m.training_step((x, torch.zeros(32)), 0)
    a = seen["s"][0]
    assert bool((a % 2 == 0).all()) and bool((a >= 2).all()) and bool((a <= 16).all())  # a = t·ts with t = 2k
    assert torch.equal(seen["t"][0], a) and torch.equal(seen["t"][1], a - 1)  # the teacher's two steps


def test_gradients_reach_the_student_and_head_only(featnet_ck: Path) -> None:
    m = _method(_recipe([{"kind": "rdd", "epochs": 1}], featnet_ck))
    m.train()
    out = m.training_step((torch.rand(16, 1, 8, 8) * 2 - 1, torch.zeros(16)), 0)
    out["loss"].backward()
    assert all(p.grad is not None for p in m.student.parameters())
    assert all(p.grad is not None for p in m.head.parameters())  # type: ignore[union-attr]
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())  # type: ignore[union-attr]
    assert all(p.grad is None and not p.requires_grad for p in m.features.parameters())  # type: ignore[union-attr]
    assert not m.memory.queue.requires_grad and m.memory.queue.grad is None  # type: ignore[union-attr]
    assert {"cfd", "is", "mem"} <= set(out)
    trainer = kd.Trainer(m, _data(), _recipe([{"kind": "rdd", "epochs": 1}], featnet_ck))
    assert trainer.optimizers["student"].clip == 1.0 and trainer.optimizers["head"].clip is None
    assert trainer.optimizers["head"].sched.name == "constant"


def _fixed_loss(m: Diffusion, x: torch.Tensor) -> float:
    probe = copy.deepcopy(m).eval()
    torch.manual_seed(123)  # the same timesteps and noise before and after
    with torch.no_grad():
        return float(probe.training_step((x, torch.zeros(len(x))), 0)["loss"])


def test_twenty_rdd_steps_lower_the_loss_and_are_deterministic(featnet_ck: Path) -> None:
    recipe = _recipe([{"kind": "rdd", "epochs": 20, "lr": 3e-3}], featnet_ck)
    data = _data(32)
    x = torch.stack([data.train[i][0] for i in range(32)])
    finals = []
    for _ in range(2):
        m = _method(recipe)
        before = _fixed_loss(m, x)
        res = kd.Trainer(m, data, kd.run.stage_recipe(recipe, m.stages(1)[0])).fit()
        assert res.steps == 20
        finals.append({k: v.clone() for k, v in m.student.state_dict().items()})
        assert _fixed_loss(m, x) < 0.8 * before
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_staged_run_resumes_inside_and_across_rounds_and_hands_on_the_ema(tmp_path: Path, featnet_ck: Path) -> None:
    from kdforge.engine.checkpoint import load_weights
    from kdforge.run import fit

    rounds = [{"kind": "ddpm", "epochs": 2}, {"kind": "pd", "epochs": 2}, {"kind": "rdd", "epochs": 2}]
    recipe = _recipe(rounds, featnet_ck, ema={"decay": 0.9}, save_every_steps=1)
    fit(_method(recipe), _data(), recipe, tmp_path / "full")

    class Stop(kd.Callback):
        def on_step_end(self, trainer: kd.Trainer, out: dict) -> None:
            if trainer.recipe.name.endswith("rdd-4") and trainer.global_step == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(_method(recipe), _data(), recipe, tmp_path / "cut", callbacks=(Stop(),))
    fit(_method(recipe), _data(), recipe, tmp_path / "cut", resume=True)
    for name in ("last.safetensors",):
        a, b = SmallUNet(1, 8, (1, 2), grid=16), SmallUNet(1, 8, (1, 2), grid=16)
        load_weights(a, tmp_path / "full" / "checkpoints" / name)
        load_weights(b, tmp_path / "cut" / "checkpoints" / name)
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
        assert int(a.steps) == 4
    # the base round's saved model is its EMA, and it is what the first PD round started from
    base = SmallUNet(1, 8, (1, 2), grid=16)
    load_weights(base, tmp_path / "full" / "stages" / "00-ddpm-16" / "checkpoints" / "last.safetensors")
    state = torch.load(tmp_path / "full" / "stages" / "00-ddpm-16" / "checkpoints" / "state" / "trainer.pt",
                       weights_only=True)
    ema = state["ema"]["weights"]
    assert all(torch.equal(base.state_dict()[k], ema[k]) for k in ema)


def test_sample_command_writes_grid_and_npz_and_refuses_other_steps(tmp_path: Path, featnet_ck: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from kdforge.cli import main

    recipe = _recipe([{"kind": "pd", "epochs": 1}], None)
    kd.run.fit(_method(recipe), _data(), recipe, tmp_path / "run")
    assert main(["sample", str(tmp_path / "run"), "-n", "5", "--seed", "3"]) == 0
    npz = next((tmp_path / "run" / "samples").glob("*.npz"))
    d = np.load(npz)
    assert d["x"].shape == (5, 1, 8, 8) and int(d["steps"]) == 8 and d["images"].dtype == np.uint8
    assert next((tmp_path / "run" / "samples").glob("*.png")).stat().st_size > 0
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "run"), "-n", "5", "--steps", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "distilled to 8 sampling steps" in err


# -- metrics and the pytorch-ddpm layout --------------------------------------------------------------------
def test_metrics_on_known_inputs() -> None:
    g = np.random.default_rng(0)
    f = g.normal(size=(500, 4))
    assert frechet_distance(f, f) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(f, f + 2.0) == pytest.approx(16.0, rel=1e-6)  # ‖μ shift‖² = 4·2²
    onehot = np.eye(10)[np.arange(1000) % 10]
    assert classifier_is(onehot) == pytest.approx(10.0, rel=1e-6)
    assert class_coverage(onehot) == pytest.approx(math.log(10))
    assert classifier_is(np.full((50, 10), 0.1)) == pytest.approx(1.0) and class_coverage(np.eye(10)[[3] * 50]) == 0


def test_ddpm_unet_has_pytorch_ddpm_keys_and_loads_a_checkpoint(tmp_path: Path) -> None:
    from kdforge.diffusion import DdpmUNet, load_ddpm_checkpoint

    torch.manual_seed(0)
    net = DdpmUNet(3, T=16, ch=32, ch_mult=(1, 2), attn=(1,), num_res_blocks=1, dropout=0.0, grid=16)
    keys = set(net.state_dict())
    for k in ("time_embedding.timembedding.0.weight", "time_embedding.timembedding.1.weight", "head.weight",
              "downblocks.0.block1.0.weight", "downblocks.0.temb_proj.1.weight", "downblocks.1.main.weight",
              "downblocks.2.attn.proj_q.weight", "middleblocks.0.attn.group_norm.weight", "upblocks.0.shortcut.weight",
              "upblocks.2.main.weight", "tail.2.weight"):
        assert k in keys, k
    emb = net.state_dict()["time_embedding.timembedding.0.weight"]
    assert float(emb[3, 0]) == pytest.approx(math.sin(3.0)) and float(emb[3, 1]) == pytest.approx(math.cos(3.0))
    sd = {f"module.{k}": v for k, v in net.state_dict().items() if k not in ("grid", "steps")}
    torch.save({"ema_model": sd, "step": 5}, tmp_path / "ckpt.pt")
    other = DdpmUNet(3, T=16, ch=32, ch_mult=(1, 2), attn=(1,), num_res_blocks=1, dropout=0.0, grid=16)
    load_ddpm_checkpoint(str(tmp_path / "ckpt.pt"), other, steps=8)
    assert int(other.steps) == 8
    z, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 9])
    torch.testing.assert_close(other(z, t), net(z, t))
    wrong = DdpmUNet(3, T=16, ch=64, ch_mult=(1, 2), attn=(1,), num_res_blocks=1, grid=16)
    with pytest.raises(kd.KdforgeError, match="shape of"):
        load_ddpm_checkpoint(str(tmp_path / "ckpt.pt"), wrong)


def test_diffusers_adapter_on_a_tiny_random_unet() -> None:
    pytest.importorskip("diffusers")
    from kdforge.diffusion import ddim_sample
    from kdforge.diffusion.unet import diffusers_unet

    torch.manual_seed(0)
    net = diffusers_unet(in_chans=1, config={"sample_size": 8, "block_out_channels": (8, 16), "layers_per_block": 1,
                                             "norm_num_groups": 4, "down_block_types": ("DownBlock2D", "DownBlock2D"),
                                             "up_block_types": ("UpBlock2D", "UpBlock2D")}, grid=16)
    out = net(torch.randn(2, 1, 8, 8), torch.tensor([1, 15]))
    assert out.shape == (2, 1, 8, 8)
    assert ddim_sample(net, 3, (1, 8, 8), steps=2).shape == (3, 1, 8, 8)
