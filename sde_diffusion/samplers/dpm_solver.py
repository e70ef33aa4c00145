r"""DPM-Solver++ (Lu et al. 2022): exponential integrators in log-SNR time with data prediction.

With λ = log(m/σ) (half the log-SNR) and the data prediction D(x, λ) = x̂_0, the probability-flow
ODE of any linear SDE has the exact solution from λ_s to λ_t = λ_s + h

.. math:: x_t = \frac{\sigma_t}{\sigma_s} x_s + m_t \int_0^h e^{\tau - h}\, D(x_{\lambda_s+\tau}, \lambda_s + \tau)\, d\tau,

so only D has to be approximated: a polynomial of degree k − 1 in λ gives a method of order k.
With φ₁ = 1 − e^{−h}, φ₂ = φ₁/h − 1 and φ₃ = φ₂/h + ½ (computed with ``expm1``),
∫₀ʰ e^{τ−h} dτ = φ₁, ∫₀ʰ e^{τ−h} τ dτ = −h φ₂ and ∫₀ʰ e^{τ−h} τ²/2 dτ = h² φ₃.
"""
from __future__ import annotations

import math
from typing import Any, List, Sequence, Tuple

import torch
from torch import Tensor

from .sampler import SAMPLERS, SamplingContext, StepSampler
from .coeffs import GridCoeffs, Level, levels_at_lambda
from .denoiser import data_prediction

# Below this many steps the last steps use lower orders (as in DPM-Solver's reference code):
# with few, large steps a high-order extrapolation of D into the low-noise end is unstable.
_LOWER_ORDER_FINAL_BELOW = 15
# Extrapolating D over a step much longer than the one its history spans amplifies its errors
# (variable-step multistep methods are only stable for bounded step ratios); such steps, e.g. the
# last step of a uniform-t grid for VP with a tiny eps, fall back to 1st order.
_MAX_STEP_RATIO = 3.0

History = List[Tuple[float, Tensor]]  # [(λ, D)], oldest first


@SAMPLERS.register("dpm_solver")
class DPMSolverPP(StepSampler):
    r"""Multistep DPM-Solver++ of order 1, 2 (2M, default) or 3 (3M), 1 NFE per step.

    Step from λ_s to λ_t (h = λ_t − λ_s) with D_0, D_1, D_2 the data predictions at the current
    and the previous two grid points (h_0 = λ_s − λ_{s1}, h_1 = λ_{s1} − λ_{s2}, r_k = h_k/h):

    * order 1 (= DDIM, η = 0):  x_t = (σ_t/σ_s) x_s + m_t φ₁ D_0;
    * 2M (Algorithm 2):        x_t = (σ_t/σ_s) x_s + m_t φ₁ (D_0 + (D_0 − D_1)/(2 r_0));
    * 3M:                      x_t = (σ_t/σ_s) x_s + m_t (φ₁ D_0 − φ₂ Δ₁ + φ₃ Δ₂) with
      δ₀ = (D_0 − D_1)/r_0, δ₁ = (D_1 − D_2)/r_1,
      Δ₁ = δ₀ + r_0 (δ₀ − δ₁)/(r_0 + r_1) ≈ h D′, Δ₂ = 2 (δ₀ − δ₁)/(r_0 + r_1) ≈ h² D″,
      the exact integral of the quadratic through the three (λ, D). (The widely copied reference
      implementation weights (δ₀ − δ₁)/(r_0 + r_1) ≈ h² D″/2 by φ₃, which halves the D″ term and
      leaves the method 2nd order; with the factor 2 the measured global order is 3.)

    Warm-up: step i uses order min(order, i + 1), since only i + 1 predictions exist. With
    ``lower_order_final`` and fewer than 15 steps, step i also uses at most order steps − i (the
    last step is 1st order): this keeps 5–10-step sampling stable; with ≥ 15 steps the full order
    is used to the end. (Strictly, the 1st-order warm-up step adds an O(h²)·|dD/dλ| error; at
    σ(T)/m(T) ≫ the data scale D hardly changes there, and the measured order of 3M is 3.1–3.2.)
    A step more than 3× longer in λ than the previous one is taken at 1st order (see
    ``_MAX_STEP_RATIO``). Any step count works (1 step = DDIM). Order 3 pays from ~15–20 steps
    on; below, 2M is the more robust choice.

    ``corrector=True`` adds the UniC corrector of UniPC (Zhao et al. 2023) at no extra NFE: when
    D_t has been evaluated at the predicted x_t (for the next step anyway), the step s → t is redone
    with the polynomial through (λ_t, D_t) and the k points the predictor used, integrated exactly
    (an exponential Adams–Moulton step of order k + 1); the next step starts from the corrected
    x_t but reuses D_t. Not applied after the last step (it would cost an NFE). The correction is
    added as an increment to the state the step receives, so a per-step ``hook`` (e.g. inpainting)
    keeps its effect.

    ``stochastic=True`` gives DPM-Solver++(2M) SDE (Lu et al. 2022, §5; order ≤ 2): the exact
    solution of the reverse SDE in λ with D linearly extrapolated,

    .. math:: x_t = \frac{\sigma_t}{\sigma_s} e^{-h} x_s + m_t (1 - e^{-2h})\big(D_0 + \tfrac12 (D_0 - D_1)/r_0\big)
        + \sigma_t \sqrt{1 - e^{-2h}}\, z,

    whose 1st-order version is exactly DDIM with η = 1. Noise is kept on the last step (the
    posterior at ``eps``).

    The history of (λ, D) lives in ``ctx.state`` and is reset in :meth:`begin`.
    **NFE = steps** (+1 with ``denoise``). Default grid ``auto``: ``logsnr`` (uniform h) for VP-type
    processes, ``karras`` (ρ = 7) for variance-exploding ones (see :func:`~.grids.auto_grid`); at
    ≤ 10 steps ``eps=1e-3`` is usually better than a tiny eps (DPM-Solver's recommendation).

    Args:
        order: 1, 2 or 3.
        lower_order_final: lower the order on the last steps when steps < 15.
        corrector: apply the UniC corrector (UniPC); not with ``stochastic``.
        stochastic: the SDE variant (order 1 or 2 only).
        **end: the end point (:class:`~.grids.EndPoint`): the time grid (default ``auto``) and where
            to stop, as a time ``eps`` or as a noise level σ/m ``end_sigma``.
    """

    default_grid = "auto"

    def __init__(
        self,
        order: int = 2,
        lower_order_final: bool = True,
        corrector: bool = False,
        stochastic: bool = False,
        **end: Any,
    ) -> None:
        super().__init__(**end)
        if order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got order={order}")
        if stochastic and order > 2:
            raise ValueError("stochastic=True supports order 1 or 2 (DPM-Solver++(2M) SDE); set order ≤ 2")
        if stochastic and corrector:
            raise ValueError("corrector=True applies to the ODE solver only; set stochastic=False or corrector=False")
        self.order = int(order)
        self.lower_order_final = bool(lower_order_final)
        self.corrector = bool(corrector)
        self.stochastic = bool(stochastic)

    def begin(self, x: Tensor, grid: GridCoeffs, ctx: SamplingContext) -> Tensor:
        ctx.state["history"] = []  # [(λ, D)], newest last
        ctx.state["pending"] = None  # (level, points, c_d, predictor weights) of the step awaiting correction
        return x

    def step_order(self, i: int, steps: int, h: float, history: History) -> int:
        """The order of step ``i`` of ``steps`` (length ``h`` in λ, after ``history``): warm-up,
        lower-order final steps, and 1st order after a step ratio h/h_0 > 3."""
        order = min(self.order, i + 1)
        if self.lower_order_final and steps < _LOWER_ORDER_FINAL_BELOW:
            order = min(order, steps - i)
        if order > 1 and h > _MAX_STEP_RATIO * (history[-1][0] - history[-2][0]):
            order = 1
        return order

    def step(self, x: Tensor, i: int, grid: GridCoeffs, ctx: SamplingContext) -> Tensor:
        cur, nxt = grid.levels[i], grid.levels[i + 1]
        D = data_prediction(ctx, x, cur)
        if ctx.state["pending"] is not None:
            start, used, c_d, w_pred = ctx.state["pending"]
            # As an increment, so that a hook's change of the predicted state is kept.
            x = _add_correction(x, start, used, c_d, w_pred, cur, D)
        history: History = ctx.state["history"]
        history.append((cur.lam, D))
        del history[: -self.order]
        h = nxt.lam - cur.lam
        points = history[-self.step_order(i, grid.steps, h, history) :]
        weights = extrapolation_weights([lam for lam, _ in points], h)
        if not self.stochastic:
            c_x, c_d = nxt.sigma / cur.sigma, nxt.m * -math.expm1(-h)
        else:
            c_x, c_d = nxt.sigma / cur.sigma * math.exp(-h), nxt.m * -math.expm1(-2 * h)
        # x_t = c_x x_s + c_d D̄ with D̄ = Σ_j w_j D_j: one multiply and one fused add per point.
        x_next = torch.mul(x, c_x)
        for w, (_, Dj) in zip(weights, points):
            x_next.add_(Dj, alpha=c_d * w)
        if self.stochastic:
            x_next.add_(ctx.noise(x), alpha=nxt.sigma * math.sqrt(max(-math.expm1(-2 * h), 0.0)))
        ctx.state["pending"] = (cur, list(points), c_d, weights) if self.corrector and i < grid.steps - 1 else None
        return x_next


def extrapolation_weights(lams: Sequence[float], h: float) -> List[float]:
    r"""Weights w_j (oldest first) with D̄ = Σ_j w_j D_j for the 1–3 points at half log-SNRs ``lams``.

    D̄ is defined by x_t = (σ_t/σ_s) x_s + m_t φ₁ D̄ (see 2M/3M in :class:`DPMSolverPP`); with
    r_k = h_k/h:

    * 1 point:  w = (1);
    * 2 points: D̄ = D_0 + (D_0 − D_1)/(2 r_0);
    * 3 points: D̄ = D_0 + (−φ₂ Δ₁ + φ₃ Δ₂)/φ₁, which is D_0 + A δ₀ + B δ₁ with
      A = c₁(1 + q) + c₂ p, B = −c₁ q − c₂ p, c₁ = −φ₂/φ₁, c₂ = φ₃/φ₁, q = r_0/(r_0 + r_1),
      p = 2/(r_0 + r_1), δ₀ = (D_0 − D_1)/r_0, δ₁ = (D_1 − D_2)/r_1.
    """
    if len(lams) == 1:
        return [1.0]
    r0 = (lams[-1] - lams[-2]) / h
    if len(lams) == 2:
        return [-1.0 / (2 * r0), 1.0 + 1.0 / (2 * r0)]
    r1 = (lams[-2] - lams[-3]) / h
    phi1 = -math.expm1(-h)
    phi2 = phi1 / h - 1.0
    phi3 = phi2 / h + 0.5
    c1, c2 = -phi2 / phi1, phi3 / phi1
    q, p = r0 / (r0 + r1), 2.0 / (r0 + r1)
    A = c1 * (1 + q) + c2 * p
    B = -c1 * q - c2 * p
    return [-B / r1, -A / r0 + B / r1, 1.0 + A / r0]


def _add_correction(
    x: Tensor, start: Level, points: History, c_d: float, w_pred: Sequence[float], end: Level, D_end: Tensor
) -> Tensor:
    """x + (UniC − predictor): the step start → end redone with the polynomial through ``points``
    and (λ_end, D_end), minus the predictor's x_t = c_x x_s + c_d Σ_j w_j D_j.

    Both share the term (σ_end/σ_start) x_s, so the difference is Σ_j (m_end u_j − c_d w_j) D_j +
    m_end u_end D_end with u the quadrature weights: one fused add per node, no copy of x_s kept.
    """
    nodes = points + [(end.lam, D_end)]
    u = exp_quadrature_weights([lam - start.lam for lam, _ in nodes], end.lam - start.lam)
    coefs = [end.m * uj - c_d * wj for uj, wj in zip(u, w_pred)] + [end.m * u[-1]]
    out = torch.add(x, nodes[0][1], alpha=coefs[0])
    for cj, (_, Dj) in zip(coefs[1:], nodes[1:]):
        out.add_(Dj, alpha=cj)
    return out


def exp_quadrature_weights(nodes: Sequence[float], h: float) -> List[float]:
    r"""Weights w_j with Σ_j w_j P(τ_j) = ∫₀ʰ e^{τ−h} P(τ) dτ for every polynomial P of degree < len(nodes).

    Solves the Vandermonde system in u = τ/h against the moments μ_k = ∫₀ʰ e^{τ−h} (τ/h)^k dτ =
    h Σ_n (−h)^n k!/(n+k+1)! (series, for h < 1) or μ_0 = φ₁, μ_k = 1 − (k/h) μ_{k−1} (h ≥ 1).
    The system has at most four unknowns, so it is solved on the host in plain floats.
    """
    n = len(nodes)
    if h < 1.0:
        mu = []
        for k in range(n):
            term, total = 1.0 / (k + 1), 0.0  # term_j = (−h)^j k!/(j+k+1)!
            for j in range(30):
                total += term
                if abs(term) <= 1e-17 * abs(total):  # the rest is below float precision
                    break
                term *= -h / (j + k + 2)
            mu.append(h * total)
    else:
        mu = [-math.expm1(-h)]
        for k in range(1, n):
            mu.append(1.0 - k / h * mu[-1])
    u = [tau / h for tau in nodes]
    return _solve([[uj**k for uj in u] for k in range(n)], mu)


def _solve(A: List[List[float]], b: List[float]) -> List[float]:
    """x with A x = b by Gaussian elimination with partial pivoting (small dense systems)."""
    n = len(b)
    M = [row[:] + [bi] for row, bi in zip(A, b)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(M[r][c]))
        if M[p][c] == 0.0:
            raise ValueError("exp_quadrature_weights: the nodes must be distinct")
        M[c], M[p] = M[p], M[c]
        for r in range(c + 1, n):
            f = M[r][c] / M[c][c]
            for k in range(c, n + 1):
                M[r][k] -= f * M[c][k]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (M[r][n] - sum(M[r][k] * x[k] for k in range(r + 1, n))) / M[r][r]
    return x


@SAMPLERS.register("dpm_solver_2s")
class DPMSolverPP2S(StepSampler):
    r"""Single-step DPM-Solver++(2S) with the midpoint r = ½ in λ: 2 NFE per step.

    .. math::
        u = \frac{\sigma_u}{\sigma_s} x_s + m_u (1 - e^{-h/2}) D(x_s, \lambda_s),\qquad
        x_t = \frac{\sigma_t}{\sigma_s} x_s + m_t (1 - e^{-h}) D(u, \lambda_s + h/2),

    the time of λ_s + h/2 from ``sde.t_from_log_snr``. Needs no history, so it suits grids with
    very uneven steps. **NFE = 2·steps** (+1 with ``denoise``). Default grid ``auto`` (as
    :class:`DPMSolverPP`).
    """

    default_grid = "auto"
    nfe_per_step = 2

    def begin(self, x: Tensor, grid: GridCoeffs, ctx: SamplingContext) -> Tensor:
        # The midpoints λ_i + h_i/2 of all steps, inverted to times at once.
        levels = grid.levels
        ctx.state["mid"] = levels_at_lambda(ctx.sde, [a.lam + 0.5 * (b.lam - a.lam) for a, b in zip(levels[:-1], levels[1:])], x)
        return x

    def step(self, x: Tensor, i: int, grid: GridCoeffs, ctx: SamplingContext) -> Tensor:
        cur, mid, nxt = grid.levels[i], ctx.state["mid"][i], grid.levels[i + 1]
        h = nxt.lam - cur.lam
        # u = (σ_u/σ_s) x + m_u φ D(x) and x_t = (σ_t/σ_s) x + m_t φ₁ D(u), each D = (y + σ² s)/m
        # folded into the affine maps.
        phi_u = -math.expm1(cur.lam - mid.lam)
        s1 = ctx.score(x, cur.t)
        k = mid.m * phi_u / cur.m
        u = torch.mul(x, mid.sigma / cur.sigma + k).add_(s1, alpha=k * cur.sigma**2)
        s2 = ctx.score(u, mid.t)
        k = nxt.m * -math.expm1(-h) / mid.m
        return torch.mul(x, nxt.sigma / cur.sigma).add_(u, alpha=k).add_(s2, alpha=k * mid.sigma**2)


__all__ = ["DPMSolverPP", "DPMSolverPP2S", "exp_quadrature_weights", "extrapolation_weights"]
