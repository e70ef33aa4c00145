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

from typing import Any, Dict, Mapping, Optional, Sequence

MODES = ("sample", "likelihood", "metrics", "plots")
DEFAULT_RUNS_ROOT = "outputs/train"  # where `python train.py` writes score-model runs (conf/train.yaml run_dir)


def drop_implied_model(cfg: Any, overrides: Sequence[str]) -> Any:
    """``cfg`` without the ``model`` group unless the command line named it (``model=…`` or ``model.<key>=…``).

    A data config brings its network (``conf/data/<name>.yaml`` overrides ``model``), so
    ``sample.py data=digits`` would otherwise ask the checkpoint for that network's *default*
    settings; in sample.py the groups are checks of what the user asked for, nothing more.
    """
    keys = {str(o).split("=", 1)[0].lstrip("+~") for o in overrides}
    if cfg.get("model") is None or any(k == "model" or k.startswith("model.") for k in keys):
        return cfg
    from omegaconf import open_dict

    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.model = None
    return cfg


def with_default_checkpoint(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    """``cfg`` with ``ckpt`` set to the newest finished score-model run under ``cfg.runs_root`` when it names none.

    Says which checkpoint it took on stdout (the job's first line). Classifier runs are never
    taken: only runs whose ``finished.json`` says ``task: score``.
    """
    if cfg.get("ckpt") not in (None, "", "None"):
        return cfg
    from ..checkpoints import latest_finished_run

    root = str(cfg.get("runs_root") or DEFAULT_RUNS_ROOT)
    run_dir = latest_finished_run(root, task="score")
    print(f"ckpt: {run_dir} (the newest finished training run under {root}; choose another with ckpt=<run dir or .ckpt>)", flush=True)
    try:
        from omegaconf import DictConfig, open_dict

        if isinstance(cfg, DictConfig):
            cfg = cfg.copy()
            with open_dict(cfg):
                cfg.ckpt = str(run_dir)
            return cfg
    except ImportError:  # pragma: no cover - hydra-core is a dependency
        pass
    return {**dict(cfg), "ckpt": str(run_dir)}


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
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    cfg = with_default_checkpoint(cfg)
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


__all__ = ["MODES", "DEFAULT_RUNS_ROOT", "drop_implied_model", "with_default_checkpoint", "run"]
