"""kdforge's losses against torchdistill's own loss modules (torchdistill 1.1.5, a dev dependency).

Each case builds a torchdistill loss exactly as its YAML would (module paths, ``mode``, ``reduction``,
``kernel_config``) and the kdforge loss through ``build_loss`` with ``compat`` and the same keys only,
no adapter code: both must give the same number on the same random tensors.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

td = pytest.importorskip("torchdistill.losses.mid_level")

from kdforge.losses import build_loss  # noqa: E402

S, T = "student_layer", "teacher_layer"


def io(x: torch.Tensor, path: str) -> dict[str, dict[str, torch.Tensor]]:
    return {path: {"output": x}}


def pair(path_s: str = S, path_t: str = T) -> dict[str, Any]:
    return {"student": {"path": path_s, "io": "output"}, "teacher": {"path": path_t, "io": "output"}, "weight": 1}


def maps(*shape: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).relu(), torch.randn(*shape, generator=g).relu()


def ours(name: str, student: list[torch.Tensor], teacher: list[torch.Tensor], **keys: Any) -> float:
    loss = build_loss(name, **keys)
    loss.setup(student, teacher)
    return float(loss(student, teacher))


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")  # torch's note on torchdistill's KLDivLoss
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_kd(temperature: float, reduction: str) -> None:
    s, t = maps(8, 10, seed=1)
    # alpha 0: the bare KL (alpha unset crashes in torchdistill 1.1.5's constructor: 1 - None)
    ref = td.KDLoss(S, "output", T, "output", temperature=temperature, alpha=0.0, reduction=reduction)
    want = float(ref(io(s, S), io(t, T)))
    got = float(build_loss("kd", T=temperature, compat="torchdistill", reduction=reduction)(s, t))
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_kd_with_labels_is_ce_plus_the_paper_kd_term(alpha: float) -> None:
    s, t = maps(8, 10, seed=2)
    y = torch.arange(8) % 10
    ref = td.KDLoss(S, "output", T, "output", temperature=4.0, alpha=alpha)
    want = float(ref(io(s, S), io(t, T), targets=y))
    got = alpha * float(build_loss("ce")(s, y)) + (1 - alpha) * float(build_loss("kd", T=4.0)(s, t))
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize(("mode", "compat"), [("code", "paper"), ("paper", "torchdistill"),
                                              ("paper", ["torchdistill"])])
@pytest.mark.parametrize("pairs", [1, 2])
def test_at(mode: str, compat: Any, pairs: int) -> None:
    fs = [maps(4, 3 + i, 6, 5, seed=10 + i) for i in range(pairs)]
    ref = td.ATLoss({f"p{i}": pair(f"s{i}", f"t{i}") for i in range(pairs)}, mode=mode)
    want = float(ref({f"s{i}": {"output": f[0]} for i, f in enumerate(fs)},
                     {f"t{i}": {"output": f[1]} for i, f in enumerate(fs)}))
    assert ours("at", [f[0] for f in fs], [f[1] for f in fs], compat=compat) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("second", [(6, 6), (3, 3)])
def test_fsp(second: tuple[int, int]) -> None:
    s1, t1 = maps(4, 3, 6, 6, seed=20)
    s2, t2 = maps(4, 5, *second, seed=21)
    cfg = {"p": {"student_first": {"path": "s1", "io": "output"}, "student_second": {"path": "s2", "io": "output"},
                 "teacher_first": {"path": "t1", "io": "output"}, "teacher_second": {"path": "t2", "io": "output"},
                 "weight": 1}}
    want = float(td.FSPLoss(cfg)({"s1": {"output": s1}, "s2": {"output": s2}},
                                 {"t1": {"output": t1}, "t2": {"output": t2}}))
    assert ours("fsp", [s1, s2], [t1, t2], compat="torchdistill") == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
@pytest.mark.parametrize("shape", [(6, 12), (6, 4, 3, 3)])
def test_sp(reduction: str, shape: tuple[int, ...]) -> None:
    s, t = maps(*shape, seed=30)
    want = float(td.SPKDLoss(S, T, reduction)(io(s, S), io(t, T)))
    assert ours("sp", [s], [t], compat="torchdistill", reduction=reduction) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("kernel", ["gaussian", "bilinear"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_cc(kernel: str, reduction: str) -> None:
    g = torch.Generator().manual_seed(40)
    s, t = 0.3 * torch.randn(6, 16, generator=g), 0.3 * torch.randn(6, 16, generator=g)  # linear outputs
    ref = td.CCKDLoss(S, T, {"type": kernel, "gamma": 0.4, "max_p": 2}, reduction)
    want = float(ref(io(s, S), io(t, T)))
    got = ours("cc", [s], [t], compat="torchdistill", kernel=kernel, reduction=reduction, embed_dim=0)
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(("dist", "angle"), [(25.0, 0.0), (0.0, 50.0), (25.0, 50.0)])
def test_rkd(reduction: str, dist: float, angle: float) -> None:
    s, t = maps(6, 8, seed=50)
    want = float(td.RKDLoss(S, T, dist, angle, reduction)(io(s, S), io(t, T)))
    got = ours("rkd", [s], [t], dist_weight=dist, angle_weight=angle, reduction=reduction)
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("shape", [(6, 8), (6, 4, 2, 2)])
def test_pkt(shape: tuple[int, ...]) -> None:
    s, t = maps(*shape, seed=60)
    want = float(td.PKTLoss(S, "output", T, "output")(io(s.flatten(1), S), io(t.flatten(1), T)))
    assert ours("pkt", [s], [t], compat="torchdistill") == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fitnet_as_torchdistills_mse_wrapper(reduction: str) -> None:
    s, t = maps(4, 3, 5, 5, seed=70)
    ref = td.SimpleLossWrapper(nn.MSELoss(reduction=reduction),
                               input={"is_from_teacher": False, "module_path": S, "io": "output"},
                               target={"is_from_teacher": True, "module_path": T, "io": "output"})
    want = float(ref(io(s, S), io(t, T), None))
    loss = build_loss("fitnet", reduction=reduction)
    loss.setup([s], [t])
    loss.regressors = nn.ModuleList([nn.Identity()])  # torchdistill's hint comes already regressed
    assert float(loss([s], [t])) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize(("beta", "gamma", "tau"), [(1.0, 1.0, 1.0), (2.0, 2.0, 4.0)])
def test_dist(beta: float, gamma: float, tau: float) -> None:
    s, t = maps(8, 10, seed=80)
    want = float(td.DISTLoss(S, "output", T, "output", beta=beta, gamma=gamma, tau=tau)(io(s, S), io(t, T)))
    assert float(build_loss("dist", beta=beta, gamma=gamma, T=tau)(s, t)) == pytest.approx(want, rel=1e-5)
