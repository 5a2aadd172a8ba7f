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
    return frechet_from_stats(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))


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


def frechet_from_stats(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """‖μ1−μ2‖² + tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) from Gaussian statistics (pytorch-fid's eps fallback)."""
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        off = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def inception_net(weights: str | Path) -> nn.Module:
    """pytorch-fid's FID InceptionV3 (pool3, 2048-d; inputs in [0, 1], resized to 299) from a local weights file.

    ``weights``: the ``pt_inception-2015-12-05-6726825d.pth`` file pytorch-fid downloads (the TF FID Inception
    ported to torch), supplied by the user; nothing is downloaded. Needs the ``kdforge[fid]`` extra.
    """
    try:
        from pytorch_fid import inception as pfi
    except ImportError:
        raise KdforgeError("FID needs the optional extra: pip install 'kdforge[fid]' (pytorch-fid)") from None
    p = Path(weights)
    if not p.is_file():
        raise KdforgeError(f"no Inception weights at {str(p)!r} (give the local pt_inception-2015-12-05-6726825d.pth "
                           "file of pytorch-fid; kdforge downloads nothing)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files
        raise KdforgeError(f"cannot read {str(p)!r} as a torch state dict ({type(e).__name__})") from None
    original = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *a, **k: state  # the user's file instead of the download
    try:
        net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    except RuntimeError as e:
        raise KdforgeError(f"{str(p)!r} is not the FID Inception state dict ({_first_line(e)})") from None
    finally:
        pfi.load_state_dict_from_url = original
    return net.eval()


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__


@torch.no_grad()
def image_features(net: nn.Module, images: np.ndarray, batch_size: int = 200,
                   device: str | torch.device = "cpu") -> np.ndarray:
    """Features ``[N, D]`` of uint8 images ``[N, H, W, C]`` (grey images repeated to RGB) through ``net``.

    ``net`` takes float images in [0, 1] ``[B, 3, H, W]`` and returns ``[B, D]`` or pytorch-fid's list of
    ``[B, D, 1, 1]`` maps.
    """
    net = net.to(device).eval()
    out = []
    for s in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size])).to(device).permute(0, 3, 1, 2)
        x = x.float() / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        f = net(x)
        f = f[0] if isinstance(f, (list, tuple)) else f
        out.append(f.reshape(len(x), -1).double().cpu().numpy())
    return np.concatenate(out)


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of features ``[N, D]``."""
    return feats.mean(0), np.cov(feats, rowvar=False)


def load_images(path: str | Path) -> np.ndarray:
    """uint8 images ``[N, H, W, C]`` from a ``kdforge sample`` .npz (``images``, or ``x`` in [−1, 1])."""
    p = Path(path)
    if not p.is_file():
        raise KdforgeError(f"no samples file at {str(p)!r} (give the .npz written by kdforge sample)")
    try:
        z = np.load(p)
        keys = set(z.files)
    except (OSError, ValueError) as e:
        raise KdforgeError(f"cannot read {str(p)!r} as .npz ({type(e).__name__})") from None
    if "images" in keys:
        a = z["images"]
    elif "x" in keys:
        a = np.round((np.clip(z["x"], -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
    else:
        raise KdforgeError(f"{str(p)!r} holds {sorted(keys)}: neither 'images' (uint8 NHWC) nor 'x' ([−1, 1] NCHW)")
    if a.ndim != 4 or a.dtype != np.uint8 or a.shape[-1] not in (1, 3):
        raise KdforgeError(f"{str(p)!r}: images must be uint8 [N, H, W, 1 or 3], got {a.dtype} {list(a.shape)}")
    return a


def reference_stats(reference: str, net: nn.Module, root: str | Path = "data", batch_size: int = 200,
                    device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray, int]:
    """(μ, Σ, N) of the reference: ``cifar10`` (its 50k training images from ``root``), a statistics .npz
    (``mu``, ``sigma``: pytorch-fid's ``fid_stats_cifar10_train.npz``) or an images .npz."""
    if reference == "cifar10":
        from torchvision.datasets import CIFAR10

        try:
            images = CIFAR10(str(root), train=True, download=False).data
        except (RuntimeError, OSError) as e:
            raise KdforgeError(f"CIFAR-10 not found in {str(root)!r} ({_first_line(e)}); give --root, or a "
                               "statistics .npz (mu, sigma) as the reference") from None
        return (*gaussian_stats(image_features(net, images, batch_size, device)), len(images))
    p = Path(reference)
    if not p.is_file():
        raise KdforgeError(f"reference {reference!r} is neither 'cifar10' nor a file (a .npz of mu/sigma or images)")
    with np.load(p) as z:
        if {"mu", "sigma"} <= set(z.files):
            return z["mu"].astype(np.float64), z["sigma"].astype(np.float64), -1
    images = load_images(p)
    return (*gaussian_stats(image_features(net, images, batch_size, device)), len(images))


def fid(samples: str | Path, inception: str | Path | nn.Module, reference: str = "cifar10", root: str | Path = "data",
        batch_size: int = 200, device: str | torch.device = "cpu") -> dict[str, float]:
    """``kdforge fid``: FID of a ``kdforge sample`` .npz against a reference, in a user-supplied Inception."""
    images = load_images(samples)
    net = inception if isinstance(inception, nn.Module) else inception_net(inception)
    mu_r, s_r, n_r = reference_stats(reference, net, root, batch_size, device)
    mu, s = gaussian_stats(image_features(net, images, batch_size, device))
    if mu.shape != mu_r.shape:
        raise KdforgeError(f"the reference statistics are {mu_r.shape[0]}-d but the features are {mu.shape[0]}-d: "
                           "were they made with another network?")
    return {"fid": frechet_from_stats(mu, s, mu_r, s_r), "samples": len(images), "reference_images": n_r}
