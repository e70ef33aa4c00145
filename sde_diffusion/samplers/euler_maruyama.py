"""Euler–Maruyama on the reverse-time SDE."""
from __future__ import annotations

import torch
from torch import Tensor

from ..sdes.base import broadcast_to_x
from .base import SAMPLERS, SamplingContext, StepSampler


@SAMPLERS.register("euler_maruyama")
class EulerMaruyama(StepSampler):
    r"""One Euler–Maruyama step of the reverse SDE from t to t − Δt (Δt > 0):

    .. math:: x \leftarrow x - [f(t)x - g(t)^2 s(x, t)]\,\Delta t + g(t)\sqrt{\Delta t}\, z.

    The noise is omitted on the last step (its variance would only blur the output). 1 NFE per step.
    """

    def step(self, x: Tensor, t_cur: Tensor, t_next: Tensor, ctx: SamplingContext) -> Tensor:
        dt = t_cur - t_next
        f = broadcast_to_x(ctx.sde.drift_coeff(t_cur), x)
        g = ctx.sde.diffusion(t_cur)
        x_mean = x - (f * x - g**2 * ctx.score(x, t_cur)) * dt
        if ctx.index == ctx.steps - 1:
            return x_mean
        return x_mean + g * torch.sqrt(dt) * ctx.noise(x)
