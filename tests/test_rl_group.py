"""The group math of OPD-DA: attention, targets, losses, Boltzmann conversion, gradient routing, ramp-up."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from kdforge.rl.group import (
    DecisionAttention,
    DistillConfig,
    attention_stats,
    boltzmann,
    decision_loss,
    group_losses,
    group_step,
    mean_pairwise_js,
    ramp_up,
)
from kdforge.rl.nets import ActorCritic


def _hk(b: int = 5, k: int = 3, d: int = 16, a: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, d, generator=g), torch.randn(b, k, a, generator=g)


def test_attention_rows_are_distributions_and_permutation_equivariant() -> None:
    torch.manual_seed(0)
    att = DecisionAttention(16, 4)
    h, _ = _hk()
    alpha = att(h)
    assert alpha.shape == (5, 3, 3)
    assert (alpha >= 0).all()
    torch.testing.assert_close(alpha.sum(-1), torch.ones(5, 3))
    perm = torch.tensor([2, 0, 1])
    alpha_p = att(h[:, perm])
    torch.testing.assert_close(alpha_p, alpha[:, perm][:, :, perm])
    # the targets permute with the policies too
    cfg = DistillConfig()
    h, o = _hk()
    dec, feat, _ = group_losses(cfg, h, o, att)
    dec_p, feat_p, _ = group_losses(cfg, h[:, perm], o[:, perm], att)
    torch.testing.assert_close(dec_p, dec[perm])
    torch.testing.assert_close(feat_p, feat[perm])


def test_include_self_false_gives_zero_self_weight() -> None:
    torch.manual_seed(1)
    att = DecisionAttention(16, 4, include_self=False)
    alpha = att(_hk()[0])
    assert float(alpha.detach().diagonal(dim1=1, dim2=2).abs().max()) == 0.0
    torch.testing.assert_close(alpha.sum(-1), torch.ones(5, 3))
    assert float(attention_stats(alpha)["attn_self"]) == 0.0


@pytest.mark.parametrize("aggregation", ["attention", "mean", "leader", "dml"])
def test_identical_policies_give_zero_decision_loss(aggregation: str) -> None:
    torch.manual_seed(2)
    net = ActorCritic("mlp", (4,), 2, 16)
    nets = [copy.deepcopy(net) for _ in range(3)]
    x = torch.randn(32, 4) * 3
    h = torch.stack([n.features(x) for n in nets], 1)
    o = torch.stack([n.actor(hh) for n, hh in zip(nets, h.unbind(1), strict=True)], 1)
    att = DecisionAttention(16, 4)
    torch.nn.init.normal_(att.w_q.weight, std=3.0)  # any α
    cfg = DistillConfig(aggregation=aggregation)
    dec, feat, _ = group_losses(cfg, h, o, att, torch.tensor([1.0, 5.0, 2.0]))
    assert float(dec.detach().abs().max()) < 1e-6
    assert float(feat.detach().abs().max()) < 1e-10


def test_decision_loss_tau_squared_by_hand() -> None:
    out = torch.tensor([[[1.0, 2.0, 3.0]]])
    tgt = torch.tensor([[[3.0, 2.0, 1.0]]])

    def by_hand(tau: float) -> float:
        p = [math.exp(v / tau) for v in (3.0, 2.0, 1.0)]
        q = [math.exp(v / tau) for v in (1.0, 2.0, 3.0)]
        p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
        return tau**2 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))

    for tau in (1.0, 2.0):
        assert float(decision_loss(out, tgt, tau)) == pytest.approx(by_hand(tau), rel=1e-5)
    # log p/q = ±2/τ here: KL(τ 1) = 2·(0.6652 − 0.0900) = 1.1504; KL(τ 2) = 0.5065 − 0.1863 = 0.3202, times τ² = 4
    assert float(decision_loss(out, tgt, 1.0)) == pytest.approx(1.1504, abs=1e-3)
    assert float(decision_loss(out, tgt, 2.0)) == pytest.approx(4 * 0.3202, abs=1e-3)
    assert float(decision_loss(out, out, 3.0)) == pytest.approx(0.0, abs=1e-7)


def test_boltzmann_conversion_for_q_values() -> None:
    q = torch.tensor([[1.0, 3.0, 2.5]])
    for tau in (0.01, 0.1, 1.0):
        torch.testing.assert_close(boltzmann(q + 7.0, tau).exp(), boltzmann(q, tau).exp())
    torch.testing.assert_close(boltzmann(q, 1e-3).exp(), torch.tensor([[0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    # standardisation makes the distribution scale-free
    torch.testing.assert_close(boltzmann(10 * q, 1.0, True), boltzmann(q, 1.0, True), atol=1e-5, rtol=0)


def _routing(detach: bool) -> tuple[list[bool], bool]:
    torch.manual_seed(3)
    nets = [ActorCritic("mlp", (4,), 2, 16) for _ in range(3)]
    att = DecisionAttention(16, 4)
    x = torch.randn(8, 4)
    h = torch.stack([n.features(x) for n in nets], 1)
    o = torch.stack([n.actor(hh) for n, hh in zip(nets, h.unbind(1), strict=True)], 1)
    dec, _, _ = group_losses(DistillConfig(detach_targets=detach), h, o, att)
    dec[0].backward()  # policy 0's decision loss only
    peers = [any(p.grad is not None and p.grad.abs().sum() > 0 for p in n.parameters()) for n in nets]
    return peers, att.w_q.weight.grad is not None and bool(att.w_q.weight.grad.abs().sum() > 0)


def test_gradient_routing_under_detach_targets() -> None:
    peers, att = _routing(detach=True)
    assert peers == [True, False, False] and att
    peers, att = _routing(detach=False)
    assert peers == [True, True, True] and att


def test_feature_target_is_stop_gradient_by_default() -> None:
    torch.manual_seed(4)
    h = torch.randn(6, 3, 8, requires_grad=True)
    o = torch.randn(6, 3, 2)
    _, feat, _ = group_losses(DistillConfig(aggregation="mean", lambda_dec=0.0), h, o, None)
    feat[0].backward()
    assert float(h.grad[:, 1:].abs().sum()) == 0.0 and float(h.grad[:, 0].abs().sum()) > 0


def test_own_states_use_only_the_policy_s_own_slice() -> None:
    h, o = _hk(b=6, k=3)  # rows 0-1 policy 0's slice, 2-3 policy 1's, 4-5 policy 2's
    h.requires_grad_(True)
    dec, feat, alpha = group_step(DistillConfig(aggregation="mean", states="own"), h, o, None)
    assert alpha.shape == (6, 3, 3)
    (dec[1] + feat[1]).backward()
    assert float(h.grad[2:4].abs().sum()) > 0 and float(h.grad[:2].abs().sum() + h.grad[4:].abs().sum()) == 0


def test_ramp_up() -> None:
    assert ramp_up(0, 10) == pytest.approx(math.exp(-5))
    assert ramp_up(10, 10) == 1.0 and ramp_up(20, 10) == 1.0 and ramp_up(0, 0) == 1.0
    vals = [ramp_up(t, 10) for t in range(12)]
    assert all(vals[t] < vals[t + 1] for t in range(10))


def test_js_monitor() -> None:
    p = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    assert mean_pairwise_js(p) == pytest.approx(0.0, abs=1e-9)
    q = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert mean_pairwise_js(q) == pytest.approx(math.log(2), rel=1e-5)
