"""Deprecated import path: the names live in :mod:`sde_diffusion.tasks.classifier` (the task) and
:mod:`sde_diffusion.models.classifier` (the networks); ``load_classifier`` is also at the package
root (``from sde_diffusion import load_classifier``)."""
from ._deprecated import forwarder

__getattr__ = forwarder(__name__, {
    **{name: "sde_diffusion.models.classifier"
       for name in ("CLASSIFIERS", "TimeClassifier", "MLPClassifier", "UNetEncoderClassifier")},
    **{name: "sde_diffusion.tasks.classifier"
       for name in ("CHECKPOINT_KIND", "ClassifierOptions", "ClassifierTask", "classifier_network_config",
                    "build_classifier_network", "BucketAccuracy", "bucket_edges", "accuracy_by_time",
                    "format_accuracy_table", "NoisyClassifier", "load_classifier", "train_classifier")},
})
