"""LLM KD terms against scipy/numpy and torch.distributions; chunked equals plain (values and gradients)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import softmax
from scipy.stats import entropy

from kdforge.llm.losses import chunked_token_loss, head_logits
from kdforge.losses import build_loss

V = 11


def _logits(n: int = 7, seed: int = 0, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, V, generator=g) * scale, torch.randn(n, V, generator=g) * scale


def _ref(name: str, s: np.ndarray, t: np.ndarray, T: float, **kw: float) -> float:
    """Mean over positions of the divergence, from numpy/scipy in float64, times T²."""
    p, q = softmax(t / T, -1), softmax(s / T, -1)
    vals = []
    for pi, qi in zip(p, q, strict=True):
        if name == "lm_fkl":
            v = entropy(pi, qi)
        elif name == "lm_rkl":
            v = entropy(qi, pi)
        elif name == "lm_jsd":
            b = kw["beta"]
            m = b * pi + (1 - b) * qi
            v = b * entropy(pi, m) + (1 - b) * entropy(qi, m)
        elif name == "lm_skl":
            a = kw["alpha"]
            v = entropy(pi, a * pi + (1 - a) * qi)
        elif name == "lm_srkl":
            a = kw["alpha"]
            v = entropy(qi, (1 - a) * pi + a * qi)
        else:
            v = 0.5 * np.abs(pi - qi).sum()
        vals.append(v)
    return float(np.mean(vals)) * T * T


CASES = [("lm_fkl", {}), ("lm_rkl", {}), ("lm_jsd", {"beta": 0.5}), ("lm_jsd", {"beta": 0.1}),
         ("lm_jsd", {"beta": 0.9}), ("lm_skl", {"alpha": 0.1}), ("lm_skl", {"alpha": 0.7}),
         ("lm_srkl", {"alpha": 0.1}), ("lm_tvd", {})]


@pytest.mark.parametrize("T", [1.0, 2.5])
@pytest.mark.parametrize(("name", "kw"), CASES)
def test_values_match_scipy(name: str, kw: dict, T: float) -> None:
    s, t = _logits()
    got = float(build_loss(name, T=T, **kw)(s, t))
    assert got == pytest.approx(_ref(name, s.double().numpy(), t.double().numpy(), T, **kw), rel=1e-5, abs=1e-7)


def _dist_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torch.distributions import Categorical, kl_divergence

    return kl_divergence(Categorical(logits=a), Categorical(logits=b)).mean()


@pytest.mark.parametrize(("name", "kw", "ref"), [
    ("lm_jsd", {"beta": 0.0}, "fkl"), ("lm_jsd", {"beta": 1.0}, "rkl"),
    ("lm_skl", {"alpha": 0.0}, "fkl"), ("lm_srkl", {"alpha": 0.0}, "rkl"), ("lm_fkl", {}, "fkl"),
    ("lm_rkl", {}, "rkl")])
def test_extremes_and_gradients_match_torch_distributions(name: str, kw: dict, ref: str) -> None:
    s, t = _logits(seed=1)
    s64 = s.double().requires_grad_()
    want = _dist_kl(t.double(), s64) if ref == "fkl" else _dist_kl(s64, t.double())
    (g_want,) = torch.autograd.grad(want, s64)
    s32 = s.clone().requires_grad_()
    got = build_loss(name, **kw)(s32, t)
    (g_got,) = torch.autograd.grad(got, s32)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert torch.allclose(g_got.double(), g_want, atol=1e-6)


def test_jsd_limits_are_forward_and_reverse_kl() -> None:
    """JSD(β)/β → KL(p ‖ q) as β → 0 and JSD(β)/(1 − β) → KL(q ‖ p) as β → 1 (why the endpoints are defined so)."""
    s, t = _logits(seed=2, scale=1.0)
    fkl, rkl = float(_dist_kl(t, s)), float(_dist_kl(s, t))
    small = float(build_loss("lm_jsd", beta=1e-3)(s.double(), t.double())) / 1e-3
    big = float(build_loss("lm_jsd", beta=1 - 1e-3)(s.double(), t.double())) / 1e-3
    assert small == pytest.approx(fkl, rel=5e-3)
    assert big == pytest.approx(rkl, rel=5e-3)


@pytest.mark.parametrize(("name", "kw"), CASES)
def test_masked_positions_change_nothing(name: str, kw: dict) -> None:
    s, t = _logits(n=9, seed=3)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1], dtype=torch.bool)
    loss = build_loss(name, **kw)
    a = s.clone().requires_grad_()
    va = loss(a, t, mask)
    (ga,) = torch.autograd.grad(va, a)
    b = s.clone()
    b[~mask] = torch.randn(int((~mask).sum()), V) * 10  # other values where nothing is trained
    assert float(loss(b, t, mask)) == pytest.approx(float(va), rel=1e-6)
    assert torch.all(ga[~mask] == 0)
    ref = _ref(name, s[mask].double().numpy(), t[mask].double().numpy(), 1.0, **kw)
    assert float(va) == pytest.approx(ref, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize(("name", "kw"), [*CASES, ("lm_ce", {})])
def test_chunked_equals_plain_values_and_gradients(name: str, kw: dict) -> None:
    torch.manual_seed(4)
    B, L, H = 3, 10, 8
    hidden = torch.randn(B, L, H, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=False).double()
    t_logits = torch.randn(B, L, V, dtype=torch.float64) * 2
    targets = torch.randint(0, V, (B, L))
    mask = torch.rand(B, L) > 0.3
    term = build_loss(name, T=1.5, **kw)

    def run(chunk: int) -> tuple[torch.Tensor, ...]:
        out = chunked_token_loss([(term, 0.7)], head_logits(hidden, head), lambda i: t_logits.reshape(-1, V)[i],
                                 mask, targets, chunk=chunk)
        gh, gw = torch.autograd.grad(out[0], (hidden, head.weight))
        return out.detach(), gh, gw

    plain = run(10_000)
    for chunk in (1, 4, 7):
        got = run(chunk)
        for a, b in zip(got, plain, strict=True):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-6), (name, chunk)
    # and plain is the direct full-tensor computation
    logits = head(hidden).reshape(-1, V)
    direct = term(logits, t_logits.reshape(-1, V), mask.reshape(-1)) if name != "lm_ce" else \
        torch.nn.functional.cross_entropy(logits[mask.reshape(-1)], targets.reshape(-1)[mask.reshape(-1)])
    assert float(plain[0][0]) == pytest.approx(0.7 * float(direct), rel=1e-9)


def test_chunked_fp32_within_1e6_of_plain() -> None:
    torch.manual_seed(5)
    hidden = torch.randn(2, 64, 16, requires_grad=True)
    head = torch.nn.Linear(16, 200, bias=False)
    t = torch.randn(2 * 64, 200)
    mask = torch.ones(2, 64, dtype=torch.bool)
    term = build_loss("lm_jsd", beta=0.5)
    a = chunked_token_loss([(term, 1.0)], head_logits(hidden, head), lambda i: t[i], mask, chunk=5)[0]
    ga = torch.autograd.grad(a, hidden)[0]
    b = chunked_token_loss([(term, 1.0)], head_logits(hidden, head), lambda i: t[i], mask, chunk=10_000)[0]
    gb = torch.autograd.grad(b, hidden)[0]
    assert abs(float(a) - float(b)) < 1e-6 and float((ga - gb).abs().max()) < 1e-6


@pytest.mark.parametrize(("name", "kw"), [("lm_fkl", {}), ("lm_skl", {"alpha": 0.3})])
def test_topk_bins_match_numpy(name: str, kw: dict) -> None:
    """Against a top-k teacher the term is the divergence over k + 1 bins: the top-k tokens and the rest."""
    s, t = _logits(n=5, seed=6)
    k, T = 3, 2.0
    p_full = softmax(t.double().numpy() / T, -1)
    ids = torch.from_numpy(np.argsort(-t.numpy(), -1)[:, :k].copy())
    p_bins = np.concatenate([np.take_along_axis(p_full, ids.numpy(), -1),
                             1 - np.take_along_axis(p_full, ids.numpy(), -1).sum(-1, keepdims=True)], -1)
    q_full = softmax(s.double().numpy() / T, -1)
    q_bins = np.concatenate([np.take_along_axis(q_full, ids.numpy(), -1),
                             1 - np.take_along_axis(q_full, ids.numpy(), -1).sum(-1, keepdims=True)], -1)
    a = kw.get("alpha", 0.0)
    want = np.mean([entropy(p, a * p + (1 - a) * q) for p, q in zip(p_bins, q_bins, strict=True)]) * T * T
    term = build_loss(name, T=T, **kw)
    got = term.token_values(s, (ids, torch.from_numpy(np.log(p_bins)).float())).mean()
    assert float(got) == pytest.approx(float(want), rel=1e-4)


def _direct(terms: list, logits: torch.Tensor, teacher: object, mask: torch.Tensor, targets: torch.Tensor
            ) -> torch.Tensor:
    """Σ_k w_k · mean over masked positions of term_k on the full (N, V) logits: one plain autograd graph."""
    m = mask.reshape(-1)
    s = logits.reshape(-1, logits.shape[-1])[m]
    total = 0.0
    for term, w in terms:
        if term.uses_targets:
            v = torch.nn.functional.cross_entropy(s, targets.reshape(-1)[m])
        elif isinstance(teacher, tuple):
            v = term.token_values(s, (teacher[0][m], teacher[1][m])).mean()
        else:
            v = term.token_values(s, teacher.reshape(-1, s.shape[-1])[m]).mean()
        total = total + w * v
    return total


@pytest.fixture(params=["one block", "blocks of 3 rows"])
def blocks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused loss with each chunk's terms in one block, and in blocks of 3 rows (for any vocabulary here)."""
    if request.param != "one block":
        monkeypatch.setattr("kdforge.llm.losses.block_rows", lambda vocab: 3)


FUSED_MIXES = [
    [("lm_fkl", {"T": 1.0}, 1.0)], [("lm_fkl", {"T": 2.0}, 0.5)], [("lm_ce", {}, 1.0)],
    [("lm_ce", {}, 0.3), ("lm_fkl", {"T": 1.0}, 0.7)],  # one log-softmax shared by CE and the KD term
    [("lm_ce", {}, 0.5), ("lm_fkl", {"T": 1.0}, 1.0), ("lm_fkl", {"T": 3.0}, 0.25)],
    [("lm_rkl", {"T": 1.5}, 1.0), ("lm_ce", {}, 0.2)],  # autograd fallback mixed with a closed form
    [("lm_jsd", {"beta": 0.3}, 1.0)], [("lm_tvd", {}, 1.0)],
    [("lm_fkl", {"T": 1.0}, 0.0), ("lm_ce", {}, 1.0)],  # a first term of weight 0 (the chunk's gradient scale)
    [("lm_ce", {}, 1.0), ("lm_fkl", {"T": 1.0}, 0.0)]]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("mix", FUSED_MIXES)
def test_fused_head_loss_equals_direct_autograd(mix: list, bias: bool, blocks: None) -> None:
    """The fused path (gradient taken in forward, per chunk) against one autograd graph over the full logits."""
    torch.manual_seed(7)
    B, L, H, Vp = 2, 9, 6, V + 3  # a head with 3 padded rows beyond the vocabulary, cropped
    hidden = torch.randn(B, L, H, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(H, Vp, bias=bias).double()
    t_logits = torch.randn(B, L, V, dtype=torch.float64) * 2
    targets = torch.randint(0, V, (B, L))
    mask = torch.rand(B, L) > 0.3
    terms = [(build_loss(name, **kw), w) for name, kw, w in mix]
    params = (hidden, head.weight, *([head.bias] if bias else []))
    out = chunked_token_loss(terms, head_logits(hidden, head, V), lambda i: t_logits.reshape(-1, V)[i],
                             mask, targets, chunk=4)
    got = torch.autograd.grad(out[0] * 1.7, params)
    ref = _direct(terms, head(hidden)[..., :V], t_logits, mask, targets)
    want = torch.autograd.grad(ref * 1.7, params)
    assert float(out[0]) == pytest.approx(float(ref), rel=1e-10)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-8)
    assert torch.all(got[0][~mask] == 0)


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("k", [3, V])  # k = V: an empty bucket
def test_fused_topk_forward_kl_equals_direct_autograd(T: float, k: int, blocks: None) -> None:
    """Forward KL over the k + 1 bins of a cached teacher: the closed-form gradient against autograd."""
    torch.manual_seed(8)
    B, L, H = 2, 7, 5
    hidden = torch.randn(B, L, H, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=False).double()
    t = torch.randn(B * L, V, dtype=torch.float64) * 3
    ids = t.topk(k, -1).indices
    top = t.gather(-1, ids) / T
    rest = t.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True) / T
    log_p = torch.cat([top, rest], -1).log_softmax(-1)
    mask = torch.rand(B, L) > 0.2
    targets = torch.randint(0, V, (B, L))
    terms = [(build_loss("lm_fkl", T=T), 1.0), (build_loss("lm_ce"), 0.5)]
    out = chunked_token_loss(terms, head_logits(hidden, head), lambda i: (ids[i], log_p[i]), mask, targets, chunk=3)
    got = torch.autograd.grad(out[0], (hidden, head.weight))
    ref = _direct(terms, head(hidden), (ids, log_p), mask, targets)
    want = torch.autograd.grad(ref, (hidden, head.weight))
    assert float(out[0]) == pytest.approx(float(ref), rel=1e-10)
    assert float(out[1]) == pytest.approx(float(_direct(terms[:1], head(hidden), (ids, log_p), mask, targets)),
                                          rel=1e-10)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-8)


def test_fused_fp32_within_1e6_of_direct(blocks: None) -> None:
    """In float32 (the training dtype), fused values and gradients stay within 1e-6 of the plain graph."""
    torch.manual_seed(9)
    hidden = torch.randn(2, 64, 16, requires_grad=True)
    head = torch.nn.Linear(16, 300, bias=False)
    t = torch.randn(2, 64, 300)
    targets = torch.randint(0, 300, (2, 64))
    mask = torch.ones(2, 64, dtype=torch.bool)
    terms = [(build_loss("lm_fkl"), 1.0), (build_loss("lm_ce"), 0.5)]
    out = chunked_token_loss(terms, head_logits(hidden, head), lambda i: t.reshape(-1, 300)[i], mask, targets,
                             chunk=5)[0]
    ga = torch.autograd.grad(out, (hidden, head.weight))
    ref = _direct(terms, head(hidden), t, mask, targets)
    gb = torch.autograd.grad(ref, (hidden, head.weight))
    assert abs(float(out) - float(ref)) < 1e-6
    assert all(float((a - b).abs().max()) < 1e-6 for a, b in zip(ga, gb, strict=True))


def test_fused_topk_forward_kl_when_the_students_rest_underflows(blocks: None) -> None:
    """A student so sure of the teacher's top-k that its rest mass underflows in float32: still the plain values."""
    torch.manual_seed(10)
    H, k = 4, 3
    hidden = torch.randn(1, 6, H, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=True)
    with torch.no_grad():
        head.weight.mul_(0.01)
        head.bias.fill_(-200.0)
        head.bias[:k] = 0.0  # tokens 0..k-1 near 0, the rest at -200: exp(-200) is 0 in float32
    ids = torch.arange(k).expand(6, k).contiguous()
    log_p = torch.tensor([0.5, 0.3, 0.1, 0.1]).log().expand(6, k + 1).contiguous()
    mask = torch.ones(1, 6, dtype=torch.bool)
    term = build_loss("lm_fkl")
    out = chunked_token_loss([(term, 1.0)], head_logits(hidden, head), lambda i: (ids[i], log_p[i]), mask, chunk=4)
    got = torch.autograd.grad(out[0], (hidden, head.weight, head.bias))
    ref = _direct([(term, 1.0)], head(hidden), (ids, log_p), mask, torch.zeros(1, 6, dtype=torch.long))
    want = torch.autograd.grad(ref, (hidden, head.weight, head.bias))
    assert torch.isfinite(out[0]) and float(out[0]) == pytest.approx(float(ref), rel=1e-6)
    for a, b in zip(got, want, strict=True):
        assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_fused_forward_kl_with_teacher_probabilities_of_zero(blocks: None) -> None:
    """A live teacher with −inf logits (probability exactly 0): those tokens add nothing to KL(p ‖ q), as in the
    plain graph, and values and gradients stay finite."""
    torch.manual_seed(11)
    B, L, H = 2, 6, 5
    hidden = torch.randn(B, L, H, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=False).double()
    t = torch.randn(B * L, V, dtype=torch.float64) * 2
    t[::2, :4] = float("-inf")
    mask = torch.ones(B, L, dtype=torch.bool)
    term = build_loss("lm_fkl")
    out = chunked_token_loss([(term, 1.0)], head_logits(hidden, head), lambda i: t[i], mask, chunk=4)
    got = torch.autograd.grad(out[0], (hidden, head.weight))
    p = softmax(t.numpy(), -1)
    q = softmax(head(hidden).detach().reshape(-1, V).numpy(), -1)
    assert float(out[0]) == pytest.approx(np.mean([entropy(a, b) for a, b in zip(p, q, strict=True)]), rel=1e-10)
    ref = _direct([(term, 1.0)], head(hidden), t, mask, torch.zeros(B, L, dtype=torch.long))
    want = torch.autograd.grad(ref, (hidden, head.weight))
    for a, b in zip(got, want, strict=True):
        assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-10, rtol=1e-8)


def test_fused_head_loss_under_autocast() -> None:
    """Under autocast (mixed-precision training) the head's chunk logits are autocast's, not written into float32
    buffers: the fused loss runs and stays within bfloat16 rounding of the float32 value."""
    torch.manual_seed(12)
    hidden = torch.randn(2, 8, 16, requires_grad=True)
    head = torch.nn.Linear(16, 40, bias=True)
    t = torch.randn(16, 40)
    mask = torch.ones(2, 8, dtype=torch.bool)
    terms = [(build_loss("lm_fkl"), 1.0)]
    want = chunked_token_loss(terms, head_logits(hidden, head), lambda i: t[i], mask, chunk=5)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_token_loss(terms, head_logits(hidden, head), lambda i: t[i], mask, chunk=5)[0]
    (g,) = torch.autograd.grad(got, hidden)
    (g_want,) = torch.autograd.grad(want, hidden)
    assert g.dtype == hidden.dtype and float(got) == pytest.approx(float(want), rel=3e-2)
    assert float((g - g_want).abs().max()) < 3e-2 * float(g_want.abs().max())
