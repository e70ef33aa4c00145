"""The tasks of ``python train.py``: ``task=<name>`` runs ``sde_diffusion.tasks.<name>.train_task``
(see :mod:`sde_diffusion.tasks`; the task list is discovered from that package).

conf/task/ also holds the tasks of ``sample.py`` (:data:`~sde_diffusion.jobs.tasks.TASKS`); they
are refused here with a pointer to sample.py.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any, Mapping, Optional, Tuple, Union

from .tasks import TASKS as SAMPLE_TASKS


def _discover() -> Tuple[str, ...]:
    """Every module of :mod:`sde_diffusion.tasks` but ``base``: a new task is one module (with a
    ``train_task(cfg, output_dir, **kwargs)``) plus one ``conf/task/<name>.yaml``."""
    from .. import tasks

    return tuple(sorted(m.name for m in pkgutil.iter_modules(tasks.__path__) if m.name != "base"))


TRAIN_TASKS = _discover()


def train_task_of(cfg: Mapping[str, Any]) -> str:
    """The task ``cfg`` asks for (``score`` when it names none); ValueError for any other than :data:`TRAIN_TASKS`."""
    task = cfg.get("task")
    if task is None:
        return "score"
    task = str(task)
    if task in TRAIN_TASKS:
        return task
    hint = (
        f"; task={task} is a sampling task: run `python sample.py ckpt=<run> task={task}` on a trained model"
        if task in SAMPLE_TASKS
        else ""
    )
    raise ValueError(f"train.py cannot run task={task}: choose one of {', '.join(TRAIN_TASKS)}{hint}")


def run_training(cfg: Any, output_dir: Optional[Union[str, Path]] = None, **kwargs: Any) -> Any:
    """Train what ``cfg.task`` names with ``sde_diffusion.tasks.<task>.train_task``; returns its result
    (a :class:`~sde_diffusion.tasks.base.FitResult`).

    ``kwargs`` (``extra_callbacks``, ``datamodule``) go to the training function.
    """
    module = importlib.import_module(f"sde_diffusion.tasks.{train_task_of(cfg)}")
    return module.train_task(cfg, output_dir, **kwargs)


__all__ = ["TRAIN_TASKS", "train_task_of", "run_training"]
