r"""The analytic first step: the probability-flow ODE of a Gaussian p_0, from T down to a start level.

At high noise the marginal p̃_σ̃ of x̃ = x/m is close to the Gaussian with p_0's mean and covariance,
N(μ, Σ + σ̃² I), and for a Gaussian p_0 the probability-flow ODE in x̃ has a closed-form solution: in the
eigenbasis Σ = V Λ Vᵀ each coordinate of x̃ − μ scales by

.. math:: \tilde x(\tilde\sigma_s) - \mu = V\,\mathrm{diag}\Big(\sqrt{\tfrac{\lambda_i + \tilde\sigma_s^2}
          {\lambda_i + \tilde\sigma_T^2}}\Big)\,V^\top (\tilde x_T - \mu)

(d x̃/dσ̃ = σ̃ (Σ + σ̃²)⁻¹ (x̃ − μ)). :class:`GaussianStart` applies that map to the prior draw x_T: a step from T
to the level σ̃_s that costs no score evaluation, so the sampler's N steps cover σ̃_s → end instead of T → end.
It also keeps the samplers away from the top of the noise range, where a trained ε-prediction network's
denoised estimate x̂_0 = (x − σ ε̂)/m is least accurate (its error is ε̂'s times σ̃ ≈ 150 on VP).

``schedule=fit`` estimates μ and Σ from the model's own samples and stores the start with the grid
(:mod:`.fitted`); the start level is :func:`start_level` (a multiple of the largest standard deviation of p_0).
Σ is kept as its ``rank`` leading eigenpairs plus one variance for the rest of the space (probabilistic PCA), so
that large data store k·D numbers, not D².

Usage::

    start = GaussianStart.from_samples(x0, level=2.0)     # x0 [n, ...] samples of p_0
    x_s = start.transport(sde, sde.prior_sample((B, *shape)))   # the state at start.time(sde)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import Tensor

from ..sdes.sde import SDE

#: The most eigenpairs of Σ a start keeps (the rest of the space shares one variance).
MAX_RANK = 128
#: Start level σ̃_s = factor × the largest standard deviation of p_0 (√λ_max), by the sampler's NFE: the last
#: entry whose bound the budget reaches; None: no start. Chosen on the wider family's tuning seeds 2000–2015 (VP and
#: VE; benchmarks/RESULTS.md, "Gaussian start"). With exact moments, at 5 NFE factor 2 gave 0.14× / 0.46× the error
#: of the rule's run from T (VP, low-D / high-D; factor 4: 0.22× / 0.45×); at 10–20 NFE factor 4 gave 0.66–0.99×
#: (factor 2 was worse than no start on 5–8 of 16 problems); factor 1 failed on high-dimensional problems (up to
#: 3000× worse). With the moments estimated by the fit, the start against the fit from T gave 0.27–0.82× at 5 NFE,
#: 0.94–1.00× at 10–20 and 0.99–1.005× from 30 NFE, where it spends the moments' evaluations for nothing.
START_FACTORS: tuple = ((1, 2.0), (8, 4.0), (30, None))


def start_factor(nfe: int) -> Optional[float]:
    """The multiple of √λ_max where a run of ``nfe`` evaluations starts, or None for none (:data:`START_FACTORS`)."""
    factor = START_FACTORS[0][1]
    for bound, f in START_FACTORS:
        if nfe >= bound:
            factor = f
    return factor


def noise_level(sde: SDE, t: float) -> float:
    """σ̃ = σ(t)/m(t): the noise level at time ``t``."""
    tt = torch.tensor(float(t), dtype=torch.float64)
    return float(sde.marginal_std(tt) / sde.mean_coeff(tt))


def top_level(sde: SDE) -> float:
    """σ̃ at T: the level of the prior."""
    return noise_level(sde, sde.T)


@dataclass
class GaussianStart:
    """A Gaussian p_0 = N(μ, Σ) for the analytic first step to the level σ̃ = ``level``.

    Fields (plain lists, so that the start is stored in a fitted schedule's JSON): ``mean`` [D]; ``eigvals`` [k] and
    ``eigvecs`` [k][D] (orthonormal rows), the k leading eigenpairs of Σ; ``residual``: the variance of Σ in every
    direction orthogonal to them; ``shape``: one sample's shape.
    """

    level: float
    mean: List[float]
    eigvals: List[float]
    eigvecs: List[List[float]]
    residual: float
    shape: List[int]
    samples: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.level) and self.level > 0):
            raise ValueError(f"the start level must be a positive noise level σ/m, got {self.level!r}")
        dim = math.prod(int(d) for d in self.shape)
        if len(self.mean) != dim or any(len(v) != dim for v in self.eigvecs) or len(self.eigvals) != len(self.eigvecs):
            raise ValueError(f"a Gaussian start of shape {tuple(self.shape)} needs a mean of {dim} numbers and "
                             f"eigenvectors of {dim}; got {len(self.mean)} and {len(self.eigvecs)} × "
                             f"{len(self.eigvecs[0]) if self.eigvecs else 0}")
        if self.residual < 0 or any(v < 0 for v in self.eigvals):
            raise ValueError("a covariance has no negative variances (eigvals, residual)")

    # ------------------------------------------------------------------ building
    @classmethod
    def from_samples(cls, x0: Tensor, level: Optional[float] = None, factor: float = 2.0,
                     rank: int = MAX_RANK) -> "GaussianStart":
        """The sample mean and covariance of ``x0`` ``[n, ...]`` (n ≥ 2), its ``rank`` leading eigenpairs kept and the
        rest averaged into one variance; ``level`` None: ``factor`` × √λ_max."""
        if x0.dim() < 2 or x0.shape[0] < 2:
            raise ValueError(f"a Gaussian start needs at least 2 samples [n, ...], got shape {tuple(x0.shape)}")
        flat = x0.detach().reshape(x0.shape[0], -1).to(torch.float64)
        if not torch.isfinite(flat).all():
            raise ValueError("the samples for a Gaussian start hold non-finite values")
        n, dim = flat.shape
        mean = flat.mean(0)
        centred = (flat - mean) / math.sqrt(n - 1)
        # Σ = centredᵀ centred: its eigenpairs from the thin SVD, O(n D min(n, D)).
        _, sv, vt = torch.linalg.svd(centred, full_matrices=False)
        k = max(0, min(int(rank), dim, sv.numel()))
        eig = sv[:k] ** 2
        total = float(centred.pow(2).sum())
        residual = max(0.0, total - float(eig.sum())) / (dim - k) if dim > k else 0.0
        top = float(eig[0]) if k else residual
        lvl = float(level) if level is not None else factor * math.sqrt(max(top, residual, 1e-300))
        return cls(level=lvl, mean=mean.tolist(), eigvals=eig.tolist(), eigvecs=vt[:k].tolist(), residual=residual,
                   shape=[int(d) for d in x0.shape[1:]], samples=n)

    @property
    def std_max(self) -> float:
        """√λ_max: the largest standard deviation of p_0."""
        return math.sqrt(max(self.eigvals + [self.residual]))

    # ------------------------------------------------------------------ use
    def time(self, sde: SDE) -> float:
        """The time t where σ(t)/m(t) equals the start level."""
        lam = torch.tensor(-2.0 * math.log(self.level), dtype=torch.float64)
        return float(sde.t_from_log_snr(lam))

    def check(self, sde: SDE, shape: Any = None) -> None:
        """Raise ValueError if the start cannot be used with ``sde`` (level at or above the prior's) or with samples of
        ``shape`` (one sample's)."""
        if self.level >= top_level(sde):
            raise ValueError(f"the Gaussian start's level σ/m = {self.level:.4g} is not below the prior's "
                             f"({top_level(sde):.4g}): it was made for another process; fit again (schedule=fit)")
        if shape is not None and [int(d) for d in shape] != [int(d) for d in self.shape]:
            raise ValueError(f"the Gaussian start was fitted to samples of shape {tuple(self.shape)}, these have shape "
                             f"{tuple(shape)}: fit again for this model (schedule=fit)")

    def transport(self, sde: SDE, x: Tensor) -> Tensor:
        """The prior draw ``x`` ``[B, ...]`` at T carried by the Gaussian's probability-flow ODE to :meth:`time`, in
        the process's own scale (m(t) x̃)."""
        self.check(sde, x.shape[1:])
        T = torch.tensor(sde.T, dtype=torch.float64)
        t_s = torch.tensor(self.time(sde), dtype=torch.float64)
        m_T, m_s = float(sde.mean_coeff(T)), float(sde.mean_coeff(t_s))
        s_T, s_s = top_level(sde) ** 2, self.level ** 2
        mean, V, lam = self._tensors(x.device)
        y = x.reshape(x.shape[0], -1).to(torch.float64) / m_T - mean
        # Outside the kept eigenvectors every direction has the residual variance: one scale there.
        rest = math.sqrt((self.residual + s_s) / (self.residual + s_T))
        out = rest * y
        if lam.numel():
            scale = ((lam + s_s) / (lam + s_T)).sqrt() - rest
            out = out + ((y @ V.T) * scale) @ V
        return (m_s * (mean + out)).to(x.dtype).reshape(x.shape)

    def _tensors(self, device: Any) -> tuple:
        """(mean [D], eigvecs [k, D], eigvals [k]) as float64 tensors on ``device``, made once per device (a sampling
        job transports every batch)."""
        cache = self.__dict__.setdefault("_cache", {})
        key = str(device)
        if key not in cache:
            dim = len(self.mean)
            cache[key] = (torch.tensor(self.mean, dtype=torch.float64, device=device),
                          torch.tensor(self.eigvecs, dtype=torch.float64, device=device).reshape(-1, dim),
                          torch.tensor(self.eigvals, dtype=torch.float64, device=device))
        return cache[key]

    # ------------------------------------------------------------------ storage
    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GaussianStart":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        missing = {"level", "mean", "eigvals", "eigvecs", "residual", "shape"} - set(known)
        if missing:
            raise ValueError(f"a stored Gaussian start lacks {', '.join(sorted(missing))}")
        return cls(**known)


__all__ = ["GaussianStart", "MAX_RANK", "START_FACTORS", "noise_level", "start_factor", "top_level"]
