"""CKA: invariances, reference values, estimators, the all-pairs matrix and streaming."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from kdforge.prune.cka import (
    CKAStream,
    center_gram,
    cka,
    cka_feature_form,
    cka_matrix,
    collect_cka,
    gram,
    hsic_biased,
    hsic_unbiased,
    u_center_gram,
)


def _x(n: int = 40, d: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_self_similarity_and_symmetry(kernel: str, estimator: str) -> None:
    x, y = _x(), _x(seed=1) @ torch.randn(12, 7, dtype=torch.float64)
    assert cka(x, x, kernel, estimator) == pytest.approx(1.0, abs=1e-10)
    assert cka(x, y, kernel, estimator) == pytest.approx(cka(y, x, kernel, estimator), abs=1e-12)


def test_biased_range() -> None:
    for s in range(5):
        x, y = _x(seed=s), _x(seed=s + 10)
        v = cka(x, y)
        assert 0.0 <= v <= 1.0
        assert 0.0 <= cka(x, torch.tanh(x @ torch.randn(12, 5, dtype=torch.float64)), "rbf") <= 1.0


def test_invariances_linear() -> None:
    x, y = _x(), torch.tanh(_x() @ torch.randn(12, 9, dtype=torch.float64)) + 0.3 * _x(d=9, seed=5)
    base = cka(x, y)
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    assert cka(x @ q, y) == pytest.approx(base, abs=1e-10)
    assert cka(3.7 * x, y) == pytest.approx(base, abs=1e-10)
    assert cka(x + torch.randn(1, 12, dtype=torch.float64) * 5, y) == pytest.approx(base, abs=1e-10)
    aniso = torch.diag(torch.tensor([1.0, 10.0] + [1.0] * 10, dtype=torch.float64))
    assert abs(cka(x @ aniso, y) - base) > 1e-3


def test_rbf_invariant_to_rotation_and_shift() -> None:
    x, y = _x(), _x(seed=3)
    base = cka(x, y, "rbf")
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    assert cka(x @ q + 2.0, y, "rbf") == pytest.approx(base, abs=1e-9)
    assert cka(4 * x, y, "rbf") == pytest.approx(base, abs=1e-9)  # the bandwidth scales with the data


def test_reference_values() -> None:
    # For 1-D features linear CKA is the squared Pearson correlation.
    a, b = np.array([1.0, 2.0, 3.0, 4.0, 6.0]), np.array([2.0, 1.0, 4.0, 3.0, 7.0])
    r = np.corrcoef(a, b)[0, 1]
    assert cka(torch.tensor(a)[:, None], torch.tensor(b)[:, None]) == pytest.approx(r**2, abs=1e-12)
    # A hand-checked RBF value against an explicit numpy implementation with H matrices.
    x, y = _x(8, 3).numpy(), _x(8, 2, seed=4).numpy()

    def k_rbf(z: np.ndarray) -> np.ndarray:
        d = np.sqrt(((z[:, None] - z[None]) ** 2).sum(-1))
        s = 0.5 * np.median(d[~np.eye(len(z), dtype=bool)])
        return np.exp(-(d**2) / (2 * s * s))

    h = np.eye(8) - 1 / 8
    hs = lambda k, l: np.trace(k @ h @ l @ h) / 49  # noqa: E741
    kx, ky = k_rbf(x), k_rbf(y)
    ref = hs(kx, ky) / np.sqrt(hs(kx, kx) * hs(ky, ky))
    assert cka(torch.tensor(x), torch.tensor(y), "rbf") == pytest.approx(ref, abs=1e-12)
    # Features of the same samples whose rows are permuted: K and L are both the identity, CKA = 1.
    assert cka(torch.eye(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64)[[1, 0, 3, 2]]) == \
        pytest.approx(1.0, abs=1e-12)


def test_gram_form_equals_feature_form() -> None:
    for s in range(3):
        x, y = _x(30, 8, s), _x(30, 5, s + 7)
        assert cka(x, y) == pytest.approx(cka_feature_form(x, y), abs=1e-12)


def test_independent_gaussians_small_and_shrinking() -> None:
    vals = {n: np.mean([cka(_x(n, 5, s), _x(n, 5, s + 100)) for s in range(5)]) for n in (20, 100, 500)}
    assert vals[500] < 0.1
    assert vals[500] < vals[100] < vals[20]


def test_unbiased_matches_u_statistic() -> None:
    n = 6
    x, y = _x(n, 3), _x(n, 2, seed=9)
    k, l = gram(x), gram(y)  # noqa: E741
    idx = range(n)
    s1 = sum(k[i, j] * l[i, j] for i, j in itertools.permutations(idx, 2)) / (n * (n - 1))
    s2 = sum(k[i, j] * l[q, r] for i, j, q, r in itertools.permutations(idx, 4)) / (n * (n - 1) * (n - 2) * (n - 3))
    s3 = sum(k[i, j] * l[i, q] for i, j, q in itertools.permutations(idx, 3)) / (n * (n - 1) * (n - 2))
    assert float(hsic_unbiased(k, l)) == pytest.approx(float(s1 + s2 - 2 * s3), rel=1e-10)
    assert float((u_center_gram(k) * u_center_gram(l)).sum() / (n * (n - 3))) == \
        pytest.approx(float(hsic_unbiased(k, l)), rel=1e-10)


def test_biased_hsic_trace_form() -> None:
    x, y = _x(10, 4), _x(10, 3, 2)
    k, l = gram(x), gram(y)  # noqa: E741
    h = torch.eye(10, dtype=torch.float64) - 1 / 10
    assert float(hsic_biased(k, l)) == pytest.approx(float(torch.trace(k @ h @ l @ h) / 81), rel=1e-12)
    assert torch.allclose(center_gram(k), h @ k @ h)


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_all_pairs_matrix_matches_pairwise(estimator: str) -> None:
    feats = [_x(20, 6, s) for s in range(4)] + [torch.randn(20, 3, 4, 4, dtype=torch.float64)]
    m = cka_matrix(feats, estimator=estimator)
    for i, j in itertools.product(range(5), repeat=2):
        ref = 1.0 if i == j else cka(feats[i], feats[j], estimator=estimator)
        assert float(m[i, j]) == pytest.approx(ref, abs=1e-10)


def test_stream_averages() -> None:
    batches = [[_x(16, 5, s), _x(16, 4, s + 50), _x(16, 3, s + 99)] for s in range(3)]
    st = CKAStream()
    for b in batches:
        st.update(b)
    assert torch.allclose(st.matrix(), sum(cka_matrix(b) for b in batches) / 3)
    mb = CKAStream(estimator="unbiased", aggregate="mean_hsic")
    for b in batches:
        mb.update(b)
    i, j = 0, 2
    num = np.mean([float(hsic_unbiased(gram(b[i]), gram(b[j]))) for b in batches])
    di = np.mean([float(hsic_unbiased(gram(b[i]), gram(b[i]))) for b in batches])
    dj = np.mean([float(hsic_unbiased(gram(b[j]), gram(b[j]))) for b in batches])
    assert float(mb.matrix()[i, j]) == pytest.approx(num / np.sqrt(di * dj), rel=1e-9)


def test_collect_cka_through_taps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    batches = [(torch.randn(32, 6), torch.zeros(32)) for _ in range(3)]
    s = collect_cka(model, ["0", "2", "3", "4"], batches)
    assert s.shape == (4, 4) and s.dtype == torch.float64
    assert torch.allclose(s, s.T) and torch.allclose(s.diagonal(), torch.ones(4, dtype=torch.float64))
    ref = np.mean([cka(model[0](b[0]), model[:3](b[0])) for b in batches])
    assert float(s[0, 1]) == pytest.approx(ref, abs=1e-6)
    assert not model._forward_hooks and not model[0]._forward_hooks
