r"""The denoiser view of a score, shared by the fast solvers (DDIM, EDM, DPM-Solver++).

For the kernel x_t = m(t) x_0 + σ(t) ε of any linear SDE and a score s(x, t) ≈ ∇ log p_t(x):

* data prediction (Tweedie)  x̂_0(x, t) = (x + σ(t)² s(x, t)) / m(t)
* noise prediction           ε̂(x, t)  = −σ(t) s(x, t),   so x = m x̂_0 + σ ε̂ exactly
* half log-SNR               λ(t) = log(m(t)/σ(t)) = ½ log-SNR (DPM-Solver's λ)
* EDM noise level            σ̃(t) = σ(t)/m(t) = e^{−λ(t)}, scaled state x̃ = x/m(t)

Only ``sde.mean_coeff``, ``sde.marginal_std`` and ``sde.t_from_log_snr`` are used (and the grids use ``sde.log_snr``),
so the solvers work for VP, sub-VP, VE, cosine VP and any :class:`~sde_diffusion.sdes.LinearSDE`.

The scalar coefficients of one time are computed in float64 as Python floats (a :class:`Level`;
inside a run they come from the run's :class:`~.coeffs.GridCoeffs`); the time handed to the score
keeps the dtype and device of the state.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ..sdes.base import SDE
from .base import SamplingContext
from .coeffs import GridCoeffs, Level, levels_at_lambda, sigma_tilde_to_lambda


def level(sde: SDE, t: Tensor) -> Level:
    """m(t), σ(t) and λ(t) = log(m/σ) at the 0-dim time ``t``, evaluated in float64 (one host sync;
    inside a run use the run's table, ``ctx.step_table``)."""
    return GridCoeffs.build(sde, (t,)).levels()[0]


def step_levels(ctx: SamplingContext, t_cur: Tensor, t_next: Tensor) -> Tuple[Level, Level]:
    """The levels of ``t_cur`` and ``t_next`` from the run's table (see ``SamplingContext.step_table``)."""
    grid, i = ctx.step_table(t_cur, t_next)
    levels = ctx.state.get("levels")
    if grid is ctx.grid and levels is not None:
        return levels[i], levels[i + 1]
    if grid is ctx.grid:
        ctx.state["levels"] = levels = grid.levels()
        return levels[i], levels[i + 1]
    both = grid.levels()
    return both[0], both[1]


def level_at_lambda(sde: SDE, lam: float, like: Tensor) -> Level:
    """The :class:`Level` at the time whose half log-SNR is ``lam`` (clipped to [0, T])."""
    return levels_at_lambda(sde, [lam], like)[0]


def level_at_sigma_tilde(sde: SDE, sigma_tilde: float, like: Tensor) -> Level:
    """The :class:`Level` at the time whose EDM noise level σ/m is ``sigma_tilde``."""
    return level_at_lambda(sde, sigma_tilde_to_lambda(sigma_tilde), like)


def denoise(ctx: SamplingContext, x: Tensor, lv: Level) -> Tuple[Tensor, Tensor]:
    """One score evaluation → (x̂_0, ε̂), both shaped like ``x`` ``[B, ...]``."""
    s = ctx.score(x, lv.t)
    return data_from_score(x, s, lv), s * -lv.sigma


def data_from_score(x: Tensor, s: Tensor, lv: Level) -> Tensor:
    """Tweedie's x̂_0 = (x + σ² s)/m as a new tensor (two fused ops)."""
    out = torch.add(x, s, alpha=lv.sigma**2)
    return out if lv.m == 1.0 else out.div_(lv.m)


def data_prediction(ctx: SamplingContext, x: Tensor, lv: Level) -> Tensor:
    """One score evaluation → x̂_0 only (what DPM-Solver++ needs)."""
    return data_from_score(x, ctx.score(x, lv.t), lv)


__all__ = ["Level", "level", "step_levels", "level_at_lambda", "level_at_sigma_tilde", "denoise", "data_prediction", "data_from_score"]
