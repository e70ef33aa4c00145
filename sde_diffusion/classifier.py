"""Time-dependent ("noisy") classifiers for classifier guidance, from one import: the networks
(:mod:`sde_diffusion.models.classifier`) and their training task (:mod:`sde_diffusion.tasks.classifier`,
``python train.py task=classifier``)::

    from sde_diffusion.classifier import load_classifier
    clf = load_classifier("outputs/classifier/digits_vp/<date>")   # run dir or .ckpt; eval mode
"""
from __future__ import annotations

from .models.classifier import CLASSIFIERS, MLPClassifier, TimeClassifier, UNetEncoderClassifier
from .tasks.classifier import (
    CHECKPOINT_KIND,
    BucketAccuracy,
    ClassifierFitResult,
    ClassifierOptions,
    NoisyClassifier,
    accuracy_by_time,
    bucket_edges,
    build_classifier_network,
    classifier_network_config,
    format_accuracy_table,
    load_classifier,
    train_classifier,
)

__all__ = [
    "CHECKPOINT_KIND",
    "CLASSIFIERS",
    "TimeClassifier",
    "MLPClassifier",
    "UNetEncoderClassifier",
    "ClassifierOptions",
    "classifier_network_config",
    "build_classifier_network",
    "BucketAccuracy",
    "bucket_edges",
    "accuracy_by_time",
    "format_accuracy_table",
    "NoisyClassifier",
    "load_classifier",
    "ClassifierFitResult",
    "train_classifier",
]
