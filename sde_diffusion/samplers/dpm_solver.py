r"""DPM-Solver++ (Lu et al. 2022): exponential integrators in log-SNR time with data prediction.

With λ = log(m/σ) and the data prediction D(x, λ) = x̂_0, the probability-flow ODE of any linear
SDE has the exact solution from λ_s to λ_t = λ_s + h

.. math:: x_t = \frac{\sigma_t}{\sigma_s} x_s + \sigma_t \int_{\lambda_s}^{\lambda_t} e^{\lambda} D(x_\lambda, \lambda)\, d\lambda,

so only D has to be approximated; a polynomial of degree k−1 in λ gives order k. The φ functions
φ₁ = 1 − e^{−h}, φ₂ = φ₁/h − e^{−h}... are written below in the ``expm1`` form for round-off.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

from torch import Tensor

from .base import SAMPLERS, SamplingContext, StepSampler
from .denoiser import denoise, level, level_at_lambda

# Below this many steps the last steps use lower orders (as in DPM-Solver's reference code):
# with few, large steps a high-order extrapolation of D into the low-noise end is unstable.
_LOWER_ORDER_FINAL_BELOW = 15


@SAMPLERS.register("dpm_solver")
class DPMSolverPP(StepSampler):
    r"""Multistep DPM-Solver++ of order 1, 2 (2M, default) or 3 (3M), 1 NFE per step.

    Step i from λ_s to λ_t (h = λ_t − λ_s) with D_0, D_1, D_2 the data predictions at the current
    and the previous two grid points (h_0 = λ_s − λ_{s1}, h_1 = λ_{s1} − λ_{s2}, r_k = h_k/h):

    * order 1 (= DDIM, η = 0):  x_t = (σ_t/σ_s) x_s + m_t φ₁ D_0,  φ₁ = 1 − e^{−h};
    * 2M (Algorithm 2):        x_t = (σ_t/σ_s) x_s + m_t φ₁ (D_0 + (D_0 − D_1)/(2 r_0));
    * 3M:                      x_t = (σ_t/σ_s) x_s + m_t (φ₁ D_0 − φ₂ Δ₁ + φ₃ Δ₂) with
      φ₂ = φ₁/h − 1 (≤ 0), φ₃ = φ₂/h + ½, δ₀ = (D_0 − D_1)/r_0, δ₁ = (D_1 − D_2)/r_1,
      Δ₁ = δ₀ + r_0 (δ₀ − δ₁)/(r_0 + r_1) ≈ h D′, Δ₂ = 2 (δ₀ − δ₁)/(r_0 + r_1) ≈ h² D″.
      These are the exact integrals of the quadratic through the three (λ, D): ∫₀ʰ e^{τ−h} τ dτ
      = −h φ₂, ∫₀ʰ e^{τ−h} τ²/2 dτ = h² φ₃. (The widely used reference implementation weights
      (δ₀ − δ₁)/(r_0 + r_1) ≈ h² D″/2 by φ₃, which halves the D″ term and leaves the method
      2nd order; with the factor 2 the measured global order is 3.)

    Warm-up: step i uses order min(order, i + 1), since only i + 1 predictions exist. With
    ``lower_order_final`` and fewer than 15 steps, step i also uses at most order steps − i (the
    last step is 1st order): this keeps 5–10-step sampling stable; with ≥ 15 steps the full order
    is used to the end, so the global error is O(h^order). Any step count works (1 step = DDIM).

    ``stochastic=True`` gives DPM-Solver++(2M) SDE (Lu et al. 2022, §5; order ≤ 2): the exact
    solution of the reverse SDE in λ with D linearly extrapolated,

    .. math:: x_t = \frac{\sigma_t}{\sigma_s} e^{-h} x_s + m_t (1 - e^{-2h})\big(D_0 + \tfrac12 (D_0 - D_1)/r_0\big)
        + \sigma_t \sqrt{1 - e^{-2h}}\, z,

    whose 1st-order version is exactly DDIM with η = 1. Noise is kept on the last step (the
    posterior at ``eps``).

    The history of (λ, D) lives in ``ctx.state`` and is reset in :meth:`begin`.
    **NFE = steps** (+1 with ``denoise``). Default grid ``logsnr`` (uniform h).

    Args:
        order: 1, 2 or 3.
        lower_order_final: lower the order on the last steps when steps < 15.
        stochastic: the SDE variant (order 1 or 2 only).
        grid, rho: time grid (``logsnr``, ``karras``, ``uniform``, ``quadratic``).
    """

    default_grid = "logsnr"

    def __init__(
        self,
        order: int = 2,
        lower_order_final: bool = True,
        stochastic: bool = False,
        grid: Optional[str] = None,
        rho: float = 7.0,
        eps: Optional[float] = None,
        denoise: bool = False,
    ) -> None:
        super().__init__(grid=grid, rho=rho, eps=eps, denoise=denoise)
        if order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got order={order}")
        if stochastic and order > 2:
            raise ValueError("stochastic=True supports order 1 or 2 (DPM-Solver++(2M) SDE); set order ≤ 2")
        self.order = int(order)
        self.lower_order_final = bool(lower_order_final)
        self.stochastic = bool(stochastic)

    def begin(self, x: Tensor, ts: Tensor, ctx: SamplingContext) -> Tensor:
        ctx.state["history"] = []  # [(λ, D)], newest last
        return x

    def step_order(self, ctx: SamplingContext) -> int:
        """The order used at step ``ctx.index``: warm-up and (optionally) lower-order final steps."""
        order = min(self.order, ctx.index + 1)
        if self.lower_order_final and ctx.steps < _LOWER_ORDER_FINAL_BELOW:
            order = min(order, ctx.steps - ctx.index)
        return order

    def step(self, x: Tensor, t_cur: Tensor, t_next: Tensor, ctx: SamplingContext) -> Tensor:
        cur, nxt = level(ctx.sde, t_cur), level(ctx.sde, t_next)
        history: List[Tuple[float, Tensor]] = ctx.state["history"]
        history.append((cur.lam, denoise(ctx, x, cur)[0]))
        del history[: -self.order]
        h = nxt.lam - cur.lam
        D = _extrapolated_data(history[-self.step_order(ctx) :], h, self.stochastic)
        if not self.stochastic:
            return (nxt.sigma / cur.sigma) * x + nxt.m * -math.expm1(-h) * D
        x_next = (nxt.sigma / cur.sigma * math.exp(-h)) * x + nxt.m * -math.expm1(-2 * h) * D
        return x_next + nxt.sigma * math.sqrt(-math.expm1(-2 * h)) * ctx.noise(x)


def _extrapolated_data(hist: List[Tuple[float, Tensor]], h: float, stochastic: bool) -> Tensor:
    r"""The effective D̄ with x_t = (σ_t/σ_s) x_s + m_t φ₁ D̄ (or its SDE analogue), from the last
    1–3 (λ, D) pairs, oldest first."""
    lam0, D0 = hist[-1]
    if len(hist) == 1:
        return D0
    lam1, D1 = hist[-2]
    r0 = (lam0 - lam1) / h
    if len(hist) == 2:
        return D0 + (D0 - D1) / (2 * r0)
    lam2, D2 = hist[-3]
    r1 = (lam1 - lam2) / h
    d0, d1 = (D0 - D1) / r0, (D1 - D2) / r1
    delta1 = d0 + r0 / (r0 + r1) * (d0 - d1)
    delta2 = 2 * (d0 - d1) / (r0 + r1)
    phi1 = -math.expm1(-h)
    phi2 = phi1 / h - 1.0
    phi3 = phi2 / h + 0.5
    return D0 + (-phi2 * delta1 + phi3 * delta2) / phi1


@SAMPLERS.register("dpm_solver_2s")
class DPMSolverPP2S(StepSampler):
    r"""Single-step DPM-Solver++(2S) with the midpoint r = ½ in λ: 2 NFE per step.

    .. math::
        u = \frac{\sigma_u}{\sigma_s} x_s + m_u (1 - e^{-h/2}) D(x_s, \lambda_s),\qquad
        x_t = \frac{\sigma_t}{\sigma_s} x_s + m_t (1 - e^{-h}) D(u, \lambda_s + h/2),

    the time of λ_s + h/2 from ``sde.t_from_log_snr``. Needs no history, so it suits grids with
    very uneven steps. **NFE = 2·steps** (+1 with ``denoise``). Default grid ``logsnr``.
    """

    default_grid = "logsnr"
    nfe_per_step = 2

    def step(self, x: Tensor, t_cur: Tensor, t_next: Tensor, ctx: SamplingContext) -> Tensor:
        cur, nxt = level(ctx.sde, t_cur), level(ctx.sde, t_next)
        h = nxt.lam - cur.lam
        mid = level_at_lambda(ctx.sde, cur.lam + 0.5 * h, x)
        u = (mid.sigma / cur.sigma) * x + mid.m * -math.expm1(-0.5 * h) * denoise(ctx, x, cur)[0]
        return (nxt.sigma / cur.sigma) * x + nxt.m * -math.expm1(-h) * denoise(ctx, u, mid)[0]


__all__ = ["DPMSolverPP", "DPMSolverPP2S"]
