"""The tasks of ``python train.py``: what ``task=<name>`` (conf/task/<name>.yaml) trains.

=============  ===========================================  ==============================================
task           trains                                       function
=============  ===========================================  ==============================================
score          the score network (the default)              :func:`sde_diffusion.training.train`
classifier     a time-dependent classifier p(y | x_t, t)    :func:`sde_diffusion.classifier.train_classifier`
autoencoder    a KL-regularised autoencoder (first stage)   :func:`sde_diffusion.tasks.autoencoder.train_autoencoder`
=============  ===========================================  ==============================================

conf/task/ also holds the tasks of ``sample.py`` (:data:`~sde_diffusion.jobs.tasks.TASKS`); they
are refused here with a pointer to sample.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .tasks import TASKS as SAMPLE_TASKS

TRAIN_TASKS = ("score", "classifier", "autoencoder")


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
    """Train what ``cfg.task`` names; returns that trainer's result
    (:class:`~sde_diffusion.training.FitResult` or :class:`~sde_diffusion.classifier.ClassifierFitResult`).

    ``kwargs`` (``extra_callbacks``, ``datamodule``) go to the training function.
    """
    task = train_task_of(cfg)
    if task == "classifier":
        from ..classifier import train_classifier

        return train_classifier(cfg, output_dir, **kwargs)
    if task == "autoencoder":
        from ..tasks.autoencoder import train_autoencoder

        return train_autoencoder(cfg, output_dir, **kwargs)
    from ..training import train

    return train(cfg, output_dir, **kwargs)


__all__ = ["TRAIN_TASKS", "train_task_of", "run_training"]
