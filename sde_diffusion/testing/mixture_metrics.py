r"""How far samples are from a Gaussian mixture p_0, with the noise floors of exact draws.

Every metric takes the true mixture (a :class:`~sde_diffusion.toy.GaussianMixture`) and samples
``x [n, D]``; non-finite samples give ∞.

* :func:`whitened_moment_kl` — KL(w ‖ ŵ) + Σ_k w_k Σ_j KL(N(μ̂_kj, v̂_kj) ‖ N(0, 1)) in each mode's
  whitened eigen-coordinates; finite even when a mode holds fewer samples than dimensions.
* :func:`moment_kl` — assign samples to components by their posterior r_ik = p(k | x_i) under
  p_0, then KL(w ‖ ŵ) + Σ_k w_k KL(N(μ̂_k, Σ̂_k) ‖ N(μ_k, Σ_k)) with ŵ_k = mean_i r_ik and
  (μ̂_k, Σ̂_k) the r-weighted moments. For true samples these responsibility-weighted estimates
  are unbiased even where components overlap (E[r_k(x) x] = w_k μ_k), and over-concentrated
  samples are penalised by the log-det term, which → ∞ as Σ̂_k collapses.
* :func:`sliced_w2` — sliced Wasserstein-2 against quantiles of a much larger true reference set
  (:func:`reference_quantiles`), so that the reference adds little noise of its own; the 1-D
  distances are the library's :func:`sde_diffusion.metrics.wasserstein_1d`.
* :func:`excess_cross_entropy` — E_x[−log p_0(x)] − H(p_0). Not a divergence: it is negative for
  samples that sit too close to the modes, so it is reported beside :func:`moment_kl`, never alone.

:class:`Truth` bundles the last three for one mixture and sample size, with each metric's noise
floor: its value on fresh exact draws of the same size (mean ± std over a few independent draws).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor

from ..metrics import wasserstein_1d

# The mixture argument is a GaussianMixture; it is not imported here so that the library's
# GaussianMixture can forward to these functions without an import cycle.
Mixture = Any


def whitened_moment_kl(mixture: Mixture, x: Tensor) -> float:
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
    dev = xd.device
    r = mixture.posterior(xd)
    nk = r.sum(0)
    w = mixture.weights.to(dev)
    total = float((w * torch.log(w / (nk / n).clamp_min(0.5 / n))).sum())
    for k in range(mixture.num_components):
        if float(nk[k]) <= 1e-9:
            total += float(w[k]) * 500.0 * mixture.dim  # no sample in this mode: a large finite charge
            continue
        rk = r[:, k] / nk[k]
        y = (xd - mixture.means[k].to(dev)) @ mixture.eigvecs[k].to(dev) / mixture.eigvals[k].to(dev).sqrt()
        mu = rk @ y
        var = (rk @ (y - mu) ** 2).clamp_min(1e-12)
        total += float(w[k]) * float(0.5 * (var + mu**2 - 1 - torch.log(var)).sum())
    return total


def gaussian_kl(mu_a: Tensor, cov_a: Tensor, mu_b: Tensor, evals_b: Tensor, evecs_b: Tensor) -> Tensor:
    r"""KL(N(μ_a, Σ_a) ‖ N(μ_b, Σ_b)) with Σ_b = U diag(λ) Uᵀ given by its eigendecomposition:

        ½ [tr(Σ_b⁻¹Σ_a) + (μ_b − μ_a)ᵀ Σ_b⁻¹ (μ_b − μ_a) − D + log det Σ_b − log det Σ_a].

    A singular Σ_a (fewer samples than dimensions) has its eigenvalues floored at 1e-12·min λ,
    which gives a large but finite value. Float64 scalars.
    """
    D = mu_a.shape[0]
    ev_a = torch.linalg.eigvalsh(0.5 * (cov_a + cov_a.T)).clamp_min(1e-12 * float(evals_b.min()))
    rot = evecs_b.T @ cov_a @ evecs_b
    tr = (torch.diagonal(rot) / evals_b).sum()
    d = evecs_b.T @ (mu_b - mu_a)
    maha = (d * d / evals_b).sum()
    return 0.5 * (tr + maha - D + torch.log(evals_b).sum() - torch.log(ev_a).sum())


def moment_kl(mixture: Mixture, x: Tensor, parts: bool = False):
    r"""KL(w ‖ ŵ) + Σ_k w_k KL(N(μ̂_k, Σ̂_k) ‖ N(μ_k, Σ_k)) in nats (see the module doc).

    ŵ is floored at 0.5/n so that a missing mode costs w_k log(2 n w_k), not ∞. Non-finite samples
    give ∞. With ``parts=True`` returns (total, weight term, Gaussian term).
    """
    x = x.to(torch.float64)
    if not torch.isfinite(x).all():
        inf = math.inf
        return (inf, inf, inf) if parts else inf
    gm = mixture
    n = x.shape[0]
    r = gm.posterior(x)  # [n, K]
    nk = r.sum(0)
    w_hat = (nk / n).clamp_min(0.5 / n)
    w = gm.weights
    weight_kl = float((w * torch.log(w / w_hat)).sum())
    gauss = 0.0
    for k in range(gm.num_components):
        if float(nk[k]) <= 1e-9:
            # No mass at all: the fitted Gaussian is undefined; charge the largest finite penalty.
            cov_k = torch.eye(gm.dim, dtype=torch.float64) * 1e-12 * float(gm.eigvals[k].min())
            mu_k = x.mean(0)
        else:
            rk = r[:, k] / nk[k]
            mu_k = rk @ x
            xc = x - mu_k
            cov_k = (xc * rk[:, None]).T @ xc
        gauss += float(w[k]) * float(gaussian_kl(mu_k, cov_k, gm.means[k], gm.eigvals[k], gm.eigvecs[k]))
    total = weight_kl + gauss
    return (total, weight_kl, gauss) if parts else total


def projections(dim: int, num: int = 256, seed: int = 0) -> Tensor:
    """``[dim, num]`` unit directions, uniform on the sphere, float64."""
    p = torch.randn(dim, num, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return p / p.norm(dim=0, keepdim=True)


def reference_quantiles(ref: Tensor, proj: Tensor, n: int, chunk: int = 32) -> Tensor:
    r"""Quantiles at levels (i + ½)/n, i < n, of each projection θᵀref: ``[n, L]`` float64.

    Taken from a reference set much larger than n, they stand in for the true projected quantiles
    F_θ⁻¹((i + ½)/n) with little noise of their own (linear interpolation between order statistics).
    """
    N = ref.shape[0]
    pos = (torch.arange(n, dtype=torch.float64) + 0.5) / n * N - 0.5
    lo = pos.floor().clamp(0, N - 1).long()
    hi = (lo + 1).clamp(max=N - 1)
    frac = (pos - lo.to(torch.float64)).clamp(0, 1)[:, None]
    cols = []
    for j in range(0, proj.shape[1], chunk):
        srt = torch.sort(ref.to(torch.float64) @ proj[:, j : j + chunk], dim=0).values
        cols.append(srt[lo] * (1 - frac) + srt[hi] * frac)
    return torch.cat(cols, dim=1)


def sliced_w2(x: Tensor, ref_quantiles: Tensor, proj: Tensor) -> float:
    r"""SW₂ = sqrt(mean_θ W₂²(θᵀx, θᵀp)): the 1-D W₂ of the n projected samples against the n
    reference quantiles at levels (i + ½)/n (``ref_quantiles [n, L]`` from :func:`reference_quantiles`,
    one column per direction of ``proj [D, L]``)."""
    x = x.to(torch.float64)
    if not torch.isfinite(x).all():
        return math.inf
    if x.shape[0] != ref_quantiles.shape[0]:
        raise ValueError(f"sliced_w2 needs {ref_quantiles.shape[0]} samples (the reference size), got {x.shape[0]}")
    return float(wasserstein_1d(x @ proj, ref_quantiles, p=2.0).mean().sqrt())


def excess_cross_entropy(mixture: Mixture, x: Tensor, entropy: float) -> float:
    """mean(−log p_0(x)) − H(p_0), nats (can be negative: see the module doc)."""
    x = x.to(torch.float64)
    if not torch.isfinite(x).all():
        return math.inf
    return float(-mixture.log_prob(x).mean()) - entropy


def entropy_mc(mixture: Mixture, n: int = 200_000, seed: int = 12345, chunk: int = 20_000) -> Tuple[float, float]:
    """H(p_0) = E[−log p_0] by Monte Carlo: (estimate, standard error)."""
    gen = torch.Generator().manual_seed(seed)
    vals = []
    for start in range(0, n, chunk):
        x = mixture.sample(min(chunk, n - start), generator=gen)
        vals.append(-mixture.log_prob(x))
    v = torch.cat(vals)
    return float(v.mean()), float(v.std() / math.sqrt(n))


METRICS = ("mkl", "sw2", "xent")
METRIC_LABELS = {
    "mkl": "(a) moment KL [nats]",
    "sw2": "(b) sliced W2",
    "xent": "(c) excess cross-entropy [nats]",
}


@dataclass
class Truth:
    """Everything needed to score samples of one mixture at one sample size ``n``.

    Attributes:
        floor: metric → (mean, std) over ``repeats`` fresh true sample sets of size n.
    """

    mixture: Mixture
    n: int
    proj: Tensor
    ref_quantiles: Tensor
    entropy: float
    entropy_se: float
    floor: Dict[str, Tuple[float, float]] = field(default_factory=dict)

    @classmethod
    def build(
        cls, mixture: Mixture, n: int, repeats: int = 10, seed: int = 1000, entropy_n: int = 100_000, ref_factor: int = 20
    ) -> "Truth":
        """Reference quantiles from ``ref_factor·n`` true samples, H(p_0) from ``entropy_n`` samples,
        floors from ``repeats`` further true sets of size n (all seeds fixed)."""
        proj = projections(mixture.dim, seed=seed)
        ref = mixture.sample(ref_factor * n, generator=torch.Generator().manual_seed(seed + 1))
        quant = reference_quantiles(ref, proj, n)
        del ref
        h, h_se = entropy_mc(mixture, n=entropy_n, seed=seed + 2)
        truth = cls(mixture, n, proj, quant, h, h_se)
        runs: Dict[str, List[float]] = {k: [] for k in METRICS}
        for r in range(repeats):
            x = mixture.sample(n, generator=torch.Generator().manual_seed(seed + 10 + r))
            for k, v in truth.evaluate(x).items():
                runs[k].append(v)
        truth.floor = {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for k, v in runs.items()}
        return truth

    def evaluate(self, x: Tensor) -> Dict[str, float]:
        """All three metrics of samples ``x [n, D]``."""
        x = x.detach().to("cpu", torch.float64)
        return {
            "mkl": moment_kl(self.mixture, x),
            "sw2": sliced_w2(x, self.ref_quantiles, self.proj),
            "xent": excess_cross_entropy(self.mixture, x, self.entropy),
        }


__all__ = [
    "whitened_moment_kl",
    "gaussian_kl",
    "moment_kl",
    "projections",
    "reference_quantiles",
    "sliced_w2",
    "excess_cross_entropy",
    "entropy_mc",
    "METRICS",
    "METRIC_LABELS",
    "Truth",
]
