"""The jobs behind ``python sample.py``: sampling, likelihood, sample-quality metrics and figures.

``run(cfg)`` runs the mode ``cfg.mode`` names (:data:`~sde_diffusion.registry.MODES`):

==========  ===================================================  ==============================
mode        what                                                 module
==========  ===================================================  ==============================
sample      n samples in resumable batches (+ guidance, tasks)   :mod:`.sample_job`
likelihood  NLL (nats) and bits/dim through the PF ODE           :mod:`.likelihood_job`
metrics     sample, then SW/MMD, digits-FD or FID vs. the data   :mod:`.metrics_job`
plots       every figure of a run (samples, paths, losses)       :mod:`.plots_job`
==========  ===================================================  ==============================

The batch jobs run in :mod:`.runner` (resumable, rank-split shards, :mod:`.shards`, on the
:mod:`.runtime` of this process); :mod:`.model` loads the checkpoints, :mod:`.conditioning` holds
the sampling tasks (sample | inpaint | colorize) and :mod:`.cli` the command line's own rules.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, Optional

from ..config import SampleConfig, parse_sample
from ..registry import MODES
from . import conditioning, likelihood_job, metrics_job, plots_job, sample_job  # noqa: F401 - they register
from .cli import drop_implied_model


def with_default_checkpoint(cfg: SampleConfig) -> SampleConfig:
    """``cfg`` with ``ckpt`` set to the newest finished score-model run under ``cfg.runs_root`` when it names none.

    Says which checkpoint it took on stdout (the job's first line). Classifier runs are never
    taken: only runs whose ``finished.json`` says ``task: score``.
    """
    if cfg.ckpt is not None:
        return cfg
    from ..checkpoints import latest_finished_run

    run_dir = latest_finished_run(cfg.runs_root, task="score")
    print(f"ckpt: {run_dir} (the newest finished training run under {cfg.runs_root}; "
          "choose another with ckpt=<run dir or .ckpt>)", flush=True)
    return replace(cfg, ckpt=str(run_dir))


def run(cfg: Any, **kwargs: Any) -> Optional[Dict[str, Any]]:
    """Run the job ``cfg.mode`` names; returns its JSON report on rank 0 (None on other ranks).

    ``cfg`` is a :class:`~sde_diffusion.config.SampleConfig` (or anything
    :func:`~sde_diffusion.config.parse_sample` takes); ``kwargs`` go to the mode (``runtime=``,
    ``on_batch_end=``).
    """
    cfg = with_default_checkpoint(parse_sample(cfg))
    return MODES.get(cfg.mode)(cfg, **kwargs)


__all__ = ["run", "with_default_checkpoint", "drop_implied_model"]
