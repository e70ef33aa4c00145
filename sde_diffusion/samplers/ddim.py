r"""DDIM (Song, Meng & Ermon 2021) for any linear SDE, deterministic (η = 0) or stochastic."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .sampler import SAMPLERS, SamplingContext, StepSampler
from .coeffs import GridCoeffs


@SAMPLERS.register("ddim")
class DDIM(StepSampler):
    r"""DDIM step from t to s < t in the general (m, σ) form of the kernel x_t = m_t x_0 + σ_t ε.

    With x̂_0 = (x_t + σ_t² s)/m_t and ε̂ = −σ_t s (one NFE),

    .. math::
        x_s = m_s\,\hat x_0 + \sqrt{\sigma_s^2 - c^2}\;\hat\varepsilon + c\,z,\qquad
        c = \eta\,\frac{\sigma_s}{\sigma_t}\sqrt{\sigma_t^2 - \frac{m_t^2}{m_s^2}\sigma_s^2}
          = \eta\,\sigma_s\sqrt{1 - e^{-2(\lambda_s - \lambda_t)}},

    λ = log(m/σ). The forward transition is x_t | x_s ~ N(a x_s, b²I) with a = m_t/m_s,
    b² = σ_t² − a²σ_s², so the posterior q(x_s | x_t, x_0) has variance σ_s² b²/σ_t² and mean
    m_s x_0 + (a σ_s²/σ_t²)(x_t − m_t x_0) = m_s x_0 + sqrt(σ_s² − σ_s²b²/σ_t²) ε: η = 1 is exactly
    the ancestral sample of that posterior at x_0 = x̂_0 (DDPM for VP); η = 0 is the deterministic
    DDIM, i.e. the exponential-integrator Euler step of the probability-flow ODE in λ
    (= DPM-Solver-1 = EDM's Euler step in σ̃ = σ/m). The first form reduces to the DDIM paper's
    σ_t(η) for m = √ᾱ, σ = √(1 − ᾱ). The noise c z is kept on the last step: it is the posterior
    at ``eps`` (std ≤ σ(eps)).

    Args:
        eta: 0 ≤ η ≤ 1, the fraction of the posterior standard deviation injected per step.
        **end: the end point (:class:`~.grids.EndPoint`); the grid defaults to ``uniform`` in t,
            as in the DDIM paper.

    NFE = steps (+1 with ``denoise``).
    """

    default_grid = "uniform"

    def __init__(self, eta: float = 0.0, **end: Any) -> None:
        super().__init__(**end)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: ancestral), got eta={eta}")
        self.eta = float(eta)

    def step(self, x: Tensor, i: int, grid: GridCoeffs, ctx: SamplingContext) -> Tensor:
        cur, nxt = grid.levels[i], grid.levels[i + 1]
        c2 = (self.eta * nxt.sigma) ** 2 * -math.expm1(-2.0 * (nxt.lam - cur.lam))
        k = math.sqrt(max(nxt.sigma**2 - c2, 0.0))
        # m_s x̂_0 + k ε̂ with x̂_0 = (x + σ_t² s)/m_t and ε̂ = −σ_t s, as one affine map of (x, s).
        s = ctx.score(x, cur.t)
        x_next = torch.mul(x, nxt.m / cur.m).add_(s, alpha=nxt.m * cur.sigma**2 / cur.m - k * cur.sigma)
        if c2 > 0:
            x_next.add_(ctx.noise(x), alpha=math.sqrt(c2))
        return x_next


__all__ = ["DDIM"]
