"""GradNorm, budgets, candidate enumeration, SGLP selection and baseline scorers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.errors import KdforgeError
from kdforge.prune.importance import (
    allocate_keep,
    block_influence,
    classification_task,
    enumerate_candidates,
    grad_norm,
    n_candidates,
    select_baseline,
    sglp_select,
)
from kdforge.prune.surgery import find_units, removed


class Block(nn.Module):
    """Linear-BN-ReLU-Linear-BN plus skip."""

    def __init__(self, w: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(w, w), nn.BatchNorm1d(w), nn.ReLU(), nn.Linear(w, w), nn.BatchNorm1d(w))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.f(x))


class ResMLP(nn.Module):
    """A small residual MLP: stem, blocks, head."""

    def __init__(self, d: int = 10, w: int = 12, n: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Linear(d, w)
        self.blocks = nn.Sequential(*[Block(w) for _ in range(n)])
        self.head = nn.Linear(w, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


def _setup(n: int = 6, seed: int = 0) -> tuple[ResMLP, list, list]:
    torch.manual_seed(seed)
    m = ResMLP(n=n)
    units = find_units(m, ["stem", *[f"blocks.{i}" for i in range(n)]], torch.zeros(2, 10))
    batches = [(torch.randn(16, 10), torch.randint(0, 3, (16,))) for _ in range(2)]
    return m, units, batches


def test_grad_norm_matches_manual() -> None:
    m, _, batches = _setup()
    ref = []
    for x, y in batches:
        mm = copy.deepcopy(m).train()
        F.cross_entropy(mm(x), y).backward()
        ref.append(math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in mm.parameters())))
    assert grad_norm(m, batches, classification_task().loss) == pytest.approx(sum(ref) / 2, rel=1e-9)
    assert grad_norm(m, batches[:1], classification_task().loss) == pytest.approx(ref[0], rel=1e-9)
    mm = copy.deepcopy(m).train()
    x, y = batches[0]
    F.cross_entropy(mm(x), y).backward()
    per = sum(float(p.grad.double().norm()) for p in mm.parameters())
    assert grad_norm(m, batches[:1], classification_task().loss, "sum_per_param") == pytest.approx(per, rel=1e-9)


def test_grad_norm_ignores_frozen_and_zeroes_between_batches() -> None:
    m, _, batches = _setup()
    loss = classification_task().loss
    x, y = batches[0]
    for p in m.parameters():
        p.grad = torch.full_like(p, 100.0)  # stale gradients must not leak into the score
    first = grad_norm(m, [batches[0], batches[0]], loss)
    assert first == pytest.approx(grad_norm(m, [batches[0]], loss), rel=1e-12)
    assert all(p.grad is None for p in m.parameters())
    m.head.requires_grad_(False)
    mm = copy.deepcopy(m).train()
    F.cross_entropy(mm(x), y).backward()
    ref = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in mm.parameters() if p.grad is not None))
    assert grad_norm(m, [batches[0]], loss) == pytest.approx(ref, rel=1e-9)
    assert not m.head.weight.requires_grad


def test_grad_norm_keeps_bn_buffers() -> None:
    m, units, batches = _setup()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    grad_norm(m, batches, classification_task().loss)
    sglp_select(m, units, [[0, 1, 2], [3, 4, 5, 6]], [2, 2], batches, classification_task(), candidate_mode="subnet")
    sglp_select(m, units, [[0, 1, 2], [3, 4, 5, 6]], [2, 2], batches, classification_task())
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert m.blocks[0].f[1].num_batches_tracked.item() == 0


@pytest.mark.parametrize(("sizes", "ratio", "pins", "expect"), [
    ([3, 7, 14, 2, 2], 0.5, None, [2, 3, 7, 1, 1]),
    ([4, 4], 0.5, None, [2, 2]),
    ([1, 1, 1], 0.3, None, [1, 1, 1]),          # at least one per segment
    ([5, 5, 5], 0.4, None, [2, 2, 2]),
    ([3, 3, 3], 0.5, [3, 0, 0], [3, 1, 1]),     # pinned units count toward the minimum
    ([10], 1.0, None, [10]),
])
def test_allocate_keep(sizes: list[int], ratio: float, pins: list[int] | None, expect: list[int]) -> None:
    r = allocate_keep(sizes, ratio, pins)
    assert r == expect
    assert all(1 <= a <= n for a, n in zip(r, sizes, strict=True))


def test_allocate_keep_hits_target() -> None:
    for sizes in ([3, 7, 14, 2, 2], [1, 9, 5, 13], [2, 2, 2, 2, 2, 18]):
        for ratio in (0.25, 0.5, 0.75):
            r = allocate_keep(sizes, ratio)
            assert sum(r) == max(len(sizes), round(ratio * sum(sizes)))
    with pytest.raises(KdforgeError):
        allocate_keep([3], 0.0)


def test_candidate_enumeration() -> None:
    segs, keep = [[0, 1, 2], [3, 4, 5, 6, 7], [8, 9]], [2, 3, 1]
    cands = [enumerate_candidates(s, r, set()) for s, r in zip(segs, keep, strict=True)]
    assert [len(c) for c in cands] == [math.comb(3, 2), math.comb(5, 3), math.comb(2, 1)]
    assert all(len(c) == r for cs, r in zip(cands, keep, strict=True) for c in cs)
    pinned = {0, 5}
    c0 = enumerate_candidates(segs[0], 2, pinned)
    assert len(c0) == 2 and all(0 in c for c in c0)
    assert n_candidates(segs[1], 3, pinned) == len(enumerate_candidates(segs[1], 3, pinned)) == math.comb(4, 2)


@pytest.mark.parametrize("mode", ["hybrid", "subnet", "hybrid_code_compat"])
def test_sglp_counts_sizes_and_pins(mode: str) -> None:
    m, units, batches = _setup()
    segs, keep = [[0, 1, 2], [3, 4, 5, 6]], [2, 2]
    sel = sglp_select(m, units, segs, keep, batches, classification_task(), candidate_mode=mode)
    assert sel.n_evals == math.comb(2, 1) + math.comb(4, 2)  # the stem (unit 0) is pinned
    assert 0 in sel.kept
    for seg, r in zip(segs, keep, strict=True):
        assert len([u for u in sel.kept if u in seg]) == r
    assert sel.unit_scores


def test_sglp_direction_and_greedy() -> None:
    m, units, batches = _setup()
    segs = [[0], [1, 2, 3, 4, 5, 6]]
    lo = sglp_select(m, units, segs, [1, 3], batches[:1], classification_task(), candidate_mode="subnet",
                     select="min")
    assert lo.n_evals == 1 + math.comb(6, 3)
    assert len(lo.details["segments"][1]["kept"]) == 3
    g = sglp_select(m, units, segs, [1, 3], batches[:1], classification_task(), candidate_mode="subnet",
                    select="max", max_candidates=5)
    assert g.n_evals == 1 + 6 + 5 + 4 and len(g.kept) == 4
    assert g.details["segments"][1]["search"] == "greedy"
    with pytest.raises(KdforgeError):
        sglp_select(m, units, segs, [1], batches, classification_task())


def test_hybrid_scores_do_not_depend_on_order() -> None:
    m, units, batches = _setup()
    a = sglp_select(m, units, [[0, 1, 2], [3, 4, 5, 6]], [2, 2], batches, classification_task())
    b = sglp_select(m, units, [[3, 4, 5, 6], [0, 1, 2]], [2, 2], batches, classification_task())
    assert a.kept == b.kept


@pytest.mark.parametrize("method", ["random", "first_n", "last_n", "every_other", "block_influence", "taylor",
                                    "oracle", "sleb", "angular"])
def test_baselines_keep_budget_and_pins(method: str) -> None:
    m, units, batches = _setup()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    sel = select_baseline(method, m, units, 4, batches, classification_task(), pinned={6})
    assert len(sel.kept) == 4 and 0 in sel.kept and 6 in sel.kept
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(p.requires_grad for p in m.parameters())


def test_simple_baselines_exact() -> None:
    m, units, batches = _setup()
    t = classification_task()
    assert select_baseline("first_n", m, units, 4, batches, t).kept == [0, 4, 5, 6]
    assert select_baseline("last_n", m, units, 4, batches, t).kept == [0, 1, 2, 3]
    assert select_baseline("every_other", m, units, 4, batches, t).kept == [0, 1, 3, 5]
    r = [select_baseline("random", m, units, 4, batches, t, seed=s).kept for s in range(6)]
    assert len({tuple(k) for k in r}) > 1
    with pytest.raises(KdforgeError):
        select_baseline("first_n", m, units, 0, batches, t)
    with pytest.raises(KdforgeError):
        select_baseline("magic", m, units, 4, batches, t)


def test_oracle_finds_dead_blocks() -> None:
    m, units, batches = _setup()
    with torch.no_grad():
        for i in (1, 4):  # a block whose residual branch outputs exactly 0 (then ReLU of a ReLU output)
            m.blocks[i].f[4].weight.zero_()
            m.blocks[i].f[4].bias.zero_()
    t = classification_task()
    sel = select_baseline("oracle", m, units, 5, batches, t)
    assert sel.unit_scores[2] == pytest.approx(0.0, abs=1e-7) and sel.unit_scores[5] == pytest.approx(0.0, abs=1e-7)
    order = sorted(sel.unit_scores, key=lambda i: sel.unit_scores[i])
    assert sorted(sel.removed) == sorted(order[:2])
    bi = block_influence(m, units, batches, t)
    assert bi[2] == pytest.approx(0.0, abs=1e-6) and bi[5] == pytest.approx(0.0, abs=1e-6)
    assert math.isinf(bi[0])  # the stem changes the shape
    assert select_baseline("block_influence", m, units, 5, batches, t).removed == [2, 5]


def test_block_influence_manual() -> None:
    m, units, batches = _setup()
    m.eval()
    x = batches[0][0]
    h = m.blocks[0](m.stem(x))
    ref = 1 - F.cosine_similarity(m.stem(x).double(), h.double(), -1).mean()
    bi = block_influence(m, units, batches[:1], classification_task())
    assert bi[1] == pytest.approx(float(ref.detach()), abs=1e-6)


def test_removed_context_restores() -> None:
    m, units, batches = _setup()
    x = batches[0][0]
    m.eval()
    full = m(x)
    with removed(m, units, [0, 1, 2]):
        assert len(m.blocks) == 2
        short = m(x)
    assert len(m.blocks) == 6 and torch.equal(m(x), full)
    assert torch.allclose(short, m.head(m.blocks[1](m.blocks[0](m.stem(x)))))
