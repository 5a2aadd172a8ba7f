"""Centred kernel alignment (CKA): linear/RBF kernels, biased/unbiased HSIC, all-pairs matrices, streaming."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kdforge.errors import KdforgeError
from kdforge.taps import FeatureTaps

Kernel = Literal["linear", "rbf"]
Estimator = Literal["biased", "unbiased"]
Aggregate = Literal["mean_cka", "mean_hsic"]


def _as_matrix(x: Tensor) -> Tensor:
    """Flatten a batch of features to (n, d) float64 rows (one row per sample)."""
    return x.detach().reshape(x.shape[0], -1).to(torch.float64)


def gram(x: Tensor, kernel: Kernel = "linear", sigma_frac: float = 0.5) -> Tensor:
    """The n×n kernel matrix of the rows of ``x`` in float64 (RBF bandwidth = sigma_frac · median distance)."""
    x = _as_matrix(x)
    k = x @ x.T
    if kernel == "linear":
        return k
    if kernel != "rbf":
        raise KdforgeError(f"unknown CKA kernel {kernel!r} (valid: linear, rbf)")
    sq = k.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2 * k).clamp_min(0)
    n = d2.shape[0]
    off = d2[~torch.eye(n, dtype=torch.bool, device=d2.device)].sqrt().sort().values
    m = off.numel()
    med = (off[(m - 1) // 2] + off[m // 2]) / 2 if m else d2.new_tensor(0.0)
    sigma = sigma_frac * med
    if float(sigma) <= 0:
        sigma = d2.new_tensor(1.0)
    return torch.exp(-d2 / (2 * sigma**2))


def center_gram(k: Tensor) -> Tensor:
    """H K H with H = I − 11ᵀ/n (the biased estimator's centring)."""
    k = k - k.mean(0, keepdim=True)
    return k - k.mean(1, keepdim=True)


def u_center_gram(k: Tensor) -> Tensor:
    """U-centring: ⟨U(K), U(L)⟩ / (n(n−3)) equals the unbiased HSIC of Song et al. (2012)."""
    n = k.shape[0]
    if n < 4:
        raise KdforgeError(f"the unbiased HSIC needs at least 4 samples per batch, got {n}")
    k = k.clone()
    k.fill_diagonal_(0)
    rows = k.sum(1, keepdim=True) / (n - 2)
    cols = k.sum(0, keepdim=True) / (n - 2)
    total = k.sum() / ((n - 1) * (n - 2))
    u = k - rows - cols + total
    u.fill_diagonal_(0)
    return u


def hsic_biased(k: Tensor, l: Tensor) -> Tensor:  # noqa: E741
    """tr(K H L H) / (n − 1)², the biased HSIC of Gretton et al."""
    n = k.shape[0]
    return (center_gram(k.double()) * center_gram(l.double())).sum() / (n - 1) ** 2


def hsic_unbiased(k: Tensor, l: Tensor) -> Tensor:  # noqa: E741
    """The unbiased HSIC (Song et al. 2012), written out term by term (needs n ≥ 4)."""
    n = k.shape[0]
    if n < 4:
        raise KdforgeError(f"the unbiased HSIC needs at least 4 samples, got {n}")
    kt, lt = k.double().clone(), l.double().clone()
    kt.fill_diagonal_(0)
    lt.fill_diagonal_(0)
    one = torch.ones(n, 1, dtype=torch.float64, device=k.device)
    term1 = torch.trace(kt @ lt)
    term2 = (one.T @ kt @ one) * (one.T @ lt @ one) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (one.T @ kt @ lt @ one)
    return ((term1 + term2 - term3) / (n * (n - 3))).squeeze()


def hsic(k: Tensor, l: Tensor, estimator: Estimator = "biased") -> Tensor:  # noqa: E741
    """HSIC of two kernel matrices with the chosen estimator."""
    if estimator == "biased":
        return hsic_biased(k, l)
    if estimator == "unbiased":
        return hsic_unbiased(k, l)
    raise KdforgeError(f"unknown HSIC estimator {estimator!r} (valid: biased, unbiased)")


def cka(x: Tensor, y: Tensor, kernel: Kernel = "linear", estimator: Estimator = "biased",
        sigma_frac: float = 0.5) -> float:
    """CKA(X, Y) = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L)) on the Gram matrices, in float64."""
    if x.shape[0] != y.shape[0]:
        raise KdforgeError(f"CKA needs the same samples on both sides, got {x.shape[0]} and {y.shape[0]} rows")
    k, l = gram(x, kernel, sigma_frac), gram(y, kernel, sigma_frac)  # noqa: E741
    den = torch.sqrt(hsic(k, k, estimator) * hsic(l, l, estimator))
    return float(hsic(k, l, estimator) / den) if float(den) > 0 else 0.0


def cka_feature_form(x: Tensor, y: Tensor) -> float:
    """Linear biased CKA in feature space: ‖YcᵀXc‖² / (‖XcᵀXc‖ · ‖YcᵀYc‖) (cheap when d < n)."""
    xc, yc = _as_matrix(x), _as_matrix(y)
    xc, yc = xc - xc.mean(0), yc - yc.mean(0)
    num = torch.linalg.matrix_norm(yc.T @ xc) ** 2
    den = torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc)
    return float(num / den) if float(den) > 0 else 0.0


def centred_grams(features: Sequence[Tensor], kernel: Kernel = "linear", estimator: Estimator = "biased",
                  sigma_frac: float = 0.5) -> Tensor:
    """(N, n²) float64: each unit's centred (biased) or U-centred (unbiased) Gram matrix, flattened."""
    rows = []
    for f in features:
        k = gram(f, kernel, sigma_frac)
        rows.append((center_gram(k) if estimator == "biased" else u_center_gram(k)).reshape(-1))
    return torch.stack(rows)


def hsic_matrix(features: Sequence[Tensor], kernel: Kernel = "linear", estimator: Estimator = "biased",
                sigma_frac: float = 0.5) -> Tensor:
    """All-pairs HSIC (up to the constant that cancels in CKA) from each unit's centred Gram computed once."""
    g = centred_grams(features, kernel, estimator, sigma_frac)
    return g @ g.T


def _normalise(m: Tensor) -> Tensor:
    d = m.diagonal().clamp_min(0).sqrt()
    den = d[:, None] * d[None, :]
    out = torch.where(den > 0, m / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(m))
    out.fill_diagonal_(1.0)
    return out


def cka_matrix(features: Sequence[Tensor], kernel: Kernel = "linear", estimator: Estimator = "biased",
               sigma_frac: float = 0.5) -> Tensor:
    """The N×N CKA matrix of N units' features on one batch (diagonal set to 1)."""
    return _normalise(hsic_matrix(features, kernel, estimator, sigma_frac))


class CKAStream:
    """Accumulate the all-pairs CKA over calibration batches.

    ``aggregate="mean_cka"`` averages per-batch CKA matrices (the official code's rule);
    ``"mean_hsic"`` averages HSIC terms before normalising, which with ``estimator="unbiased"`` is the
    minibatch-unbiased CKA of Nguyen et al. (2021).
    """

    def __init__(self, kernel: Kernel = "linear", estimator: Estimator = "biased",
                 aggregate: Aggregate = "mean_cka", sigma_frac: float = 0.5) -> None:
        if aggregate not in ("mean_cka", "mean_hsic"):
            raise KdforgeError(f"unknown CKA aggregate {aggregate!r} (valid: mean_cka, mean_hsic)")
        self.kernel, self.estimator, self.aggregate, self.sigma_frac = kernel, estimator, aggregate, sigma_frac
        self.total: Tensor | None = None
        self.batches = 0

    def update(self, features: Sequence[Tensor]) -> None:
        """Add one batch: a list of per-unit features with the same samples in the same order."""
        m = hsic_matrix(features, self.kernel, self.estimator, self.sigma_frac)
        n = features[0].shape[0]
        m = _normalise(m) if self.aggregate == "mean_cka" else m / (n * (n - 3) if self.estimator == "unbiased"
                                                                     else (n - 1) ** 2)
        self.total = m if self.total is None else self.total + m
        self.batches += 1

    def matrix(self) -> Tensor:
        """The averaged N×N matrix (diagonal 1), float64 on the CPU."""
        if self.total is None:
            raise KdforgeError("no calibration batch was seen: the CKA needs at least one batch")
        m = self.total / self.batches
        out = m.clone() if self.aggregate == "mean_cka" else _normalise(m)
        out.fill_diagonal_(1.0)
        return out.cpu()


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Call the model on a batch: ``(x, y)`` pairs use x, a tensor is passed as is."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return model(x)


@torch.no_grad()
def collect_cka(model: nn.Module, units: Sequence[str], batches: Iterable[Any],
                forward: Callable[[nn.Module, Any], Any] = default_forward, kernel: Kernel = "linear",
                estimator: Estimator = "biased", aggregate: Aggregate = "mean_cka", sigma_frac: float = 0.5,
                device: torch.device | str | None = None, transform: Callable[[Tensor], Tensor] | None = None
                ) -> Tensor:
    """Stream calibration batches through ``model`` (eval, no grad), tap ``units`` and return the CKA matrix.

    ``transform`` maps each tapped tensor to the (samples, features) rows the CKA compares (default: one
    flattened row per sample)."""
    was = model.training
    model.eval()
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    stream = CKAStream(kernel, estimator, aggregate, sigma_frac)
    with FeatureTaps(model, units, detach=True) as taps:
        for batch in batches:
            forward(model, _to(batch, dev))
            stream.update([taps[u] if transform is None else transform(taps[u]) for u in units])
            taps.clear()
    model.train(was)
    return stream.matrix()


def token_rows(x: Tensor, max_rows: int = 512, skip_first: int = 1) -> Tensor:
    """(B, T, H) hidden states → (≤ max_rows, H) token rows: every token a CKA sample, the first ``skip_first``
    positions of each sequence dropped (the attention-sink token carries the residual stream's massive
    activations), evenly strided down to ``max_rows``."""
    rows = x[:, skip_first:, :].reshape(-1, x.shape[-1])
    if len(rows) > max_rows:
        rows = rows[torch.linspace(0, len(rows) - 1, max_rows).long()]
    return rows


def _to(batch: Any, dev: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: _to(v, dev) for k, v in batch.items()}
    if isinstance(batch, Tensor):
        return batch.to(dev)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, dev) for b in batch)
    return batch
