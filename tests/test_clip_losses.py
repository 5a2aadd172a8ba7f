"""CLIP-KD losses on crafted embeddings: zeros, symmetries, exact gradients, student-only gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdforge.clip.losses import (
    ClipKDLoss,
    LogitScale,
    afd_loss,
    clip_loss,
    contrastive_grads,
    crd_loss,
    fd_loss,
    gd_loss,
    icl_loss,
)
from kdforge.errors import KdforgeError


def unit(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def test_clip_loss_symmetric_equal_embeddings_and_aligned_limit() -> None:
    v, s = unit(8, 16, seed=1), unit(8, 16, seed=2)
    assert torch.allclose(clip_loss(v, s, 14.3), clip_loss(s, v, 14.3))
    same = unit(1, 16).expand(8, 16)
    assert clip_loss(same, same, 10.0).item() == pytest.approx(math.log(8), abs=1e-5)
    eye = torch.eye(8, 16)
    assert clip_loss(eye, eye, 100.0).item() < 1e-30 + 1e-6
    assert clip_loss(eye, eye, 100.0) < clip_loss(eye, eye, 5.0)


def test_crd_zero_nonneg_row_shift_invariant_and_student_only_grad() -> None:
    z = torch.randn(6, 6)
    assert crd_loss(z, z).item() == pytest.approx(0.0, abs=1e-6)
    zt = torch.randn(6, 6, requires_grad=True)
    zs = torch.randn(6, 6, requires_grad=True)
    loss = crd_loss(zs, zt)
    assert loss.item() > 0
    # one constant per row leaves row-softmaxes unchanged (only the row direction: shift every row equally
    # so the column direction is unchanged too)
    shifted = crd_loss(zs + 3.0, zt - 1.0)
    assert shifted.item() == pytest.approx(loss.item(), abs=1e-5)
    loss.backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert zt.grad is None


def test_fd_zero_scale_invariant_and_cosine_form() -> None:
    tv, ts = unit(5, 12, seed=3), unit(5, 12, seed=4)
    assert fd_loss(tv, ts, tv, ts).item() == 0.0
    loss_mod = ClipKDLoss(12, 12, {"fd": 1.0}, gather_batch=False)
    raw_v, raw_s = torch.randn(5, 12), torch.randn(5, 12)
    a = loss_mod(raw_v, raw_s, torch.tensor(10.0), tv, ts, 10.0)["fd"]
    b = loss_mod(3.7 * raw_v, 0.2 * raw_s, torch.tensor(10.0), tv, ts, 10.0)["fd"]
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    v, s = F.normalize(raw_v, dim=-1), F.normalize(raw_s, dim=-1)
    expect = sum((2 - 2 * F.cosine_similarity(x, t).mean()) / 12 for x, t in ((v, tv), (s, ts)))
    assert a.item() == pytest.approx(float(expect), rel=1e-5)


def test_icl_equals_teacher_clip_loss_when_student_is_teacher() -> None:
    tv, ts = unit(7, 10, seed=5), unit(7, 10, seed=6)
    assert icl_loss(tv, ts, tv, ts, 20.0).item() == pytest.approx(clip_loss(tv, ts, 20.0).item(), rel=1e-6)


def test_gd_analytic_gradients_match_autograd_float64() -> None:
    p = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    tau = 0.37
    loss = F.cross_entropy(p @ k.T / tau, torch.arange(6))
    gp, gk = torch.autograd.grad(loss, (p, k))
    ap, ak = contrastive_grads(p.detach(), k.detach(), 1 / tau)
    assert torch.allclose(ap, gp, atol=1e-10) and torch.allclose(ak, gk, atol=1e-10)


def test_gd_zero_when_student_is_teacher_and_compat_divides_by_scale() -> None:
    tv, ts = unit(6, 8, seed=7, dtype=torch.float64), unit(6, 8, seed=8, dtype=torch.float64)
    assert gd_loss(tv, ts, tv, ts, 14.0, 14.0).item() == pytest.approx(0.0, abs=1e-14)
    v, s = unit(6, 8, seed=9, dtype=torch.float64), unit(6, 8, seed=10, dtype=torch.float64)
    compat = gd_loss(v, s, tv, ts, 14.0, 20.0, compat=True)
    assert compat.item() == pytest.approx(gd_loss(v, s, tv, ts, 1 / 14.0, 1 / 20.0).item(), rel=1e-10)
    assert compat.item() < 1e-4 * gd_loss(v, s, tv, ts, 14.0, 20.0).item()  # why the code needs weight 1e8


@pytest.mark.parametrize("d_s", [16, 8])
def test_afd_and_projection_widths(d_s: int) -> None:
    mod = ClipKDLoss(d_s, 16, {"afd": 1.0}, gather_batch=False)
    assert (mod.proj_v is None) == (d_s == 16)
    assert mod.fuse_v.in_features == 32 and mod.fuse_v.out_features == d_s  # projected width + teacher width
    out = mod(torch.randn(4, d_s), torch.randn(4, d_s), torch.tensor(14.0), unit(4, 16), unit(4, 16), 14.0)
    assert out["afd"].ndim == 0 and out["afd"].item() > 0


def test_afd_value_of_the_fusion_by_hand() -> None:
    """f^I = normalise(U_v[ṽ; v^T] + b_v), f^T likewise; L = ½[CE(κ f^I f^Tᵀ) + CE(κ f^T f^Iᵀ)], written out."""
    v, s = [[1.0, 0.0], [0.6, 0.8]], [[0.0, 1.0], [0.8, -0.6]]
    tv, ts = [[0.6, 0.8], [1.0, 0.0]], [[-0.6, 0.8], [0.0, 1.0]]
    uv, bv = [[1.0, 0.5, -1.0, 0.0], [0.0, 2.0, 0.5, 1.0]], [0.1, -0.2]
    us, bs = [[0.5, 0.0, 1.0, 1.0], [-1.0, 1.0, 0.0, 2.0]], [0.0, 0.3]
    kappa = 5.0

    def fuse(a: list[float], b: list[float], u: list[list[float]], bias: list[float]) -> list[float]:
        x = a + b
        y = [sum(w * xi for w, xi in zip(row, x, strict=True)) + c for row, c in zip(u, bias, strict=True)]
        n = math.sqrt(sum(t * t for t in y))
        return [t / n for t in y]

    fi = [fuse(a, b, uv, bv) for a, b in zip(v, tv, strict=True)]
    ft = [fuse(a, b, us, bs) for a, b in zip(s, ts, strict=True)]

    def ce_rows(p: list[list[float]], k: list[list[float]]) -> float:
        total = 0.0
        for i, pi in enumerate(p):
            logits = [kappa * sum(x * y for x, y in zip(pi, kj, strict=True)) for kj in k]
            total += math.log(sum(math.exp(z) for z in logits)) - logits[i]
        return total / len(p)

    want = 0.5 * (ce_rows(fi, ft) + ce_rows(ft, fi))
    fuse_v, fuse_s = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    with torch.no_grad():
        for lin, u, b in ((fuse_v, uv, bv), (fuse_s, us, bs)):
            lin.weight.copy_(torch.tensor(u))
            lin.bias.copy_(torch.tensor(b))
    args = [torch.tensor(x) for x in (v, s, tv, ts)]
    assert afd_loss(*args, fuse_v, fuse_s, kappa).item() == pytest.approx(want, rel=1e-5)
    # the module's AFD term is the same fusion with its own layers
    mod = ClipKDLoss(2, 2, {"afd": 1.0}, gather_batch=False)
    mod.fuse_v.load_state_dict(fuse_v.state_dict())
    mod.fuse_s.load_state_dict(fuse_s.state_dict())
    with torch.no_grad():
        mod.fusion_scale.theta.fill_(math.log(kappa))
    got = mod(args[0], args[1], torch.tensor(1.0), args[2], args[3], 1.0)["afd"]
    assert got.item() == pytest.approx(want, rel=1e-5)
    # the fusion matters: without the teacher half (zeroed), the value changes
    assert afd_loss(args[0], args[1], 0 * args[2], 0 * args[3], fuse_v, fuse_s, kappa).item() != pytest.approx(want)


def test_clip_compat_switch_and_old_keys() -> None:
    v, s = unit(6, 8, seed=9, dtype=torch.float64), unit(6, 8, seed=10, dtype=torch.float64)
    tv, ts = unit(6, 8, seed=7, dtype=torch.float64), unit(6, 8, seed=8, dtype=torch.float64)
    args = (v, s, torch.tensor(14.0), tv, ts, 20.0)

    def gd(**kw: object) -> float:
        return ClipKDLoss(8, 8, {"gd": 1.0}, gather_batch=False, **kw).double()(*args)["gd"].item()

    paper, code = gd_loss(v, s, tv, ts, 14.0, 20.0).item(), gd_loss(v, s, tv, ts, 1 / 14.0, 1 / 20.0).item()
    assert gd() == pytest.approx(paper, rel=1e-6)
    assert gd(compat=["gd"]) == pytest.approx(code, rel=1e-6)
    assert gd(compat="official") == pytest.approx(code, rel=1e-6)
    with pytest.warns(FutureWarning, match="gd_compat is deprecated"):
        assert gd(gd_compat=True) == pytest.approx(code, rel=1e-6)
    with pytest.raises(KdforgeError, match="compat must be one of paper, official, mfd, gd"):
        ClipKDLoss(8, 8, {"gd": 1.0}, compat=["torchdistill"])


def test_projection_gets_gradients_and_teacher_none() -> None:
    mod = ClipKDLoss(8, 16, {"task": 1.0, "crd": 1.0, "fd": 2000.0, "icl": 1.0, "gd": 1e3, "afd": 1.0},
                     gather_batch=False)
    raw_v = torch.randn(6, 8, requires_grad=True)
    raw_s = torch.randn(6, 8, requires_grad=True)
    tv = unit(6, 16, seed=11).requires_grad_()
    ts = unit(6, 16, seed=12).requires_grad_()
    scale = torch.tensor(14.0, requires_grad=True)
    out = mod(raw_v, raw_s, scale, tv, ts, torch.tensor(20.0))
    assert set(out) == {"task", "crd", "fd", "gd", "icl", "afd", "loss"}
    out["loss"].backward()
    for p in (mod.proj_v.weight, mod.proj_s.weight, mod.cross_scale.theta, mod.fuse_v.weight, raw_v, raw_s, scale):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert tv.grad is None and ts.grad is None
    assert ClipKDLoss(16, 16, {"fd": 1.0}).proj_v is None
    assert ClipKDLoss(8, 16, {"crd": 1.0}).proj_v is None  # no projected term, no unused parameters


def test_logit_scale_exp_clamped_and_raw() -> None:
    s = LogitScale()
    assert s().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        s.theta.fill_(9.0)
    assert s().item() == pytest.approx(100.0, rel=1e-5)
    s.clamp_()
    assert s.theta.item() == pytest.approx(math.log(100), rel=1e-6)
    raw = LogitScale(param="raw")
    assert raw().item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)  # used directly, as in the code
    with pytest.raises(KdforgeError, match="scale_param"):
        LogitScale(param="log")


def test_unknown_term_is_a_clear_error() -> None:
    with pytest.raises(KdforgeError, match="valid: task, crd, fd, gd, icl, afd"):
        ClipKDLoss(8, 8, {"mfd": 1.0})
