"""Deprecated import path: the names live in :mod:`sde_diffusion.tasks.score`, :mod:`sde_diffusion.fit`,
:mod:`sde_diffusion.tasks.base` and :mod:`sde_diffusion.callbacks`; ``load_checkpoint`` and ``fit``
are also at the package root (``from sde_diffusion import load_checkpoint``)."""
from ._deprecated import forwarder

__getattr__ = forwarder(__name__, {
    "ScoreDiffusion": "sde_diffusion.tasks.score", "load_checkpoint": "sde_diffusion.tasks.score",
    "train": "sde_diffusion.tasks.score", "FitResult": "sde_diffusion.fit", "build_trainer": "sde_diffusion.fit",
    "output_dir_for": "sde_diffusion.fit", "LinearWarmup": "sde_diffusion.tasks.base",
    "adamw_with_warmup": "sde_diffusion.tasks.base", "seeded": "sde_diffusion.tasks.base",
    "step_seed": "sde_diffusion.tasks.base", "EMA": "sde_diffusion.callbacks", "eval_mode": "sde_diffusion.callbacks",
    "find_ema": "sde_diffusion.callbacks",
})
