"""Score networks. ``MODELS`` is the registry mirrored by ``conf/model/``.

Every model is built as ``MODELS.build(name, data_shape=(...), num_classes=int | None, **kwargs)``
(or :func:`build_model`) and is called as ``net(x [B, *data_shape], t [B], y [B] | None) -> [B, *data_shape]``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from ..registry import MODELS
from .kl_autoencoder import KLAutoencoder, kl_to_standard_normal
from .score_net import ScoreNet
from .embeddings import GaussianFourierEmbedding, LabelEmbedding, SinusoidalEmbedding, TimeEmbedding
from .mlp import MLP
from .unet import UNet
from .ncsnpp import NCSNpp



def build_model(name: str, data_shape: Sequence[int], num_classes: Optional[int] = None, **kwargs: Any) -> ScoreNet:
    """Build the registered model ``name`` for data of shape ``data_shape``.

    ``kwargs`` are the constructor arguments (e.g. the rest of ``conf/model/<name>.yaml``); list
    values from Hydra (``ListConfig``) are accepted. Unknown names raise ``ValueError`` listing the choices.
    """
    return MODELS.build(name, data_shape=tuple(int(s) for s in data_shape), num_classes=num_classes, **kwargs)


__all__ = [
    "KLAutoencoder",
    "kl_to_standard_normal",
    "MODELS",
    "build_model",
    "ScoreNet",
    "MLP",
    "UNet",
    "NCSNpp",
    "GaussianFourierEmbedding",
    "SinusoidalEmbedding",
    "TimeEmbedding",
    "LabelEmbedding",
]
