r"""U-Net building blocks in the DDPM++ style (Song et al. 2021, NCSN++ code base with DDPM blocks).

Feature maps are ``[B, C, H, W]``; embeddings are ``[B, E]``. Every block works for non-square
maps and any floating dtype (and under autocast): nothing here fixes a dtype or a device.

* :func:`group_norm` — GroupNorm whose group count adapts to small channel counts.
* :class:`ResBlock` — ``GN → SiLU → (up/down) → conv3×3 → + Dense(SiLU(e)) → GN → SiLU → dropout →
  conv3×3``, plus a (1×1-conv) skip; optionally rescaled by ``1/√2`` (DDPM++ "skip_rescale").
* :class:`AttnBlock` — multi-head self-attention over the ``H·W`` positions, residual.
* :class:`Downsample` / :class:`Upsample` — factor-2 resampling, with or without a 3×3 conv.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .resampling import downsample_fir, upsample_fir
from .score_net import xavier_init_


def num_groups(channels: int, max_groups: int = 32, min_group_size: int = 4) -> int:
    """Groups for GroupNorm: the largest divisor of ``channels`` not above ``min(max_groups, channels // min_group_size)``.

    DDPM++ uses ``min(channels // 4, 32)``; taking a divisor keeps it valid for any channel count
    (e.g. 3 → 1, 24 → 6, 48 → 12, 128 → 32).
    """
    if channels < 1:
        raise ValueError(f"channels must be positive, got {channels}")
    target = max(1, min(max_groups, channels // min_group_size))
    while channels % target:
        target -= 1
    return target


def group_norm(channels: int, eps: float = 1e-6) -> nn.GroupNorm:
    """``nn.GroupNorm`` with :func:`num_groups` groups."""
    return nn.GroupNorm(num_groups(channels), channels, eps=eps)


def conv3x3(in_ch: int, out_ch: int, zero: bool = False, stride: int = 1) -> nn.Conv2d:
    return xavier_init_(nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1), zero=zero)  # type: ignore[return-value]


def conv1x1(in_ch: int, out_ch: int, zero: bool = False) -> nn.Conv2d:
    return xavier_init_(nn.Conv2d(in_ch, out_ch, 1), zero=zero)  # type: ignore[return-value]


def upsample_nearest(x: Tensor) -> Tensor:
    """``[B, C, H, W] -> [B, C, 2H, 2W]`` by repetition."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def downsample_avg(x: Tensor) -> Tensor:
    """``[B, C, H, W] -> [B, C, H/2, W/2]`` by 2×2 averaging."""
    return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResBlock(nn.Module):
    """DDPM++ residual block ``[B, in_ch, H, W], e [B, E] -> [B, out_ch, H', W']``.

    ``h = conv_1(drop(SiLU(GN(conv_0(R(SiLU(GN(x)))) + Dense(SiLU(e))))))``, ``out = (S(R(x)) + h) · c``;
    with ``scale_shift_norm`` (AdaGN) the middle is ``GN(h)·(1 + a) + b`` with (a, b) = Dense(SiLU(e)).
    with ``R`` the optional resampling (``up``: nearest ×2, ``down``: average ÷2, BigGAN style; with
    ``fir_kernel`` the FIR resamplers of :mod:`.resampling`, as NCSN++),
    ``S`` a 1×1 conv when the shape changes (identity otherwise) and ``c = 1/√2`` if ``skip_rescale``
    (keeps the variance of the sum of two unit-variance branches at one) else 1.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int,
        dropout: float = 0.0,
        skip_rescale: bool = True,
        up: bool = False,
        down: bool = False,
        zero_init: bool = True,
        scale_shift_norm: bool = False,
        fir_kernel: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("a ResBlock cannot both upsample and downsample")
        self.up, self.down = up, down
        # NCSN++ resamples with a FIR filter (StyleGAN2's [1, 3, 3, 1]); None: nearest / 2x2 average.
        self.fir_kernel = None if fir_kernel is None else tuple(float(v) for v in fir_kernel)
        self.scale_shift_norm = bool(scale_shift_norm)
        self.norm_0 = group_norm(in_ch)
        self.conv_0 = conv3x3(in_ch, out_ch)
        self.emb_proj = xavier_init_(nn.Linear(emb_dim, out_ch * (2 if self.scale_shift_norm else 1)))
        self.norm_1 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv_1 = conv3x3(out_ch, out_ch, zero=zero_init)
        self.skip = conv1x1(in_ch, out_ch) if (in_ch != out_ch or up or down) else nn.Identity()
        self.out_scale = 1.0 / math.sqrt(2.0) if skip_rescale else 1.0

    def _resample(self, x: Tensor) -> Tensor:
        if self.up:
            return upsample_nearest(x) if self.fir_kernel is None else upsample_fir(x, self.fir_kernel)
        if self.down:
            return downsample_avg(x) if self.fir_kernel is None else downsample_fir(x, self.fir_kernel)
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self._resample(F.silu(self.norm_0(x)))
        x = self._resample(x)
        h = self.conv_0(h)
        e = self.emb_proj(F.silu(emb))[:, :, None, None]
        if self.scale_shift_norm:
            # AdaGN (Dhariwal & Nichol): the time embedding scales and shifts the normalised features.
            scale, shift = e.chunk(2, dim=1)
            h = self.norm_1(h) * (1 + scale) + shift
        else:
            h = self.norm_1(h + e)
        h = self.conv_1(self.dropout(F.silu(h)))
        return (self.skip(x) + h) * self.out_scale


class AttnBlock(nn.Module):
    """Self-attention over positions: ``x + Proj(MHA(GN(x)))`` (times ``1/√2`` if ``skip_rescale``).

    Shapes: ``[B, C, H, W] -> [B, C, H, W]``; attention runs over the ``H·W`` tokens with
    ``num_heads`` heads of width ``C / num_heads``.
    """

    def __init__(self, channels: int, num_heads: int = 1, skip_rescale: bool = True, zero_init: bool = True) -> None:
        super().__init__()
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"attention heads must divide the channels; got channels={channels}, num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = conv1x1(channels, 3 * channels)
        self.proj = conv1x1(channels, channels, zero=zero_init)
        self.out_scale = 1.0 / math.sqrt(2.0) if skip_rescale else 1.0

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        # [B, heads, tokens, head_dim] for scaled_dot_product_attention (softmax(q kᵀ/√d) v).
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return (x + self.proj(out)) * self.out_scale


def position_features(channels: int, height: int, width: int, like: Tensor) -> Tensor:
    """Fixed 2-D sinusoidal position features ``[1, C, H, W]`` of the pixel grid in [0, 1]² (half the channels
    for the row, half for the column; sin and cos at frequencies kπ, k = 1 … C/4)."""
    quarter = max(1, channels // 4)
    freqs = math.pi * torch.arange(1, quarter + 1, dtype=torch.float32, device=like.device)
    ys = (torch.arange(height, dtype=torch.float32, device=like.device) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32, device=like.device) + 0.5) / width
    fy, fx = ys[:, None] * freqs, xs[:, None] * freqs                       # [H, q], [W, q]
    row = torch.cat([fy.sin(), fy.cos()], 1).t()[:, :, None].expand(-1, height, width)
    col = torch.cat([fx.sin(), fx.cos()], 1).t()[:, None, :].expand(-1, height, width)
    feats = torch.cat([row, col], 0)[:channels]
    if feats.shape[0] < channels:
        feats = torch.cat([feats, feats.new_zeros(channels - feats.shape[0], height, width)])
    return feats[None].to(like.dtype)


class CrossAttnBlock(nn.Module):
    """Cross-attention from image features to a context sequence (LDM's spatial transformer, one layer);
    with ``positional`` the queries also see fixed 2-D position features (:func:`position_features`).

    ``x [B, C, H, W]``, ``context [B, L, d]``, ``mask [B, L]`` (True = a real token) → ``x + Proj(MHA(q =
    GN(x), k = v = context))``. Padded tokens get weight exactly 0 (−∞ before the softmax), so they never
    change the output. ``proj`` starts at zero (``zero_init``): the block is then exactly the identity.
    """

    def __init__(self, channels: int, context_dim: int, num_heads: int = 1, zero_init: bool = True,
                 positional: bool = False) -> None:
        super().__init__()
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"attention heads must divide the channels; got channels={channels}, num_heads={num_heads}")
        self.num_heads = num_heads
        self.positional = bool(positional)
        self.norm = group_norm(channels)
        self.q = conv1x1(channels, channels)
        self.kv = xavier_init_(nn.Linear(context_dim, 2 * channels))
        self.proj = conv1x1(channels, channels, zero=zero_init)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        b, c, h, w = x.shape
        heads, d = self.num_heads, c // self.num_heads
        q_in = self.norm(x)
        if self.positional:
            # Where a query sits (fixed 2-D sinusoids), so that a region can attend to the words about it.
            q_in = q_in + position_features(c, h, w, x)
        q = self.q(q_in).reshape(b, heads, d, h * w).transpose(-1, -2)          # [B, heads, HW, d]
        k, v = self.kv(context.to(x.dtype)).reshape(b, -1, 2, heads, d).permute(2, 0, 3, 1, 4)  # [B, heads, L, d] each
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :].to(torch.bool))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """``[B, C, H, W] -> [B, C, H/2, W/2]``: stride-2 3×3 conv (``with_conv``) or 2×2 average pooling."""

    def __init__(self, channels: int, with_conv: bool = True) -> None:
        super().__init__()
        self.conv = conv3x3(channels, channels, stride=2) if with_conv else None

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) if self.conv is not None else downsample_avg(x)


class Upsample(nn.Module):
    """``[B, C, H, W] -> [B, C, 2H, 2W]``: nearest-neighbour ×2, then a 3×3 conv if ``with_conv``."""

    def __init__(self, channels: int, with_conv: bool = True) -> None:
        super().__init__()
        self.conv = conv3x3(channels, channels) if with_conv else None

    def forward(self, x: Tensor) -> Tensor:
        x = upsample_nearest(x)
        return self.conv(x) if self.conv is not None else x


__all__ = [
    "num_groups",
    "group_norm",
    "conv3x3",
    "conv1x1",
    "upsample_nearest",
    "downsample_avg",
    "ResBlock",
    "AttnBlock",
    "CrossAttnBlock",
    "Downsample",
    "Upsample",
]
