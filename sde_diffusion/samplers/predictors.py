r"""Predictors: one step of a reverse-SDE solver, usable alone or inside :mod:`~.pc`.

A predictor advances x over interval i of the run's coefficient table, from ``grid.times[i]`` to
the earlier ``grid.times[i + 1]``, and can return either the sample or
its *noise-free mean* (the step without the injected Gaussian noise). ``PREDICTORS`` maps names to
classes so the predictor–corrector sampler combines them by name:

* ``euler_maruyama``    — Euler–Maruyama on the reverse SDE (1 NFE).
* ``reverse_diffusion`` — the SDE's own discretisation run backwards (1 NFE).
* ``ancestral``         — a sample of the exact Gaussian posterior q(x_s | x_t, x̂_0) (1 NFE).
* ``none``              — identity (0 NFE), for corrector-only sampling.

All but ``none`` are also registered as stand-alone samplers under the same name. Stand-alone,
the last step returns the noise-free mean unless ``noise_free_final=False``.
"""
from __future__ import annotations

import abc
import math
from typing import Any

import torch
from torch import Tensor

from ..registry import Registry
from .sampler import SAMPLERS, SamplingContext, StepSampler
from .coeffs import GridCoeffs

PREDICTORS: Registry = Registry("predictor")


class Predictor(StepSampler):
    """A reverse step with an optional noise-free variant (see :meth:`predict`).

    Args:
        noise_free_final: return the noise-free mean on the last step (stand-alone use).
        **end: the end point (grid, rho, eps, end_sigma, denoise; :class:`~.grids.EndPoint`).
    """

    def __init__(self, noise_free_final: bool = True, **end: Any) -> None:
        super().__init__(**end)
        self.noise_free_final = bool(noise_free_final)

    @abc.abstractmethod
    def predict(self, x: Tensor, i: int, grid: GridCoeffs, ctx: SamplingContext, noise: bool = True) -> Tensor:
        """x ``[B, ...]`` at ``grid.times[i + 1]`` from x at ``grid.times[i]``; without noise the mean.

        With ``noise=False`` no random numbers are drawn from ``ctx``'s generator.
        """

    def step(self, x: Tensor, i: int, grid: GridCoeffs, ctx: SamplingContext) -> Tensor:
        last = i == grid.steps - 1
        return self.predict(x, i, grid, ctx, noise=not (last and self.noise_free_final))


@SAMPLERS.register("euler_maruyama")
@PREDICTORS.register("euler_maruyama")
class EulerMaruyama(Predictor):
    r"""Euler–Maruyama on the reverse SDE from t to t − Δt:

    .. math:: x \leftarrow x - [f(t)x - g(t)^2 s(x, t)]\,\Delta t + g(t)\sqrt{\Delta t}\, z
        = (1 - f\Delta t)\,x + g^2\Delta t\, s + g\sqrt{\Delta t}\, z.

    1 NFE per step.
    """

    def predict(self, x: Tensor, i: int, grid: GridCoeffs, ctx: SamplingContext, noise: bool = True) -> Tensor:
        dt = grid.t[i] - grid.t[i + 1]
        out = _affine(x, 1.0 - grid.f[i] * dt, ctx.score(x, grid.times[i]), grid.g2[i] * dt)
        if not noise:
            return out
        return out.add_(ctx.noise(x), alpha=math.sqrt(grid.g2[i] * dt))


@SAMPLERS.register("reverse_diffusion")
@PREDICTORS.register("reverse_diffusion")
class ReverseDiffusion(Predictor):
    r"""The forward process's one-step discretisation, reversed (Song et al. 2021, eq. 46).

    ``sde.discretize`` gives the forward step from s = t_next to t = t_cur as
    x_t = x_s + f_i + G_i z with the exact kernel: f_i = (a − 1)x, G_i = b, where
    (a, b) = ``transition_coeffs(s, t)``. The reverse step is

    .. math:: x_s = x_t - f_i + G_i^2\, s(x_t, t) + G_i\, z = (2 - a)\,x_t + b^2 s + b\, z.

    For VP, a = √(1 − β_i) and b² = β_i (DDPM's discretisation); for VE, a = 1 and
    b² = σ_t² − σ_s² (SMLD's). Using the exact kernel keeps a and b finite for any step size, so
    there is no NaN at small N. 1 NFE per step.
    """

    def predict(self, x: Tensor, i: int, grid: GridCoeffs, ctx: SamplingContext, noise: bool = True) -> Tensor:
        a, b = grid.transition(i)
        out = _affine(x, 2.0 - a, ctx.score(x, grid.times[i]), b * b)
        if not noise:
            return out
        return out.add_(ctx.noise(x), alpha=b)


@SAMPLERS.register("ancestral")
@PREDICTORS.register("ancestral")
class Ancestral(Predictor):
    r"""Ancestral sampling: draw x_s from the exact Gaussian posterior q(x_s | x_t, x_0 = x̂_0).

    For a linear SDE the forward step from s to t > s is x_t | x_s ~ N(a x_s, b² I) with
    (a, b) = ``transition_coeffs(s, t)`` (a = m_t/m_s, b² = σ_t² − a²σ_s²), and x_s | x_0 ~
    N(m_s x_0, σ_s² I). Bayes' rule gives

    .. math::
        q(x_s \mid x_t, x_0) = \mathcal N\Big(\frac{a\sigma_s^2}{\sigma_t^2}x_t
            + \frac{b^2 m_s}{\sigma_t^2}x_0,\ \frac{\sigma_s^2 b^2}{\sigma_t^2} I\Big).

    With Tweedie's x̂_0 = (x_t + σ_t² s)/m_t and m_s/m_t = 1/a the mean simplifies to
    (x_t + b² s(x_t, t))/a. For VP (a = √(1 − β_i), b² = β_i) this is DDPM's Algorithm 2 with
    the posterior variance β̃_i = β_i (1 − ᾱ_{i−1})/(1 − ᾱ_i); for VE (a = 1) it is SMLD's
    ancestral step x_s = x_t + (σ_t² − σ_s²) s + √(σ_s²(σ_t² − σ_s²)/σ_t²) z. 1 NFE per step.
    """

    def predict(self, x: Tensor, i: int, grid: GridCoeffs, ctx: SamplingContext, noise: bool = True) -> Tensor:
        a, b = grid.transition(i)
        out = _affine(x, 1.0 / a, ctx.score(x, grid.times[i]), b * b / a)
        if not noise:
            return out
        return out.add_(ctx.noise(x), alpha=grid.sigma[i + 1] * b / grid.sigma[i])


def _affine(x: Tensor, cx: float, s: Tensor, cs: float) -> Tensor:
    """cx·x + cs·s as a new tensor (two fused ops; neither input is modified)."""
    if cx == 1.0:
        return torch.add(x, s, alpha=cs)
    return torch.mul(x, cx).add_(s, alpha=cs)


@PREDICTORS.register("none")
class NonePredictor(Predictor):
    """No prediction: x is returned unchanged (0 NFE); for corrector-only sampling in ``pc``."""

    nfe_per_step = 0

    def predict(self, x: Tensor, i: int, grid: GridCoeffs, ctx: SamplingContext, noise: bool = True) -> Tensor:
        return x


__all__ = ["PREDICTORS", "Predictor", "EulerMaruyamaPredictor", "ReverseDiffusion", "Ancestral", "NonePredictor"]


# Kept for readability where the predictor role is meant.
EulerMaruyamaPredictor = EulerMaruyama
