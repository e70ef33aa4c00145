r"""Embeddings of the continuous diffusion time and of class labels.

Time ``t`` is a ``[B]`` tensor of continuous times in ``[0, T]``. Two fixed feature maps turn it
into ``[B, dim]`` features, then :class:`TimeEmbedding` passes them through a two-layer MLP:

* Gaussian Fourier features (Tancik et al. 2020; NCSN++ in Song et al. 2021):
  ``W_k ~ N(0, scale²)`` drawn once at construction and frozen (a buffer, saved in checkpoints),
  ``φ(t) = [sin(2π t W), cos(2π t W)]``.
* Sinusoidal features (Transformer / DDPM), on the rescaled time ``τ = scale · t``
  (``scale = 1000`` maps ``t ∈ [0, 1]`` onto DDPM's step index range):
  ``ω_k = 10000^{−k/(h−1)}``, ``k = 0..h−1``, ``h = dim // 2``, ``φ(t) = [sin(τ ω), cos(τ ω)]``.

Both compute in the dtype of their frequency buffer, which follows the module's dtype
(``.double()``), whatever dtype ``t`` arrives in; the elementwise maths stays out of autocast's
low-precision casts, so ``1000·t`` is never rounded to bfloat16.

:class:`LabelEmbedding` maps labels ``y ∈ {0, …, num_classes}`` to vectors, where the extra index
``num_classes`` is the *null label* ("no condition") used for classifier-free guidance;
``y=None`` means null for the whole batch.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

EMBEDDING_TYPES = ("fourier", "sinusoidal")


class GaussianFourierEmbedding(nn.Module):
    """``φ(t) = [sin(2π t W), cos(2π t W)]`` with frozen ``W ~ N(0, scale²)`` of size ``dim // 2``.

    Args:
        dim: output width (even).
        scale: standard deviation of the random frequencies; larger values resolve finer time
            detail (NCSN++ uses 16).

    Shapes: ``t [B] -> [B, dim]``. ``W`` is drawn from torch's global generator, so seeding before
    construction makes it reproducible.
    """

    def __init__(self, dim: int, scale: float = 16.0) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"Fourier embedding dim must be an even integer >= 2, got {dim}")
        if not scale > 0:
            raise ValueError(f"Fourier embedding scale must be positive, got {scale}")
        self.dim = dim
        self.scale = float(scale)
        self.register_buffer("freqs", torch.randn(dim // 2) * scale)

    def forward(self, t: Tensor) -> Tensor:
        arg = 2 * math.pi * t.to(self.freqs.dtype)[:, None] * self.freqs[None, :]
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


class SinusoidalEmbedding(nn.Module):
    """DDPM's positional features of ``τ = scale · t``: ``[sin(τ ω), cos(τ ω)]``, ``ω_k = 10000^{−k/(h−1)}``.

    Args:
        dim: output width; an odd width is padded with one zero column.
        scale: factor applied to ``t`` (1000 turns ``t ∈ [0, 1]`` into DDPM-like step indices).
        max_period: the longest wavelength's base, 10000 as in the Transformer.

    Shapes: ``t [B] -> [B, dim]``.
    """

    def __init__(self, dim: int, scale: float = 1000.0, max_period: float = 10000.0) -> None:
        super().__init__()
        if dim < 4:
            raise ValueError(f"sinusoidal embedding dim must be >= 4, got {dim}")
        if not scale > 0:
            raise ValueError(f"sinusoidal embedding scale must be positive, got {scale}")
        self.dim = dim
        self.scale = float(scale)
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / (half - 1))
        # Non-persistent: a pure function of the constructor arguments, nothing to checkpoint.
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        arg = (self.scale * t.to(self.freqs.dtype))[:, None] * self.freqs[None, :]
        emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)
        if self.dim % 2:
            emb = nn.functional.pad(emb, (0, 1))
        return emb


class TimeEmbedding(nn.Module):
    """Fixed time features followed by ``Linear(dim, out_dim) → SiLU → Linear(out_dim, out_dim)``.

    Args:
        embedding_type: ``"fourier"`` (:class:`GaussianFourierEmbedding`) or ``"sinusoidal"``
            (:class:`SinusoidalEmbedding`).
        dim: width of the fixed features.
        out_dim: width of the returned embedding.
        scale: ``scale`` of the chosen feature map; ``None`` picks its default (16 for Fourier,
            1000 for sinusoidal).

    Shapes: ``t [B] -> [B, out_dim]``.
    """

    def __init__(self, embedding_type: str, dim: int, out_dim: int, scale: Optional[float] = None) -> None:
        super().__init__()
        if embedding_type == "fourier":
            self.features: nn.Module = GaussianFourierEmbedding(dim, 16.0 if scale is None else scale)
        elif embedding_type == "sinusoidal":
            self.features = SinusoidalEmbedding(dim, 1000.0 if scale is None else scale)
        else:
            raise ValueError(
                f"unknown embedding_type {embedding_type!r}; choose one of: {', '.join(EMBEDDING_TYPES)}"
            )
        self.embedding_type = embedding_type
        self.mlp = nn.Sequential(nn.Linear(dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.features(t))


class LabelEmbedding(nn.Module):
    """``nn.Embedding(num_classes + 1, dim)``; index ``num_classes`` is the learned null label.

    Shapes: ``y [B] (int64, values in [0, num_classes]) or None -> [B, dim]``; ``None`` means the null
    label for all ``batch_size`` rows.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer (or None for no labels), got {num_classes}")
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: Optional[Tensor], batch_size: int) -> Tensor:
        if y is None:
            y = torch.full((batch_size,), self.num_classes, dtype=torch.long, device=self.embedding.weight.device)
        elif y.shape != (batch_size,):
            raise ValueError(f"labels y must have shape [{batch_size}] (one per sample), got {tuple(y.shape)}")
        return self.embedding(y.long())


__all__ = [
    "EMBEDDING_TYPES",
    "GaussianFourierEmbedding",
    "SinusoidalEmbedding",
    "TimeEmbedding",
    "LabelEmbedding",
]
