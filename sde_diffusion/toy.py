r"""Gaussian mixtures with exact perturbed densities and scores: ground truth without training.

For p_0 = Σ_k w_k N(μ_k, Σ_k) and a linear SDE with kernel N(m(t) x_0, σ(t)² I), every marginal is
again a mixture,

.. math:: p_t = \sum_k w_k\, \mathcal N\big(m\mu_k,\ m^2\Sigma_k + \sigma^2 I\big),

whose log-density and score are computed here in closed form. Each Σ_k is diagonalised once,
Σ_k = U_k Λ_k U_kᵀ, so that m²Σ_k + σ²I = U_k (m²Λ_k + σ²) U_kᵀ costs O(D²) per point and
component even when every sample has its own t.

Usage::

    gm = GaussianMixture.ring(k=8, radius=4.0, std=0.3)          # 2-D, 8 modes
    x0 = gm.sample(1000, generator=torch.Generator().manual_seed(0))   # [1000, 2]
    score_fn = gm.score_fn(VPSDE())                                # exact s(x, t) for samplers
    gm.log_prob_t(x, t, sde)                                       # [B]
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .sdes.base import SDE

ArrayLike = Union[Tensor, Sequence]


class GaussianMixture:
    """Mixture Σ_k w_k N(μ_k, Σ_k) in D dimensions.

    Args:
        weights: ``[K]`` non-negative, normalised here.
        means: ``[K, D]``.
        covs: ``[K, D, D]`` symmetric positive-definite (or ``[K, D]`` diagonal variances, or
            ``[K]`` isotropic variances).
    """

    def __init__(self, weights: ArrayLike, means: ArrayLike, covs: ArrayLike) -> None:
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        mu = torch.as_tensor(means, dtype=torch.float64)
        if mu.dim() != 2:
            raise ValueError(f"means must have shape [K, D], got {tuple(mu.shape)}")
        K, D = mu.shape
        if w.shape[0] != K:
            raise ValueError(f"weights has {w.shape[0]} entries but means has K={K} rows")
        if (w < 0).any() or not torch.isfinite(w).all() or w.sum() <= 0:
            raise ValueError("weights must be finite, non-negative and not all zero")
        cov_in = torch.as_tensor(covs)
        # Rounding of the caller's dtype (e.g. float32 Q Λ Qᵀ) leaves asymmetries of ~D·eps.
        in_eps = torch.finfo(cov_in.dtype).eps if cov_in.is_floating_point() else 0.0
        cov = cov_in.to(torch.float64)
        if cov.dim() == 1:
            cov = cov[:, None, None] * torch.eye(D, dtype=torch.float64)
        elif cov.dim() == 2:
            cov = torch.diag_embed(cov)
        if cov.shape != (K, D, D):
            raise ValueError(f"covs must have shape [K, D, D] = [{K}, {D}, {D}], got {tuple(cov.shape)}")
        asym = (cov - cov.transpose(1, 2)).abs().amax(dim=(1, 2))
        scale = cov.abs().amax(dim=(1, 2))
        if (asym > 1e-10 + max(1e-8, 64 * D * in_eps) * scale).any():
            raise ValueError(
                f"covariances must be symmetric; largest |Σ − Σᵀ| entry is {float(asym.max()):.3g} "
                "(pass 0.5·(Σ + Σᵀ) if the asymmetry is rounding)"
            )
        cov = 0.5 * (cov + cov.transpose(1, 2))
        _, info = torch.linalg.cholesky_ex(cov)
        if (info != 0).any():
            bad = torch.nonzero(info).flatten().tolist()
            raise ValueError(f"covariance of component(s) {bad} is not positive-definite")
        self.weights = w / w.sum()
        self.means = mu
        self.covs = cov
        self.eigvals, self.eigvecs = torch.linalg.eigh(cov)  # [K, D], [K, D, D] (columns)
        self.chol = torch.linalg.cholesky(cov)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def ring(cls, k: int = 8, radius: float = 4.0, std: float = 0.3, weights: Optional[ArrayLike] = None) -> "GaussianMixture":
        """``k`` isotropic 2-D modes evenly spaced on a circle."""
        ang = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
        means = radius * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
        w = torch.ones(k) if weights is None else weights
        return cls(w, means, torch.full((k,), std**2, dtype=torch.float64))

    @classmethod
    def random(
        cls,
        dim: int,
        k: int,
        seed: int = 0,
        mean_scale: float = 3.0,
        std_range: Tuple[float, float] = (0.2, 1.0),
        unequal_weights: bool = True,
    ) -> "GaussianMixture":
        """A reproducible random mixture with full (rotated, anisotropic) covariances.

        Component stds are drawn log-uniformly in ``std_range``; a wide range gives very
        different scales across dimensions and components.
        """
        gen = torch.Generator().manual_seed(seed)
        means = mean_scale * torch.randn(k, dim, generator=gen, dtype=torch.float64)
        lo, hi = math.log(std_range[0]), math.log(std_range[1])
        stds = torch.exp(lo + (hi - lo) * torch.rand(k, dim, generator=gen, dtype=torch.float64))
        q, _ = torch.linalg.qr(torch.randn(k, dim, dim, generator=gen, dtype=torch.float64))
        covs = q @ torch.diag_embed(stds**2) @ q.transpose(1, 2)
        covs = 0.5 * (covs + covs.transpose(1, 2))
        w = 0.5 + torch.rand(k, generator=gen, dtype=torch.float64) if unequal_weights else torch.ones(k)
        return cls(w, means, covs)

    @classmethod
    def random_family(cls, seed: int) -> "GaussianMixture":
        r"""One draw, fixed by ``seed``, from a family of exact-score test problems nobody tuned for.

        The family (every choice independent, uniform on the stated scale):

        * dimension D = round(2^u), u ~ U[1, 8] (log-uniform over 2…256);
        * K ~ U{2, …, 12} modes with weights w_k ∝ e^{v_k}, v_k ~ U[0, log 50] (ratios up to 1:50);
        * a scale per mode s_k, log-uniform over [0.03, 3] (scales spanning 1:100), and within
          each mode stds s_k·e^{a}, a ~ U[−1, 1] per axis, on random rotated axes (full covariances);
        * separation r, log-uniform over [0.5, 20] (overlapping → isolated): the means are
          r·median(s)·√(2/D)·z_k with z_k ~ N(0, I_D), so pairwise distances are ≈ 2r·median(s).

        Returns the mixture; its diameter (for a VE σ_max) is :meth:`diameter`.
        """
        gen = torch.Generator().manual_seed(int(seed))
        u = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))
        dim = max(2, int(round(2 ** u(1.0, 8.0))))
        k = int(torch.randint(2, 13, (), generator=gen))
        w = torch.exp(math.log(50.0) * torch.rand(k, generator=gen, dtype=torch.float64))
        scales = torch.exp(math.log(0.03) + math.log(100.0) * torch.rand(k, generator=gen, dtype=torch.float64))
        aniso = torch.exp(2 * torch.rand(k, dim, generator=gen, dtype=torch.float64) - 1)
        stds = scales[:, None] * aniso
        q, _ = torch.linalg.qr(torch.randn(k, dim, dim, generator=gen, dtype=torch.float64))
        covs = q @ torch.diag_embed(stds**2) @ q.transpose(1, 2)
        covs = 0.5 * (covs + covs.transpose(1, 2))
        sep = math.exp(u(math.log(0.5), math.log(20.0)))
        means = sep * float(scales.median()) * torch.randn(k, dim, generator=gen, dtype=torch.float64) * math.sqrt(2.0 / dim)
        return cls(w, means, covs)

    def diameter(self) -> float:
        """An upper estimate of the data's extent: largest distance between means plus 6 × the largest std."""
        d = torch.cdist(self.means, self.means).max() if self.num_components > 1 else torch.tensor(0.0)
        return float(d + 6.0 * self.eigvals.max().sqrt())

    # ------------------------------------------------------------------ basics
    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def mean(self) -> Tensor:
        """Mixture mean ``[D]``."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Mixture covariance ``[D, D]``."""
        mu = self.mean()
        d = self.means - mu
        return torch.einsum("k,kij->ij", self.weights, self.covs) + torch.einsum("k,ki,kj->ij", self.weights, d, d)

    def component(self, k: int) -> "GaussianMixture":
        """Component ``k`` alone, as a one-component mixture."""
        return GaussianMixture(torch.ones(1), self.means[k : k + 1], self.covs[k : k + 1])

    def sample(
        self,
        n: int,
        generator: Optional[torch.Generator] = None,
        return_labels: bool = False,
        dtype: torch.dtype = torch.float64,
    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """Draw ``n`` samples ``[n, D]`` (and their component labels ``[n]``)."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[labels] + torch.einsum("nij,nj->ni", self.chol[labels], z)
        x = x.to(dtype)
        return (x, labels) if return_labels else x

    # ------------------------------------------------------------------ perturbed densities
    def _coeffs(self, x: Tensor, t: Optional[Union[Tensor, float]], sde: Optional[SDE]) -> Tuple[Tensor, Tensor]:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [B, {self.dim}], got {tuple(x.shape)}")
        B = x.shape[0]
        if sde is None or t is None:
            one = torch.ones(B, dtype=torch.float64, device=x.device)
            return one, torch.zeros_like(one)
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        if t.dim() == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"batch mismatch: x has shape {tuple(x.shape)} but t has shape {tuple(t.shape)}")
        return sde.mean_coeff(t), sde.marginal_std(t)

    def _terms(self, x: Tensor, t, sde) -> Tuple[Tensor, Tensor, Tensor]:
        """Per-component log N and the whitened residuals (all float64)."""
        m, s = self._coeffs(x, t, sde)
        dev = x.device
        mu, lam, U = self.means.to(dev), self.eigvals.to(dev), self.eigvecs.to(dev)
        xd = x.to(torch.float64)
        diff = xd[:, None, :] - m[:, None, None] * mu[None]  # [B, K, D]
        y = torch.einsum("bkd,kde->bke", diff, U)  # coordinates in each eigenbasis
        var = m[:, None, None] ** 2 * lam[None] + s[:, None, None] ** 2  # [B, K, D]
        logn = -0.5 * ((y * y / var).sum(-1) + torch.log(var).sum(-1) + self.dim * math.log(2 * math.pi))
        return logn, y / var, U

    def log_prob_t(self, x: Tensor, t: Union[Tensor, float], sde: SDE) -> Tensor:
        """log p_t(x) of the mixture pushed through ``sde`` to time ``t``: ``[B]`` in x's dtype."""
        logn, _, _ = self._terms(x, t, sde)
        logw = torch.log(self.weights.to(x.device))
        return torch.logsumexp(logw + logn, dim=1).to(x.dtype)

    def log_prob(self, x: Tensor) -> Tensor:
        """log p_0(x): ``[B]``."""
        logn, _, _ = self._terms(x, None, None)
        return torch.logsumexp(torch.log(self.weights.to(x.device)) + logn, dim=1).to(x.dtype)

    def posterior_t(self, x: Tensor, t: Union[Tensor, float], sde: SDE) -> Tensor:
        """Component responsibilities p(k | x_t): ``[B, K]`` (float64)."""
        logn, _, _ = self._terms(x, t, sde)
        return torch.softmax(torch.log(self.weights.to(x.device)) + logn, dim=1)

    def whitened_moment_kl(self, x: Tensor) -> float:
        r"""How far samples ``x [n, D]`` are from p_0, in nats (∞ for non-finite samples).

        .. math:: \mathrm{KL}(w \,\|\, \hat w) + \sum_k w_k \sum_j
                  \mathrm{KL}\big(N(\hat\mu_{kj}, \hat v_{kj}) \,\|\, N(0, 1)\big)

        with exact responsibilities p(k | x) giving ŵ_k (floored at 0.5/n) and the weighted mean
        μ̂_kj and variance v̂_kj of x in mode k's whitened eigen-coordinates Λ_k^{-1/2} U_kᵀ(x − μ_k).
        Unlike a full-covariance moment KL it stays finite when a mode holds fewer samples than
        dimensions, and for a Gaussian mode it sees exactly what a linear-score integrator gets
        wrong: the bias and spread along each eigen-direction. Exact draws give a floor of about
        Σ_k w_k·D/n_k (the estimation noise).
        """
        xd = x.to(torch.float64)
        if not torch.isfinite(xd).all():
            return math.inf
        n = xd.shape[0]
        r = self.posterior_t(xd, 0.0, None)
        nk = r.sum(0)
        w = self.weights.to(xd.device)
        total = float((w * torch.log(w / (nk / n).clamp_min(0.5 / n))).sum())
        for k in range(self.num_components):
            if float(nk[k]) <= 1e-9:
                total += float(w[k]) * 500.0 * self.dim  # no sample in this mode: a large finite charge
                continue
            rk = r[:, k] / nk[k]
            y = (xd - self.means[k].to(xd.device)) @ self.eigvecs[k].to(xd.device) / self.eigvals[k].to(xd.device).sqrt()
            mu = rk @ y
            var = (rk @ (y - mu) ** 2).clamp_min(1e-12)
            total += float(w[k]) * float(0.5 * (var + mu**2 - 1 - torch.log(var)).sum())
        return total

    def score(self, x: Tensor, t: Union[Tensor, float], sde: SDE) -> Tensor:
        """∇_x log p_t(x) = Σ_k p(k|x) · (−(m²Σ_k + σ²I)^{-1}(x − mμ_k)): ``[B, D]`` in x's dtype."""
        logn, white, U = self._terms(x, t, sde)
        r = torch.softmax(torch.log(self.weights.to(x.device)) + logn, dim=1)  # [B, K]
        comp = -torch.einsum("bke,kde->bkd", white, U)
        return torch.einsum("bk,bkd->bd", r, comp).to(x.dtype)

    def score_fn(self, sde: SDE) -> Callable[[Tensor, Tensor], Tensor]:
        """The exact score as a ``score_fn(x, t)`` for samplers and likelihoods."""

        def fn(x: Tensor, t: Tensor) -> Tensor:
            return self.score(x, t, sde)

        return fn

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.num_components}, D={self.dim})"


__all__ = ["GaussianMixture"]
