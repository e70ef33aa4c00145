"""Training, from one import: the score task (:mod:`sde_diffusion.tasks.score`), the pieces every
task shares (:mod:`sde_diffusion.tasks.base`) and the EMA (:mod:`sde_diffusion.callbacks`)::

    from sde_diffusion.training import load_checkpoint, train
    module = load_checkpoint("outputs/.../checkpoints/last.ckpt")   # net = trained, ema = EMA
    score_fn = module.score_fn(use_ema=True)                        # s(x, t) = −ε_θ(x, t)/σ(t)
"""
from __future__ import annotations

from .callbacks import EMA, eval_mode, find_ema
from .tasks.base import (
    FitResult,
    LinearWarmup,
    adamw_with_warmup,
    build_trainer,
    optimizer_settings,
    output_dir_for,
    seeded,
    step_seed,
    with_run_dir,
)
from .tasks.score import ScoreDiffusion, load_checkpoint, train

__all__ = [
    "EMA",
    "optimizer_settings",
    "adamw_with_warmup",
    "ScoreDiffusion",
    "LinearWarmup",
    "FitResult",
    "load_checkpoint",
    "build_trainer",
    "output_dir_for",
    "with_run_dir",
    "train",
    "find_ema",
    "seeded",
    "step_seed",
    "eval_mode",
]
