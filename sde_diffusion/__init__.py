"""sde_diffusion: score-based generative modelling with continuous-time SDEs."""
from .sdes import SDE, SDES, CosineVPSDE, LinearSDE, SubVPSDE, VESDE, VPSDE

__version__ = "0.1.0"
from .samplers import SAMPLERS, EndPoint, SampleResult, make_sampler, sample  # noqa: E402
from .toy import GaussianMixture  # noqa: E402

# Training and checkpoints pull in Lightning: imported on first use.
_LAZY = {
    "fit": "sde_diffusion.fit",
    "Task": "sde_diffusion.fit",
    "TASKS": "sde_diffusion.registry",
    "load_checkpoint": "sde_diffusion.tasks.score_matching",
    "load_classifier": "sde_diffusion.tasks.classifier",
    "load_autoencoder": "sde_diffusion.tasks.autoencoder",
    "parse_train": "sde_diffusion.config",
    "parse_sample": "sde_diffusion.config",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sde_diffusion' has no attribute {name!r}")


__all__ = ["SDE", "SDES", "LinearSDE", "VPSDE", "SubVPSDE", "CosineVPSDE", "VESDE", "SAMPLERS", "SampleResult",
           "sample", "make_sampler", "EndPoint", "GaussianMixture", *_LAZY]
