r"""Predictor–corrector sampling (Song et al. 2021, Algorithm 1).

At every grid time t_i (i = 0 … N−1, from T downwards) the corrector first runs its Langevin
updates at t_i, then the predictor steps from t_i to t_{i+1}; this is the order of the reference
code. The result after the last step is the predictor's noise-free mean when
``noise_free_final=True`` (the reference's ``denoise=True``); with ``predictor="none"`` it is the
last corrector update's mean.

NFE = N · (p + c) (+1 with ``denoise``), p = 1 for a predictor (0 for ``none``) and
c = ``n_corrector_steps`` (0 for ``corrector="none"``).

Usage::

    sample(sde, score_fn, (512, 2), sampler="pc", steps=1000,
           predictor="reverse_diffusion", corrector="langevin", snr=0.16)
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from .sampler import SAMPLERS, SamplingContext, StepSampler
from .coeffs import GridCoeffs
from .correctors import CORRECTORS, LangevinCorrector
from .predictors import PREDICTORS


@SAMPLERS.register("pc")
class PredictorCorrector(StepSampler):
    """Predictor × corrector by name.

    Args:
        predictor: a name in ``PREDICTORS`` (euler_maruyama, reverse_diffusion, ancestral, none).
        corrector: a name in ``CORRECTORS`` (langevin, annealed_langevin, none).
        snr: the corrector's target signal-to-noise ratio r > 0.
        n_corrector_steps: corrector updates per grid time (≥ 0).
        noise_free_final: return the noise-free mean after the last step.
        snr_norm: ``batch`` or ``sample`` norms in the ``langevin`` step size (see
            :class:`~.correctors.LangevinCorrector`); ignored by other correctors.
        **end: the end point (grid, rho, eps, end_sigma, denoise; :class:`~.grids.EndPoint`).
    """

    def __init__(
        self,
        predictor: str = "reverse_diffusion",
        corrector: str = "langevin",
        snr: float = 0.16,
        n_corrector_steps: int = 1,
        noise_free_final: bool = True,
        snr_norm: str = "batch",
        **end: Any,
    ) -> None:
        super().__init__(**end)
        pred_cls = PREDICTORS.get(predictor)
        corr_cls = CORRECTORS.get(corrector)
        self.predictor_name, self.corrector_name = predictor, corrector
        self.predictor = pred_cls()
        if issubclass(corr_cls, LangevinCorrector):
            self.corrector = corr_cls(snr=snr, n_steps=n_corrector_steps, snr_norm=snr_norm)
        else:
            self.corrector = corr_cls(snr=snr, n_steps=n_corrector_steps)
        self.noise_free_final = bool(noise_free_final)
        self.nfe_per_step = self.predictor.nfe_per_step + self.corrector.nfe
        if self.nfe_per_step == 0:
            raise ValueError(
                f"pc with predictor={predictor!r} and corrector={corrector!r} (n_corrector_steps="
                f"{n_corrector_steps}) never evaluates the score; choose a predictor or a corrector"
            )

    def step(self, x: Tensor, i: int, grid: GridCoeffs, ctx: SamplingContext) -> Tensor:
        want_mean = self.noise_free_final and i == grid.steps - 1
        x, x_mean = self.corrector.correct(x, i, grid, ctx)
        if self.predictor.nfe_per_step == 0:
            return x_mean if want_mean else x
        return self.predictor.predict(x, i, grid, ctx, noise=not want_mean)

    def __repr__(self) -> str:
        return (
            f"PredictorCorrector(predictor={self.predictor_name!r}, corrector={self.corrector!r}, "
            f"noise_free_final={self.noise_free_final}, {self.end_repr()})"
        )


__all__ = ["PredictorCorrector"]
