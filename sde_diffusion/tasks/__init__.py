"""The training tasks of ``python train.py task=<name>``, one module each, with one ``conf/task/<name>.yaml``:

=============  ===========================================  ==============================
task           trains                                       module
=============  ===========================================  ==============================
score          the score network by DSM (the default)       :mod:`.score`
classifier     a time-dependent classifier p(y | x_t, t)    :mod:`.classifier`
autoencoder    a KL-regularised autoencoder (first stage)   :mod:`.autoencoder`
=============  ===========================================  ==============================

Each module holds one LightningModule and one :class:`~sde_diffusion.fit.Task`, registered in
``TASKS`` by a decorator; :func:`sde_diffusion.fit.fit` trains any of them and
:func:`sde_diffusion.checkpoints.load` loads their checkpoints by the task's name. :mod:`.base`
holds what the modules share (optimiser, seeded draws, the latent codec). Networks live in
:mod:`sde_diffusion.models`.
"""
from ..registry import TASKS
from . import autoencoder, classifier, score_matching  # noqa: F401  (each registers its task)

__all__ = ["TASKS"]
