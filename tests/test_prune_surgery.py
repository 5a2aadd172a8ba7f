"""Surgery on residual CNNs: units, pinned blocks, bit-identical kept weights, forward, save and reload."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdforge.errors import KdforgeError
from kdforge.models import create_model
from kdforge.profile import count_params
from kdforge.prune.surgery import (
    find_units,
    load_pruned,
    pinned_indices,
    prune_model,
    pruned_record,
    random_init_like,
    removed,
    save_pruned,
)


def _resnet20() -> nn.Module:
    torch.manual_seed(0)
    m = create_model("resnet20", 10, 1).eval()
    for mod in m.modules():  # non-trivial BN statistics, so that bit-identity is meaningful
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.9, 1.1)
    return m


def test_cifar_resnet_units() -> None:
    m = _resnet20()
    units = find_units(m)
    assert [u.name for u in units][:4] == ["stem", "layer1.0", "layer1.1", "layer1.2"]
    assert len(units) == 10
    assert {u.name for u in units if not u.removable} == {"stem", "layer2.0", "layer3.0"}
    assert pinned_indices(units, ["layer1.1", 9]) == {0, 2, 4, 7, 9}
    with pytest.raises(KdforgeError):
        pinned_indices(units, ["layer9.0"])
    assert len(find_units(create_model("resnet56", 10, 1))) == 28


def test_prune_keeps_weights_bit_identical() -> None:
    m = _resnet20()
    units = find_units(m)
    keep = [0, 1, 3, 4, 7, 9]
    p = prune_model(m, units, keep)
    assert [len(p.layer1), len(p.layer2), len(p.layer3)] == [2, 1, 2]
    pairs = {"layer1.0": "layer1.0", "layer1.1": "layer1.2", "layer2.0": "layer2.0", "layer3.0": "layer3.0",
             "layer3.1": "layer3.2"}
    sd, sp = m.state_dict(), p.state_dict()
    for new, old in pairs.items():
        for k, v in sp.items():
            if k.startswith(new + "."):
                assert torch.equal(v, sd[old + k[len(new):]])
    for k in ("stem.0.weight", "fc.weight", "fc.bias"):
        assert torch.equal(sp[k], sd[k])
    assert len(list(m.layer1)) == 3  # the original is untouched
    x = torch.randn(3, 1, 16, 16)
    assert p(x).shape == (3, 10)
    with torch.no_grad():
        ref = m.fc(m.pool(m.layer3[2](m.layer3[0](m.layer2[0](m.layer1[2](m.layer1[0](m.stem(x))))))))
    assert torch.equal(p(x), ref)


def test_param_count_and_depth() -> None:
    m = _resnet20()
    units = find_units(m)
    keep = [0, 2, 4, 5, 7]
    p = prune_model(m, units, keep)
    gone = sum(count_params(m.get_submodule(units[i].name)) for i in range(len(units)) if i not in keep)
    assert count_params(p) == count_params(m) - gone
    assert len(p.layer1) + len(p.layer2) + len(p.layer3) == len(keep) - 1


def test_pinned_cannot_be_removed() -> None:
    m = _resnet20()
    units = find_units(m)
    with pytest.raises(KdforgeError, match="pinned"):
        prune_model(m, units, [0, 1, 2, 3, 7])  # layer2.0 (unit 4) changes the shape


def test_removed_context_equals_pruned() -> None:
    m = _resnet20()
    units = find_units(m)
    x = torch.randn(2, 1, 16, 16)
    keep = [0, 1, 4, 7, 8]
    full = m(x)
    with removed(m, units, keep):
        tmp = m(x)
    assert torch.equal(tmp, prune_model(m, units, keep)(x))
    assert torch.equal(m(x), full)


def test_save_and_reload(tmp_path) -> None:
    m = _resnet20()
    units = find_units(m)
    keep = [0, 2, 3, 4, 7, 8]
    p = prune_model(m, units, keep)
    rec = pruned_record(units, keep, {"model": "resnet20", "num_classes": 10, "in_chans": 1, "image_size": 16})
    save_pruned(p, tmp_path / "pruned", rec)
    assert (tmp_path / "pruned" / "pruned.yaml").is_file()
    q = load_pruned(tmp_path / "pruned")
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(q(x), p.eval()(x))
    assert all(torch.equal(a, b) for a, b in zip(q.state_dict().values(), p.state_dict().values(), strict=True))
    assert torch.equal(load_pruned(tmp_path / "pruned" / "model.safetensors")(x), q(x))
    with pytest.raises(KdforgeError):
        load_pruned(tmp_path / "nothing")


def test_torchvision_resnet() -> None:
    torch.manual_seed(0)
    m = create_model("torchvision:resnet18", 5, 3).eval()
    units = find_units(m)
    assert units[0].name == "maxpool" and len(units) == 9
    assert {u.name for u in units if not u.removable} == {"maxpool", "layer2.0", "layer3.0", "layer4.0"}
    keep = [i for i, u in enumerate(units) if not u.removable]
    p = prune_model(m, units, keep)
    assert p(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    assert torch.equal(p.layer2[0].conv1.weight, m.layer2[0].conv1.weight)


def test_timm_resnet() -> None:
    pytest.importorskip("timm")
    m = create_model("timm:resnet18", 4, 3).eval()
    units = find_units(m)
    assert [u.name for u in units if u.removable] == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    p = prune_model(m, units, [i for i, u in enumerate(units) if u.name != "layer3.1"])
    assert len(p.layer3) == 1 and p(torch.randn(1, 3, 64, 64)).shape == (1, 4)


def test_generic_units_shape_check() -> None:
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(nn.Conv2d(8, 8, 3, padding=1),
                                                                   nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU()))
    units = find_units(m, ["0", "1.0", "1.1", "1.2"], torch.zeros(1, 3, 8, 8))
    assert [u.removable for u in units] == [False, True, False, True]
    assert "shape-changing" in units[2].reason and "Sequential" in units[0].reason
    p = prune_model(m, units, [0, 2, 3])
    assert len(p[1]) == 2 and p(torch.zeros(1, 3, 8, 8)).shape == (1, 16, 4, 4)
    with pytest.raises(KdforgeError):
        find_units(nn.Linear(2, 2))


def test_random_init_like_is_seeded_and_fresh() -> None:
    m = _resnet20()
    a, b = random_init_like(m, 3), random_init_like(m, 3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.layer1[0].conv1.weight, m.layer1[0].conv1.weight)
    assert float(a.layer1[0].bn1.running_var.mean()) == 1.0
