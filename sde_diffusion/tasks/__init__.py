"""Training tasks beyond the score network, each one LightningModule plus one ``conf/task/<name>.yaml``.

* :mod:`.autoencoder` — ``python train.py task=autoencoder``: the KL-regularised first stage of
  latent score-based models.
"""
