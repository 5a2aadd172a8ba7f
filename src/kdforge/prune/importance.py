"""Which units to keep: SGLP (GradNorm per segment, hybrid or subnet candidates) and baseline scorers."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.errors import KdforgeError
from kdforge.prune.surgery import UnitSpec, random_init_like, removed
from kdforge.taps import FeatureTaps

CandidateMode = Literal["hybrid", "hybrid_code_compat", "subnet"]
Select = Literal["max", "min"]
NormKind = Literal["global", "sum_per_param"]
ScoreBy = Literal["gradnorm", "loss"]
BASELINES = ("random", "first_n", "last_n", "every_other", "block_influence", "angular", "sleb", "sleb_pick", "taylor",
             "oracle")


@dataclass
class Task:
    """How a model is called on a calibration batch, and its loss (CE for images, next-token CE for text)."""

    forward: Callable[[nn.Module, Any], Any]
    loss: Callable[[nn.Module, Any], Tensor]
    train_mode: bool = True
    trainable: Callable[[str], bool] | None = None


def classification_task(train_mode: bool = True) -> Task:
    """Batches are ``(x, y)``; the loss is the mean cross-entropy (GradNorm in train mode, as the code)."""
    return Task(lambda m, b: m(b[0]), lambda m, b: F.cross_entropy(m(b[0]), b[1]), train_mode)


def causal_lm_task() -> Task:
    """Batches are token-id rows; next-token CE in eval mode; embeddings and head frozen for GradNorm."""
    from kdforge.llm import lm_logits, lm_loss

    def trainable(name: str) -> bool:
        return not any(k in name for k in ("embed", "wte", "wpe", "lm_head"))

    return Task(lambda m, b: lm_logits(m, b), lambda m, b: lm_loss(m, b), False, trainable)


def _lm_trainable(name: str) -> bool:
    return not any(k in name for k in ("embed", "wte", "wpe", "lm_head"))


def causal_lm_kl_task() -> Task:
    """Batches are ``{"ids", "ref_logp"}`` (:func:`with_reference`); the loss is KL(reference ‖ model) per token.

    The reference is the unpruned model, so the loss measures how much of it a candidate keeps (0 for the
    unpruned model itself), where next-token CE on the data mixes that with how hard the text is.
    """
    from kdforge.llm.losses import forward_kl
    from kdforge.llm.metrics import lm_logits

    def loss(m: nn.Module, b: dict[str, Tensor]) -> Tensor:
        logits = lm_logits(m, b["ids"]).float()
        ref = b["ref_logp"].to(logits.device)
        return forward_kl(logits[..., : ref.shape[-1]].log_softmax(-1), ref).mean()

    return Task(lambda m, b: lm_logits(m, b["ids"]), loss, False, _lm_trainable)


@torch.no_grad()
def with_reference(model: nn.Module, batches: Sequence[Tensor]) -> list[dict[str, Tensor]]:
    """Token-id batches with the (unpruned) model's next-token log-probabilities, for :func:`causal_lm_kl_task`."""
    from kdforge.llm.metrics import lm_logits

    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = [{"ids": b, "ref_logp": lm_logits(model, b.to(dev)).float().log_softmax(-1).cpu()} for b in batches]
    model.train(was)
    return out


@dataclass
class Selection:
    """The kept units, per-unit scores for plots, and what the selection cost."""

    method: str
    kept: list[int]
    n_units: int
    unit_scores: dict[int, float] = field(default_factory=dict)
    n_evals: int = 0
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def removed(self) -> list[int]:
        return [i for i in range(self.n_units) if i not in set(self.kept)]

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "kept": self.kept, "removed": self.removed,
                "unit_scores": {str(k): v for k, v in self.unit_scores.items()}, "n_evals": self.n_evals,
                "seconds": self.seconds, **self.details}


# -- GradNorm -----------------------------------------------------------------------------------
def _to(batch: Any, dev: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: _to(v, dev) for k, v in batch.items()}
    if isinstance(batch, Tensor):
        return batch.to(dev)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, dev) for b in batch)
    return batch


def grad_norm(model: nn.Module, batches: Sequence[Any], loss_fn: Callable[[nn.Module, Any], Tensor],
              norm: NormKind = "global", train_mode: bool = True, restore_buffers: bool = True,
              trainable: Callable[[str], bool] | None = None) -> float:
    """GradNorm averaged over batches: sqrt(Σ‖g‖²) (global) or Σ‖g‖ (sum_per_param); grads zeroed per batch.

    Parameters without a gradient are ignored; the model's buffers (BN statistics) and its
    ``requires_grad`` flags are restored afterwards, and its gradients cleared.
    """
    if norm not in ("global", "sum_per_param"):
        raise KdforgeError(f"unknown grad_norm kind {norm!r} (valid: global, sum_per_param)")
    saved = {k: b.detach().clone() for k, b in model.named_buffers()} if restore_buffers else {}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    if trainable is not None:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n] and trainable(n))
    params = [p for p in model.parameters() if p.requires_grad]
    was = model.training
    model.train(train_mode)
    dev = next(model.parameters()).device
    scores = []
    try:
        for batch in batches:
            for p in params:
                p.grad = None
            loss_fn(model, _to(batch, dev)).backward()  # gradient-only analysis
            grads = [p.grad.detach().double() for p in params if p.grad is not None]
            if norm == "global":
                scores.append(math.sqrt(sum(float((g * g).sum()) for g in grads)))
            else:
                scores.append(sum(float(g.norm()) for g in grads))
    finally:
        for p in params:
            p.grad = None
        model.train(was)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        if saved:
            with torch.no_grad():
                for k, b in model.named_buffers():
                    b.copy_(saved[k])
    return float(np.mean(scores)) if scores else 0.0


# -- budgets and candidates -----------------------------------------------------------------------
def allocate_keep(sizes: Sequence[int], keep_ratio: float, pinned_per_segment: Sequence[int] | None = None,
                  total: int | None = None) -> list[int]:
    """r_s = max(1, round-half-up(ρ·n_s)), adjusted by largest remainder so Σ r_s = round(ρ·N) (or ``total``)."""
    if not 0 < keep_ratio <= 1:
        raise KdforgeError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    pins = list(pinned_per_segment or [0] * len(sizes))
    lo = [min(n, max(1, p)) for n, p in zip(sizes, pins, strict=True)]
    quota = [keep_ratio * n for n in sizes]
    r = [min(n, max(lo_s, math.floor(q + 0.5))) for n, lo_s, q in zip(sizes, lo, quota, strict=True)]
    target = round(keep_ratio * sum(sizes)) if total is None else int(total)
    target = min(sum(sizes), max(sum(lo), target))
    while sum(r) < target:
        s = max((i for i in range(len(r)) if r[i] < sizes[i]), key=lambda i: (quota[i] - r[i], sizes[i]))
        r[s] += 1
    while sum(r) > target:
        s = min((i for i in range(len(r)) if r[i] > lo[i]), key=lambda i: (quota[i] - r[i], -sizes[i]))
        r[s] -= 1
    return r


def enumerate_candidates(segment: Sequence[int], keep: int, pinned: set[int]) -> list[tuple[int, ...]]:
    """All kept subsets of one segment with ``keep`` units, pinned units always in."""
    fixed = [u for u in segment if u in pinned]
    free = [u for u in segment if u not in pinned]
    r = min(len(free), max(0, keep - len(fixed)))
    return [tuple(sorted([*fixed, *c])) for c in itertools.combinations(free, r)]


def n_candidates(segment: Sequence[int], keep: int, pinned: set[int]) -> int:
    """C(free, keep − pinned) without enumerating."""
    free = sum(1 for u in segment if u not in pinned)
    return math.comb(free, min(free, max(0, keep - (len(segment) - free))))


# -- SGLP ---------------------------------------------------------------------------------------
def _unit_state(model: nn.Module, unit: str) -> dict[str, Tensor]:
    pre = unit + "."
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(pre)}


def _load_into(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    sd = model.state_dict()
    with torch.no_grad():
        for k, v in tensors.items():
            sd[k].copy_(v)


def sglp_select(model: nn.Module, units: Sequence[UnitSpec], segments: Sequence[Sequence[int]],
                keep_per_segment: Sequence[int], batches: Sequence[Any], task: Task, pinned: set[int] | None = None,
                candidate_mode: CandidateMode = "hybrid", select: Select = "max", norm: NormKind = "global",
                max_candidates: int = 256, seed: int = 0, score_by: ScoreBy = "gradnorm") -> Selection:
    """SGLP: per segment, score every kept subset by GradNorm and keep the best (greedy past ``max_candidates``).

    ``score_by="loss"`` scores a subnet candidate by the task's calibration loss instead of its gradient
    norm (with :func:`causal_lm_kl_task`: its KL to the unpruned model; keep ``select="min"``).
    """
    if len(segments) != len(keep_per_segment):
        raise KdforgeError(f"keep_per_segment has {len(keep_per_segment)} entries for {len(segments)} segments")
    if candidate_mode not in ("hybrid", "hybrid_code_compat", "subnet"):
        raise KdforgeError(f"unknown candidate_mode {candidate_mode!r} (valid: hybrid, hybrid_code_compat, subnet)")
    if select not in ("max", "min"):
        raise KdforgeError(f"unknown select {select!r} (valid: max, min)")
    if score_by not in ("gradnorm", "loss"):
        raise KdforgeError(f"unknown score_by {score_by!r} (valid: gradnorm, loss)")
    if score_by == "loss" and candidate_mode != "subnet":
        raise KdforgeError("score_by 'loss' scores pretrained subnets: set candidate_mode 'subnet'")
    pinned = set(pinned or ()) | {i for i, u in enumerate(units) if not u.removable}
    t0 = time.perf_counter()
    n = len(units)
    better = (lambda a, b: a > b) if select == "max" else (lambda a, b: a < b)
    work = None
    if candidate_mode != "subnet":
        work = random_init_like(model, seed)
        random_state = {k: v.detach().clone() for k, v in work.state_dict().items()}
        pretrained = {i: _unit_state(model, units[i].name) for i in range(n)}

    def score(seg: Sequence[int], cand: Sequence[int]) -> float:
        if candidate_mode == "subnet":
            drop = set(seg) - set(cand)
            with removed(model, units, [i for i in range(n) if i not in drop]):
                if score_by == "loss":
                    return calib_loss(model, batches, task)
                return grad_norm(model, batches, task.loss, norm, task.train_mode, trainable=task.trainable)
        assert work is not None
        if candidate_mode == "hybrid":
            _load_into(work, random_state)
        for u in cand:
            _load_into(work, pretrained[u])
        return grad_norm(work, batches, task.loss, norm, task.train_mode, trainable=task.trainable)

    kept: list[int] = []
    evals = 0
    per_seg: list[dict[str, Any]] = []
    sums: dict[int, list[float]] = {i: [] for i in range(n)}
    for seg, r in zip(segments, keep_per_segment, strict=True):
        seg = list(seg)
        count = n_candidates(seg, r, pinned)
        if count <= max_candidates:
            best, best_s = None, None
            for cand in enumerate_candidates(seg, r, pinned):
                s = score(seg, cand)
                evals += 1
                for u in cand:
                    sums[u].append(s)
                if best_s is None or better(s, best_s):
                    best, best_s = cand, s
            chosen = list(best or seg)
            how = "exhaustive"
        else:
            chosen, e = _greedy_in_segment(seg, r, pinned, lambda c, seg=seg: score(seg, c), better, sums)
            evals += e
            how = "greedy"
        per_seg.append({"segment": seg, "keep": r, "candidates": count, "search": how, "kept": chosen})
        kept += chosen
    unit_scores = {i: float(np.mean(v)) for i, v in sums.items() if v}
    tag = "" if score_by == "gradnorm" else "-loss"
    return Selection(f"sglp-{candidate_mode}-{select}{tag}", sorted(kept), n, unit_scores, evals,
                     time.perf_counter() - t0, {"segments": per_seg})


def _greedy_in_segment(seg: list[int], r: int, pinned: set[int], score: Callable[[list[int]], float],
                       better: Callable[[float, float], bool], sums: dict[int, list[float]]) -> tuple[list[int], int]:
    """Remove one unit at a time, each time the one whose removal scores best, until ``r`` remain."""
    cur = list(seg)
    evals = 0
    target = max(r, sum(1 for u in seg if u in pinned))
    while len(cur) > target:
        best_u, best_s = None, None
        for u in cur:
            if u in pinned:
                continue
            cand = [v for v in cur if v != u]
            s = score(cand)
            evals += 1
            for v in cand:
                sums[v].append(s)
            if best_s is None or better(s, best_s):
                best_u, best_s = u, s
        if best_u is None:
            break
        cur.remove(best_u)
    return cur, evals


# -- baselines ----------------------------------------------------------------------------------
def _removable(n: int, pinned: set[int]) -> list[int]:
    return [i for i in range(n) if i not in pinned]


def _n_remove(n: int, n_keep: int, pinned: set[int]) -> int:
    free = len(_removable(n, pinned))
    k = n - n_keep
    if k > free:
        raise KdforgeError(f"cannot keep only {n_keep} of {n} units: {len(pinned)} are pinned")
    return max(0, k)


def _keep_lowest_removed(n: int, scores: dict[int, float], n_keep: int, pinned: set[int]) -> list[int]:
    """Remove the n − n_keep removable units with the lowest score."""
    k = _n_remove(n, n_keep, pinned)
    order = sorted(_removable(n, pinned), key=lambda i: (scores[i], i))
    drop = set(order[:k])
    return [i for i in range(n) if i not in drop]


def _io_batches(model: nn.Module, units: Sequence[UnitSpec], batches: Sequence[Any], task: Task,
                reduce: Callable[[Tensor, Tensor], Tensor]) -> dict[int, float]:
    """Mean over batches of ``reduce(input, output)`` for each shape-preserving unit."""
    names = [u.name for u in units]
    acc: dict[int, list[float]] = {i: [] for i in range(len(units))}
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    with torch.no_grad(), FeatureTaps(model, names, mode="input", detach=True) as ti, \
            FeatureTaps(model, names, detach=True) as to:
        for b in batches:
            task.forward(model, _to(b, dev))
            for i, nm in enumerate(names):
                if nm in ti and nm in to and ti[nm].shape == to[nm].shape:
                    acc[i].append(float(reduce(ti[nm], to[nm])))
            ti.clear()
            to.clear()
    model.train(was)
    return {i: float(np.mean(v)) if v else math.inf for i, v in acc.items()}


def _tokens(x: Tensor) -> Tensor:
    """Rows of per-token vectors: (B, C, H, W) → (B·H·W, C); (B, T, D) → (B·T, D); else per sample."""
    if x.ndim == 4:
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    if x.ndim == 3:
        return x.reshape(-1, x.shape[-1])
    return x.reshape(x.shape[0], -1)


def block_influence(model: nn.Module, units: Sequence[UnitSpec], batches: Sequence[Any], task: Task
                    ) -> dict[int, float]:
    """ShortGPT's BI_i = 1 − E_tokens[cos(h_in, h_out)] per unit (inf for shape-changing units)."""
    return _io_batches(model, units, batches, task,
                       lambda a, b: 1 - F.cosine_similarity(_tokens(a).double(), _tokens(b).double(), -1).mean())


def _last_token(x: Tensor) -> Tensor:
    return x[:, -1, :] if x.ndim == 3 else x.reshape(x.shape[0], -1)


@torch.no_grad()
def angular_distances(model: nn.Module, units: Sequence[UnitSpec], batches: Sequence[Any], task: Task,
                      n_drop: int) -> dict[int, float]:
    """Gromov et al.: arccos(cos(h_ℓ, h_{ℓ+n}))/π on the last token for each start ℓ of n consecutive units."""
    names = [u.name for u in units]
    n = len(units)
    dists: dict[int, list[float]] = {}
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    with FeatureTaps(model, names, mode="input", detach=True) as ti, FeatureTaps(model, [names[-1]], detach=True) as to:
        for b in batches:
            task.forward(model, _to(b, dev))
            hs = [_last_token(ti[nm]).double() for nm in names] + [_last_token(to[names[-1]]).double()]
            for start in range(0, n - n_drop + 1):
                a, c = hs[start], hs[start + n_drop]
                if a.shape != c.shape:
                    continue
                cos = F.cosine_similarity(a, c, -1).clamp(-1, 1)
                dists.setdefault(start, []).append(float((torch.arccos(cos) / math.pi).mean()))
            ti.clear()
            to.clear()
    model.train(was)
    return {s: float(np.mean(v)) for s, v in dists.items()}


@torch.no_grad()
def calib_loss(model: nn.Module, batches: Sequence[Any], task: Task) -> float:
    """Mean loss over calibration batches in eval mode."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    vals = [float(task.loss(model, _to(b, dev))) for b in batches]
    model.train(was)
    return float(np.mean(vals))


def taylor_scores(model: nn.Module, units: Sequence[UnitSpec], batches: Sequence[Any], task: Task) -> dict[int, float]:
    """Shortened-LLaMA Taylor: |Σ_θ∈unit θ·∂ℓ/∂θ| per unit, summed over batches (eval mode, buffers kept)."""
    names = [u.name for u in units]
    params = dict(model.named_parameters())
    groups = {i: [p for k, p in params.items() if k.startswith(nm + ".")] for i, nm in enumerate(names)}
    flags = {k: p.requires_grad for k, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    totals = dict.fromkeys(groups, 0.0)
    try:
        for b in batches:
            model.zero_grad(set_to_none=True)
            task.loss(model, _to(b, dev)).backward()  # gradient-only analysis
            for i, ps in groups.items():
                totals[i] += abs(sum(float((p.detach() * p.grad).sum()) for p in ps if p.grad is not None))
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was)
        for k, p in params.items():
            p.requires_grad_(flags[k])
    return totals


def sleb_order(model: nn.Module, units: Sequence[UnitSpec], k: int, batches: Sequence[Any], task: Task,
               pinned: set[int]) -> tuple[list[int], dict[int, float], int]:
    """SLEB's greedy search: remove ``k`` units one at a time, each time the one whose removal leaves the lowest
    calibration loss; (removal order, loss after each removal, evaluations)."""
    cur, order, scores, evals = list(range(len(units))), [], {}, 0
    for _ in range(k):
        best, best_v = None, None
        for i in cur:
            if i in pinned:
                continue
            with removed(model, units, [j for j in cur if j != i]):
                v = calib_loss(model, batches, task)
            evals += 1
            if best_v is None or v < best_v:
                best, best_v = i, v
        if best is None:
            break
        cur.remove(best)
        order.append(best)
        scores[best] = float(best_v)  # type: ignore[arg-type]
    return order, scores, evals


def _sleb_order(model: nn.Module, units: Sequence[UnitSpec], k: int, batches: Sequence[Any], task: Task,
                pinned: set[int], prefix: Sequence[int]) -> tuple[list[int], dict[int, float], int]:
    """:func:`sleb_order`, or the first ``k`` of a ``prefix`` order already searched (no evaluation, no scores)."""
    if len(prefix) >= k:
        return list(prefix[:k]), {}, 0
    return sleb_order(model, units, k, batches, task, pinned)


def pick_lowest_loss(model: nn.Module, units: Sequence[UnitSpec], candidates: dict[str, list[int]],
                     batches: Sequence[Any], task: Task) -> tuple[str, dict[str, float]]:
    """The candidate (name → kept units) whose pruned model has the lowest calibration loss, and every loss
    (ties go to the first named)."""
    losses = {}
    for name, kept in candidates.items():
        with removed(model, units, kept):
            losses[name] = calib_loss(model, batches, task)
    return min(losses, key=lambda c: losses[c]), losses


def select_baseline(method: str, model: nn.Module, units: Sequence[UnitSpec], n_keep: int,
                    batches: Sequence[Any], task: Task, pinned: set[int] | None = None, seed: int = 0,
                    sleb_prefix: Sequence[int] = ()) -> Selection:
    """Keep ``n_keep`` units by a baseline criterion (pinned units always kept).

    ``sleb_prefix`` (``sleb``, ``sleb_pick``): a SLEB removal order already searched on the same model and first
    batch; a greedy order is a prefix of any longer one, so when it is long enough its prefix is the search.
    """
    pinned = set(pinned or ()) | {i for i, u in enumerate(units) if not u.removable}
    n = len(units)
    t0 = time.perf_counter()
    k = _n_remove(n, n_keep, pinned)
    free = _removable(n, pinned)
    scores: dict[int, float] = {}
    evals = 0
    details: dict[str, Any] = {}
    if method == "random":
        rng = np.random.default_rng(seed)
        drop = set(rng.choice(free, size=k, replace=False).tolist()) if k else set()
        kept = [i for i in range(n) if i not in drop]
        details["seed"] = seed
    elif method == "first_n":
        kept = [i for i in range(n) if i not in set(free[:k])]
    elif method == "last_n":
        kept = [i for i in range(n) if i not in set(free[len(free) - k:])]
    elif method == "every_other":
        drop = {free[int((j + 0.5) * len(free) / k)] for j in range(k)} if k else set()
        kept = [i for i in range(n) if i not in drop]
    elif method == "block_influence":
        scores = block_influence(model, units, batches, task)
        kept = _keep_lowest_removed(n, scores, n_keep, pinned)
        evals = 1
    elif method == "angular":
        d = angular_distances(model, units, batches, task, k)
        ok = {s: v for s, v in d.items() if all(j not in pinned for j in range(s, s + k))}
        if not ok:
            raise KdforgeError(f"angular: no run of {k} consecutive removable units (pinned units break them)")
        start = min(ok, key=lambda s: (ok[s], s))
        kept = [i for i in range(n) if not start <= i < start + k]
        scores = {s: v for s, v in ok.items()}
        details["block"] = [start, start + k - 1]
        evals = 1
    elif method == "taylor":
        scores = taylor_scores(model, units, batches, task)
        kept = _keep_lowest_removed(n, scores, n_keep, pinned)
        evals = len(batches)
    elif method == "oracle":
        base = calib_loss(model, batches, task)
        for i in free:
            with removed(model, units, [j for j in range(n) if j != i]):
                scores[i] = calib_loss(model, batches, task) - base
            evals += 1
        kept = _keep_lowest_removed(n, scores, n_keep, pinned)
    elif method == "sleb":
        order, scores, evals = _sleb_order(model, units, k, batches, task, pinned, sleb_prefix)
        details["order"] = order
        kept = [i for i in range(n) if i not in set(order)]
    elif method == "sleb_pick":
        if len(batches) < 2:
            raise KdforgeError(f"sleb_pick needs at least 2 calibration batches, got {len(batches)}: SLEB searches "
                               "on the first, the choice is scored on the others (a prune recipe: "
                               "calibration.score_batches >= 2)")
        order, scores, evals = _sleb_order(model, units, k, batches[:1], task, pinned, sleb_prefix)
        bi = block_influence(model, units, batches[1:], task)
        cands = {"sleb": [i for i in range(n) if i not in set(order)],
                 "block_influence": _keep_lowest_removed(n, bi, n_keep, pinned)}
        pick, losses = pick_lowest_loss(model, units, cands, batches[1:], task)
        evals += 1 + len(cands)
        kept = cands[pick]
        details.update({"order": order, "picked": pick, "pick_losses": losses,
                        "candidates": {name: [i for i in range(n) if i not in set(c)] for name, c in cands.items()}})
    else:
        from kdforge.errors import closest

        raise KdforgeError(f"unknown selection method {method!r}{closest(method, ('sglp', *BASELINES))} "
                           f"(valid: sglp, {', '.join(BASELINES)})")
    return Selection(method, sorted(kept), n, {i: v for i, v in scores.items() if math.isfinite(v)}, evals,
                     time.perf_counter() - t0, details)
