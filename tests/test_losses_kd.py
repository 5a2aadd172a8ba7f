"""KD loss invariants: zero at equality, T² gradient scaling, reference values."""

from __future__ import annotations

import math

import pytest
import torch

from kdforge.errors import KdforgeError
from kdforge.losses import KDLoss, build_loss, kd_loss


def test_zero_when_student_equals_teacher() -> None:
    z = torch.randn(8, 10)
    assert kd_loss(z, z.clone(), T=4.0).abs().item() < 1e-6


def test_positive_otherwise_and_invariant_to_logit_shift() -> None:
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    v = kd_loss(s, t, 2.0)
    assert v > 0
    assert torch.allclose(kd_loss(s + 3.0, t - 1.0, 2.0), v, atol=1e-6)


def test_reference_value_from_the_formula() -> None:
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[2.0, 0.0, 1.0]])
    T = 2.0
    ps = [math.exp(v / T) for v in s[0].tolist()]
    pt = [math.exp(v / T) for v in t[0].tolist()]
    ps = [p / sum(ps) for p in ps]
    pt = [p / sum(pt) for p in pt]
    ref = T * T * sum(a * math.log(a / b) for a, b in zip(pt, ps, strict=True))
    assert kd_loss(s, t, T).item() == pytest.approx(ref, rel=1e-6)


def test_gradient_matches_t_squared_scaling() -> None:
    # d/ds of T²·KL(p_t^T || p_s^T) = T·(p_s^T − p_t^T) / B: the T² factor keeps the soft gradient O(1/T)·T².
    torch.manual_seed(0)
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5)
    for T in (1.0, 4.0):
        (g,) = torch.autograd.grad(kd_loss(s, t, T), s)
        expected = T * (torch.softmax(s / T, -1) - torch.softmax(t / T, -1)) / s.shape[0]
        assert torch.allclose(g, expected, atol=1e-6)


def test_no_gradient_reaches_the_teacher_side_when_detached() -> None:
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    KDLoss(T=3)(s, t.detach()).backward()
    assert s.grad is not None and t.grad is None


def test_bad_temperature() -> None:
    with pytest.raises(KdforgeError, match="T must be > 0"):
        build_loss("kd", T=0)
