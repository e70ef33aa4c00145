r"""FID for real images: torchmetrics' ``FrechetInceptionDistance`` on local Inception features.

FID = ‖μ_r − μ_g‖² + tr(Σ_r + Σ_g − 2(Σ_r Σ_g)^{1/2}) over the 2048-d pool-3 features of the
TensorFlow Inception graph (see :mod:`.inception` for where the weights file comes from). The
streaming sums are accumulated by torchmetrics in float64.

Usage::

    fid = FID()                          # raises InceptionWeightsMissing with instructions if offline
    fid.update(real_images, real=True)   # [B, C, H, W] in [0, 1] (float) or uint8
    fid.update(samples, real=False)
    fid.compute()                        # float
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from .cache import PathLike
from .inception import InceptionFeatures


class FID:
    """Streaming FID between real and generated images.

    Args:
        weights_path: the Inception TorchScript file (default: the search of :mod:`.inception`).
        cache: directory searched for the file instead of the default caches.
        download: fetch the file into the cache if it is missing (needs network access).
        feature_extractor: a module mapping images in [0, 1] ``[B, C, H, W]`` to ``[B, F]`` features,
            used instead of Inception (e.g. a domain-specific network); ``weights_path``,
            ``cache`` and ``download`` are then ignored.
        reset_real_features: whether :meth:`reset` also forgets the real statistics.
    """

    def __init__(
        self,
        weights_path: Optional[PathLike] = None,
        *,
        cache: Optional[PathLike] = None,
        download: bool = False,
        feature_extractor: Optional[nn.Module] = None,
        reset_real_features: bool = True,
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        feats = feature_extractor if feature_extractor is not None else InceptionFeatures(
            weights_path, cache=cache, download=download
        )
        self.metric = FrechetInceptionDistance(feature=feats, reset_real_features=reset_real_features)
        if device is not None:
            self.metric = self.metric.to(device)

    def to(self, device: Union[str, torch.device]) -> "FID":
        self.metric = self.metric.to(device)
        return self

    def update(self, images: Tensor, real: bool) -> None:
        """Add a batch ``[B, C, H, W]`` of images in [0, 1] (or uint8 in [0, 255])."""
        if images.dim() != 4:
            raise ValueError(f"images must have shape [B, C, H, W], got {tuple(images.shape)}")
        self.metric.update(images, real=real)

    def compute(self) -> float:
        return float(self.metric.compute())

    def reset(self) -> None:
        self.metric.reset()


__all__ = ["FID"]
