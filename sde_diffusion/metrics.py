r"""Sample-quality metrics: sliced Wasserstein, MMD, Fréchet distance (and FID from features).

All functions take samples ``[N, ...]`` (flattened to ``[N, D]``) as torch tensors or numpy arrays
and compute in float64.

* :func:`sliced_wasserstein` — SW_p(x, y) = (E_θ W_p^p(θᵀx, θᵀy))^{1/p}, θ uniform on the sphere,
  with the exact 1-D W_p between empirical measures (any sizes N, M).
* :func:`mmd` — the unbiased estimate of MMD² with a sum of kernels over several bandwidths.
* :func:`frechet_distance` — d² = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2},
  via symmetric eigendecompositions (stable for singular covariances).
* :func:`fid_from_features` — Fréchet distance between Gaussian fits of two feature sets.

Image metrics that need a feature network live in :mod:`sde_diffusion.evaluation` and are
re-exported here lazily: ``FID`` (Inception features, torchmetrics), ``digits_fd`` and
``classify`` (the 8×8 digits classifier).

Usage::

    sliced_wasserstein(samples, reference, generator=torch.Generator().manual_seed(0))
    mmd(samples, reference)                  # unbiased MMD², ≈ 0 for equal distributions
    fid_from_features(feats_a, feats_b)
"""
from __future__ import annotations

import importlib
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

ArrayLike = Union[Tensor, np.ndarray]


def _as_2d(x: ArrayLike, name: str) -> Tensor:
    t = torch.as_tensor(x)
    if t.dim() < 1 or t.shape[0] < 1:
        raise ValueError(f"{name} must have shape [N, ...] with N ≥ 1, got {tuple(t.shape)}")
    return t.reshape(t.shape[0], -1).to(torch.float64)


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same number of features, got {x.shape[1]} and {y.shape[1]}")


# ---------------------------------------------------------------------- sliced Wasserstein
def wasserstein_1d(a: Tensor, b: Tensor, p: float = 2.0) -> Tensor:
    """Exact W_p^p between the empirical measures of the columns: a ``[N, P]``, b ``[M, P]`` → ``[P]``.

    W_p^p = ∫_0^1 |F_a^{-1}(u) − F_b^{-1}(u)|^p du with the quantile functions piecewise constant
    on the breakpoints {i/N} ∪ {j/M}.
    """
    N, M = a.shape[0], b.shape[0]
    a_sorted, _ = torch.sort(a, dim=0)
    b_sorted, _ = torch.sort(b, dim=0)
    if N == M:
        return (a_sorted - b_sorted).abs().pow(p).mean(0)
    dev = a.device
    f64 = torch.float64
    # Correctly rounded division maps equal fractions i/N = j/M to the same double.
    levels = torch.cat([torch.arange(1, N + 1, device=dev, dtype=f64) / N, torch.arange(1, M + 1, device=dev, dtype=f64) / M])
    levels = torch.unique(levels)  # sorted
    widths = torch.diff(levels, prepend=levels.new_zeros(1))
    mid = levels - widths / 2
    ia = torch.clamp((mid * N).floor().long(), max=N - 1)
    ib = torch.clamp((mid * M).floor().long(), max=M - 1)
    diff = (a_sorted[ia] - b_sorted[ib]).abs().pow(p)  # [L, P]
    return (widths[:, None] * diff).sum(0)


def sliced_wasserstein(
    x: ArrayLike,
    y: ArrayLike,
    n_projections: int = 256,
    p: float = 2.0,
    generator: Optional[torch.Generator] = None,
) -> float:
    """Sliced p-Wasserstein distance SW_p = (mean_θ W_p^p(θᵀx, θᵀy))^{1/p}.

    Args:
        x: ``[N, ...]`` samples; y: ``[M, ...]`` samples (same number of features).
        n_projections: directions θ drawn uniformly on the unit sphere (from ``generator``, CPU).
        p: order ≥ 1.
    """
    if p < 1:
        raise ValueError(f"p must be at least 1, got p={p}")
    if n_projections < 1:
        raise ValueError(f"n_projections must be at least 1, got {n_projections}")
    xa, ya = _as_2d(x, "x"), _as_2d(y, "y")
    _check_pair(xa, ya)
    theta = torch.randn(xa.shape[1], n_projections, generator=generator, dtype=torch.float64)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(xa.device)
    wpp = wasserstein_1d(xa @ theta, ya.to(xa.device) @ theta, p)
    return float(wpp.mean() ** (1.0 / p))


# ---------------------------------------------------------------------- MMD
KERNELS = ("rbf", "imq")


def median_bandwidth(x: ArrayLike, y: ArrayLike) -> float:
    """Median pairwise Euclidean distance of the pooled sample (the median heuristic)."""
    z = torch.cat([_as_2d(x, "x"), _as_2d(y, "y")])
    d = torch.cdist(z, z)
    iu = torch.triu_indices(z.shape[0], z.shape[0], offset=1)
    return float(d[iu[0], iu[1]].median())


def mmd(
    x: ArrayLike,
    y: ArrayLike,
    kernel: str = "rbf",
    bandwidths: Optional[Sequence[float]] = None,
) -> float:
    r"""Unbiased estimate of the squared maximum mean discrepancy.

    .. math:: \widehat{\mathrm{MMD}}^2 = \frac{1}{N(N-1)}\sum_{i\ne j}k(x_i,x_j)
              + \frac{1}{M(M-1)}\sum_{i\ne j}k(y_i,y_j) - \frac{2}{NM}\sum_{i,j}k(x_i,y_j),

    with k = Σ_h k_h a sum over bandwidths h: ``"rbf"`` k_h = exp(−‖a−b‖²/(2h²)), ``"imq"``
    k_h = (1 + ‖a−b‖²/h²)^{−1/2}. Default bandwidths: the median pairwise distance times
    (0.25, 0.5, 1, 2, 4). The estimate is unbiased, so it can be slightly negative when x and y
    come from one distribution.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of: {', '.join(KERNELS)}")
    xa, ya = _as_2d(x, "x"), _as_2d(y, "y")
    _check_pair(xa, ya)
    ya = ya.to(xa.device)
    N, M = xa.shape[0], ya.shape[0]
    if N < 2 or M < 2:
        raise ValueError(f"mmd needs at least 2 samples on each side, got N={N}, M={M}")
    if bandwidths is None:
        med = median_bandwidth(xa, ya)
        bandwidths = [med * f for f in (0.25, 0.5, 1.0, 2.0, 4.0)]
    hs = [float(h) for h in bandwidths]
    if not hs or any(not h > 0 for h in hs):
        raise ValueError(f"bandwidths must be a non-empty list of positive numbers, got {list(bandwidths)}")

    def k(a: Tensor, b: Tensor) -> Tensor:
        d2 = torch.cdist(a, b).pow(2)
        if kernel == "rbf":
            return sum(torch.exp(-d2 / (2 * h * h)) for h in hs)
        return sum(torch.rsqrt(1 + d2 / (h * h)) for h in hs)

    kxx, kyy, kxy = k(xa, xa), k(ya, ya), k(xa, ya)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (N * (N - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (M * (M - 1))
    return float(sxx + syy - 2 * kxy.mean())


# ---------------------------------------------------------------------- Fréchet distance
def gaussian_stats(features: ArrayLike) -> Tuple[Tensor, Tensor]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of ``[N, D]`` features."""
    f = _as_2d(features, "features")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (f.shape[0] - 1)


def _psd_sqrt(a: Tensor) -> Tensor:
    w, v = torch.linalg.eigh(0.5 * (a + a.T))
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1: ArrayLike, cov1: ArrayLike, mu2: ArrayLike, cov2: ArrayLike) -> float:
    r"""Squared Fréchet (2-Wasserstein) distance between N(μ₁, Σ₁) and N(μ₂, Σ₂).

    .. math:: d^2 = \|\mu_1-\mu_2\|^2 + \operatorname{tr}\Sigma_1 + \operatorname{tr}\Sigma_2
              - 2\operatorname{tr}\big(\Sigma_1^{1/2}\Sigma_2\Sigma_1^{1/2}\big)^{1/2}.

    Computed in float64 with symmetric eigendecompositions (negative eigenvalues from round-off
    are clipped), so it is stable for singular covariances, unlike sqrtm of the non-symmetric Σ₁Σ₂.
    Shapes: μ ``[D]``, Σ ``[D, D]``.
    """
    m1, m2 = torch.as_tensor(mu1, dtype=torch.float64), torch.as_tensor(mu2, dtype=torch.float64)
    c1, c2 = torch.as_tensor(cov1, dtype=torch.float64), torch.as_tensor(cov2, dtype=torch.float64)
    D = m1.shape[-1] if m1.dim() else 0
    if m1.dim() != 1 or m2.shape != m1.shape or c1.shape != (D, D) or c2.shape != (D, D):
        raise ValueError(
            f"expected mu1, mu2 of shape [D] and cov1, cov2 of shape [D, D]; got {tuple(m1.shape)}, "
            f"{tuple(m2.shape)}, {tuple(c1.shape)}, {tuple(c2.shape)}"
        )
    c2 = c2.to(c1.device)
    s1 = _psd_sqrt(c1)
    inner = s1 @ c2 @ s1
    tr_sqrt = torch.linalg.eigvalsh(0.5 * (inner + inner.T)).clamp(min=0).sqrt().sum()
    d2 = (m1 - m2.to(m1.device)).pow(2).sum() + torch.trace(c1) + torch.trace(c2) - 2 * tr_sqrt
    return float(d2.clamp(min=0))


def fid_from_features(f1: ArrayLike, f2: ArrayLike) -> float:
    """Fréchet distance between Gaussian fits (mean, unbiased covariance) of ``[N, D]`` and ``[M, D]`` features."""
    a, b = _as_2d(f1, "f1"), _as_2d(f2, "f2")
    _check_pair(a, b)
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


# ---------------------------------------------------------------------- network-based metrics
# Loaded on first access: they import torchmetrics and the digits classifier, which plain
# distance computations do not need.
_LAZY = {
    "FID": "sde_diffusion.evaluation.fid",
    "InceptionWeightsMissing": "sde_diffusion.evaluation.inception",
    "digits_fd": "sde_diffusion.evaluation.digits_classifier",
    "classify": "sde_diffusion.evaluation.digits_classifier",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "wasserstein_1d",
    "sliced_wasserstein",
    "median_bandwidth",
    "mmd",
    "gaussian_stats",
    "frechet_distance",
    "fid_from_features",
    "KERNELS",
    *_LAZY,
]
