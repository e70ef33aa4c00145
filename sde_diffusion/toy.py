r"""Gaussian mixtures with exact perturbed densities and scores: ground truth without training.

For p_0 = Σ_k w_k N(μ_k, Σ_k) and a linear SDE with kernel N(m(t) x_0, σ(t)² I), every marginal is
again a mixture,

.. math:: p_t = \sum_k w_k\, \mathcal N\big(m\mu_k,\ m^2\Sigma_k + \sigma^2 I\big),

whose log-density and score are computed here in closed form. Each Σ_k is diagonalised once,
Σ_k = U_k Λ_k U_kᵀ, so that m²Σ_k + σ²I = U_k (m²Λ_k + σ²) U_kᵀ costs O(D²) per point and
component even when every sample has its own t. The rotations of all K components are one matrix
product x [B, D] @ [U_1 | … | U_K] [D, K·D] and the way back another; the mixture itself stays in
float64, and the arithmetic runs in float64 unless ``compute_dtype`` says otherwise.

Test problems built from mixtures (random families, benchmark problems) and sample-quality
metrics against a mixture live in :mod:`sde_diffusion.testing`.

Usage::

    gm = GaussianMixture.ring(k=8, radius=4.0, std=0.3)          # 2-D, 8 modes
    x0 = gm.sample(1000, generator=torch.Generator().manual_seed(0))   # [1000, 2]
    score_fn = gm.score_fn(VPSDE())                                # exact s(x, t) for samplers
    gm.log_prob_t(x, t, sde)                                       # [B]
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .sdes.sde import SDE

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
        self._consts_cache: Dict[Tuple[torch.dtype, torch.device], Dict[str, Tensor]] = {}

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

    def diameter(self) -> float:
        """An upper estimate of the data's extent (a VE σ_max for it): largest distance between means
        plus 6 × the largest std."""
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
    def _consts(self, dtype: torch.dtype, device: torch.device) -> Dict[str, Tensor]:
        """The rotation matrices and per-component constants in ``dtype`` on ``device`` (cached)."""
        key = (dtype, device)
        c = self._consts_cache.get(key)
        if c is None:
            K, D = self.num_components, self.dim
            U = self.eigvecs  # [K, D, D], columns are eigenvectors
            f64 = {
                "proj": U.permute(1, 0, 2).reshape(D, K * D),  # x @ proj = [x U_1 | … | x U_K]
                "back": U.permute(0, 2, 1).reshape(K * D, D),  # [… y_k …] @ back = Σ_k U_k y_k
                "mu_rot": torch.einsum("kd,kde->ke", self.means, U),  # U_kᵀ μ_k
                "lam": self.eigvals,
                "logw": torch.log(self.weights),
            }
            c = {k: v.to(dtype=dtype, device=device).contiguous() for k, v in f64.items()}
            self._consts_cache[key] = c
        return c

    def _coeffs(self, x: Tensor, t: Optional[Union[Tensor, float]], sde: Optional[SDE], dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """(m, σ) in ``dtype``: 0-dim when every sample has the same time, else ``[B, 1, 1]``."""
        if sde is None or t is None:
            one = torch.ones((), dtype=dtype, device=x.device)
            return one, torch.zeros_like(one)
        t = torch.as_tensor(t, dtype=dtype, device=x.device)
        if t.dim() != 0:
            if t.shape != (x.shape[0],):
                raise ValueError(f"batch mismatch: x has shape {tuple(x.shape)} but t has shape {tuple(t.shape)}")
            if bool((t == t[0]).all()):  # one time for the whole batch (what samplers pass)
                t = t[0]
        m, s = sde.mean_coeff(t).to(dtype), sde.marginal_std(t).to(dtype)
        if t.dim() == 1:
            m, s = m[:, None, None], s[:, None, None]
        return m, s

    def _terms(
        self, x: Tensor, t: Optional[Union[Tensor, float]], sde: Optional[SDE], compute_dtype: Optional[torch.dtype]
    ) -> Tuple[Tensor, Tensor]:
        """(log w_k + log N_k(x) ``[B, K]``, whitened residuals y_k / v_k ``[B, K, D]``) in the compute dtype.

        With y_k = U_kᵀ(x − m μ_k) and v_k = m²λ_k + σ² (component k's variances in its eigenbasis),
        log N_k(x) = −½ (Σ_d y_kd²/v_kd + Σ_d log v_kd + D log 2π).
        """
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [B, {self.dim}], got {tuple(x.shape)}")
        dtype = x.dtype if compute_dtype is None else compute_dtype
        c = self._consts(dtype, x.device)
        m, s = self._coeffs(x, t, sde, dtype)
        K, D = self.num_components, self.dim
        xc = x.to(dtype)
        if m.dim() == 0:
            # One time: the mean shift rides along in the matrix product as a bias.
            y = torch.addmm((-m * c["mu_rot"]).reshape(1, K * D), xc, c["proj"]).view(-1, K, D)
        else:
            y = (xc @ c["proj"]).view(-1, K, D) - m * c["mu_rot"]
        var = m * m * c["lam"] + s * s  # [K, D] or [B, K, D]
        white = y / var
        quad = (y * white if white.requires_grad else y.mul_(white)).sum(-1)
        logn = -0.5 * (quad + torch.log(var).sum(-1) + D * math.log(2 * math.pi))
        return c["logw"] + logn, white

    def log_prob_t(
        self, x: Tensor, t: Union[Tensor, float], sde: SDE, compute_dtype: Optional[torch.dtype] = torch.float64
    ) -> Tensor:
        """log p_t(x) of the mixture pushed through ``sde`` to time ``t`` (scalar or ``[B]``): ``[B]`` in x's dtype.

        ``compute_dtype`` is the dtype of the arithmetic (``None``: x's own).
        """
        logits, _ = self._terms(x, t, sde, compute_dtype)
        return torch.logsumexp(logits, dim=1).to(x.dtype)

    def log_prob(self, x: Tensor, compute_dtype: Optional[torch.dtype] = torch.float64) -> Tensor:
        """log p_0(x): ``[B]`` in x's dtype."""
        logits, _ = self._terms(x, None, None, compute_dtype)
        return torch.logsumexp(logits, dim=1).to(x.dtype)

    def posterior_t(
        self, x: Tensor, t: Union[Tensor, float], sde: SDE, compute_dtype: Optional[torch.dtype] = torch.float64
    ) -> Tensor:
        """Component responsibilities p(k | x_t): ``[B, K]`` in the compute dtype (float64 by default)."""
        logits, _ = self._terms(x, t, sde, compute_dtype)
        return torch.softmax(logits, dim=1)

    def posterior(self, x: Tensor, compute_dtype: Optional[torch.dtype] = torch.float64) -> Tensor:
        """Component responsibilities p(k | x) under p_0: ``[B, K]``."""
        logits, _ = self._terms(x, None, None, compute_dtype)
        return torch.softmax(logits, dim=1)

    def score(
        self, x: Tensor, t: Union[Tensor, float], sde: SDE, compute_dtype: Optional[torch.dtype] = torch.float64
    ) -> Tensor:
        r"""∇_x log p_t(x) = −Σ_k p(k|x) (m²Σ_k + σ²I)^{-1}(x − mμ_k): ``[B, D]`` in x's dtype.

        ``t`` is a scalar or ``[B]``. The arithmetic runs in ``compute_dtype`` (``None``: x's own
        dtype, e.g. float32, about twice as fast again and accurate to float32 rounding).
        """
        logits, white = self._terms(x, t, sde, compute_dtype)
        r = torch.softmax(logits, dim=1)[:, :, None]  # [B, K, 1]
        weighted = white * r if white.requires_grad or r.requires_grad else white.mul_(r)
        K, D = self.num_components, self.dim
        back = self._consts(white.dtype, x.device)["back"]
        return (-(weighted.reshape(-1, K * D) @ back)).to(x.dtype)

    def score_fn(self, sde: SDE, compute_dtype: Optional[torch.dtype] = torch.float64) -> Callable[[Tensor, Tensor], Tensor]:
        """The exact score as a ``score_fn(x, t)`` for samplers and likelihoods (see :meth:`score`)."""

        def fn(x: Tensor, t: Tensor) -> Tensor:
            return self.score(x, t, sde, compute_dtype)

        return fn

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.num_components}, D={self.dim})"


__all__ = ["GaussianMixture"]
