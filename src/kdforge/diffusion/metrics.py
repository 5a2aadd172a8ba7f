"""Sample quality in a held-out classifier's features: Fréchet distance, classifier-IS, class coverage."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.errors import KdforgeError


@torch.no_grad()
def classifier_outputs(net: nn.Module, x: Tensor, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features, class probabilities) of the metric network on images in [−1, 1]."""
    net.eval()
    feats, probs = [], []
    for s in range(0, len(x), batch_size):
        f = net.embed(x[s:s + batch_size])  # type: ignore[operator]
        feats.append(f.double().numpy())
        probs.append(F.softmax(net.fc(f), 1).double().numpy())  # type: ignore[operator]
    return np.concatenate(feats), np.concatenate(probs)


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """‖μ1−μ2‖² + tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) between Gaussian fits of two feature sets."""
    from scipy import linalg

    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        off = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def classifier_is(probs: np.ndarray) -> float:
    """exp(E_x KL(p(y|x) ‖ p(y))) of the metric classifier's predictions."""
    p_y = probs.mean(0, keepdims=True)
    kl = (probs * (np.log(probs + 1e-12) - np.log(p_y + 1e-12))).sum(1)
    return float(math.exp(kl.mean()))


def class_coverage(probs: np.ndarray) -> float:
    """Entropy (nats) of the histogram of predicted classes; ln(C) when every class is equally present."""
    counts = np.bincount(probs.argmax(1), minlength=probs.shape[1]).astype(np.float64)
    p = counts / counts.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def sample_scores(net: nn.Module, samples: Tensor, real_feats: np.ndarray) -> dict[str, float]:
    """FD (vs the real features), IS and coverage of generated images."""
    f, p = classifier_outputs(net, samples)
    return {"fd": frechet_distance(f, real_feats), "is": classifier_is(p), "coverage": class_coverage(p)}


def inception_fid(real: Tensor, fake: Tensor, weights: str | Path) -> float:
    """FID with torchmetrics' Inception (pool3) from local weights (extra ``kdforge[fid]``); images in [−1, 1]."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        raise KdforgeError("Inception FID needs the optional extra: pip install 'kdforge[fid]' "
                           "(torchmetrics, torch-fidelity)") from None
    if not Path(weights).is_file():
        raise KdforgeError(f"no Inception weights at {str(weights)!r} (give the local pt_inception-2015-12-05 file)")
    fid = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(weights))

    def rgb(x: Tensor) -> Tensor:
        x = (x.clamp(-1, 1) + 1) / 2
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    fid.update(rgb(real), real=True)
    fid.update(rgb(fake), real=False)
    return float(fid.compute())
