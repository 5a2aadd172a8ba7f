"""The ``compat`` switch of the KD zoo's losses: each mode against a value written out by hand.

Every reference below is computed in plain Python from small hand-made tensors and the formula of
the paper or of the named code base (torchdistill, RepDistiller), never with the function under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from kdforge.errors import KdforgeError
from kdforge.losses import build_loss
from kdforge.losses.contrastive import CRDLoss, nce_loss


def _softmax(z: list[float], T: float) -> list[float]:
    e = [math.exp(v / T) for v in z]
    return [v / sum(e) for v in e]


def _unit(v: list[float], eps: float = 0.0, code: bool = False) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / (n + eps) if code else x / max(n, eps) for x in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_unknown_compat_value_names_the_valid_ones() -> None:
    with pytest.raises(KdforgeError, match="compat must be one of paper, torchdistill"):
        build_loss("kd", compat="mdistiller")


def test_kd_paper_keeps_t_squared_torchdistill_drops_it() -> None:
    s, t, T = [1.0, 2.0, 0.0], [0.0, 1.0, 3.0], 2.0
    ps, pt = _softmax(s, T), _softmax(t, T)
    kl = sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt, strict=True))
    st, tt = torch.tensor([s]), torch.tensor([t])
    assert build_loss("kd", T=T)(st, tt).item() == pytest.approx(T * T * kl, rel=1e-5)
    assert build_loss("kd", T=T, compat="repdistiller")(st, tt).item() == pytest.approx(T * T * kl, rel=1e-5)
    assert build_loss("kd", T=T, compat="torchdistill")(st, tt).item() == pytest.approx(kl, rel=1e-5)


def _at_vec(f: list[list[float]]) -> list[float]:
    """Σ_c f_c² at each position, L2-normalised (f: channels × positions)."""
    a = [sum(f[c][j] ** 2 for c in range(len(f))) for j in range(len(f[0]))]
    return _unit(a)


def test_at_paper_is_the_mean_square_torchdistill_paper_mode_the_unsquared_norm() -> None:
    # B = 2 samples, C = 2 channels, H×W = 1×3 positions
    fs = [[[1.0, -2.0, 0.5], [0.0, 1.0, 1.0]], [[2.0, 0.0, 1.0], [1.0, 1.0, -1.0]]]
    ft = [[[0.5, 1.0, 2.0], [1.0, 0.0, 0.0]], [[0.0, 3.0, 1.0], [2.0, 1.0, 0.0]]]
    diffs = [[a - b for a, b in zip(_at_vec(x), _at_vec(y), strict=True)] for x, y in zip(fs, ft, strict=True)]
    paper = sum(d * d for row in diffs for d in row) / 6
    torchdistill = sum(math.sqrt(sum(d * d for d in row)) for row in diffs) / 2
    s, t = torch.tensor(fs).unsqueeze(2), torch.tensor(ft).unsqueeze(2)
    assert build_loss("at")([s], [t]).item() == pytest.approx(paper, rel=1e-5)
    assert build_loss("at", compat="torchdistill")([s], [t]).item() == pytest.approx(torchdistill, rel=1e-5)


def test_at_method_passes_compat_to_its_loss() -> None:
    from kdforge.method import DataInfo, build_method

    info = DataInfo(num_classes=10, in_chans=1, image_size=8)
    m = build_method({"name": "at", "teacher": {"model": "cnn_tiny"}, "student": {"model": "cnn_tiny"},
                      "compat": "torchdistill"}, info)
    assert m.terms[-1].loss.compat == "torchdistill"


def test_fsp_paper_squared_mean_torchdistill_maxpool_and_column_norms() -> None:
    # B = 1; first map 2 channels × 2×2, second map 1 channel × 1×1 (so the first is pooled to 1×1)
    s1, s2 = [[1.0, 2.0, 3.0, 6.0], [0.0, -1.0, 4.0, 1.0]], [2.0]
    t1, t2 = [[2.0, 2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 5.0]], [1.0]
    avg = [[sum(c) / 4 * s2[0] for c in s1], [sum(c) / 4 * t2[0] for c in t1]]
    mx = [[max(c) * s2[0] for c in s1], [max(c) * t2[0] for c in t1]]
    paper = sum((a - b) ** 2 for a, b in zip(*avg, strict=True)) / 2
    torchdistill = math.sqrt(sum((a - b) ** 2 for a, b in zip(*mx, strict=True)))  # one column j, / B = 1
    feats = ([torch.tensor(s1).view(1, 2, 2, 2), torch.tensor(s2).view(1, 1, 1, 1)],
             [torch.tensor(t1).view(1, 2, 2, 2), torch.tensor(t2).view(1, 1, 1, 1)])
    for compat, want in (("paper", paper), ("repdistiller", paper), ("torchdistill", torchdistill)):
        loss = build_loss("fsp", compat=compat)
        loss.setup(*feats)
        assert loss(*feats).item() == pytest.approx(want, rel=1e-5), compat


def test_sp_paper_normalises_gram_rows_with_l2_torchdistill_with_l1() -> None:
    qs, qt = [[1.0, 2.0], [3.0, -1.0]], [[0.0, 1.0], [2.0, 2.0]]

    def gram(q: list[list[float]], l1: bool) -> list[list[float]]:
        rows = [[_dot(a, b) for b in q] for a in q]
        return [[v / sum(abs(x) for x in r) for v in r] if l1 else _unit(r) for r in rows]

    def sp(l1: bool) -> float:
        gs, gt = gram(qs, l1), gram(qt, l1)
        return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(2) for j in range(2)) / 4

    assert abs(sp(True) - sp(False)) > 1e-3
    for compat, want in (("paper", sp(False)), ("repdistiller", sp(False)), ("torchdistill", sp(True))):
        got = build_loss("sp", compat=compat)([torch.tensor(qs)], [torch.tensor(qt)]).item()
        assert got == pytest.approx(want, rel=1e-5), compat


def _cc_matrix(x: list[list[float]], normalise: bool, gamma: float = 0.4) -> list[list[float]]:
    rows = [_unit(r) if normalise else r for r in x]
    return [[sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * _dot(a, b) ** p for p in range(3))
             for b in rows] for a in rows]


def test_cc_paper_torchdistill_and_repdistiller_values() -> None:
    xs = [[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]]
    xt = [[0.0, 1.0], [1.0, 1.0], [-1.0, 2.0]]
    sq = [[(a - b) ** 2 for a, b in zip(r, q, strict=True)]
          for r, q in zip(_cc_matrix(xs, True), _cc_matrix(xt, True), strict=True)]
    paper = sum(map(sum, sq)) / 9
    raw = [[(a - b) ** 2 for a, b in zip(r, q, strict=True)]
           for r, q in zip(_cc_matrix(xs, False), _cc_matrix(xt, False), strict=True)]
    torchdistill = math.sqrt(sum(map(sum, raw))) / 9
    delta = [[abs(a - b) for a, b in zip(r, q, strict=True)] for r, q in zip(xs, xt, strict=True)]
    repdistiller = sum(_dot(delta[i], delta[i + 1]) for i in range(2)) / 2
    s, t = [torch.tensor(xs)], [torch.tensor(xt)]
    for compat, want in (("paper", paper), ("torchdistill", torchdistill), ("repdistiller", repdistiller)):
        loss = build_loss("cc", compat=compat, embed_dim=0)
        loss.setup(s, t)
        assert loss(s, t).item() == pytest.approx(want, rel=1e-5), compat


def test_cc_old_variant_key_still_works_with_a_deprecation_note() -> None:
    with pytest.warns(FutureWarning, match="variant is deprecated; use compat"):
        loss = build_loss("cc", variant="repdistiller")
    assert loss.compat == "repdistiller"


def _pkt(xs: list[list[float]], xt: list[list[float]], eps: float, code: bool) -> float:
    def probs(x: list[list[float]]) -> list[list[float]]:
        u = [_unit(r, eps, code) for r in x]
        k = [[(_dot(a, b) + 1) / 2 for b in u] for a in u]
        return [[v / sum(row) for v in row] for row in k]

    ps, pt = probs(xs), probs(xt)
    n = len(xs)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(n) for j in range(n)) / n**2


def test_pkt_code_divides_by_norm_plus_eps() -> None:
    # a large eps makes x/(‖x‖+ε) and x/max(‖x‖, ε) differ visibly
    xs, xt, eps = [[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]], [[0.0, 1.0], [1.0, 1.0], [-1.0, 2.0]], 0.5
    s, t = [torch.tensor(xs)], [torch.tensor(xt)]
    paper, code = _pkt(xs, xt, eps, False), _pkt(xs, xt, eps, True)
    assert abs(paper - code) > 1e-3
    assert build_loss("pkt", eps=eps)(s, t).item() == pytest.approx(paper, rel=1e-5)
    for compat in ("official", "repdistiller", "torchdistill"):
        assert build_loss("pkt", eps=eps, compat=compat)(s, t).item() == pytest.approx(code, rel=1e-5), compat


def test_crd_code_adds_eps_to_the_nce_denominators() -> None:
    scores = [[1e-6, 3e-6, 5e-7], [2e-6, 1e-6, 4e-6]]
    n_data, eps = 1_000_000, 1e-7
    kpn = 2 / n_data

    def nce(e: float) -> float:
        total = 0.0
        for row in scores:
            total += math.log(row[0] / (row[0] + kpn + e)) + sum(math.log(kpn / (q + kpn + e)) for q in row[1:])
        return -total / len(scores)

    x = torch.tensor(scores, dtype=torch.float64)
    assert nce_loss(x, n_data).item() == pytest.approx(nce(0.0), rel=1e-9)
    assert nce_loss(x, n_data, eps).item() == pytest.approx(nce(eps), rel=1e-9)
    assert abs(nce(0.0) - nce(eps)) > 1e-3
    assert CRDLoss(bank_size=8, num_negatives=2).nce_eps == 0.0
    for compat in ("official", "repdistiller", "torchdistill"):
        assert CRDLoss(bank_size=8, num_negatives=2, compat=compat).nce_eps == eps


# -- compat as a list, torchdistill's reduction keys and CC's bilinear kernel ---------------------------
def test_compat_given_as_a_list_selects_the_same_code_base_in_at_fsp_and_cc() -> None:
    fs = [[[1.0, -2.0, 0.5], [0.0, 1.0, 1.0]], [[2.0, 0.0, 1.0], [1.0, 1.0, -1.0]]]
    ft = [[[0.5, 1.0, 2.0], [1.0, 0.0, 0.0]], [[0.0, 3.0, 1.0], [2.0, 1.0, 0.0]]]
    diffs = [[a - b for a, b in zip(_at_vec(x), _at_vec(y), strict=True)] for x, y in zip(fs, ft, strict=True)]
    at_td = sum(math.sqrt(sum(d * d for d in row)) for row in diffs) / 2
    s, t = torch.tensor(fs).unsqueeze(2), torch.tensor(ft).unsqueeze(2)
    assert build_loss("at", compat=["torchdistill"])([s], [t]).item() == pytest.approx(at_td, rel=1e-5)
    # FSP: one column after max-pooling (the hand value of the string test above)
    s1, s2 = [[1.0, 2.0, 3.0, 6.0], [0.0, -1.0, 4.0, 1.0]], [2.0]
    t1, t2 = [[2.0, 2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 5.0]], [1.0]
    mx = [[max(c) * s2[0] for c in s1], [max(c) * t2[0] for c in t1]]
    feats = ([torch.tensor(s1).view(1, 2, 2, 2), torch.tensor(s2).view(1, 1, 1, 1)],
             [torch.tensor(t1).view(1, 2, 2, 2), torch.tensor(t2).view(1, 1, 1, 1)])
    fsp = build_loss("fsp", compat=["torchdistill"])
    fsp.setup(*feats)
    assert fsp(*feats).item() == pytest.approx(math.dist(*mx), rel=1e-5)
    xs, xt = [[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]], [[0.0, 1.0], [1.0, 1.0], [-1.0, 2.0]]
    delta = [[abs(a - b) for a, b in zip(r, q, strict=True)] for r, q in zip(xs, xt, strict=True)]
    cc = build_loss("cc", compat=["repdistiller"], embed_dim=0)
    cc.setup([torch.tensor(xs)], [torch.tensor(xt)])
    want = sum(_dot(delta[i], delta[i + 1]) for i in range(2)) / 2
    assert cc([torch.tensor(xs)], [torch.tensor(xt)]).item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(KdforgeError, match="compat names one code base here"):
        build_loss("cc", compat=["repdistiller", "torchdistill"])


def test_kd_reduction_sum_and_mean_as_kldivloss() -> None:
    s, t, T = [[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]], [[0.0, 1.0, 3.0], [1.0, 1.0, 0.0]], 2.0
    kl = [sum(b * (math.log(b) - math.log(a)) for a, b in zip(_softmax(x, T), _softmax(y, T), strict=True))
          for x, y in zip(s, t, strict=True)]
    st, tt = torch.tensor(s), torch.tensor(t)
    for reduction, want in (("batchmean", sum(kl) / 2), ("sum", sum(kl)), ("mean", sum(kl) / 6)):
        got = build_loss("kd", T=T, compat="torchdistill", reduction=reduction)(st, tt).item()
        assert got == pytest.approx(want, rel=1e-5), reduction
    assert build_loss("kd", T=T, reduction="sum")(st, tt).item() == pytest.approx(T * T * sum(kl), rel=1e-5)
    with pytest.raises(KdforgeError, match="reduction must be one of batchmean, sum, mean"):
        build_loss("kd", reduction="none")


def test_sp_reduction_sum_drops_the_one_over_b_squared() -> None:
    qs, qt = [[1.0, 2.0], [3.0, -1.0]], [[0.0, 1.0], [2.0, 2.0]]

    def gram_l1(q: list[list[float]]) -> list[list[float]]:
        rows = [[_dot(a, b) for b in q] for a in q]
        return [[v / sum(abs(x) for x in r) for v in r] for r in rows]

    gs, gt = gram_l1(qs), gram_l1(qt)
    total = sum((gt[i][j] - gs[i][j]) ** 2 for i in range(2) for j in range(2))
    got = build_loss("sp", compat="torchdistill", reduction="sum")([torch.tensor(qs)], [torch.tensor(qt)]).item()
    assert got == pytest.approx(total, rel=1e-5)


def test_cc_bilinear_kernel_and_reduction_sum() -> None:
    xs, xt = [[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]], [[0.0, 1.0], [1.0, 1.0], [-1.0, 2.0]]
    cs = [[_dot(a, b) for b in xs] for a in xs]  # torchdistill's bilinear pool: X Xᵀ on raw outputs
    ct = [[_dot(a, b) for b in xt] for a in xt]
    frob = math.sqrt(sum((cs[i][j] - ct[i][j]) ** 2 for i in range(3) for j in range(3)))
    s, t = [torch.tensor(xs)], [torch.tensor(xt)]
    for reduction, want in (("batchmean", frob / 9), ("sum", frob)):
        loss = build_loss("cc", compat="torchdistill", kernel="bilinear", reduction=reduction, embed_dim=0)
        loss.setup(s, t)
        assert loss(s, t).item() == pytest.approx(want, rel=1e-5), reduction
    raw = [[(a - b) ** 2 for a, b in zip(r, q, strict=True)]
           for r, q in zip(_cc_matrix(xs, False), _cc_matrix(xt, False), strict=True)]
    gauss = build_loss("cc", compat="torchdistill", reduction="sum", embed_dim=0)
    gauss.setup(s, t)
    assert gauss(s, t).item() == pytest.approx(math.sqrt(sum(map(sum, raw))), rel=1e-5)
    with pytest.raises(KdforgeError, match="compat repdistiller has no kernel"):
        build_loss("cc", compat="repdistiller", kernel="bilinear")


def _huber(a: float, b: float) -> float:
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def test_rkd_and_fitnet_reduction_sum() -> None:
    # RKD distance term on 3 points in 1-D: normalised distance matrices, Huber summed over the 9 entries
    es, et = [[0.0], [1.0], [3.0]], [[0.0], [2.0], [2.5]]

    def dist(e: list[list[float]]) -> list[list[float]]:
        d = [[abs(a[0] - b[0]) for b in e] for a in e]
        mu = sum(v for r in d for v in r if v > 0) / 6
        return [[v / mu for v in r] for r in d]

    ds, dt = dist(es), dist(et)
    h = [_huber(ds[i][j], dt[i][j]) for i in range(3) for j in range(3)]
    s, t = [torch.tensor(es)], [torch.tensor(et)]
    for reduction, want in (("mean", sum(h) / 9), ("sum", sum(h))):
        got = build_loss("rkd", dist_weight=1.0, angle_weight=0.0, reduction=reduction)(s, t).item()
        assert got == pytest.approx(want, rel=1e-5), reduction
    # FitNet with an identity regressor (same shapes): squared errors summed vs averaged
    hs, ht = torch.tensor([[1.0, -2.0], [0.5, 3.0]]), torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    sq = (1 - 0) ** 2 + (-2 - 1) ** 2 + (0.5 - 2) ** 2 + (3 - 2) ** 2
    for reduction, want in (("mean", sq / 4), ("sum", sq)):
        fit = build_loss("fitnet", reduction=reduction)
        fit.setup([hs], [ht])
        fit.regressors = torch.nn.ModuleList([torch.nn.Identity()])
        assert fit([hs], [ht]).item() == pytest.approx(want, rel=1e-5), reduction
