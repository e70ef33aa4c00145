"""Test problems and sample-quality metrics built on exact Gaussian-mixture scores.

Ground truth for tests and benchmarks, not needed to train or sample:

* :mod:`.families` — problem families with exact scores (:func:`random_family`,
  :func:`grid_mixture`, the benchmark problems of :func:`make_problems`), the processes they run
  on (:func:`make_sde`) and exact draws of p_t (:func:`marginal_sample`);
* :mod:`.mixture_metrics` — distances of samples from the true mixture (:func:`whitened_moment_kl`,
  :func:`moment_kl`, :func:`sliced_w2`, :func:`excess_cross_entropy`) and their noise floors
  (:class:`Truth`).

The mixture itself, with its perturbed densities and scores, is the library's
:class:`sde_diffusion.toy.GaussianMixture`.
"""
from .draws import random_family_parameters
from .families import OTHER_SDE_NAMES, SDE_NAMES, ConstantBetaSDE, Problem, grid_mixture, make_problems, make_sde, marginal_sample, random_family, wide_family
from .mixture_metrics import (
    METRIC_LABELS,
    METRICS,
    Truth,
    entropy_mc,
    excess_cross_entropy,
    gaussian_kl,
    moment_kl,
    projections,
    reference_quantiles,
    sliced_w2,
    whitened_moment_kl,
)

__all__ = [
    "random_family",
    "random_family_parameters",
    "grid_mixture",
    "Problem",
    "make_problems",
    "SDE_NAMES",
    "OTHER_SDE_NAMES",
    "ConstantBetaSDE",
    "make_sde",
    "wide_family",
    "marginal_sample",
    "whitened_moment_kl",
    "gaussian_kl",
    "moment_kl",
    "projections",
    "reference_quantiles",
    "sliced_w2",
    "excess_cross_entropy",
    "entropy_mc",
    "METRICS",
    "METRIC_LABELS",
    "Truth",
]
