r"""Correctors: score-based MCMC at a fixed time t, used by the predictor–corrector sampler.

Every corrector runs ``n_steps`` Langevin updates at time t (1 NFE each)

.. math:: x \leftarrow x + \delta\, s(x, t) + \sqrt{2\delta}\, z,\qquad z \sim \mathcal N(0, I),

and differs only in the step size δ:

* ``langevin``          — signal-to-noise-ratio rule (Song et al. 2021, Algorithms 4–5):
  δ = 2 α (r ‖z‖/‖s‖)².
* ``annealed_langevin`` — SMLD's annealed Langevin dynamics, δ ∝ σ(t)²: δ = 2 α (r σ(t))².
* ``none``              — no correction (0 NFE).

r is the target signal-to-noise ratio ``snr``. α = (m(t)/m(t'))² is the one-step ratio of the
signal power between t and the next grid time t' < t: for VP it is ᾱ(t)/ᾱ(t') ≈ 1 − β_i, the
discrete α_i of the reference implementation; for VE (m = 1) it is 1. (Applied to every linear
SDE alike, so sub-VP gets the same α as VP, where the reference uses 1.)
"""
from __future__ import annotations

import abc
import math
from typing import Tuple, Union

import torch
from torch import Tensor

from ..registry import Registry
from ..sdes.sde import broadcast_to_x
from .sampler import SamplingContext
from .coeffs import GridCoeffs

CORRECTORS: Registry = Registry("corrector")

SNR_NORMS = ("batch", "sample")


class Corrector(abc.ABC):
    """Base corrector: ``n_steps`` Langevin updates at the time ``grid.times[i]`` of a step.

    Args:
        snr: target signal-to-noise ratio r > 0.
        n_steps: Langevin updates per call (≥ 0); each costs 1 NFE.
    """

    def __init__(self, snr: float = 0.16, n_steps: int = 1) -> None:
        if not (isinstance(snr, (int, float)) and math.isfinite(snr) and snr > 0):
            raise ValueError(f"snr must be a positive number, got snr={snr!r}")
        if int(n_steps) != n_steps or n_steps < 0:
            raise ValueError(f"n_corrector_steps must be an integer ≥ 0, got {n_steps!r}")
        self.snr = float(snr)
        self.n_steps = int(n_steps)

    @property
    def nfe(self) -> int:
        """Score evaluations per call."""
        return self.n_steps

    @staticmethod
    def alpha(i: int, grid: GridCoeffs) -> float:
        """α = (m(t_i)/m(t_{i+1}))², the one-step signal ratio (1 for VE)."""
        return (grid.m[i] / grid.m[i + 1]) ** 2

    @abc.abstractmethod
    def step_size(self, score: Tensor, z: Tensor, alpha: float, sigma: float) -> Union[Tensor, float]:
        """δ from the score and noise ``[B, ...]``, α and σ(t): a float, a 0-dim tensor or ``[B]`` sizes."""

    def correct(self, x: Tensor, i: int, grid: GridCoeffs, ctx: SamplingContext) -> Tuple[Tensor, Tensor]:
        """Run the updates at ``grid.times[i]`` on x ``[B, ...]``; return (x, x_mean), both ``[B, ...]``,
        x_mean being the last update without noise."""
        x_mean = x
        if self.n_steps == 0:
            return x, x_mean
        t, alpha, sigma = grid.times[i], self.alpha(i, grid), grid.sigma[i]
        for _ in range(self.n_steps):
            s = ctx.score(x, t)
            z = ctx.noise(x)
            delta = self.step_size(s, z, alpha, sigma)
            if isinstance(delta, float):
                x_mean = torch.add(x, s, alpha=delta)
                x = torch.add(x_mean, z, alpha=math.sqrt(2 * delta))
            else:
                delta = broadcast_to_x(delta, x)
                x_mean = torch.addcmul(x, delta, s)
                x = torch.addcmul(x_mean, delta.mul(2).sqrt_(), z)
        return x, x_mean

    def __repr__(self) -> str:
        return f"{type(self).__name__}(snr={self.snr}, n_steps={self.n_steps})"


@CORRECTORS.register("langevin")
class LangevinCorrector(Corrector):
    r"""Langevin MCMC with δ = 2 α (r ‖z‖/‖s‖)² (Song et al. 2021, Algorithm 5 for VP, 4 for VE).

    Args:
        snr_norm: ``"batch"`` (default, as the reference code): ‖z‖ and ‖s‖ are per-sample norms
            averaged over the batch, so one δ is shared by the batch — robust when a sample's
            score happens to be tiny (δ would explode for that sample alone, notably in low
            dimensions), but a sample's update depends on the rest of the batch. ``"sample"``: δ
            per sample from its own norms — batch-independent, best in high dimensions where the
            norms concentrate.
    """

    def __init__(self, snr: float = 0.16, n_steps: int = 1, snr_norm: str = "batch") -> None:
        super().__init__(snr=snr, n_steps=n_steps)
        if snr_norm not in SNR_NORMS:
            raise ValueError(f"unknown snr_norm {snr_norm!r}; choose one of: {', '.join(SNR_NORMS)}")
        self.snr_norm = snr_norm

    def step_size(self, score: Tensor, z: Tensor, alpha: float, sigma: float) -> Tensor:
        B = score.shape[0]
        s_norm = torch.linalg.vector_norm(score.reshape(B, -1), dim=1)
        z_norm = torch.linalg.vector_norm(z.reshape(B, -1), dim=1)
        if self.snr_norm == "batch":
            s_norm, z_norm = s_norm.mean(), z_norm.mean()
        # A zero score (exactly at a mode) would give an infinite step; the floor keeps it finite.
        tiny = torch.finfo(score.dtype).tiny
        # Stays on the device (no host sync): δ = 2α r² (‖z‖/‖s‖)².
        ratio = z_norm.div_(s_norm.clamp_(min=tiny ** 0.5))
        return ratio.square_().mul_(2 * alpha * self.snr**2)


@CORRECTORS.register("annealed_langevin")
class AnnealedLangevin(Corrector):
    r"""SMLD's annealed Langevin dynamics: δ = 2 α (r σ(t))², the step ∝ σ² of Song & Ermon (2019)."""

    def step_size(self, score: Tensor, z: Tensor, alpha: float, sigma: float) -> float:
        return 2 * alpha * (self.snr * sigma) ** 2


@CORRECTORS.register("none")
class NoneCorrector(Corrector):
    """No correction (0 NFE); ``n_steps`` is ignored."""

    def __init__(self, snr: float = 0.16, n_steps: int = 1) -> None:
        super().__init__(snr=snr, n_steps=n_steps)
        self.n_steps = 0

    def step_size(self, score: Tensor, z: Tensor, alpha: float, sigma: float) -> float:
        raise RuntimeError("the 'none' corrector takes no step")


__all__ = ["CORRECTORS", "SNR_NORMS", "Corrector", "LangevinCorrector", "AnnealedLangevin", "NoneCorrector"]
