r"""Factor-2 resampling of feature maps with a FIR filter, in plain PyTorch (no compiled extension).

NCSN++ (Song et al. 2021) resamples with the StyleGAN2 filter ``k = [1, 3, 3, 1]``. With the 2-D
kernel ``K = k kᵀ / (Σk)²`` (normalised so a constant image keeps its value) and ``p = len(k) − 2``:

* :func:`upfirdn2d` — insert ``up − 1`` zeros after every pixel, pad by ``pad = (p₀, p₁)`` on each
  side (negative values crop), convolve every channel with ``K`` (flipped, i.e. a true convolution),
  keep every ``down``-th pixel;
* :func:`upsample_fir` — ``upfirdn2d(x, 4K, up=2, pad=((p+1)//2 + 1, p//2))``: ``[B, C, H, W] → [B, C, 2H, 2W]``;
* :func:`downsample_fir` — ``upfirdn2d(x, K, down=2, pad=((p+1)//2, p//2))``: ``[B, C, H, W] → [B, C, H/2, W/2]``;
* :func:`conv_downsample_fir` — the filter, then a stride-2 convolution with weights ``w``
  ``[O, C, k, k]`` (padding applied once, before both): ``[B, C, H, W] → [B, O, H/2, W/2]``.

``k = [1, 1]`` reduces the two plain resamplers to nearest-neighbour upsampling and 2×2 averaging.
Everything works for any float dtype and device; the kernel follows the input's.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_FIR_KERNEL: Tuple[int, ...] = (1, 3, 3, 1)


def fir_kernel_2d(k: Sequence[float], like: Tensor) -> Tensor:
    """``K = k kᵀ / (Σk)²`` as a ``[len(k), len(k)]`` tensor with ``like``'s dtype and device."""
    k1 = torch.as_tensor([float(v) for v in k], dtype=torch.float64)
    if k1.dim() != 1 or k1.numel() < 1 or not float(k1.sum()) > 0:
        raise ValueError(f"a FIR kernel is a non-empty list of numbers with a positive sum, got {list(k)}")
    k2 = torch.outer(k1, k1)
    return (k2 / k2.sum()).to(dtype=like.dtype, device=like.device)


def upfirdn2d(x: Tensor, kernel: Tensor, up: int = 1, down: int = 1, pad: Tuple[int, int] = (0, 0)) -> Tensor:
    """Upsample by zero insertion, pad, filter each channel with ``kernel`` ``[kh, kw]``, downsample.

    Output size per side: ``(n·up + p₀ + p₁ − k) // down + 1``.
    """
    b, c, h, w = x.shape
    if up > 1:
        z = x.new_zeros(b, c, h * up, w * up)
        z[:, :, ::up, ::up] = x
        x = z
    p0, p1 = int(pad[0]), int(pad[1])
    if p0 or p1:
        x = F.pad(x, (p0, p1, p0, p1))
    kh, kw = kernel.shape
    weight = torch.flip(kernel, [0, 1]).reshape(1, 1, kh, kw).expand(c, 1, kh, kw)
    return F.conv2d(x, weight, stride=down, groups=c)


def upsample_fir(x: Tensor, k: Sequence[float] = DEFAULT_FIR_KERNEL) -> Tensor:
    """``[B, C, H, W] → [B, C, 2H, 2W]`` with the FIR filter ``k`` (gain 4 for the inserted zeros)."""
    kernel = fir_kernel_2d(k, x) * 4
    p = kernel.shape[0] - 2
    return upfirdn2d(x, kernel, up=2, pad=((p + 1) // 2 + 1, p // 2))


def downsample_fir(x: Tensor, k: Sequence[float] = DEFAULT_FIR_KERNEL) -> Tensor:
    """``[B, C, H, W] → [B, C, H/2, W/2]``: filter with ``k``, keep every second pixel."""
    kernel = fir_kernel_2d(k, x)
    p = kernel.shape[0] - 2
    return upfirdn2d(x, kernel, down=2, pad=((p + 1) // 2, p // 2))


def conv_downsample_fir(x: Tensor, weight: Tensor, k: Sequence[float] = DEFAULT_FIR_KERNEL) -> Tensor:
    """Filter with ``k``, then a stride-2 convolution with ``weight`` ``[O, C, s, s]`` (odd ``s``), no bias."""
    s = weight.shape[-1]
    kernel = fir_kernel_2d(k, x)
    p = (kernel.shape[0] - 2) + (s - 1)
    x = upfirdn2d(x, kernel, pad=((p + 1) // 2, p // 2))
    return F.conv2d(x, weight, stride=2)


__all__ = ["DEFAULT_FIR_KERNEL", "fir_kernel_2d", "upfirdn2d", "upsample_fir", "downsample_fir", "conv_downsample_fir"]
