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
    from kdforge.diffusion.sample import step_indices

    g, t = 64, 8
    teacher, student = SmallUNet(ch=8, grid=g), SmallUNet(ch=8, grid=g)
    teacher.steps.fill_(t)
    student.steps.fill_(t // 2)
    assert student.level == (t // 2, 2 * teacher.level[1])
    s_idx, t_idx = step_indices(student), step_indices(teacher)
    assert s_idx == t_idx[::2] == [16 * k for k in range(4, -1, -1)]  # grid index of step k: k * 2ts
    s = CosineGrid(g)
    closed = lambda i: math.cos(((i + 1) / (g + 1) + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(
        0.008 / 1.008 * math.pi / 2) ** 2  # the spec's ᾱ_i, written out
    for k in range(t // 2):  # the student's ᾱ at its step k = the closed form at the teacher's step 2k
        i = s_idx[::-1][k]  # (step 4 = index G, where the clamped β makes the closed form inexact, is left out)
        assert float(s.alpha_bar[i]) == pytest.approx(closed(2 * k * (g // t)), rel=1e-9)


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


class _RefSwish(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class _RefTimeEmbedding(torch.nn.Module):
    # pytorch-ddpm model.py: a frozen sinusoidal table, sin and cos interleaved per frequency
    def __init__(self, T: int, d_model: int, dim: int) -> None:
        super().__init__()
        freq = torch.exp(-torch.arange(0, d_model, 2).float() / d_model * math.log(10000))
        ang = torch.arange(T).float()[:, None] * freq[None, :]
        table = torch.stack([ang.sin(), ang.cos()], dim=-1).view(T, d_model)
        self.timembedding = torch.nn.Sequential(torch.nn.Embedding.from_pretrained(table),
                                                torch.nn.Linear(d_model, dim), _RefSwish(), torch.nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.timembedding(t)


class _RefDown(torch.nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.main = torch.nn.Conv2d(c, c, 3, 2, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class _RefUp(torch.nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.main = torch.nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.main(F.interpolate(x, scale_factor=2, mode="nearest"))


class _RefAttn(torch.nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.group_norm = torch.nn.GroupNorm(32, c)
        self.proj_q, self.proj_k = torch.nn.Conv2d(c, c, 1), torch.nn.Conv2d(c, c, 1)
        self.proj_v, self.proj = torch.nn.Conv2d(c, c, 1), torch.nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.group_norm(x)
        q, k, v = self.proj_q(n), self.proj_k(n), self.proj_v(n)
        weights = torch.einsum("bci,bcj->bij", q.flatten(2), k.flatten(2)) / math.sqrt(c)
        out = torch.einsum("bij,bcj->bci", weights.softmax(-1), v.flatten(2)).view(b, c, h, w)
        return x + self.proj(out)


class _RefRes(torch.nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int, attn: bool) -> None:
        super().__init__()
        self.block1 = torch.nn.Sequential(torch.nn.GroupNorm(32, cin), _RefSwish(), torch.nn.Conv2d(cin, cout, 3, 1, 1))
        self.temb_proj = torch.nn.Sequential(_RefSwish(), torch.nn.Linear(tdim, cout))
        self.block2 = torch.nn.Sequential(torch.nn.GroupNorm(32, cout), _RefSwish(), torch.nn.Dropout(0.0),
                                          torch.nn.Conv2d(cout, cout, 3, 1, 1))
        self.shortcut = torch.nn.Conv2d(cin, cout, 1, 1, 0) if cin != cout else torch.nn.Identity()
        self.attn = _RefAttn(cout) if attn else torch.nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x) + self.temb_proj(temb)[:, :, None, None]
        return self.attn(self.block2(h) + self.shortcut(x))


class _RefUNet(torch.nn.Module):
    """pytorch-ddpm's model.py UNet, written here from its structure (independent of kdforge's DdpmUNet)."""

    def __init__(self, T: int, ch: int, ch_mult: tuple[int, ...], attn: tuple[int, ...], num_res_blocks: int) -> None:
        super().__init__()
        tdim = 4 * ch
        self.time_embedding = _RefTimeEmbedding(T, ch, tdim)
        self.head = torch.nn.Conv2d(3, ch, 3, 1, 1)
        self.downblocks = torch.nn.ModuleList()
        skip, now = [ch], ch
        for i, m in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.downblocks.append(_RefRes(now, ch * m, tdim, i in attn))
                now = ch * m
                skip.append(now)
            if i < len(ch_mult) - 1:
                self.downblocks.append(_RefDown(now))
                skip.append(now)
        self.middleblocks = torch.nn.ModuleList([_RefRes(now, now, tdim, True), _RefRes(now, now, tdim, False)])
        self.upblocks = torch.nn.ModuleList()
        for i in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.upblocks.append(_RefRes(skip.pop() + now, ch * ch_mult[i], tdim, i in attn))
                now = ch * ch_mult[i]
            if i > 0:
                self.upblocks.append(_RefUp(now))
        assert not skip
        self.tail = torch.nn.Sequential(torch.nn.GroupNorm(32, now), _RefSwish(), torch.nn.Conv2d(now, 3, 3, 1, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time_embedding(t)
        hs = [self.head(x)]
        for layer in self.downblocks:
            hs.append(layer(hs[-1], temb))
        h = hs[-1]
        for layer in self.middleblocks:
            h = layer(h, temb)
        for layer in self.upblocks:
            h = layer(torch.cat([h, hs.pop()], 1) if isinstance(layer, _RefRes) else h, temb)
        return self.tail(h)


def test_ddpm_unet_loads_a_pytorch_ddpm_checkpoint_and_computes_what_its_model_does(tmp_path: Path) -> None:
    from kdforge.diffusion import DdpmUNet, load_ddpm_checkpoint

    torch.manual_seed(0)
    ref = _RefUNet(T=17, ch=32, ch_mult=(1, 2), attn=(1,), num_res_blocks=1)
    for p in ref.parameters():  # pytorch-ddpm zero-initialises some layers: random weights test every path
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.2)
    sd = {f"module.{k}": v for k, v in ref.state_dict().items()}
    torch.save({"ema_model": sd, "net_model": {}, "step": 5}, tmp_path / "ckpt.pt")  # as its train loop saves
    net = DdpmUNet(3, ch=32, ch_mult=(1, 2), attn=(1,), num_res_blocks=1, dropout=0.0, grid=16)  # T: grid + 1
    load_ddpm_checkpoint(str(tmp_path / "ckpt.pt"), net, steps=8)
    assert int(net.steps) == 8
    z, t = torch.randn(3, 3, 8, 8), torch.tensor([0, 9, 16])
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(z, t), ref.eval()(z, t), rtol=1e-4, atol=1e-5)
    wrong = DdpmUNet(3, ch=64, ch_mult=(1, 2), attn=(1,), num_res_blocks=1, grid=16)
    with pytest.raises(kd.KdforgeError, match="shape of"):
        load_ddpm_checkpoint(str(tmp_path / "ckpt.pt"), wrong)


def test_ddpm_unet_defaults_cover_the_whole_grid() -> None:
    from kdforge.diffusion.unet import ddpm_unet

    with torch.device("meta"):
        net = ddpm_unet()  # T unset, grid 1024: the table has 1025 rows
    assert net.time_embedding.timembedding[0].weight.shape == (1025, 128)
    small = ddpm_unet(ch=32, ch_mult=(1,), attn=(), num_res_blocks=1, grid=8)
    assert small(torch.randn(2, 3, 8, 8), torch.tensor([0, 8])).shape == (2, 3, 8, 8)  # index G = 8 works
    with pytest.raises(kd.KdforgeError, match=r"must cover the grid indices 0\.\.1024"):
        ddpm_unet(T=1000)


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


# -- EMA warm-up, CIFAR-10 in [−1, 1], the DenseNet classifier, FID --------------------------------------------
def test_ema_warmup_makes_the_random_start_fade() -> None:
    from kdforge.config import EmaConfig
    from kdforge.engine.ema import Ema

    start, trained = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(start.weight, 1.0)
    torch.nn.init.constant_(trained.weight, 0.0)
    n = 2300
    for warm in (False, True):
        ema = Ema(start, EmaConfig(decay=0.999, warmup=warm))
        for _ in range(n):
            ema.update(trained)
        # the share of the initial weights left is the product of the decays used, written out independently
        keep = 0.999**n if not warm else math.prod(min(0.999, (1 + i) / (10 + i)) for i in range(n))
        assert float(ema.model.weight) == pytest.approx(keep, rel=1e-6)
    assert 0.999**n > 0.1 - 0.001  # without warm-up: ~10 % of the random start after 2,300 steps
    assert keep < 1e-12


def test_cifar10_pm1_is_flip_only_in_minus_one_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    class FakeCifar:  # torchvision's CIFAR10 attributes, with tiny made-up images
        def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
            g = np.random.default_rng(0 if train else 1)
            self.data = g.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
            self.data[0, 0, 0] = (0, 255, 128)
            self.targets = list(range(6))
            self.classes = [f"c{i}" for i in range(10)]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCifar)
    b = load_data(name="cifar10_pm1", download=False, val_fraction=0.0, augment=True)
    raw = torch.from_numpy(FakeCifar("", True).data).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(b.train.x, raw / 127.5 - 1, atol=2e-6, rtol=0)  # exactly x / 127.5 − 1
    assert float(b.train.x[0, 0, 0, 0]) == pytest.approx(-1) and float(b.train.x[0, 1, 0, 0]) == pytest.approx(1)
    torch.manual_seed(0)
    for _ in range(20):  # every training view is the image or its mirror: no pad-and-crop
        x, _ = b.train[2]
        assert torch.equal(x, b.train.x[2]) or torch.equal(x, b.train.x[2].flip(-1))


def test_densenet_classifier_gives_the_papers_1920_by_4_by_4_map() -> None:
    pytest.importorskip("timm")
    from kdforge.diffusion.features import diffusion_densenet

    with torch.device("meta"):
        net = diffusion_densenet()  # DenseNet-201, CIFAR stem
        a, v = net.features(torch.empty(2, 3, 32, 32))
    assert a.shape == (2, 1920, 4, 4) and v.shape == (2, 1920) and net.channels == 1920
    small = diffusion_densenet(growth_rate=8, block_config=(1, 1, 1, 1))
    x = torch.randn(3, 3, 32, 32)
    a, v = small.eval().features(x)
    assert a.shape[2:] == (4, 4) and bool((a < 0).any())  # A is before the final ReLU
    torch.testing.assert_close(v, F.relu(a).mean((2, 3)))
    torch.testing.assert_close(small(x), small.fc(v))


def test_fid_of_a_sample_file_against_an_independent_computation(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from scipy import linalg

    from kdforge.cli import main
    from kdforge.diffusion.metrics import fid

    g = np.random.default_rng(0)
    fake = g.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
    real = np.clip(g.normal(150, 40, (60, 8, 8, 3)), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "samples.npz", images=fake, steps=1, seed=0)
    np.savez(tmp_path / "real.npz", images=real)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
    got = fid(tmp_path / "samples.npz", net, str(tmp_path / "real.npz"), batch_size=7)

    def feats(a: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(a).permute(0, 3, 1, 2).float().div(255).expand(-1, 3, -1, -1)
        with torch.no_grad():
            return net(x).double().numpy()

    f1, f2 = feats(fake), feats(real)
    m1, m2, s1, s2 = f1.mean(0), f2.mean(0), np.cov(f1.T), np.cov(f2.T)
    ref = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(linalg.sqrtm(s1 @ s2)))
    assert got["fid"] == pytest.approx(ref, rel=1e-6) and got["samples"] == 40 and got["reference_images"] == 60
    np.savez(tmp_path / "stats.npz", mu=m2, sigma=s2)  # pytorch-fid's precomputed-statistics file
    assert fid(tmp_path / "samples.npz", net, str(tmp_path / "stats.npz"))["fid"] == pytest.approx(ref, rel=1e-6)
    assert main(["fid", str(tmp_path / "samples.npz"), "--inception", str(tmp_path / "none.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and ("no Inception weights" in err or "pytorch-fid" in err)
    assert main(["fid", str(tmp_path / "missing.npz"), "--inception", str(tmp_path / "none.pth")]) == 2
    assert "no samples file" in capsys.readouterr().err


@pytest.mark.slow
def test_fid_inception_loads_a_weights_file_of_the_fid_inception_layout(tmp_path: Path) -> None:
    pfi = pytest.importorskip("pytorch_fid.inception")
    import sys

    from kdforge.diffusion.metrics import fid, inception_net

    # random weights in the FID Inception's layout, taken from the model pytorch-fid builds (no download)
    grab = lambda *a, **k: sys._getframe(1).f_locals["inception"].state_dict()
    original, pfi.load_state_dict_from_url = pfi.load_state_dict_from_url, grab
    try:
        torch.save(pfi.fid_inception_v3().state_dict(), tmp_path / "pt_inception.pth")
    finally:
        pfi.load_state_dict_from_url = original
    net = inception_net(tmp_path / "pt_inception.pth")
    assert pfi.load_state_dict_from_url is original  # the patch is undone
    g = np.random.default_rng(0)
    np.savez(tmp_path / "a.npz", images=g.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8))
    np.savez(tmp_path / "b.npz", images=g.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    got = fid(tmp_path / "a.npz", net, str(tmp_path / "b.npz"), batch_size=3)
    assert got["samples"] == 6 and np.isfinite(got["fid"]) and got["fid"] >= 0
    torch.save({"other": torch.zeros(2)}, tmp_path / "wrong.pth")
    with pytest.raises(kd.KdforgeError, match="not the FID Inception"):
        inception_net(tmp_path / "wrong.pth")


def test_paper_scale_recipes_name_the_flip_only_data_and_the_densenet() -> None:
    from kdforge.config import validate
    from kdforge.diffusion.method import DiffusionConfig
    from kdforge.recipe_files import packaged

    rdd = kd.Recipe.from_yaml(packaged("diffusion/cifar10-rdd-paper.yaml"))
    cls = kd.Recipe.from_yaml(packaged("diffusion/cifar10-densenet201.yaml"))
    assert rdd.data.name == cls.data.name == "cifar10_pm1" and rdd.data.augment
    m = validate(DiffusionConfig, rdd.method.model_dump())
    assert m.features is not None and m.features.model == "diffusion_densenet"
    assert m.features.checkpoint == "runs/cifar10-densenet201/checkpoints/last.safetensors"
    assert cls.method.model_dump()["model"]["model"] == "diffusion_densenet"
