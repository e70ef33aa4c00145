r"""Batch transforms between stored data and the model's range.

Images are stored as integers on a ``levels``-level scale (uint8 0..255 for CIFAR-10, 0..16 for
the 8×8 digits) and converted one batch at a time, so random parts (dequantisation noise, flips)
are fresh in every epoch:

* without dequantisation  x₀₁ = v / (levels − 1)            ∈ [0, 1]
* with uniform dequantisation  x₀₁ = (v + u) / levels,  u ~ U(0, 1)  ∈ [0, 1)
* model range  x = 2 x₀₁ − 1 ∈ [−1, 1] when ``centered`` (else x = x₀₁).

``scaler`` / ``inverse_scaler`` are the affine maps [0, 1] ↔ model range; the inverse does not
clamp, so it stays an exact inverse (clamp before display if samples leave the range).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def centered_scaler(x: Tensor) -> Tensor:
    """[0, 1] → [−1, 1]:  x ↦ 2x − 1."""
    return x * 2.0 - 1.0


def centered_inverse_scaler(x: Tensor) -> Tensor:
    """[−1, 1] → [0, 1]:  x ↦ (x + 1) / 2 (no clamping)."""
    return (x + 1.0) * 0.5


def identity(x: Tensor) -> Tensor:
    """The scaler of vector data sets, which are already in model range."""
    return x


def random_horizontal_flip(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Mirror each image of ``x`` ``[B, C, H, W]`` along W with probability ½."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class PixelTransform:
    """Integer pixels ``[B, C, H, W]`` on a ``levels``-level scale → float32 in model range.

    Args:
        levels: number of distinct stored values (256 for 8-bit images, 17 for the digits).
        centered: map [0, 1] to [−1, 1] (the model range of every built-in image set).
        dequantize: add U(0, 1) noise before dividing by ``levels`` (for likelihood training;
            the density of the dequantised data then lower-bounds the discrete likelihood).
        flip: random horizontal flips (augmentation; training split only).

    A plain module-level class (not a closure) so DataLoader workers can pickle it.
    """

    def __init__(self, levels: int, centered: bool = True, dequantize: bool = False, flip: bool = False) -> None:
        if int(levels) < 2:
            raise ValueError(f"levels must be an integer >= 2, got {levels!r}")
        self.levels = int(levels)
        self.centered = bool(centered)
        self.dequantize = bool(dequantize)
        self.flip = bool(flip)

    def to_unit(self, v: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Stored values ``v`` → [0, 1] (float32), dequantised if configured."""
        x = v.to(torch.float32)
        if self.dequantize:
            u = torch.rand(x.shape, generator=generator, dtype=torch.float32, device=x.device)
            return (x + u) / self.levels
        return x / (self.levels - 1)

    def scaler(self, x: Tensor) -> Tensor:
        return centered_scaler(x) if self.centered else x

    def inverse_scaler(self, x: Tensor) -> Tensor:
        return centered_inverse_scaler(x) if self.centered else x

    def __call__(self, v: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        x = self.to_unit(v, generator)
        if self.flip:
            x = random_horizontal_flip(x, generator)
        return self.scaler(x)

    def __repr__(self) -> str:
        return (
            f"PixelTransform(levels={self.levels}, centered={self.centered}, "
            f"dequantize={self.dequantize}, flip={self.flip})"
        )


class IdentityTransform:
    """Stored float vectors are already in model range; only the dtype is fixed to float32."""

    def __call__(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return x.to(torch.float32)

    def scaler(self, x: Tensor) -> Tensor:
        return x

    def inverse_scaler(self, x: Tensor) -> Tensor:
        return x


__all__ = [
    "PixelTransform",
    "IdentityTransform",
    "centered_scaler",
    "centered_inverse_scaler",
    "identity",
    "random_horizontal_flip",
]
