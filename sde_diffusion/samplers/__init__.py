"""Reverse-time samplers behind one :func:`sample` API. ``SAMPLERS`` is mirrored by ``conf/sampler/``."""
from .base import SAMPLERS, SampleResult, Sampler, SamplingContext, StepSampler, build_sampler, sample
from .grids import GRIDS, time_grid
from . import euler_maruyama  # noqa: F401  (registers)
from .euler_maruyama import EulerMaruyama

__all__ = [
    "SAMPLERS",
    "SampleResult",
    "Sampler",
    "SamplingContext",
    "StepSampler",
    "build_sampler",
    "sample",
    "GRIDS",
    "time_grid",
    "EulerMaruyama",
]
from . import ddim, dpm_solver, edm  # noqa: F401,E402  (register the fast solvers)
from .ddim import DDIM  # noqa: E402
from .dpm_solver import DPMSolverPP, DPMSolverPP2S  # noqa: E402
from .edm import EDMHeun  # noqa: E402
from . import ode_samplers, pc, predictors, torchsde_sampler  # noqa: F401,E402  (register the SDE-paper samplers)
from .correctors import CORRECTORS, AnnealedLangevin, Corrector, LangevinCorrector  # noqa: E402
from .ode_samplers import ODEDopri5, ODEHeun, ODERK4, ODEScipy  # noqa: E402
from .pc import PredictorCorrector  # noqa: E402
from .predictors import PREDICTORS, Ancestral, Predictor, ReverseDiffusion  # noqa: E402
from .torchsde_sampler import TorchSDESampler  # noqa: E402
__all__ += [
    "CORRECTORS",
    "PREDICTORS",
    "Corrector",
    "LangevinCorrector",
    "AnnealedLangevin",
    "Predictor",
    "ReverseDiffusion",
    "Ancestral",
    "PredictorCorrector",
    "ODEHeun",
    "ODERK4",
    "ODEDopri5",
    "ODEScipy",
    "TorchSDESampler",
]
__all__ += ["DDIM", "DPMSolverPP", "DPMSolverPP2S", "EDMHeun"]
