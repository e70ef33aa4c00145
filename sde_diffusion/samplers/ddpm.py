r"""DDPM's Algorithm 2 on the discrete β_i, with DDPM's and Improved DDPM's reverse variances and respacing."""
from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor

from ..score import learned_variance_source
from ..sdes.discrete import SCHEDULES, DiscreteVP, check_variance_preserving
from ..sdes.sde import SDE, ScoreFn
from .sampler import SAMPLERS, Sampler, StepHook, _progress

VARIANCES = ("beta", "beta_tilde", "learned")


@SAMPLERS.register("ddpm")
class DDPM(Sampler):
    r"""Ancestral sampling of DDPM's discrete chain (Ho et al. 2020, Algorithm 2), exactly.

    For i = N … 1, with ε̂ = ε_θ(x_i, t_i) = −σ(t_i)·s(x_i, t_i) (the network's own noise prediction
    for a score model s = −ε_θ/σ) and z ~ N(0, I) (z = 0 at i = 1):

    .. math:: x_{i-1} = \frac{1}{\sqrt{\alpha_i}}\Big(x_i - \frac{\beta_i}{\sqrt{1-\bar\alpha_i}}\,\hat\varepsilon\Big)
              + \sigma_i z,\qquad
              \sigma_i^2 = \beta_i\ (\texttt{beta}),\ \tilde\beta_i\ (\texttt{beta\_tilde}),\ \text{or}\
              \exp(v\log\beta_i + (1-v)\log\tilde\beta_i)\ (\texttt{learned}).

    The β_i are those of :class:`~sde_diffusion.sdes.discrete.DiscreteVP` (``beta_schedule``: ``sde``, the
    exact discretisation of the process at t_i = i·T/N; ``ddpm``, β_i = β(t_i)·T/N as the discrete-time
    loss trains; or DDPM's ``linear`` / Improved DDPM's ``cosine`` schedule, whose steps the network sees
    at the time of equal log-SNR). ``steps`` < ``train_steps`` respaces the chain to that many evenly
    spaced steps (Nichol & Dhariwal), whose β'_k and β̃'_k the variances then use. The chain ends at
    x_0 = μ_θ(x_1, 1), the noise-free last step, so there is no end time or extra denoising step.
    ``learned`` needs a network trained with ``model.learn_sigma=true`` (its v output, read from the
    same evaluation, so it costs no extra NFE). Runs on variance-preserving processes only.

    Args:
        variance: ``beta`` | ``beta_tilde`` | ``learned``.
        beta_schedule: ``sde`` | ``ddpm`` | ``linear`` | ``cosine``.
        train_steps: N of the chain before respacing (``steps`` ≤ N).

    NFE = steps.
    """

    default_grid = None

    def __init__(self, variance: str = "beta_tilde", beta_schedule: str = "sde", train_steps: int = 1000, **end: Any) -> None:
        super().__init__(**end)
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}; choose one of: {', '.join(VARIANCES)}")
        if beta_schedule not in SCHEDULES:
            raise ValueError(f"unknown beta_schedule {beta_schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        if isinstance(train_steps, bool) or int(train_steps) != train_steps or train_steps < 1:
            raise ValueError(f"train_steps must be an integer >= 1, got {train_steps!r}")
        if self.end.eps is not None or self.end.end_sigma is not None or self.end.denoise:
            raise ValueError("ddpm ends at x_0 = mu_theta(x_1, 1) (Algorithm 2's noise-free last step): "
                             "it takes no eps, end_sigma or denoise")
        self.variance = variance
        self.beta_schedule = beta_schedule
        self.train_steps = int(train_steps)

    def validate(self, sde: SDE) -> None:
        check_variance_preserving(sde, "sampler=ddpm")

    def process(self, sde: SDE, steps: int) -> DiscreteVP:
        """The (respaced) chain a run of ``steps`` steps walks down."""
        if steps > self.train_steps:
            raise ValueError(f"sampler=ddpm takes at most train_steps={self.train_steps} steps, got steps={steps}; "
                             f"lower steps or raise sampler.train_steps")
        return DiscreteVP.build(self.beta_schedule, sde, self.train_steps).respace(steps)

    def run(
        self,
        sde: SDE,
        score_fn: ScoreFn,
        x: Tensor,
        steps: int,
        generator: Optional[torch.Generator] = None,
        progress: bool = False,
        record: bool = False,
        hook: Optional[StepHook] = None,
    ) -> Tuple[Tensor, Optional[List[Tensor]], Optional[Tensor]]:
        proc = self.process(sde, steps)
        source = learned_variance_source(score_fn)
        if self.variance == "learned" and source is None:
            raise ValueError("variance='learned' needs a network trained with model.learn_sigma=true (it outputs the "
                             "variance interpolation v); use variance=beta or beta_tilde with this model")
        t64 = proc.network_times(sde)
        sigma_t = sde.marginal_std(t64).tolist()
        times = torch.cat([t64.flip(0), torch.zeros(1, dtype=torch.float64)]).to(x.device, x.dtype)  # t_K .. t_1, 0
        K = proc.N
        beta, alpha = proc.beta.tolist(), torch.exp(proc.log_alpha).tolist()
        noise_coef = (proc.beta / torch.sqrt(proc.one_minus_alpha_bar)).tolist()
        fixed_std = None if self.variance == "learned" else proc.variance(self.variance)[0].sqrt().tolist()
        traj = [x] if record else None
        for n in _progress(range(K), progress, "DDPM"):
            k = K - 1 - n  # 0-based step index: x_{k+1} -> x_k
            t = times[n].expand(x.shape[0])
            eps_hat = sde_eps(score_fn(x, t), sigma_t[k])
            x_next = torch.add(x, eps_hat, alpha=-noise_coef[k]).mul_(1.0 / math.sqrt(alpha[k]))
            if k > 0:
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                if fixed_std is not None:
                    x_next.add_(z, alpha=fixed_std[k])
                else:
                    frac = source.last_frac.to(x.dtype)
                    var, _ = proc.variance("learned", frac=frac, index=k)
                    x_next.add_(var.sqrt() * z)
            x = x_next
            if hook is not None:
                x = hook(x, times[n + 1])
            if traj is not None:
                traj.append(x)
        return x, traj, times


def sde_eps(score: Tensor, sigma: float) -> Tensor:
    """ε̂ = −σ(t)·s(x, t): a score model's noise prediction."""
    return score.mul(-sigma)


__all__ = ["DDPM", "VARIANCES"]
