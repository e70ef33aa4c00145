r"""The denoiser view of a score, shared by the fast solvers (DDIM, EDM, DPM-Solver++).

For the kernel x_t = m(t) x_0 + σ(t) ε of any linear SDE and a score s(x, t) ≈ ∇ log p_t(x):

* data prediction (Tweedie)  x̂_0(x, t) = (x + σ(t)² s(x, t)) / m(t)
* noise prediction           ε̂(x, t)  = −σ(t) s(x, t),   so x = m x̂_0 + σ ε̂ exactly
* half log-SNR               λ(t) = log(m(t)/σ(t)) = ½ log-SNR (DPM-Solver's λ)
* EDM noise level            σ̃(t) = σ(t)/m(t) = e^{−λ(t)}, scaled state x̃ = x/m(t)

Only ``sde.mean_coeff``, ``sde.marginal_std`` and ``sde.t_from_log_snr`` are used (and the grids use ``sde.log_snr``),
so the solvers work for VP, sub-VP, VE, cosine VP and any :class:`~sde_diffusion.sdes.LinearSDE`.

The scalar coefficients of one time are a :class:`~.coeffs.Level` of Python floats computed in
float64 (a step reads them from the run's table, ``grid.levels``); the time handed to the score
keeps the dtype and device of the state.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .sampler import SamplingContext
from .coeffs import Level


def data_from_score(x: Tensor, s: Tensor, lv: Level) -> Tensor:
    """Tweedie's x̂_0 = (x + σ² s)/m of x ``[B, ...]`` and its score, as a new tensor (two fused ops)."""
    out = torch.add(x, s, alpha=lv.sigma**2)
    return out if lv.m == 1.0 else out.div_(lv.m)


def data_prediction(ctx: SamplingContext, x: Tensor, lv: Level) -> Tensor:
    """One score evaluation → x̂_0 ``[B, ...]`` only (what DPM-Solver++ needs)."""
    return data_from_score(x, ctx.score(x, lv.t), lv)


__all__ = ["data_prediction", "data_from_score"]
