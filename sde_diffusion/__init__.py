"""sde_diffusion: score-based generative modelling with continuous-time SDEs."""
from .sdes import SDE, SDES, CosineVPSDE, LinearSDE, SubVPSDE, VESDE, VPSDE

__version__ = "0.1.0"
from .samplers import SAMPLERS, SampleResult, sample
from .toy import GaussianMixture
