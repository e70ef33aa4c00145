r"""EDM's 2nd-order Heun sampler (Karras et al. 2022, Algorithms 1 and 2) for any linear SDE."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from .sampler import SAMPLERS, SamplingContext, StepSampler
from .coeffs import GridCoeffs, Level, levels_at_lambda, sigma_tilde_to_lambda


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
        **end: the end point (:class:`~.grids.EndPoint`); the grid defaults to ``karras``, ρ = 7.
    """

    order = 2
    nfe_per_step = 2  # the last step's one evaluation is in expected_nfe

    default_grid = "karras"

    def __init__(
        self,
        S_churn: float = 0.0,
        S_tmin: float = 0.0,
        S_tmax: float = math.inf,
        S_noise: float = 1.0,
        **end: Any,
    ) -> None:
        super().__init__(**end)
        if S_churn < 0 or S_noise < 0:
            raise ValueError(f"S_churn and S_noise must be ≥ 0, got S_churn={S_churn}, S_noise={S_noise}")
        if not 0 <= S_tmin <= S_tmax:
            raise ValueError(f"need 0 ≤ S_tmin ≤ S_tmax, got S_tmin={S_tmin}, S_tmax={S_tmax}")
        self.S_churn = float(S_churn)
        self.S_tmin = float(S_tmin)
        self.S_tmax = float(S_tmax)
        self.S_noise = float(S_noise)

    def expected_nfe(self, steps: int) -> int:
        return 2 * steps - 1 + int(self.end.denoise)

    def _churn_levels(self, grid: GridCoeffs, ctx: SamplingContext, x: Tensor) -> List[Optional[Level]]:
        """σ̂ levels of Algorithm 2, lines 4–6, for every step (None: no churn), computed at once."""
        levels, steps = grid.levels, grid.steps
        s_max = levels[0].sigma_tilde
        gamma = min(self.S_churn / steps, math.sqrt(2.0) - 1.0)
        want: Dict[int, float] = {}
        for i in range(steps):
            s = levels[i].sigma_tilde
            if self.S_churn == 0 or not self.S_tmin <= s <= self.S_tmax:
                continue
            s_hat = min(s * (1.0 + gamma), s_max)
            if s_hat > s:
                want[i] = s_hat
        hats = levels_at_lambda(ctx.sde, [sigma_tilde_to_lambda(v) for v in want.values()], x)
        out: List[Optional[Level]] = [None] * steps
        for i, hat in zip(want, hats):
            out[i] = hat
        return out

    def begin(self, x: Tensor, grid: GridCoeffs, ctx: SamplingContext) -> Tensor:
        ctx.state["churn"] = self._churn_levels(grid, ctx, x) if self.S_churn > 0 else None
        return x

    def step(self, x: Tensor, i: int, grid: GridCoeffs, ctx: SamplingContext) -> Tensor:
        # The slope dx̃/dσ̃ = (x̃ − D(x̃, σ̃))/σ̃ equals ε̂ = −σ(t) s(m x̃, t): no division by σ̃ is needed.
        cur, nxt = grid.levels[i], grid.levels[i + 1]
        churn = ctx.state.get("churn")
        hat = churn[i] if churn is not None else None
        if hat is not None:
            # Raise the noise level of x̃ = x/m from σ̃_i to σ̂, then step from σ̂ (Algorithm 2).
            var = max(hat.sigma_tilde**2 - cur.sigma_tilde**2, 0.0)
            xt = torch.mul(x, 1.0 / cur.m).add_(ctx.noise(x), alpha=math.sqrt(var) * self.S_noise)
            cur = hat
            x_in = xt * cur.m
        else:
            xt = x if cur.m == 1.0 else x * (1.0 / cur.m)
            x_in = x
        dsig = nxt.sigma_tilde - cur.sigma_tilde
        s1 = ctx.score(x_in, cur.t)
        if i == grid.steps - 1:  # Euler on the last step
            out = torch.add(xt, s1, alpha=-dsig * cur.sigma)
        else:
            x_pred = torch.add(xt, s1, alpha=-dsig * cur.sigma)
            s2 = ctx.score(x_pred if nxt.m == 1.0 else x_pred.mul_(nxt.m), nxt.t)
            out = torch.add(xt, s1, alpha=-0.5 * dsig * cur.sigma).add_(s2, alpha=-0.5 * dsig * nxt.sigma)
        return out if nxt.m == 1.0 else out.mul_(nxt.m)


__all__ = ["EDMHeun"]
