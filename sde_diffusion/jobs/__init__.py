"""The jobs behind ``python sample.py``: sampling, likelihood, sample-quality metrics and figures.

``run(cfg)`` dispatches on ``cfg.mode`` (``conf/sample.yaml``):

==========  ===================================================  ==============================
mode        what                                                 module
==========  ===================================================  ==============================
sample      n samples in resumable batches (+ guidance, tasks)   :mod:`.sampling`
likelihood  NLL (nats) and bits/dim through the PF ODE           :mod:`.likelihood_job`
metrics     sample, then SW/MMD, digits-FD or FID vs. the data   :mod:`.metrics_job`
plots       every figure of a run (samples, paths, losses)       :mod:`.figures`
==========  ===================================================  ==============================

:mod:`.train_tasks` dispatches ``python train.py`` on ``cfg.task`` (score | classifier).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

MODES = ("sample", "likelihood", "metrics", "plots")


def run(cfg: Mapping[str, Any], **kwargs: Any) -> Optional[Dict[str, Any]]:
    """Run the job ``cfg.mode`` asks for; returns its JSON report on rank 0 (None on other ranks)."""
    mode = str(cfg.get("mode", "sample"))
    task = cfg.get("task", "sample")
    from .tasks import TASKS

    # Checked before anything else reads (and resolves) the config: conf/task/ also holds
    # train.py's tasks, whose settings do not belong in a sampling config.
    if isinstance(task, str) and task not in TASKS:
        hint = f" (task={task} is trained by train.py)" if task in ("score", "classifier") else ""
        raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}{hint}")
    if mode == "sample":
        from .sampling import run_sample

        return run_sample(cfg, **kwargs)
    if mode == "likelihood":
        from .likelihood_job import run_likelihood

        return run_likelihood(cfg, **kwargs)
    if mode == "metrics":
        from .metrics_job import run_metrics

        return run_metrics(cfg, **kwargs)
    if mode == "plots":
        from .figures import run_plots

        return run_plots(cfg, **kwargs)
    raise ValueError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")


__all__ = ["MODES", "run"]
