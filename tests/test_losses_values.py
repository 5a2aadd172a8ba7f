"""Value tests of OFD's margin and loss, ReviewKD's ABF and warm-up, and FT's paraphraser.

Modules get hand-set weights (1×1 or centre-only 3×3 convs, identity BatchNorms in eval mode) so that
every output is a short formula written out below in plain Python.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdforge.losses import build_loss
from kdforge.losses.feature import ABF, Paraphraser, bn_margin, ft_factor_loss, ofd_loss
from kdforge.method import DataInfo, build_method


def _identity_bn(bn: nn.BatchNorm2d) -> None:
    bn.eval()
    bn.eps = 0.0
    with torch.no_grad():
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        bn.weight.fill_(1.0)
        bn.bias.zero_()


def _scalar_conv(conv: nn.Conv2d, value: float, bias: float = 0.0) -> None:
    """A 1-in 1-out conv that multiplies by ``value`` (centre tap only) and adds ``bias``."""
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = value
        if conv.bias is not None:
            conv.bias.fill_(bias)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _neg_mean(mu: float, sigma: float) -> float:
    """E[x | x < 0] for x ~ N(mu, sigma²), from the truncated-normal mean."""
    z = mu / sigma
    phi = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    cdf_neg = 0.5 * math.erfc(z / math.sqrt(2))
    return mu - sigma * phi / cdf_neg


# -- OFD ---------------------------------------------------------------------------------------------
def test_ofd_bn_margin_is_the_mean_of_the_negative_part() -> None:
    gamma = torch.tensor([1.0, -2.0, 0.5, 0.1])
    beta = torch.tensor([0.0, 1.0, -0.3, 1.0])  # the last channel is negative with p < 1e-3: −3|γ|
    want = [_neg_mean(0.0, 1.0), _neg_mean(1.0, 2.0), _neg_mean(-0.3, 0.5), -0.3]
    assert want[0] == pytest.approx(-math.sqrt(2 / math.pi))
    assert bn_margin(gamma, beta).tolist() == pytest.approx(want, rel=1e-5)
    # a Monte-Carlo check of the formula itself for one channel
    x = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2.0 + 1.0
    assert x[x < 0].mean().item() == pytest.approx(want[1], abs=0.01)


def test_ofd_loss_value_with_negative_teacher_features() -> None:
    t = [-2.0, -0.1, 0.5, 1.0]
    s = [-1.5, 0.2, -1.0, 1.0]
    m = -0.5
    total = 0.0
    for si, ti in zip(s, t, strict=True):
        target = max(ti, m)  # margin ReLU of the teacher
        if si > target or target > 0:  # partial L2: skip where both are "off"
            total += (si - target) ** 2
    want = total / 4
    got = ofd_loss(torch.tensor(s).view(1, 1, 2, 2), torch.tensor(t).view(1, 1, 2, 2), torch.tensor([m]))
    assert got.item() == pytest.approx(want)
    assert want == pytest.approx((0.2 + 0.1) ** 2 / 4 + (-1.0 - 0.5) ** 2 / 4)


@pytest.mark.parametrize(("model", "tap", "bn_name"), [("cnn_tiny", "stage3.1", "stage3.1"),
                                                      ("resnet8", "layer3.0.preact", "layer3.0.bn2")])
def test_ofd_reads_the_teacher_bn_of_a_pre_relu_tap(model: str, tap: str, bn_name: str) -> None:
    info = DataInfo(10, 1, 16)
    m = build_method({"name": "distill", "teacher": {"model": model}, "student": {"model": model},
                      "terms": [{"loss": "ofd", "weight": 1.0, "student_tap": tap, "teacher_tap": tap}]}, info)
    assert tap in m.teacher.pre_relu_taps.values()
    bn = dict(m.teacher.named_modules())[bn_name]
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, bn.num_features))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, bn.num_features))
    x = torch.randn(4, 1, 16, 16)
    m.setup((x, torch.zeros(4, dtype=torch.long)))
    margin = m.terms[0].loss.margins()[0]
    want = [_neg_mean(b, g) for g, b in zip(bn.weight.tolist(), bn.bias.tolist(), strict=True)]
    assert margin.tolist() == pytest.approx(want, rel=1e-5)
    assert (margin < 0).all()
    # the tap really holds negative (pre-ReLU) values
    m.teacher(x)
    assert (m.t_taps[tap] < 0).any()


def test_ofd_batch_margin_from_negative_features() -> None:
    loss = build_loss("ofd", margin="batch")
    t = torch.tensor([[-1.0, -3.0], [2.0, 0.0]]).view(1, 1, 2, 2)
    loss.setup([torch.zeros(1, 1, 2, 2)], [t])
    assert loss.margins()[0].tolist() == pytest.approx([-2.0])


# -- ReviewKD ----------------------------------------------------------------------------------------
def test_reviewkd_abf_fuses_by_the_attention_weights() -> None:
    abf = ABF(cin=1, mid=1, cout=1, fuse=True).eval()
    _identity_bn(abf.reduce[1])
    _identity_bn(abf.out[1])
    a, c = 2.0, -1.5  # reduce and output convs
    w = [[0.5, -1.0], [0.25, 2.0]]  # attention 1×1 conv: 2 channels (x, residual) → 2 weights
    b = [0.1, -0.2]
    _scalar_conv(abf.reduce[0], a)
    _scalar_conv(abf.out[0], c)
    with torch.no_grad():
        abf.att[0].weight.copy_(torch.tensor(w).view(2, 2, 1, 1))
        abf.att[0].bias.copy_(torch.tensor(b))
    x = [[1.0, -2.0], [0.5, 3.0]]
    r = 0.7  # a 1×1 deeper residual, nearest-upsampled to 2×2
    fused = []
    for row in x:
        out_row = []
        for v in row:
            xr = a * v
            w0 = _sigmoid(w[0][0] * xr + w[0][1] * r + b[0])
            w1 = _sigmoid(w[1][0] * xr + w[1][1] * r + b[1])
            out_row.append(xr * w0 + r * w1)
        fused.append(out_row)
    with torch.no_grad():
        out, got_fused = abf(torch.tensor(x).view(1, 1, 2, 2), torch.tensor(r).view(1, 1, 1, 1), (2, 2))
    flat = [f for row in fused for f in row]
    assert got_fused.flatten().tolist() == pytest.approx(flat, rel=1e-5)
    # the 3×3 output conv has only its centre tap, so it scales each position
    assert out.flatten().tolist() == pytest.approx([c * f for f in flat], rel=1e-5)
    # without a deeper stage (the deepest ABF) there is no fusion
    with torch.no_grad():
        _, plain = abf(torch.tensor(x).view(1, 1, 2, 2), None, (2, 2))
    assert plain.flatten().tolist() == pytest.approx([a * v for row in x for v in row])


@pytest.mark.parametrize(("total", "warmup", "factors"), [
    (240, None, {0: 1 / 20, 9: 10 / 20, 19: 1.0, 100: 1.0}),  # mdistiller: 20 of 240 epochs
    (24, None, {0: 1 / 2, 1: 1.0}),  # scaled: round(24 / 12) = 2
    (5, None, {0: 1.0}),  # at least one epoch
    (24, 0, {0: 1.0}),
    (24, 4, {0: 0.25, 3: 1.0}),
])
def test_reviewkd_warmup_follows_mdistiller_scaled_to_the_run(total: int, warmup: int | None,
                                                              factors: dict[int, float]) -> None:
    loss = build_loss("reviewkd", warmup=warmup)
    loss.total_epochs = total
    for epoch, want in factors.items():
        loss.set_epoch(epoch)
        assert loss.warmup_factor() == pytest.approx(want), epoch


def test_distill_passes_the_run_length_to_its_losses() -> None:
    m = build_method({"name": "distill", "teacher": {"model": "cnn_tiny"}, "student": {"model": "cnn_tiny"},
                      "terms": [{"loss": "reviewkd", "weight": 1.0, "student_tap": ["stage2", "stage3"]}]},
                     DataInfo(10, 1, 16))
    m.total_epochs = 36
    m.on_epoch_start(0)
    assert m.terms[0].loss.warmup_epochs() == 3


# -- FT ----------------------------------------------------------------------------------------------
def test_ft_paraphraser_encoder_decoder_and_factor_loss_values() -> None:
    para = Paraphraser(channels=1, factor_channels=1).eval()
    convs = [m for m in para.modules() if isinstance(m, nn.Conv2d)]
    for bn in (m for m in para.modules() if isinstance(m, nn.BatchNorm2d)):
        _identity_bn(bn)
    k = [1.5, -2.0, 0.5, 3.0]
    for conv, v in zip(convs, k, strict=True):
        _scalar_conv(conv, v, bias=0.25)

    def lrelu(v: float) -> float:
        return v if v > 0 else 0.1 * v

    x = [1.0, -0.5, 2.0]
    factor = [lrelu(k[1] * lrelu(k[0] * v)) for v in x]  # conv-BN-LeakyReLU twice (no conv biases there)
    recon = [k[3] * lrelu(k[2] * f) + 0.25 for f in factor]  # conv-BN-LeakyReLU, then a conv with bias
    with torch.no_grad():
        got_factor, got_recon = para(torch.tensor(x).view(1, 1, 1, 3))
    assert got_factor.flatten().tolist() == pytest.approx(factor, rel=1e-5)
    assert got_recon.flatten().tolist() == pytest.approx(recon, rel=1e-5)
    # FT's loss: mean |F_s/‖F_s‖ − F_t/‖F_t‖|^p over the flattened factor
    fs = [0.5, 1.0, -1.0]
    ns, nt = math.sqrt(sum(v * v for v in fs)), math.sqrt(sum(v * v for v in factor))
    want = sum(abs(a / ns - b / nt) for a, b in zip(fs, factor, strict=True)) / 3
    got = ft_factor_loss(torch.tensor(fs).view(1, 1, 1, 3), torch.tensor(factor).view(1, 1, 1, 3))
    assert got.item() == pytest.approx(want, rel=1e-5)
