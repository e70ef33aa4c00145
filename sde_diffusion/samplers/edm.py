r"""EDM's 2nd-order Heun sampler (Karras et al. 2022, Algorithms 1 and 2) for any linear SDE."""
from __future__ import annotations

import math
from typing import Optional

from torch import Tensor

from .base import SAMPLERS, SamplingContext, StepSampler
from .denoiser import Level, denoise, level, level_at_sigma_tilde


@SAMPLERS.register("edm_heun")
class EDMHeun(StepSampler):
    r"""Heun's method on the probability-flow ODE in EDM's coordinates.

    With σ̃ = σ(t)/m(t) and x̃ = x/m(t), the probability-flow ODE of any linear SDE becomes

    .. math:: \frac{d\tilde x}{d\tilde\sigma} = \frac{\tilde x - D(\tilde x, \tilde\sigma)}{\tilde\sigma},
        \qquad D(\tilde x, \tilde\sigma) = \hat x_0(m\tilde x, t) = \frac{m\tilde x + \sigma^2 s(m\tilde x, t)}{m},

    (the score of x̃ = x_0 + σ̃ ε is m·s). Each step from σ̃_i to σ̃_{i+1} is an Euler step
    x̃' = x̃ + (σ̃_{i+1} − σ̃_i) d_i, d_i = (x̃ − D(x̃, σ̃_i))/σ̃_i, followed by the trapezoidal
    correction x̃ ← x̃ + (σ̃_{i+1} − σ̃_i)(d_i + d')/2 with d' = (x̃' − D(x̃', σ̃_{i+1}))/σ̃_{i+1}.

    The last step, down to σ̃_min = σ̃(eps) (not 0, so the result is the state at ``eps`` like
    every sampler's; ``denoise=True`` adds the step to 0), is Euler only, as in EDM: at the
    low-noise end D hardly changes, so the correction would cost an NFE for little gain; this Euler
    step is exactly DDIM's η = 0 step. Hence **NFE = 2·steps − 1** (+1 with ``denoise``).

    The default grid is ``karras`` with ρ = 7: σ̃_i = (σ̃_max^{1/ρ} + i/N (σ̃_min^{1/ρ} − σ̃_max^{1/ρ}))^ρ.
    The method needs ≳ 35 NFE: with few steps consecutive σ̃ differ by large factors, and the
    correction, whose end-point slope carries 1/σ̃_{i+1}, overshoots (on the 2-D 8-mode ring it is
    worse than Euler–Maruyama below ~40 NFE); use ``dpm_solver`` for 10–20 NFE.

    Stochastic churn (Algorithm 2): where S_tmin ≤ σ̃_i ≤ S_tmax, the noise level is first raised to
    σ̂ = σ̃_i (1 + γ), γ = min(S_churn/steps, √2 − 1), by x̃ ← x̃ + sqrt(σ̂² − σ̃_i²) S_noise z
    (z from the run's generator), and the Heun step starts from σ̂. σ̂ is capped at σ̃(T), since the
    score is only defined on [0, T]; so the first step (at T) is never churned. NFE is unchanged.

    Args:
        S_churn: total churn; 0 (default) gives the deterministic sampler.
        S_tmin, S_tmax: σ̃ range in which churn is applied.
        S_noise: scale of the added noise (slightly > 1 compensates for denoiser bias in EDM).
        grid, rho: time grid (default ``karras``, ρ = 7).
    """

    default_grid = "karras"

    def __init__(
        self,
        S_churn: float = 0.0,
        S_tmin: float = 0.0,
        S_tmax: float = math.inf,
        S_noise: float = 1.0,
        grid: Optional[str] = None,
        rho: float = 7.0,
        eps: Optional[float] = None,
        denoise: bool = False,
    ) -> None:
        super().__init__(grid=grid, rho=rho, eps=eps, denoise=denoise)
        if S_churn < 0 or S_noise < 0:
            raise ValueError(f"S_churn and S_noise must be ≥ 0, got S_churn={S_churn}, S_noise={S_noise}")
        if not 0 <= S_tmin <= S_tmax:
            raise ValueError(f"need 0 ≤ S_tmin ≤ S_tmax, got S_tmin={S_tmin}, S_tmax={S_tmax}")
        self.S_churn = float(S_churn)
        self.S_tmin = float(S_tmin)
        self.S_tmax = float(S_tmax)
        self.S_noise = float(S_noise)

    def expected_nfe(self, steps: int) -> int:
        return 2 * steps - 1 + int(self.denoise)

    def _churn(self, x: Tensor, cur: Level, ctx: SamplingContext) -> tuple[Tensor, Level]:
        """Raise the noise level of x̃ from σ̃_i to σ̂ (Algorithm 2, lines 4–6)."""
        s = cur.sigma_tilde
        if self.S_churn == 0 or not self.S_tmin <= s <= self.S_tmax:
            return x, cur
        s_max = level(ctx.sde, ctx.state["t_max"]).sigma_tilde
        s_hat = min(s * (1.0 + min(self.S_churn / ctx.steps, math.sqrt(2.0) - 1.0)), s_max)
        if s_hat <= s:
            return x, cur
        hat = level_at_sigma_tilde(ctx.sde, s_hat, x)
        var = max(hat.sigma_tilde**2 - s**2, 0.0)
        return x + math.sqrt(var) * self.S_noise * ctx.noise(x), hat

    def begin(self, x: Tensor, ts: Tensor, ctx: SamplingContext) -> Tensor:
        ctx.state["t_max"] = ts[0]
        return x

    def step(self, x: Tensor, t_cur: Tensor, t_next: Tensor, ctx: SamplingContext) -> Tensor:
        cur, nxt = level(ctx.sde, t_cur), level(ctx.sde, t_next)
        xt, cur = self._churn(x / cur.m, cur, ctx)

        def slope(y: Tensor, lv: Level) -> Tensor:  # dx̃/dσ̃ = (x̃ − D)/σ̃
            return (y - denoise(ctx, lv.m * y, lv)[0]) / lv.sigma_tilde

        dsig = nxt.sigma_tilde - cur.sigma_tilde
        d = slope(xt, cur)
        xt_next = xt + dsig * d
        if ctx.index < ctx.steps - 1:
            xt_next = xt + 0.5 * dsig * (d + slope(xt_next, nxt))
        return nxt.m * xt_next


__all__ = ["EDMHeun"]
