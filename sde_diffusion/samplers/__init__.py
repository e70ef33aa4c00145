"""Reverse-time samplers behind one :func:`sample` API. ``SAMPLERS`` is mirrored by ``conf/sampler/``.

Importing this package registers every built-in sampler (and every built-in time grid in
``GRIDS``). :func:`make_sampler` turns a name (or None for the measured default) and options into
a checked sampler; the contract for writing one is in :mod:`.base`.
"""
from .sampler import SAMPLERS, SampleResult, Sampler, SamplingContext, StepSampler, build_sampler, make_sampler, sample
from .coeffs import GridCoeffs, Level
from .grids import GRIDS, EndPoint, auto_grid, time_grid
from .predictors import PREDICTORS, Ancestral, EulerMaruyama, Predictor, ReverseDiffusion
from .correctors import CORRECTORS, AnnealedLangevin, Corrector, LangevinCorrector
from .pc import PredictorCorrector
from .ode_samplers import ODEDopri5, ODEHeun, ODERK4, ODEScipy
from .torchsde_sampler import TorchSDESampler
from .ddim import DDIM
from .ddpm import DDPM
from .dpm_solver import DPMSolverPP, DPMSolverPP2S
from .dpm_solver_adaptive import AdaptiveDPMSolverPP
from .edm import EDMHeun
from .defaults import NAMED_RULES, tuned_options
from .gaussian_start import GaussianStart

__all__ = [
    "SAMPLERS",
    "SampleResult",
    "Sampler",
    "SamplingContext",
    "StepSampler",
    "build_sampler",
    "make_sampler",
    "sample",
    "EndPoint",
    "GRIDS",
    "auto_grid",
    "time_grid",
    "GridCoeffs",
    "Level",
    "PREDICTORS",
    "CORRECTORS",
    "Predictor",
    "EulerMaruyama",
    "ReverseDiffusion",
    "Ancestral",
    "Corrector",
    "LangevinCorrector",
    "AnnealedLangevin",
    "PredictorCorrector",
    "ODEHeun",
    "ODERK4",
    "ODEDopri5",
    "ODEScipy",
    "TorchSDESampler",
    "DDIM",
    "DDPM",
    "DPMSolverPP",
    "DPMSolverPP2S",
    "AdaptiveDPMSolverPP",
    "EDMHeun",
    "GaussianStart",
    "NAMED_RULES",
    "tuned_options",
]
