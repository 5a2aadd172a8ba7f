"""Candidates searched against the budget: depth pruning (SGLP, block influence, uniform, random), width pruning."""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from kdforge.compress.budget import measure
from kdforge.compress.recipe import DEPTH_FAMILIES, CompressRecipe
from kdforge.compress.source import Source
from kdforge.errors import KdforgeError


@dataclass
class Candidate:
    """A compressed model within budget: how it was made (``plan``, replayable on the base) and its size."""

    name: str
    family: str
    model: nn.Module
    plan: dict[str, Any]
    budget_value: float
    budget_fraction: float
    search_seconds: float
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Skipped:
    """A family that produced no candidate, and why (one line)."""

    family: str
    reason: str
    smallest_fraction: float | None = None


def module_types(model: nn.Module) -> str:
    """The leaf module types of a model, most frequent first (for 'cannot handle' messages)."""
    counts = Counter(type(m).__name__ for m in model.modules() if not list(m.children()))
    return ", ".join(f"{k} x{v}" for k, v in counts.most_common(8))


def _largest_within(lo: int, hi: int, fits: Callable[[int], bool]) -> int | None:
    """The largest n in [lo, hi] with ``fits(n)`` (monotone: fits for small n), or None."""
    if not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


class DepthSearch:
    """Depth candidates: remove whole residual blocks chosen by a criterion until the budget holds."""

    def __init__(self, src: Source, r: CompressRecipe) -> None:
        from kdforge.prune.importance import classification_task
        from kdforge.prune.sglp import CalibrationConfig, cnn_calibration
        from kdforge.prune.surgery import find_units, pinned_indices

        self.src, self.r = src, r
        self.units = find_units(src.model)  # KdforgeError when the model has no residual blocks
        self.pinned = pinned_indices(self.units)
        c = r.candidates
        cal = CalibrationConfig(n_samples=c.calib_samples, batch_size=c.calib_batch, score_batches=c.score_batches,
                                score_batch_size=c.score_batch_size, seed=c.seed)
        self.cka_batches, self.score_batches = cnn_calibration(src.data, cal)
        self.task = classification_task()
        self._analysis: Any = None

    def analysis(self) -> Any:
        """CKA and Fisher segmentation (SGLP), computed once."""
        if self._analysis is None:
            from kdforge.prune.sglp import AnalysisConfig, analyze

            self._analysis = analyze(self.src.model, self.units, self.cka_batches, self.task,
                                     AnalysisConfig(k_max=6))
        return self._analysis

    def select(self, family: str, n_keep: int) -> list[int]:
        """Indices of the units kept by ``family`` at ``n_keep`` units."""
        from kdforge.prune.importance import select_baseline, sglp_select

        model = self.src.model
        if family == "sglp":
            from kdforge.prune.importance import allocate_keep

            a = self.analysis()
            pins = [sum(1 for u in seg if u in self.pinned) for seg in a.segmentation.segments]
            per_seg = allocate_keep(a.segmentation.sizes(), n_keep / len(self.units), pins)
            sel = sglp_select(model, self.units, a.segmentation.segments, per_seg, self.score_batches, self.task,
                              self.pinned, "hybrid", "max", "global", self.r.candidates.max_candidates,
                              self.r.candidates.seed)
        else:
            sel = select_baseline(DEPTH_FAMILIES[family], model, self.units, n_keep, self.score_batches, self.task,
                                  self.pinned, self.r.candidates.seed)
        model.eval()
        return sel.kept

    def build(self, kept: list[int]) -> nn.Module:
        from kdforge.prune.surgery import prune_model

        return prune_model(self.src.model, self.units, kept).eval()

    def search(self, family: str, target: float, original: float) -> Candidate | Skipped:
        """The candidate of ``family`` keeping the most units whose budget measure is at most ``target``."""
        b = self.r.budget
        t0 = time.perf_counter()
        cache: dict[int, tuple[list[int], float]] = {}

        def probe(n: int) -> tuple[list[int], float]:
            if n not in cache:
                kept = self.select(family, n)
                cache[n] = kept, measure(self.build(kept), b.metric, self.src.input_shape, len(kept),
                                         b.latency_batch, self.src.model)
            return cache[n]

        n_min, n_max = len(self.pinned), len(self.units) - 1
        if n_max < n_min:
            return Skipped(family, "every prunable unit is pinned (shape-changing)")
        best = _largest_within(n_min, n_max, lambda n: probe(n)[1] <= target)
        if best is None:
            kept, value = probe(n_min)
            # SGLP keeps at least one unit per segment, so its smallest selection may hold more than the pinned ones
            why = "at least one per SGLP segment, " if family == "sglp" and len(kept) > n_min else ""
            return Skipped(family, f"its smallest selection keeps {len(kept)} of {len(self.units)} units ({why}"
                                   f"{n_min} pinned) and gives {value / original:.2f} of the original's {b.metric}",
                           value / original)
        kept, value = probe(best)
        from kdforge.prune.surgery import pruned_record

        plan = {"depth": pruned_record(self.units, kept, {})}
        plan["depth"].pop("base")
        return Candidate(f"{family}-{len(kept)}of{len(self.units)}", family, self.build(kept), plan, value,
                         value / original, time.perf_counter() - t0,
                         {"kept": len(kept), "units": len(self.units),
                          "removed": [self.units[i].name for i in range(len(self.units)) if i not in set(kept)]})


def _classifier(model: nn.Module, num_classes: int) -> list[nn.Module]:
    """The output layer(s): Linear/Conv layers whose outputs are the classes (never width-pruned)."""
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    return heads[-1:]


def width_prune(model: nn.Module, ratio: float, shape: tuple[int, ...], num_classes: int,
                importance: str = "l2") -> tuple[nn.Module, list[Any]]:
    """A copy of ``model`` with ``ratio`` of the channels of every coupled group removed (Torch-Pruning)."""
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    imp = tp.importance.MagnitudeImportance(p=1 if importance == "l1" else 2)
    pruner = tp.pruner.MetaPruner(m, torch.zeros(1, *shape), importance=imp, pruning_ratio=ratio,
                                  ignored_layers=_classifier(m, num_classes))
    pruner.step()
    return m.eval(), [list(h) for h in pruner.pruning_history()]


def replay_width(model: nn.Module, history: list[Any], shape: tuple[int, ...]) -> nn.Module:
    """Apply a recorded Torch-Pruning history to an unpruned model of the same architecture (in place)."""
    import torch_pruning as tp

    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, *shape))
    dg.load_pruning_history([tuple(h) for h in history])
    return model


class WidthSearch:
    """Width candidates: the same fraction of channels removed in every coupled group, found by bisection."""

    def __init__(self, src: Source, r: CompressRecipe) -> None:
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            raise KdforgeError("width pruning needs Torch-Pruning: pip install 'kdforge[compress]' "
                               "(or drop 'width' from candidates.families)") from None
        self.src, self.r = src, r

    def build(self, ratio: float) -> tuple[nn.Module, list[Any]]:
        return width_prune(self.src.model, ratio, self.src.input_shape, self.src.data.num_classes,
                           self.r.candidates.width_importance)

    def search(self, target: float, original: float, steps: int = 6, max_ratio: float = 0.9) -> Candidate | Skipped:
        b = self.r.budget
        if b.metric == "layers":
            return Skipped("width", "width pruning keeps every layer; a layers budget needs a depth family")
        t0 = time.perf_counter()
        try:
            smallest, hist = self.build(max_ratio)
        except Exception as e:
            return Skipped("width", f"Torch-Pruning cannot trace {type(self.src.model).__name__}: "
                                    f"{str(e).splitlines()[0][:120]}")
        v_min = measure(smallest, b.metric, self.src.input_shape, None, b.latency_batch, self.src.model)
        if v_min > target:
            return Skipped("width", f"even removing {max_ratio:.0%} of the channels gives {v_min / original:.2f} of "
                                    f"the original's {b.metric}", v_min / original)
        lo, hi, best = 0.0, max_ratio, (max_ratio, smallest, hist, v_min)
        for _ in range(steps):
            mid = (lo + hi) / 2
            m, h = self.build(mid)
            v = measure(m, b.metric, self.src.input_shape, None, b.latency_batch, self.src.model)
            if v <= target:
                hi, best = mid, (mid, m, h, v)
            else:
                lo = mid
        ratio, m, h, v = best
        return Candidate(f"width-{round(100 * ratio)}pct", "width", m, {"width": {"history": h, "ratio": ratio}},
                         v, v / original, time.perf_counter() - t0, {"ratio": ratio})


def search_candidates(src: Source, r: CompressRecipe, log: Callable[[str], None] = print
                      ) -> tuple[float, list[Candidate], list[Skipped]]:
    """Every requested family searched against the budget: (original's measure, candidates, skipped families)."""
    b = r.budget
    depth: DepthSearch | None = None
    depth_error = ""
    if any(f in DEPTH_FAMILIES for f in r.candidates.families):
        try:
            depth = DepthSearch(src, r)
        except KdforgeError as e:
            depth_error = f"{e} (module types found: {module_types(src.model)})"
    n_units = len(depth.units) if depth is not None else None
    if b.metric == "layers" and depth is None:
        raise KdforgeError(f"budget.metric layers needs residual blocks to remove, and {type(src.model).__name__} "
                           f"has none the surgery can handle (module types found: {module_types(src.model)})")
    # latency: every candidate is measured as a ratio to the original, interleaved with it
    original = 1.0 if b.metric == "latency" else measure(src.model, b.metric, src.input_shape, n_units,
                                                         b.latency_batch)
    target = b.fraction * original
    cands: list[Candidate] = []
    skipped: list[Skipped] = []
    for fam in r.candidates.families:
        if fam in DEPTH_FAMILIES:
            res: Candidate | Skipped = (depth.search(fam, target, original) if depth is not None
                                        else Skipped(fam, depth_error))
        else:
            res = WidthSearch(src, r).search(target, original)
        (cands if isinstance(res, Candidate) else skipped).append(res)  # type: ignore[arg-type]
        log(f"compress: {fam}: " + (f"{res.name}, {b.metric} {res.budget_fraction:.2f}x the original"
                                    if isinstance(res, Candidate) else f"no candidate ({res.reason})"))
    if not cands:
        reach = [s for s in skipped if s.smallest_fraction is not None]
        if reach:
            s = min(reach, key=lambda s: s.smallest_fraction)  # type: ignore[arg-type, return-value]
            raise KdforgeError(f"budget {b.metric} <= {b.fraction:g}x the original is unreachable: the smallest "
                               f"reachable is {s.smallest_fraction:.2f}x ({s.family})")
        raise KdforgeError(f"no candidate family can compress {type(src.model).__name__}: "
                           + "; ".join(f"{s.family}: {s.reason}" for s in skipped))
    return original, cands, skipped


def skipped_json(skipped: list[Skipped]) -> list[dict[str, Any]]:
    return [asdict(s) for s in skipped]
