"""Cross-modal ReID metrics (CMC rank-k, mAP, mINP) and the SYSU-MM01 / RegDB / LLCM test protocols.

CMC of SYSU-MM01, LLCM and the synthetic set is the "unique identity" variant of their official evaluation
code (the ranked gallery identities de-duplicated, first occurrence kept, before the first match is found);
RegDB's is the standard one of the official ``eval_regdb`` (the first match in the raw ranking). AP and INP
use the raw ranking. Queries without any positive left in the gallery are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RANKS = (1, 5, 10, 20)
#: gallery-removal rules: ``sysu`` drops every cam-2 gallery image for cam-3 queries; ``same_cam`` drops
#: gallery images of the query's identity taken by the query's camera (LLCM)
RULES = ("none", "sysu", "same_cam")


def eval_ranking(sim: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_cams: np.ndarray, g_cams: np.ndarray,
                 rule: str = "none", max_rank: int = 20, unique_ids: bool = True) -> dict[str, float]:
    """rank-1/5/10/20, mAP and mINP (%) of a query × gallery similarity matrix (higher = more similar).

    ``unique_ids``: CMC on the de-duplicated ranking (SYSU/LLCM code); False: the raw ranking (RegDB's).
    """
    if rule not in RULES:
        raise ValueError(f"unknown removal rule {rule!r} (valid: {', '.join(RULES)})")
    order = np.argsort(-sim, axis=1, kind="stable")
    cmc_sum = np.zeros(max_rank)
    aps, inps = [], []
    for q in range(len(q_pids)):
        o = order[q]
        gp, gc = g_pids[o], g_cams[o]
        if rule == "sysu":
            keep = ~((q_cams[q] == 3) & (gc == 2))
        elif rule == "same_cam":
            keep = ~((gp == q_pids[q]) & (gc == q_cams[q]))
        else:
            keep = np.ones(len(o), dtype=bool)
        gp = gp[keep]
        raw = gp == q_pids[q]
        if not raw.any():
            continue  # no positive for this query: skipped, as in the official code
        if unique_ids:
            _, first = np.unique(gp, return_index=True)
            matches = gp[np.sort(first)] == q_pids[q]
        else:
            matches = raw
        cmc = np.minimum(matches.cumsum(), 1)[:max_rank]
        cmc_sum[: len(cmc)] += cmc
        cmc_sum[len(cmc):] += cmc[-1] if len(cmc) else 0
        hits = np.flatnonzero(raw)
        aps.append(float(np.mean(np.arange(1, len(hits) + 1) / (hits + 1))))
        inps.append(len(hits) / (hits[-1] + 1))
    n = len(aps)
    if n == 0:
        return {**{f"rank{k}": float("nan") for k in RANKS if k <= max_rank}, "mAP": float("nan"),
                "mINP": float("nan"), "queries": 0.0}
    cmc = cmc_sum / n
    out = {f"rank{k}": 100 * float(cmc[k - 1]) for k in RANKS if k <= max_rank}
    out.update(mAP=100 * float(np.mean(aps)), mINP=100 * float(np.mean(inps)), queries=float(n))
    return out


def sample_gallery(pids: np.ndarray, cams: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Indices of ``shots`` random images (all if fewer) per (identity, camera), drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    out = []
    for pid, cam in sorted(set(zip(pids.tolist(), cams.tolist(), strict=True))):
        idx = np.flatnonzero((pids == pid) & (cams == cam))
        out.extend(rng.choice(idx, size=min(shots, len(idx)), replace=False).tolist())
    return np.array(sorted(out), dtype=np.int64)


@dataclass(frozen=True)
class Setting:
    """One evaluation setting: query and gallery modalities and cameras, gallery sampling, removal rule, trials."""

    key: str                       # metric prefix ('' for the headline setting)
    query_modal: int
    gallery_modal: int
    gallery_cams: tuple[int, ...] | None = None  # None: every camera of the gallery modality
    shots: int | None = None       # None: the whole gallery; else images per (identity, camera) per trial
    trials: int = 10
    rule: str = "none"
    unique_ids: bool = True        # CMC on de-duplicated identities (False: RegDB's raw ranking)


def protocol_settings(protocol: str, trials: int = 10) -> list[Setting]:
    """The settings a protocol reports; the first one's metrics carry no prefix."""
    vis, ir = 0, 1
    if protocol in ("sysu", "synthetic"):
        out = [Setting("", ir, vis, (1, 2, 4, 5), 1, trials, "sysu"),
               Setting("indoor_", ir, vis, (1, 2), 1, trials, "sysu")]
        if protocol == "sysu":
            out += [Setting("multi_", ir, vis, (1, 2, 4, 5), 10, trials, "sysu"),
                    Setting("indoor_multi_", ir, vis, (1, 2), 10, trials, "sysu")]
        return out
    if protocol == "llcm":
        return [Setting("", ir, vis, None, 1, trials, "same_cam"),
                Setting("v2i_", vis, ir, None, 1, trials, "same_cam")]
    if protocol == "regdb":
        return [Setting("", vis, ir, None, None, 1, "none", unique_ids=False),
                Setting("i2v_", ir, vis, None, None, 1, "none", unique_ids=False)]
    raise ValueError(f"unknown ReID protocol {protocol!r} (valid: sysu, synthetic, llcm, regdb)")


def evaluate_setting(feats: np.ndarray, pids: np.ndarray, cams: np.ndarray, modal: np.ndarray, s: Setting
                     ) -> dict[str, float]:
    """Metrics of one setting averaged over its gallery trials (trial t samples the gallery with seed t)."""
    q = np.flatnonzero(modal == s.query_modal)
    g_all = np.flatnonzero((modal == s.gallery_modal) & (np.isin(cams, s.gallery_cams) if s.gallery_cams
                                                         else True))
    runs = []
    for t in range(s.trials if s.shots is not None else 1):
        g = g_all if s.shots is None else g_all[sample_gallery(pids[g_all], cams[g_all], s.shots, t)]
        sim = feats[q] @ feats[g].T
        runs.append(eval_ranking(sim, pids[q], pids[g], cams[q], cams[g], s.rule, unique_ids=s.unique_ids))
    return {f"{s.key}{k}": float(np.mean([r[k] for r in runs])) for k in runs[0] if k != "queries"}


def evaluate_protocol(feats: np.ndarray, pids: np.ndarray, cams: np.ndarray, modal: np.ndarray, protocol: str,
                      trials: int = 10, settings: Sequence[Setting] | None = None) -> dict[str, float]:
    """Every setting of ``protocol`` on one embedded test set (rows of ``feats`` align with the metadata)."""
    out: dict[str, float] = {}
    for s in settings or protocol_settings(protocol, trials):
        out.update(evaluate_setting(feats, pids, cams, modal, s))
    return out


def chance_level(pids: np.ndarray, cams: np.ndarray, modal: np.ndarray, protocol: str, draws: int = 20,
                 seed: int = 0) -> dict[str, float]:
    """The headline metrics of random embeddings on this test set (mean over ``draws``): the chance level."""
    rng = np.random.default_rng(seed)
    s = protocol_settings(protocol)[0]
    runs = [evaluate_setting(rng.standard_normal((len(pids), 8)), pids, cams, modal, s) for _ in range(draws)]
    return {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
