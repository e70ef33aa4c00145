"""The training tasks of ``python train.py task=<name>``, one module each, with one ``conf/task/<name>.yaml``:

=============  ===========================================  ==============================
task           trains                                       module
=============  ===========================================  ==============================
score          the score network by DSM (the default)       :mod:`.score`
classifier     a time-dependent classifier p(y | x_t, t)    :mod:`.classifier`
autoencoder    a KL-regularised autoencoder (first stage)   :mod:`.autoencoder`
=============  ===========================================  ==============================

Each module defines ``train_task(cfg, output_dir=None, *, extra_callbacks=(), datamodule=None)``;
:mod:`.base` holds what they share (optimiser, seeded draws, Trainer builder, output directory).
Networks live in :mod:`sde_diffusion.models`.
"""
