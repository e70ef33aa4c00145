"""The embedded default image set: scikit-learn's 8×8 handwritten digits (1797 images, 10 classes).

Shipped as ``sde_diffusion/data/assets/digits.npz`` (``images`` uint8 ``[1797, 8, 8]`` with values
0..16, ``labels`` int64 ``[1797]``) and read through ``importlib.resources``, so it works from a
source checkout, an installed wheel or a zipped package, with no download and no scikit-learn.

Pixel scaling (17 levels): x₀₁ = v / 16, or (v + u) / 17 with ``uniform_dequantization``; the
model range is 2 x₀₁ − 1 when ``centered``.

``size`` > 8 upsamples every image once, when the splits are built: bilinear (align_corners=False)
to ``size × size``, rounded back to the 17 integer levels, so the larger images are still discrete
data with the same ``levels`` (bits/dim stay well defined) and sharper than pixel replication.
"""
from __future__ import annotations

import io
from importlib import resources
from typing import Any, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .datamodule import ImageDataModule, TensorPairDataset, split_indices
from ..registry import DATASETS

DIGITS_PACKAGE = "sde_diffusion.data"
DIGITS_RESOURCE = ("assets", "digits.npz")
DIGITS_LEVELS = 17  # pixel values 0..16


def digits_resource() -> Any:
    """The packaged ``digits.npz`` as an ``importlib.resources`` Traversable (``read_bytes()``)."""
    res = resources.files(DIGITS_PACKAGE)
    for part in DIGITS_RESOURCE:
        res = res / part
    return res


def upsample_digits(images: Tensor, size: int) -> Tensor:
    """uint8 ``[N, 8, 8]`` (values 0..16) → uint8 ``[N, size, size]``, bilinear, rounded to the 17 levels."""
    if size == images.shape[-1]:
        return images
    up = F.interpolate(images[:, None].to(torch.float32), size=(size, size), mode="bilinear", align_corners=False)
    return up[:, 0].round_().clamp_(0, DIGITS_LEVELS - 1).to(torch.uint8)


def load_digits() -> Tuple[Tensor, Tensor]:
    """The full digits set, no Lightning needed.

    Returns:
        images: uint8 ``[1797, 8, 8]``, values 0..16 (0 = background).
        labels: int64 ``[1797]``, values 0..9.
    """
    # Read into memory first: a resource inside a zip archive is not necessarily seekable.
    data = digits_resource().read_bytes()
    with np.load(io.BytesIO(data)) as npz:
        images = np.asarray(npz["images"], dtype=np.uint8)
        labels = np.asarray(npz["labels"], dtype=np.int64)
    if images.ndim != 3 or images.shape[1:] != (8, 8) or labels.shape != (images.shape[0],):
        raise ValueError(f"corrupt digits asset: images {images.shape}, labels {labels.shape}")
    return torch.from_numpy(images), torch.from_numpy(labels)


@DATASETS.register("digits")
class DigitsDataModule(ImageDataModule):
    """8×8 digits as 1×size×size images in model range, labels 0..9; a seeded train/val split.

    Args:
        size: image side (8: the originals; a multiple of 8, e.g. 32, upsamples them once).
        centered: model range [−1, 1] (default) or [0, 1].
        uniform_dequantization: x₀₁ = (v + u)/17, u ~ U(0, 1), instead of v/16.
        random_flip: off by default (mirrored digits are not digits).
        val_fraction: held-out share (default 0.1 → 180 images).
        batch_size, batch_per_device, num_workers, seed: see ``BaseDataModule``.
    """

    num_classes = 10
    levels = DIGITS_LEVELS

    def __init__(
        self,
        size: int = 8,
        batch_size: int = 128,
        batch_per_device: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.1,
        centered: bool = True,
        uniform_dequantization: bool = False,
        random_flip: bool = False,
    ) -> None:
        super().__init__(
            centered=centered,
            uniform_dequantization=uniform_dequantization,
            random_flip=random_flip,
            batch_size=batch_size,
            batch_per_device=batch_per_device,
            num_workers=num_workers,
            seed=seed,
            val_fraction=val_fraction,
        )
        if int(size) != size or size < 8 or size % 8:
            raise ValueError(f"data.size must be a multiple of 8 (8: the original digits, e.g. 32), got {size}")
        self.size = int(size)
        self.data_shape = (1, self.size, self.size)

    def _build_splits(self) -> Tuple[Dataset, Dataset]:
        images, labels = load_digits()
        x = upsample_digits(images, self.size)[:, None]  # [N, 1, size, size]
        tr, va = split_indices(x.shape[0], self.val_fraction, self.seed)
        return TensorPairDataset(x[tr], labels[tr]), TensorPairDataset(x[va], labels[va])


__all__ = ["load_digits", "upsample_digits", "digits_resource", "DigitsDataModule", "DIGITS_LEVELS"]

