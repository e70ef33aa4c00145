"""Time-dependent ("noisy") classifiers for classifier guidance, from one import: the networks
(:mod:`sde_diffusion.models.classifier`) and their training task (:mod:`sde_diffusion.tasks.classifier`,
``python train.py task=classifier``)::

    from sde_diffusion.classifier import load_classifier
    clf = load_classifier("outputs/classifier/digits_vp/<date>")   # run dir or .ckpt; eval mode
"""
from __future__ import annotations

from .models.classifier import CLASSIFIERS, MLPClassifier, TimeClassifier, UNetEncoderClassifier
from .tasks import classifier as _task
from .tasks.classifier import *  # noqa: F401,F403 - the task's public names (its __all__)
from .tasks.classifier import CHECKPOINT_KIND

__all__ = ["CHECKPOINT_KIND", "CLASSIFIERS", "TimeClassifier", "MLPClassifier", "UNetEncoderClassifier"] + [
    name for name in _task.__all__ if name != "train_task"
]
