r"""The denoiser view of a score, shared by the fast solvers (DDIM, EDM, DPM-Solver++).

For the kernel x_t = m(t) x_0 + σ(t) ε of any linear SDE and a score s(x, t) ≈ ∇ log p_t(x):

* data prediction (Tweedie)  x̂_0(x, t) = (x + σ(t)² s(x, t)) / m(t)
* noise prediction           ε̂(x, t)  = −σ(t) s(x, t),   so x = m x̂_0 + σ ε̂ exactly
* half log-SNR               λ(t) = log(m(t)/σ(t)) = ½ log-SNR (DPM-Solver's λ)
* EDM noise level            σ̃(t) = σ(t)/m(t) = e^{−λ(t)}, scaled state x̃ = x/m(t)

Only ``sde.mean_coeff``, ``sde.marginal_std`` and ``sde.t_from_log_snr`` are used (and the grids use ``sde.log_snr``),
so the solvers work for VP, sub-VP, VE, cosine VP and any :class:`~sde_diffusion.sdes.LinearSDE`.

The scalar coefficients of one grid time are computed once, in float64, as Python floats (a
:class:`Level`); the time handed to the score keeps the dtype and device of the state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch
from torch import Tensor

from ..sdes.base import SDE
from .base import SamplingContext


@dataclass(frozen=True)
class Level:
    """Kernel coefficients at one time ``t`` (0-dim tensor in the state's dtype and device)."""

    t: Tensor
    m: float
    sigma: float
    lam: float  # half log-SNR log(m/σ)

    @property
    def sigma_tilde(self) -> float:
        """EDM's noise level σ̃ = σ/m."""
        return self.sigma / self.m


def level(sde: SDE, t: Tensor) -> Level:
    """m(t), σ(t) and λ(t) = log(m/σ) at the 0-dim time ``t``, evaluated in float64."""
    # Scalars on the host in float64 (devices such as MPS lack float64); one sync per call.
    t64 = t.detach().cpu().to(torch.float64)
    m = float(sde.mean_coeff(t64))
    sigma = float(sde.marginal_std(t64))
    if not (m > 0 and sigma > 0):
        raise ValueError(
            f"{type(sde).__name__} has m={m:g}, sigma={sigma:g} at t={float(t64):g}; the fast solvers need "
            "m > 0 and sigma > 0 on the whole time grid (use eps > 0)"
        )
    return Level(t=t, m=m, sigma=sigma, lam=math.log(m) - math.log(sigma))


def level_at_lambda(sde: SDE, lam: float, like: Tensor) -> Level:
    """The :class:`Level` at the time whose half log-SNR is ``lam`` (clipped to [0, T])."""
    t = sde.t_from_log_snr(torch.tensor(2.0 * lam, dtype=torch.float64))
    return level(sde, t.to(device=like.device, dtype=like.dtype))


def level_at_sigma_tilde(sde: SDE, sigma_tilde: float, like: Tensor) -> Level:
    """The :class:`Level` at the time whose EDM noise level σ/m is ``sigma_tilde``."""
    return level_at_lambda(sde, -math.log(sigma_tilde), like)


def denoise(ctx: SamplingContext, x: Tensor, lv: Level) -> Tuple[Tensor, Tensor]:
    """One score evaluation → (x̂_0, ε̂), both shaped like ``x`` ``[B, ...]``."""
    s = ctx.score(x, lv.t)
    return (x + lv.sigma**2 * s) / lv.m, -lv.sigma * s


__all__ = ["Level", "level", "level_at_lambda", "level_at_sigma_tilde", "denoise"]
