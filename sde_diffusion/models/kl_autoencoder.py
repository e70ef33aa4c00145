r"""A convolutional KL-regularised autoencoder (the first stage of latent score-based models).

Encoder q_φ(z | x) = N(μ_φ(x), diag σ_φ(x)²) and decoder x̂ = D_ψ(z), as in LSGM and Stable
Diffusion's first stage. For ``L = len(ch_mult)`` levels the downsampling factor is f = 2^(L−1)::

    encoder:  conv3×3(C → ch) → per level: num_res_blocks × Block, then (not last) a stride-2 conv
              → Block → GN → SiLU → conv3×3(→ 2c): mean and log-variance
    decoder:  conv3×3(c → ch·ch_mult[-1]) → Block → per level (reversed): num_res_blocks × Block,
              then (not first) nearest ×2 + conv3×3 → GN → SiLU → conv3×3(→ C)

Shapes: ``x [B, C, H, W]`` → ``mean, logvar [B, c, H/f, W/f]`` → ``x̂ [B, C, H, W]``. ``H`` and ``W``
must be divisible by f.

The KL term per example is exact:

.. math:: \mathrm{KL}(q_φ(z|x)\,\|\,N(0, I)) = \tfrac12 \sum_j (μ_j^2 + σ_j^2 - 1 - \log σ_j^2).

Usage::

    ae = KLAutoencoder((1, 32, 32), latent_channels=4, ch_mult=(1, 2, 2))   # f = 4
    mean, logvar = ae.encode(x)                                             # [B, 4, 8, 8] each
    z = ae.sample_latent(mean, logvar)                                      # reparameterised
    x_hat = ae.decode(z)                                                    # [B, 1, 32, 32]
    kl = kl_to_standard_normal(mean, logvar)                                # [B] nats
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .layers import conv3x3, group_norm, upsample_nearest

LOGVAR_RANGE = (-30.0, 20.0)  # keeps exp(logvar) finite in float32


def kl_to_standard_normal(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, diag e^logvar) ‖ N(0, I)) summed over all but the batch dimension: ``[B]`` nats."""
    terms = mean.pow(2) + torch.exp(logvar) - 1.0 - logvar
    return 0.5 * terms.reshape(terms.shape[0], -1).sum(1)


class _Block(nn.Module):
    """``GN → SiLU → conv3×3 → GN → SiLU → dropout → conv3×3`` plus a (1×1-conv) skip."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float) -> None:
        super().__init__()
        self.body = nn.Sequential(
            group_norm(in_ch), nn.SiLU(), conv3x3(in_ch, out_ch),
            group_norm(out_ch), nn.SiLU(), nn.Dropout(dropout), conv3x3(out_ch, out_ch),
        )
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


class KLAutoencoder(nn.Module):
    """Encoder to a diagonal Gaussian over ``[c, H/f, W/f]`` latents, and a decoder back to images.

    Args:
        data_shape: ``(C, H, W)``.
        latent_channels: c.
        ch: base channel count.
        ch_mult: channels per level (``ch · ch_mult[i]``); f = 2^(len(ch_mult) − 1).
        num_res_blocks: blocks per level.
        dropout: inside the blocks.
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        latent_channels: int = 4,
        ch: int = 32,
        ch_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in data_shape)
        ch_mult = tuple(int(m) for m in ch_mult)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"the autoencoder takes images with data_shape (C, H, W); got {shape}")
        if latent_channels < 1 or ch < 1 or not ch_mult or min(ch_mult) < 1 or num_res_blocks < 1:
            raise ValueError(
                "need latent_channels >= 1, ch >= 1, a non-empty ch_mult of positive ints and num_res_blocks >= 1; "
                f"got latent_channels={latent_channels}, ch={ch}, ch_mult={list(ch_mult)}, num_res_blocks={num_res_blocks}"
            )
        C, H, W = shape
        f = 2 ** (len(ch_mult) - 1)
        if H % f or W % f:
            raise ValueError(
                f"image size {H}x{W} is not divisible by the downsampling factor f = {f} "
                f"(ch_mult={list(ch_mult)}); use a ch_mult with fewer levels or resize the images"
            )
        self.data_shape = shape
        self.latent_channels = int(latent_channels)
        self.factor = f
        self.latent_shape = (self.latent_channels, H // f, W // f)

        enc = [conv3x3(C, ch)]
        in_c = ch
        for i, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                enc.append(_Block(in_c, ch * mult, dropout))
                in_c = ch * mult
            if i < len(ch_mult) - 1:
                enc.append(conv3x3(in_c, in_c, stride=2))
        enc += [_Block(in_c, in_c, dropout), group_norm(in_c), nn.SiLU(), conv3x3(in_c, 2 * self.latent_channels)]
        self.encoder = nn.Sequential(*enc)

        top = ch * ch_mult[-1]
        self.dec_in = conv3x3(self.latent_channels, top)
        self.dec_mid = _Block(top, top, dropout)
        in_c = top
        self.up_levels = nn.ModuleList()
        for i in reversed(range(len(ch_mult))):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(_Block(in_c, ch * ch_mult[i], dropout))
                in_c = ch * ch_mult[i]
            self.up_levels.append(nn.ModuleList([nn.Sequential(*blocks), conv3x3(in_c, in_c) if i > 0 else nn.Identity()]))
        self.dec_out = nn.Sequential(group_norm(in_c), nn.SiLU(), conv3x3(in_c, C))

    def encode(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """``x [B, C, H, W]`` → ``(mean, logvar)``, each ``[B, c, H/f, W/f]``."""
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"the autoencoder was built for images {self.data_shape}, got {tuple(x.shape[1:])}")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    @staticmethod
    def sample_latent(mean: Tensor, logvar: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """z = mean + e^{logvar/2}·ε, ε ~ N(0, I) (the reparameterisation)."""
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * eps

    def decode(self, z: Tensor) -> Tensor:
        """``z [B, c, H/f, W/f]`` → ``x̂ [B, C, H, W]``."""
        if tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"the decoder takes latents {self.latent_shape}, got {tuple(z.shape[1:])}")
        h = self.dec_mid(self.dec_in(z))
        for blocks, up in self.up_levels:
            h = blocks(h)
            if not isinstance(up, nn.Identity):
                h = up(upsample_nearest(h))
        return self.dec_out(h)

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """``(x̂, mean, logvar)`` with x̂ decoded from a reparameterised sample of q(z | x)."""
        mean, logvar = self.encode(x)
        return self.decode(self.sample_latent(mean, logvar, generator)), mean, logvar

    @property
    def latent_dim(self) -> int:
        return math.prod(self.latent_shape)


__all__ = ["KLAutoencoder", "kl_to_standard_normal", "LOGVAR_RANGE"]
