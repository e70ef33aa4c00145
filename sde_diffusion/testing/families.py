r"""Test problems with exact ground truth: Gaussian mixtures whose perturbed score is known.

For p_0 = Σ_k w_k N(μ_k, Σ_k) and a linear SDE with kernel N(m x_0, σ² I), every marginal
p_t = Σ_k w_k N(m μ_k, m²Σ_k + σ² I) is known in closed form
(:class:`~sde_diffusion.toy.GaussianMixture`), so a sampler fed the exact score can be judged
against p_0 itself.

* :func:`random_family` — one draw, fixed by its seed, from a family of problems nobody tuned for
  (dimension 2–256, 2–12 modes, weights up to 1:50, scales 1:100; see :mod:`.draws`);
* :func:`grid_mixture` — a 2-D lattice of modes with unequal weights;
* :func:`make_problems` — the fixed benchmark problems (ring8, grid25, gmm16, gmm64), each with
  its sample sizes and a VE σ_max;
* :func:`make_sde` — the processes a problem is run on (VP, sub-VP, VE with a given σ_max, and the
  :data:`OTHER_SDE_NAMES` with other parameters);
* :func:`marginal_sample` — an exact draw of p_t (a start x_T that is not the prior's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict

import torch
from torch import Tensor

from ..sdes import CosineVPSDE, LinearSDE, SubVPSDE, VESDE, VPSDE
from ..sdes.sde import SDE
from ..toy import GaussianMixture
from .draws import random_family_parameters, wide_family_parameters


def random_family(seed: int) -> GaussianMixture:
    """Draw ``seed`` of the random problem family (:mod:`sde_diffusion.testing.draws` states it).

    Its extent, a VE σ_max for it, is :meth:`GaussianMixture.diameter`.
    """
    return GaussianMixture(*random_family_parameters(seed))


def wide_family(seed: int) -> GaussianMixture:
    """Draw ``seed`` of the wider family: half the original family, half many sharp modes (2–64) in
    2–8 D on lattices, rings and scatters (:func:`~sde_diffusion.testing.draws.wide_family_parameters`)."""
    return GaussianMixture(*wide_family_parameters(seed))


def grid_mixture(side: int = 5, spacing: float = 2.5, std: float = 0.25, weight_ratio: float = 20.0) -> GaussianMixture:
    """``side²`` isotropic 2-D modes on a centred square lattice; weights grow geometrically along
    the row-major order so that the heaviest mode is ``weight_ratio`` times the lightest."""
    k = side * side
    ij = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(k, 2)
    means = spacing * (ij.to(torch.float64) - (side - 1) / 2)
    weights = torch.exp(torch.linspace(0.0, math.log(weight_ratio), k, dtype=torch.float64))
    # A fixed shuffle so that heavy and light modes are neighbours, not sorted by position.
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(7))
    return GaussianMixture(weights[perm], means, torch.full((k,), std**2, dtype=torch.float64))


@dataclass
class Problem:
    """A target mixture, its sample sizes and the VE σ_max suited to it (≈ its diameter)."""

    name: str
    description: str
    mixture: GaussianMixture
    n_full: int
    n_quick: int
    ve_sigma_max: float


def make_problems() -> Dict[str, Problem]:
    """The benchmark problems, in reporting order."""
    return {
        "ring8": Problem(
            "ring8", "2-D, 8 equal isotropic modes on a circle of radius 4, std 0.3",
            GaussianMixture.ring(k=8, radius=4.0, std=0.3), 5000, 1000, 10.0,
        ),
        "grid25": Problem(
            "grid25", "2-D, 5×5 lattice (spacing 2.5, std 0.25), weights spanning 1:20",
            grid_mixture(), 5000, 1000, 15.0,
        ),
        "gmm16": Problem(
            "gmm16", "16-D, 10 full-covariance modes, stds 0.1–1 (GaussianMixture.random seed 1)",
            GaussianMixture.random(16, 10, seed=1, mean_scale=3.0, std_range=(0.1, 1.0)), 5000, 1000, 30.0,
        ),
        "gmm64": Problem(
            "gmm64", "64-D, 8 full-covariance modes, stds 0.02–2 (GaussianMixture.random seed 2)",
            GaussianMixture.random(64, 8, seed=2, mean_scale=3.0, std_range=(0.02, 2.0)), 3000, 1500, 50.0,
        ),
    }


SDE_NAMES = ("vp", "subvp", "ve")
#: Processes with parameters other than the library's defaults, as users set them: the cosine VP schedule, VP with
#: β ∈ [0.05, 10] (σ̃(T) = 12 instead of 152), a user's LinearSDE with a constant β = 8 (the LinearSDE docstring's
#: example; its lowest noise level σ̃(eps) = 0.009), VE on EDM's σ range 0.002–80 whatever the data's scale, and VE
#: with the reference code's kernel (``exact_kernel=False``: σ(0) = σ_min = 0.01).
OTHER_SDE_NAMES = ("cosine", "vp_beta10", "linear_beta8", "ve_edm", "ve_ref")


class ConstantBetaSDE(LinearSDE):
    """dx = −½β x dt + √β dw with a constant β, written as a user would subclass :class:`LinearSDE`."""

    def __init__(self, beta: float = 8.0, **kw: Any) -> None:
        super().__init__(**kw)
        self.beta = float(beta)

    def f(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta * torch.ones_like(t)

    def g(self, t: Tensor) -> Tensor:
        return math.sqrt(self.beta) * torch.ones_like(t)


_MAKERS: Dict[str, Callable[[float], SDE]] = {
    "vp": lambda d: VPSDE(),
    "subvp": lambda d: SubVPSDE(),
    "ve": lambda d: VESDE(sigma_min=0.01, sigma_max=float(d)),
    "cosine": lambda d: CosineVPSDE(),
    "vp_beta10": lambda d: VPSDE(beta_min=0.05, beta_max=10.0),
    "linear_beta8": lambda d: ConstantBetaSDE(8.0),
    "ve_edm": lambda d: VESDE(sigma_min=0.002, sigma_max=80.0),
    "ve_ref": lambda d: VESDE(sigma_min=0.01, sigma_max=float(d), exact_kernel=False),
}


def make_sde(name: str, ve_sigma_max: float) -> SDE:
    """VP and sub-VP with the library defaults; VE with σ_min = 0.01 and σ_max = ``ve_sigma_max``
    (a problem's ``ve_sigma_max``, or a mixture's :meth:`~GaussianMixture.diameter`); or one of
    :data:`OTHER_SDE_NAMES`."""
    if name not in _MAKERS:
        raise ValueError(f"unknown SDE {name!r}; choose one of: {', '.join(SDE_NAMES + OTHER_SDE_NAMES)}")
    return _MAKERS[name](ve_sigma_max)


def marginal_sample(mixture: GaussianMixture, sde: SDE, n: int, t: float, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """Exact draw from p_t: m(t) x_0 + σ(t) z with x_0 ~ p_0 (float64 arithmetic, cast to ``dtype``)."""
    x0 = mixture.sample(n, generator=generator)
    z = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    tt = torch.tensor(t, dtype=torch.float64)
    return (sde.mean_coeff(tt) * x0 + sde.marginal_std(tt) * z).to(dtype)


__all__ = [
    "random_family",
    "wide_family",
    "grid_mixture",
    "Problem",
    "make_problems",
    "SDE_NAMES",
    "OTHER_SDE_NAMES",
    "ConstantBetaSDE",
    "make_sde",
    "marginal_sample",
]
