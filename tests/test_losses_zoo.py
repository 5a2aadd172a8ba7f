"""KD-zoo losses: minima at equality, gradient flow, shape errors, invariances and reference values from the spec."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kdforge as kd
from kdforge.errors import KdforgeError
from kdforge.losses import build_loss, kd_loss
from kdforge.losses.contrastive import CRDLoss, nce_loss
from kdforge.losses.feature import (
    ab_loss,
    at_loss,
    fitnet_loss,
    fsp_loss,
    ft_factor_loss,
    hcl_loss,
    nst_loss,
    ofd_loss,
    vid_loss,
)
from kdforge.losses.relation import cc_loss, pkt_loss, rkd_loss, sp_loss
from kdforge.losses.response_extra import dist_from_probs, dist_loss, dkd_loss, dkd_parts
from kdforge.method import DataInfo, build_method
from kdforge.registry import LOSSES

# -- DKD -------------------------------------------------------------------------------------------


def test_dkd_identity_kd_equals_tckd_plus_weighted_nckd_per_sample() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(16, 7, dtype=torch.float64) * 3, torch.randn(16, 7, dtype=torch.float64) * 3
    y = torch.randint(0, 7, (16,))
    T = 2.0
    tckd, nckd = dkd_parts(s, t, y, T)
    p_t = F.softmax(t / T, -1)
    kl = (p_t * (F.log_softmax(t / T, -1) - F.log_softmax(s / T, -1))).sum(-1)
    p_tg = p_t.gather(1, y[:, None]).squeeze(1)
    assert torch.allclose(kl, tckd + (1 - p_tg) * nckd, atol=1e-10)
    # hence DKD with α = 1 and per-sample β = 1 − p_t,g is KD exactly
    assert torch.allclose(((tckd + (1 - p_tg) * nckd).mean() * T * T), kd_loss(s, t, T), atol=1e-10)


def test_dkd_alpha1_beta0_is_tckd_and_zero_at_equality() -> None:
    torch.manual_seed(1)
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    tckd, _ = dkd_parts(s, t, y, 4.0)
    assert torch.allclose(dkd_loss(s, t, y, 1.0, 0.0, 4.0), tckd.mean() * 16, atol=1e-6)
    assert dkd_loss(s, s.clone(), y).abs() < 1e-5


def test_dkd_invariant_to_permuting_non_target_classes() -> None:
    torch.manual_seed(2)
    s, t = torch.randn(1, 6), torch.randn(1, 6)
    y = torch.tensor([2])
    perm = torch.tensor([4, 0, 2, 5, 1, 3])  # keeps class 2 in place
    a = dkd_loss(s, t, y, 1.0, 8.0, 4.0)
    b = dkd_loss(s[:, perm], t[:, perm], y, 1.0, 8.0, 4.0)
    assert torch.allclose(a, b, atol=1e-6)


def test_dkd_reference_value_from_the_formula() -> None:
    s, t, g, T, alpha, beta = [1.0, 2.0, 0.5, -1.0], [2.0, 0.0, 1.0, 0.5], 1, 2.0, 1.0, 8.0

    def soft(z: list[float]) -> list[float]:
        e = [math.exp(v / T) for v in z]
        return [v / sum(e) for v in e]

    ps, pt = soft(s), soft(t)
    tckd = pt[g] * math.log(pt[g] / ps[g]) + (1 - pt[g]) * math.log((1 - pt[g]) / (1 - ps[g]))
    qs = soft([v for i, v in enumerate(s) if i != g])
    qt = soft([v for i, v in enumerate(t) if i != g])
    nckd = sum(a * math.log(a / b) for a, b in zip(qt, qs, strict=True))
    ref = T * T * (alpha * tckd + beta * nckd)
    got = dkd_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([g]), alpha, beta, T)
    assert got.item() == pytest.approx(ref, rel=1e-5)


def test_dkd_warmup_follows_set_epoch() -> None:
    loss = build_loss("dkd", warmup=4)
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.randint(0, 5, (4,))
    full = dkd_loss(s, t, y)
    loss.set_epoch(0)
    assert torch.allclose(loss(s, t, y), full / 4)
    loss.set_epoch(10)
    assert torch.allclose(loss(s, t, y), full)


def test_logit_losses_reject_bad_shapes() -> None:
    with pytest.raises(KdforgeError, match="dkd: targets must be"):
        dkd_loss(torch.randn(4, 5), torch.randn(4, 5), torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(KdforgeError, match="dist: student and teacher logits"):
        dist_loss(torch.randn(4, 5), torch.randn(4, 6))
    with pytest.raises(KdforgeError, match="loss 'dkd' has no option 'gamma'"):
        build_loss("dkd", gamma=1.0)


# -- DIST ------------------------------------------------------------------------------------------


def test_dist_zero_at_equality_and_bounded() -> None:
    torch.manual_seed(3)
    z = torch.randn(16, 10)
    assert dist_loss(z, z.clone(), 1.0, 1.0, 4.0).abs() < 1e-3  # not exactly 0: the eps 1e-8 in ρ, times T²
    assert dist_loss(z.double(), z.double(), 1.0, 1.0, 1.0).abs() < 1e-6
    T = 4.0
    for _ in range(5):
        v = dist_loss(torch.randn(16, 10) * 5, torch.randn(16, 10) * 5, 1.0, 1.0, T)
        assert 0 <= v <= 2 * T * T * 2  # β·inter + γ·intra, each in [0, 2T²]
    ys = torch.softmax(torch.randn(8, 5), -1)
    _, inter, intra = dist_from_probs(ys, 1 - ys, T=T)  # perfectly anti-correlated rows and columns
    assert inter.item() == pytest.approx(2 * T * T, rel=1e-4) and intra.item() == pytest.approx(2 * T * T, rel=1e-4)


def test_dist_invariances() -> None:
    torch.manual_seed(4)
    ys, yt = torch.rand(8, 6), torch.rand(8, 6)
    a, b = torch.rand(8, 1) + 0.5, torch.randn(8, 1)
    _, inter, _ = dist_from_probs(ys, yt)
    _, inter2, _ = dist_from_probs(a * ys + b, yt)
    assert torch.allclose(inter, inter2, atol=1e-5)
    ac, bc = torch.rand(1, 6) + 0.5, torch.randn(1, 6)
    _, _, intra = dist_from_probs(ys, yt)
    _, _, intra2 = dist_from_probs(ac * ys + bc, yt)
    assert torch.allclose(intra, intra2, atol=1e-5)


def test_dist_reference_value() -> None:
    ys = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    yt = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])

    def rho(u: np.ndarray, v: np.ndarray) -> float:
        u, v = u - u.mean(), v - v.mean()
        return float((u * v).sum() / (np.linalg.norm(u) * np.linalg.norm(v) + 1e-8))

    inter = np.mean([1 - rho(ys[i], yt[i]) for i in range(2)])
    intra = np.mean([1 - rho(ys[:, j], yt[:, j]) for j in range(3)])
    total, _, _ = dist_from_probs(torch.tensor(ys), torch.tensor(yt), beta=2.0, gamma=3.0, T=1.0)
    assert total.item() == pytest.approx(2 * inter + 3 * intra, rel=1e-6)


# -- feature and relation losses: gradients, connectors, errors -------------------------------------

S_MAPS = [(4, 8, 8), (8, 4, 4)]
T_MAPS = [(6, 8, 8), (12, 4, 4)]
FEATURE_CASES: list[tuple[str, dict[str, Any], list[tuple[int, ...]], list[tuple[int, ...]]]] = [
    ("fitnet", {}, [(4, 8, 8)], [(6, 4, 4)]),
    ("fitnet", {}, [(4, 4, 4)], [(6, 8, 8)]),
    ("at", {}, S_MAPS, T_MAPS),
    ("nst", {}, S_MAPS, T_MAPS),
    ("ft", {"stages": "one"}, [(4, 8, 8)], [(6, 4, 4)]),  # two stages: the paraphraser is frozen in the main one
    ("ab", {}, S_MAPS, T_MAPS),
    ("fsp", {}, S_MAPS, T_MAPS),
    ("vid", {}, S_MAPS, T_MAPS),
    ("ofd", {}, [(4, 8, 8)], [(6, 8, 8)]),
    ("reviewkd", {}, [*S_MAPS, (16,)], [*T_MAPS, (24,)]),
    ("rkd", {}, [(16,)], [(24,)]),
    ("sp", {}, [(4, 8, 8)], [(6, 4, 4)]),
    ("cc", {}, [(16,)], [(24,)]),
    ("cc", {"compat": "repdistiller"}, [(16,)], [(24,)]),
    ("pkt", {}, [(16,)], [(24,)]),
    ("crd", {"bank_size": 64, "num_negatives": 16}, [(16,)], [(24,)]),
]


def _feats(shapes: list[tuple[int, ...]], b: int = 6, grad: bool = True, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, *sh, generator=g).relu().requires_grad_(grad) for sh in shapes]


@pytest.mark.parametrize(("name", "kw", "s_shapes", "t_shapes"), FEATURE_CASES,
                         ids=[f"{c[0]}{i}" for i, c in enumerate(FEATURE_CASES)])
def test_gradients_reach_student_and_connectors_never_teacher(name: str, kw: dict[str, Any],
                                                              s_shapes: list[tuple[int, ...]],
                                                              t_shapes: list[tuple[int, ...]]) -> None:
    torch.manual_seed(0)
    loss = build_loss(name, **kw)
    s, t = _feats(s_shapes), _feats(t_shapes, seed=1)
    with torch.no_grad():
        loss.setup(s, t)
    extra = {"targets": torch.randint(0, 3, (6,))} if loss.needs_targets else {}
    value = loss(s, t, **extra)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)
    assert all(x.grad is None for x in t)
    params = list(loss.parameters())
    assert all(p.grad is not None for p in params), [n for n, p in loss.named_parameters() if p.grad is None]


def test_connector_losses_need_setup_and_matching_shapes() -> None:
    loss = build_loss("fitnet")
    s, t = _feats([(4, 8, 8)]), _feats([(6, 4, 4)])
    with pytest.raises(KdforgeError, match="fitnet: connectors are not built"):
        loss(s, t)
    loss.setup(s, t)
    with pytest.raises(KdforgeError, match="do not fit the connectors"):
        loss(_feats([(4, 4, 4)]), t)
    with pytest.raises(KdforgeError, match="got 2 student and 1 teacher"):
        loss(_feats([(4, 8, 8), (4, 8, 8)]), t)


def test_wrong_rank_is_a_clear_error() -> None:
    with pytest.raises(KdforgeError, match=r"at: feature 0 must be \(B, C, H, W\) maps"):
        build_loss("at")([torch.randn(4, 16)], [torch.randn(4, 16)])
    with pytest.raises(KdforgeError, match="fsp: needs at least 2"):
        build_loss("fsp").setup(_feats([(4, 8, 8)]), _feats([(4, 8, 8)]))
    with pytest.raises(KdforgeError, match="crd: takes one student and one teacher tap"):
        build_loss("crd").setup(_feats([(8,), (8,)]), _feats([(8,), (8,)]))


def test_missing_tap_is_a_clear_error_when_building_the_method() -> None:
    cfg = {"name": "distill", "teacher": {"model": "cnn_small"}, "student": {"model": "cnn_tiny"},
           "terms": [{"loss": "at", "student_tap": "stage9"}]}
    with pytest.raises(KdforgeError, match=r"no module named 'stage9'.*did you mean"):
        build_method(cfg, DataInfo(10, 1, 8))


# -- minima at equality and invariances --------------------------------------------------------------


def test_feature_losses_vanish_when_student_equals_teacher() -> None:
    f = _feats(S_MAPS, grad=False)
    g = [x.clone() for x in f]
    for fn in (at_loss, nst_loss, fitnet_loss, fsp_loss, hcl_loss):
        assert fn(f, g).abs() < 1e-6, fn.__name__
    assert ft_factor_loss(f[0], g[0]).abs() < 1e-7
    assert ofd_loss(f[0], g[0], torch.zeros(4)).abs() < 1e-7
    t = torch.randn(3, 4, 5, 5)
    assert ab_loss(torch.where(t > 0, 1.0, -1.0), t, margin=1.0).abs() < 1e-7  # right side of the boundary, with margin
    assert ab_loss(-torch.where(t > 0, 1.0, -1.0), t, margin=1.0) > 0
    v = torch.randn(8, 16)
    for fn in (sp_loss, pkt_loss, rkd_loss):
        assert fn(v, v.clone()).abs() < 1e-6, fn.__name__
    assert cc_loss(v, v.clone(), "paper").abs() < 1e-7 and cc_loss(v, v.clone(), "repdistiller").abs() < 1e-7


def test_at_unchanged_by_feature_scale_and_sp_takes_other_sizes() -> None:
    s, t = _feats(S_MAPS, grad=False), _feats(T_MAPS, grad=False, seed=1)
    assert torch.allclose(at_loss(s, t), at_loss([3.0 * x for x in s], [0.5 * x for x in t]), atol=1e-6)
    assert torch.isfinite(sp_loss(torch.randn(6, 4, 8, 8), torch.randn(6, 32, 2, 2)))


def test_rkd_invariant_to_scale_rotation_translation() -> None:
    torch.manual_seed(5)
    s, t = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    base = rkd_loss(s, t)
    assert torch.allclose(rkd_loss(3.0 * s, t), base, atol=1e-8)
    assert torch.allclose(rkd_loss(s @ q, t), base, atol=1e-8)
    assert torch.allclose(rkd_loss(s + 2.0, t - 1.0), base, atol=1e-8)


def test_vid_is_a_gaussian_nll_that_prefers_mu_equal_target() -> None:
    loss = build_loss("vid")
    s, t = _feats([(4, 4, 4)]), _feats([(6, 4, 4)], seed=1)
    loss.setup(s, t)
    var = loss.variances()[0]
    assert torch.allclose(var, torch.full((6,), 5.0), atol=1e-5)
    target = t[0].detach()
    at_target = vid_loss(target, target, var)
    assert at_target.item() == pytest.approx(0.5 * math.log(5.0), rel=1e-4)
    assert vid_loss(target + 1.0, target, var) > at_target
    loss(s, t).backward()
    assert loss.log_scales[0].grad is not None and loss.log_scales[0].grad.abs().sum() > 0


# -- reference values from the spec's formulas (numpy, independent of the implementation) -----------


def test_at_sp_pkt_nst_reference_values() -> None:
    rng = np.random.default_rng(0)
    fs, ft = rng.random((2, 3, 4, 4)), rng.random((2, 5, 4, 4))

    def att(f: np.ndarray) -> np.ndarray:
        a = (f**2).mean(1).reshape(len(f), -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    ref_at = ((att(fs) - att(ft)) ** 2).mean()
    assert at_loss([torch.tensor(fs)], [torch.tensor(ft)]).item() == pytest.approx(ref_at, rel=1e-6)

    def gram(f: np.ndarray) -> np.ndarray:
        q = f.reshape(len(f), -1)
        g = q @ q.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    ref_sp = ((gram(ft) - gram(fs)) ** 2).sum() / 4
    assert sp_loss(torch.tensor(fs), torch.tensor(ft)).item() == pytest.approx(ref_sp, rel=1e-6)

    vs, vt = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))

    def cond(v: np.ndarray) -> np.ndarray:
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
        k = (v @ v.T + 1) / 2
        return k / k.sum(1, keepdims=True)

    ps, pt = cond(vs), cond(vt)
    ref_pkt = (pt * np.log((pt + 1e-7) / (ps + 1e-7))).mean()
    assert pkt_loss(torch.tensor(vs), torch.tensor(vt)).item() == pytest.approx(ref_pkt, rel=1e-6)

    fs2 = rng.random((2, 3, 4, 4))

    def chan(f: np.ndarray) -> np.ndarray:
        f = f.reshape(f.shape[0], f.shape[1], -1)
        return f / np.linalg.norm(f, axis=2, keepdims=True)

    a, b = chan(fs2), chan(fs)
    mmd = (np.einsum("bid,bjd->bij", a, a) ** 2).mean() + (np.einsum("bid,bjd->bij", b, b) ** 2).mean() \
        - 2 * (np.einsum("bid,bjd->bij", a, b) ** 2).mean()
    assert nst_loss([torch.tensor(fs2)], [torch.tensor(fs)]).item() == pytest.approx(mmd, rel=1e-6)


def test_rkd_reference_value() -> None:
    rng = np.random.default_rng(1)
    s, t = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))

    def huber(x: np.ndarray) -> float:
        a = np.abs(x)
        return float(np.where(a < 1, 0.5 * x**2, a - 0.5).mean())

    def dist(e: np.ndarray) -> np.ndarray:
        d = np.linalg.norm(e[:, None] - e[None], axis=2)
        return d / d[d > 0].mean()

    def angle(e: np.ndarray) -> np.ndarray:
        diff = e[None] - e[:, None]  # diff[a, b] = e_b − e_a
        n = np.linalg.norm(diff, axis=2, keepdims=True)
        u = np.divide(diff, n, out=np.zeros_like(diff), where=n > 0)
        return np.einsum("abd,acd->abc", u, u)

    ref = 25 * huber(dist(s) - dist(t)) + 50 * huber(angle(s) - angle(t))
    assert rkd_loss(torch.tensor(s), torch.tensor(t)).item() == pytest.approx(ref, rel=1e-5)


def test_crd_nce_reference_value() -> None:
    scores = torch.tensor([[0.5, 0.1, 0.2], [0.3, 0.05, 0.4]], dtype=torch.float64)
    n, k = 10, 2
    ref = -sum(math.log(r[0] / (r[0] + k / n)) + sum(math.log((k / n) / (x + k / n)) for x in r[1:])
               for r in scores.tolist()) / 2
    assert nce_loss(scores, n).item() == pytest.approx(ref, rel=1e-10)


# -- CRD memory bank ---------------------------------------------------------------------------------


def _crd(**kw: Any) -> tuple[CRDLoss, list[torch.Tensor], list[torch.Tensor]]:
    loss = build_loss("crd", feat_dim=8, **kw)
    s, t = _feats([(12,)], b=4, grad=False), _feats([(20,)], b=4, grad=False, seed=1)
    loss.setup(s, t)
    return loss, s, t  # type: ignore[return-value]


def test_crd_queue_update_keeps_unit_rows_and_advances() -> None:
    loss, s, t = _crd(bank_size=10, num_negatives=5)
    y = torch.tensor([0, 1, 2, 1])
    loss.train()
    for step in range(3):
        loss(s, t, targets=y)
        assert int(loss.ptr) == (4 * (step + 1)) % 10
    written = loss.mem_y >= 0
    assert int(written.sum()) == 10
    assert torch.allclose(loss.mem_s.norm(dim=1), torch.ones(10), atol=1e-5)
    assert torch.allclose(loss.mem_t.norm(dim=1), torch.ones(10), atol=1e-5)
    loss.eval()
    before = loss.mem_s.clone()
    loss(s, t, targets=y)
    assert torch.equal(before, loss.mem_s)  # no bank writes outside training


def test_crd_exact_negatives_come_from_other_classes() -> None:
    loss, _, _ = _crd(bank_size=12, num_negatives=50)
    loss.mem_y.copy_(torch.arange(12) % 3)
    y = torch.tensor([0, 1, 2, 0])
    neg = loss.sample_negatives(y, 4)
    assert (loss.mem_y[neg] != y[:, None]).all()


def test_crd_keyed_mode_positive_is_row_i_and_momentum_update() -> None:
    loss, s, t = _crd(bank_size=16, num_negatives=15, momentum=0.5, memory="keyed")
    assert loss.needs_indices and not _crd(bank_size=16, num_negatives=4)[0].needs_indices
    idx = torch.tensor([3, 7, 8, 15])
    y = torch.tensor([0, 1, 2, 3])
    assert torch.isfinite(loss(s, t, targets=y, indices=idx))  # K = N − 1
    assert torch.allclose(loss.mem_s[idx].norm(dim=1), torch.ones(4), atol=1e-5)
    # reference: the same negatives, positive = M_t[i] / M_s[i] before the update, Z from the first batch
    loss2, _, _ = _crd(bank_size=16, num_negatives=15, momentum=0.5, memory="keyed")
    loss2.load_state_dict(loss.state_dict())
    mem_s, mem_t = loss2.mem_s.clone(), loss2.mem_t.clone()
    torch.manual_seed(11)
    got = loss2(s, t, targets=y, indices=idx)
    torch.manual_seed(11)
    neg = loss2.sample_negatives(y, 4, exclude=idx)
    assert not (neg == idx[:, None]).any()
    vs = F.normalize(loss2.embed_s(s[0]), dim=1)
    vt = F.normalize(loss2.embed_t(t[0]), dim=1)

    def side(anchor: torch.Tensor, bank: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        w = torch.cat([bank[idx][:, None], bank[neg]], 1)
        return nce_loss(torch.exp((w @ anchor[:, :, None]).squeeze(-1) / 0.07) / z, 16)

    ref = side(vs, mem_t, loss.z_s) + side(vt, mem_s, loss.z_t)
    assert torch.allclose(got, ref, rtol=1e-4)
    expect = F.normalize(0.5 * mem_s[idx] + 0.5 * vs.detach(), dim=1)
    assert torch.allclose(loss2.mem_s[idx], expect, atol=1e-6)
    untouched = torch.ones(16, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(loss2.mem_s[untouched], mem_s[untouched])
    assert torch.equal(loss2.mem_t[untouched], mem_t[untouched])
    assert loss2.mem_y[idx].tolist() == y.tolist() and (loss2.mem_y[untouched] == -1).all()


def test_crd_keyed_negatives_never_draw_the_positive_and_need_indices() -> None:
    loss, s, t = _crd(bank_size=6, num_negatives=400, memory="keyed")
    loss.mem_y.copy_(torch.tensor([0, 1, 0, 1, 0, 1]))
    y, idx = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 2, 3])
    neg = loss.sample_negatives(y, 4, exclude=idx)
    assert not (neg == idx[:, None]).any() and (loss.mem_y[neg] != y[:, None]).all()
    loss.mem_y.fill_(-1)  # unvisited rows: any row but the positive
    neg = loss.sample_negatives(y, 4, exclude=idx)
    assert not (neg == idx[:, None]).any() and all(len(set(r.tolist())) == 5 for r in neg)
    with pytest.raises(KdforgeError, match="needs the batch's sample indices"):
        loss(s, t, targets=y)
    loss.set_num_data(40)  # one row per training sample (RepDistiller's n_data), fresh uniform rows
    assert loss.mem_s.shape == (40, 8) and loss.bank_size == 40 and (loss.mem_y == -1).all()
    assert float(loss.mem_s.abs().max()) <= 1 / (8 / 3) ** 0.5
    queue, _, _ = _crd(bank_size=6, num_negatives=4)
    queue.set_num_data(40)
    assert queue.mem_s.shape == (6, 8)  # a queue keeps its size


def test_crd_queue_refuses_sample_indices_instead_of_ignoring_them() -> None:
    queue, s, t = _crd(bank_size=6, num_negatives=4)
    before = queue.mem_s.clone()
    with pytest.raises(KdforgeError, match=r"memory 'queue' cannot use sample indices.*set memory: keyed"):
        queue(s, t, targets=torch.tensor([0, 1, 0, 1]), indices=torch.tensor([0, 1, 2, 3]))
    assert torch.equal(queue.mem_s, before)  # nothing written


def test_crd_keyed_memory_runs_through_the_engine_with_sample_indices() -> None:
    cfg = {"name": "distill", "teacher": {"model": "cnn_small"}, "student": {"model": "cnn_tiny"},
           "terms": [{"loss": "ce"}, {"loss": "crd", "student_tap": "pool", "memory": "keyed", "num_negatives": 32,
                      "feat_dim": 16}]}
    m = build_method(cfg, DataInfo(10, 1, 8))
    assert m.batch_fields == ("index",)
    assert build_method({**cfg, "terms": [{"loss": "ce"}]}, DataInfo(10, 1, 8)).batch_fields == ()
    r = {"name": "t", "seed": 0, "method": cfg, "optim": {"lr": 0.05}, "sched": {"name": "constant"},
         "data": {"name": "digits", "batch_size": 32, "limit_train": 96, "val_fraction": 0.0, "augment": False},
         "train": {"epochs": 2, "progress": "silent"}}
    recipe = kd.Recipe.from_dict(r)
    res = kd.Trainer(m, kd.load_data(recipe.data), recipe).fit()
    crd = m.terms[1].loss
    assert crd.mem_s.shape == (96, 16)  # a row per training sample
    assert (crd.mem_y >= 0).all()  # every sample's row was visited and labelled
    assert torch.allclose(crd.mem_s.norm(dim=1), torch.ones(96), atol=1e-5)
    data = kd.load_data(recipe.data)
    assert crd.mem_y.tolist() == [int(data.train[i][1]) for i in range(96)]  # rows keyed by sample index
    assert all(math.isfinite(h["train_loss_crd"]) for h in res.history)


def test_crd_bank_is_restored_from_state_dict() -> None:
    loss, s, t = _crd(bank_size=32, num_negatives=8)
    y = torch.tensor([0, 1, 2, 1])
    for _ in range(3):
        loss(s, t, targets=y)
    state = {k: v.clone() for k, v in loss.state_dict().items()}
    assert {"mem_s", "mem_t", "mem_y", "ptr", "z_s", "z_t"} <= set(state)
    fresh, _, _ = _crd(bank_size=32, num_negatives=8)
    assert not torch.equal(fresh.mem_s, loss.mem_s)
    fresh.load_state_dict(state)
    torch.manual_seed(3)
    a = loss(s, t, targets=y)
    torch.manual_seed(3)
    b = fresh(s, t, targets=y)
    assert torch.allclose(a, b) and torch.equal(loss.mem_s, fresh.mem_s) and int(loss.ptr) == int(fresh.ptr)


def test_crd_bank_is_in_the_methods_resumable_state() -> None:
    cfg = {"name": "distill", "teacher": {"model": "cnn_small"}, "student": {"model": "cnn_tiny"},
           "terms": [{"loss": "ce"}, {"loss": "crd", "student_tap": "pool", "bank_size": 64, "num_negatives": 8}]}
    m = build_method(cfg, DataInfo(10, 1, 8))
    batch = (torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    m.setup(batch)
    m.train()
    m.training_step(batch, 0)["loss"].backward()
    state = m.resumable_state()
    assert "terms.1.loss.mem_s" in state and "terms.1.loss.ptr" in state
    assert int(state["terms.1.loss.ptr"]) == 8
    assert not any(k.startswith("teacher.") for k in state)


def test_every_zoo_loss_is_registered() -> None:
    names = set(LOSSES.names())
    assert {"dkd", "dist", "fitnet", "at", "nst", "ft", "ab", "fsp", "vid", "ofd", "reviewkd", "rkd", "sp", "cc",
            "pkt", "crd", "attn_map"} <= names
