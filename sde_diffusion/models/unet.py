r"""A DDPM++-style U-Net score network for images (Song et al. 2021, Appendix H; Ho et al. 2020).

Layout for ``L = len(ch_mult)`` levels, level ``i`` at ``ch · ch_mult[i]`` channels and spatial size
``(H / 2^i, W / 2^i)``::

    conv3×3(C → ch)
    down, level i:  num_res_blocks × [ResBlock (+ Attn if the level's resolution is in attn_resolutions)]
                    then (i < L−1) a downsampling ResBlock (BigGAN style) or a Downsample layer
    middle:         ResBlock, Attn, ResBlock
    up, level i:    (num_res_blocks + 1) × ResBlock on [h, skip] concatenated along channels,
                    Attn once if the level's resolution is in attn_resolutions,
                    then (i > 0) an upsampling ResBlock or an Upsample layer
    GN → SiLU → conv3×3(ch → C)

Every ResBlock receives ``e = TimeEmbedding(t) + LabelEmbedding(y)`` of width ``4 · ch``. A level's
*resolution* is ``min(H, W) / 2^i`` (the side length for square images), which is what
``attn_resolutions`` refers to. With ``zero_init`` the last conv of every residual branch and the
output conv start at zero, so the network outputs exactly 0 at initialisation (DDPM++ uses a
≈0 scale for the same layers).

Shapes: ``x [B, C, H, W]``, ``t [B]``, ``y [B] | None`` → ``[B, C, H, W]``. ``H`` and ``W`` must be
divisible by ``2^(L−1)``; non-square images are fine.
"""
from __future__ import annotations

import math
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .score_net import ScoreNet
from .embeddings import LabelEmbedding, TimeEmbedding
from .layers import AttnBlock, CrossAttnBlock, Downsample, ResBlock, Upsample, conv3x3, group_norm
from .score_net import xavier_init_
from ..registry import MODELS

CROSS_ATTENTION = ("attn", "all")


class _DownLevel(nn.Module):
    def __init__(self, blocks: List[ResBlock], attns: List[nn.Module], resample: Optional[nn.Module],
                 crosses: Optional[List[Optional[nn.Module]]] = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)
        self.resample = resample
        if crosses is not None:  # text models only, so other checkpoints keep their keys
            self.crosses = nn.ModuleList([c if c is not None else nn.Identity() for c in crosses])


class _UpLevel(nn.Module):
    def __init__(self, blocks: List[ResBlock], attn: nn.Module, resample: Optional[nn.Module],
                 crosses: Optional[List[Optional[nn.Module]]] = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attn = attn
        self.resample = resample
        if crosses is not None:
            self.crosses = nn.ModuleList([c if c is not None else nn.Identity() for c in crosses])


def _cross(module: nn.Module, h: Tensor, context: Optional[Tensor], mask: Optional[Tensor]) -> Tensor:
    return h if isinstance(module, nn.Identity) else module(h, context, mask)


@MODELS.register("unet")
class UNet(ScoreNet):
    """DDPM++ U-Net ``net(x [B, C, H, W], t [B], y [B] | None) -> [B, C, H, W]``.

    Args:
        data_shape: ``(C, H, W)``.
        num_classes: number of classes for label conditioning (null label = ``num_classes``), or ``None``.
        ch: base channel count.
        ch_mult: channel multiplier per level; ``len(ch_mult) − 1`` downsamplings (``None``: sized to
            the image by :func:`unet_layout`).
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attn_resolutions: level resolutions (``min(H, W) / 2^i``) that get self-attention; each must
            exist for this image size (``None``: :func:`unet_layout`'s choice).
        dropout: dropout probability inside the residual blocks.
        embedding_type: ``"sinusoidal"`` (DDPM++) or ``"fourier"`` (NCSN++).
        embedding_scale: sinusoidal time factor / Fourier frequency std (``None``: 1000 / 16).
        skip_rescale: multiply residual sums by ``1/√2``.
        resblock_updown: resample inside residual blocks (BigGAN style, as DDPM++); otherwise use
            separate :class:`Downsample` / :class:`Upsample` layers.
        resamp_with_conv: give the separate resampling layers a 3×3 conv (ignored with ``resblock_updown``).
        num_heads: attention heads (must divide the channels at every attention level).
        zero_init: start residual-branch outputs and the output conv at zero.
        scale_shift_norm: AdaGN time conditioning in the residual blocks, GN(h)·(1 + a(e)) + b(e)
            (Dhariwal & Nichol), instead of adding the embedding before the norm.
        learn_sigma: also output Improved DDPM's variance interpolation v: ``[B, 2C, H, W]`` = (prediction, v).
        context_dim: width d of a text context ``[B, L, d]`` (set by the training module from its text
            encoder; ``None``: no text). Adds :class:`~.layers.CrossAttnBlock` layers.
        cross_attention: where they sit: ``attn`` (after every self-attention: the attention resolutions
            and the middle) or ``all`` (after every residual block and in the middle).
        pooled_context: also add a linear map of the mean of the valid context tokens to the time embedding.
        cross_attention_position: the cross-attention queries also see fixed 2-D position features, so a
            region can attend to the words that place something in it ("3 left of 8").

    With text, ``forward(x, t, y, context [B or 1, L, d], context_mask [B or 1, L])``; the cross-attention
    outputs and the pooled map start at zero, so an untrained text U-Net is exactly the plain one.
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        num_classes: Optional[int] = None,
        ch: int = 64,
        ch_mult: Optional[Sequence[int]] = None,
        num_res_blocks: int = 2,
        attn_resolutions: Optional[Sequence[int]] = None,
        dropout: float = 0.1,
        embedding_type: str = "sinusoidal",
        embedding_scale: Optional[float] = None,
        skip_rescale: bool = True,
        resblock_updown: bool = True,
        resamp_with_conv: bool = True,
        num_heads: int = 1,
        zero_init: bool = True,
        scale_shift_norm: bool = False,
        learn_sigma: bool = False,
        context_dim: Optional[int] = None,
        cross_attention: str = "attn",
        pooled_context: bool = True,
        cross_attention_position: bool = False,
    ) -> None:
        super().__init__(data_shape, num_classes)
        self.learn_sigma = bool(learn_sigma)
        if cross_attention not in CROSS_ATTENTION:
            raise ValueError(f"unknown cross_attention {cross_attention!r}; choose one of: {', '.join(CROSS_ATTENTION)}")
        self.context_dim = None if context_dim is None else int(context_dim)
        ch_mult, attn_resolutions, resolutions = check_unet_args(
            self.data_shape, ch, ch_mult, num_res_blocks, attn_resolutions, dropout
        )
        channels = self.data_shape[0]
        self.ch, self.ch_mult = ch, ch_mult
        self.num_res_blocks, self.attn_resolutions = num_res_blocks, attn_resolutions
        self.resblock_updown = resblock_updown

        emb_dim = 4 * ch
        self.time_embed = TimeEmbedding(embedding_type, ch, emb_dim, embedding_scale)
        self.label_embed = LabelEmbedding(self.num_classes, emb_dim) if self.num_classes is not None else None

        def res(in_c: int, out_c: int, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(in_c, out_c, emb_dim, dropout, skip_rescale, up=up, down=down, zero_init=zero_init,
                            scale_shift_norm=scale_shift_norm)

        def attn(c: int) -> AttnBlock:
            return AttnBlock(c, num_heads, skip_rescale, zero_init)

        text = self.context_dim is not None

        def cross(c: int, at_attention: bool) -> Optional[CrossAttnBlock]:
            if not text or not (cross_attention == "all" or at_attention):
                return None
            return CrossAttnBlock(c, self.context_dim, num_heads, zero_init=True, positional=cross_attention_position)

        self.context_embed = (xavier_init_(nn.Linear(self.context_dim, emb_dim), zero=True)
                              if text and pooled_context else None)

        self.conv_in = conv3x3(channels, ch)
        skip_channels = [ch]
        in_c = ch
        down_levels = []
        for i, mult in enumerate(ch_mult):
            out_c = ch * mult
            blocks, attns, crosses = [], [], []
            for _ in range(num_res_blocks):
                blocks.append(res(in_c, out_c))
                attns.append(attn(out_c) if resolutions[i] in attn_resolutions else nn.Identity())
                crosses.append(cross(out_c, resolutions[i] in attn_resolutions))
                in_c = out_c
                skip_channels.append(in_c)
            resample: Optional[nn.Module] = None
            if i < len(ch_mult) - 1:
                resample = res(in_c, in_c, down=True) if resblock_updown else Downsample(in_c, resamp_with_conv)
                skip_channels.append(in_c)
            down_levels.append(_DownLevel(blocks, attns, resample, crosses if text else None))
        self.down = nn.ModuleList(down_levels)

        self.mid_block_0 = res(in_c, in_c)
        self.mid_attn = attn(in_c)
        if text:
            self.mid_cross = cross(in_c, True)
        self.mid_block_1 = res(in_c, in_c)

        up_levels = []
        for i in reversed(range(len(ch_mult))):
            out_c = ch * ch_mult[i]
            blocks, crosses = [], []
            for k in range(num_res_blocks + 1):
                blocks.append(res(in_c + skip_channels.pop(), out_c))
                in_c = out_c
                # After the level's self-attention (once, after the last block) or after every block.
                crosses.append(cross(out_c, resolutions[i] in attn_resolutions and k == num_res_blocks))
            level_attn: nn.Module = attn(in_c) if resolutions[i] in attn_resolutions else nn.Identity()
            resample = None
            if i > 0:
                resample = res(in_c, in_c, up=True) if resblock_updown else Upsample(in_c, resamp_with_conv)
            up_levels.append(_UpLevel(blocks, level_attn, resample, crosses if text else None))
        self.up = nn.ModuleList(up_levels)
        assert not skip_channels, "every skip connection must be consumed exactly once"

        self.norm_out = group_norm(in_c)
        self.conv_out = conv3x3(in_c, channels * (2 if self.learn_sigma else 1), zero=zero_init)

    @classmethod
    def validate_data_shape(cls, data_shape: Sequence[int], ch_mult: Sequence[int] = (1, 2, 2)) -> None:
        """Raise ``ValueError`` unless ``data_shape = (C, H, W)`` with ``H, W`` divisible by ``2^(len(ch_mult)−1)``."""
        shape = tuple(int(s) for s in data_shape)
        ch_mult = tuple(ch_mult)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(
                f"UNet takes images with data_shape (C, H, W); got {shape}. For vectors use model 'mlp'."
            )
        _, height, width = shape
        factor = 2 ** (len(ch_mult) - 1)
        if height % factor or width % factor:
            levels = 1
            while height % 2**levels == 0 and width % 2**levels == 0:
                levels += 1
            fit_h, fit_w = math.ceil(height / factor) * factor, math.ceil(width / factor) * factor
            raise ValueError(
                f"image size {height}x{width} is not divisible by 2**(len(ch_mult)-1) = {factor} "
                f"(ch_mult={list(ch_mult)} downsamples {len(ch_mult) - 1} times). Fix: resize or pad the "
                f"images to a multiple of {factor} (e.g. {fit_h}x{fit_w}), or use a ch_mult with at most "
                f"{levels} entries for this size."
            )

    def forward(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None, context: Optional[Tensor] = None,
                context_mask: Optional[Tensor] = None) -> Tensor:
        t = self._check_inputs(x, t)
        emb = self.time_embed(t)
        if self.label_embed is not None:
            emb = emb + self.label_embed(y, x.shape[0])
        text = self.context_dim is not None
        if text:
            context, context_mask = self._check_context(x, context, context_mask)
            if self.context_embed is not None:
                w = context_mask.to(context.dtype)[..., None]
                pooled = (context * w).sum(1) / w.sum(1).clamp_min(1.0)
                emb = emb + self.context_embed(pooled.to(emb.dtype))
        elif context is not None:
            raise ValueError("this U-Net was built without text (context_dim=None) but was given a context; train with "
                             "conditioning.text.encoder=tiny (or hf) to condition on prompts")

        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            crosses = level.crosses if text else [nn.Identity()] * len(level.blocks)
            for block, attn, cross in zip(level.blocks, level.attns, crosses):
                h = _cross(cross, attn(block(h, emb)), context, context_mask)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h, emb) if self.resblock_updown else level.resample(h)
                skips.append(h)

        h = self.mid_attn(self.mid_block_0(h, emb))
        if text:
            h = _cross(self.mid_cross, h, context, context_mask)
        h = self.mid_block_1(h, emb)

        for level in self.up:
            crosses = list(level.crosses) if text else [nn.Identity()] * len(level.blocks)
            for k, block in enumerate(level.blocks):
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
                if k < len(level.blocks) - 1:
                    h = _cross(crosses[k], h, context, context_mask)
            h = _cross(crosses[-1], level.attn(h), context, context_mask)
            if level.resample is not None:
                h = level.resample(h, emb) if self.resblock_updown else level.resample(h)

        return self.conv_out(F.silu(self.norm_out(h)))

    def _check_context(self, x: Tensor, context: Optional[Tensor], mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """The context ``[B, L, d]`` and its mask ``[B, L]`` (a batch of 1 is broadcast), checked."""
        if context is None:
            raise ValueError("this U-Net reads a text context: pass context [B, L, d] and context_mask [B, L] (the "
                             "training module's score_fn encodes prompts; the empty prompt is the unconditional one)")
        if context.dim() != 3 or context.shape[-1] != self.context_dim:
            raise ValueError(f"context must have shape [B, L, {self.context_dim}], got {tuple(context.shape)}")
        if mask is None:
            mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        if mask.shape != context.shape[:2]:
            raise ValueError(f"context_mask must have shape {tuple(context.shape[:2])}, got {tuple(mask.shape)}")
        b = x.shape[0]
        if context.shape[0] == 1 and b != 1:
            context, mask = context.expand(b, -1, -1), mask.expand(b, -1)
        elif context.shape[0] != b:
            raise ValueError(f"context has batch {context.shape[0]} but x has {b} (give one context per sample, or one for all)")
        return context, mask.to(torch.bool)

    def reference_modules(self) -> Iterator[Tuple[str, nn.Module]]:
        """``(kind, module)`` in the order of score_sde_pytorch's ``all_modules`` for DDPM++ (``ncsnpp``
        with BigGAN blocks, no progressive branches, positional time features), for
        :mod:`sde_diffusion.convert`. Kinds as :meth:`~sde_diffusion.models.ncsnpp.NCSNpp.reference_modules`."""
        if not self.resblock_updown:
            raise ValueError("only U-Nets with resblock_updown=true (BigGAN blocks, as DDPM++) have a score_sde_pytorch layout")
        if self.time_embed.embedding_type == "fourier":
            yield "fourier", self.time_embed.features
        yield "linear", self.time_embed.mlp[0]
        yield "linear", self.time_embed.mlp[2]
        yield "conv", self.conv_in
        for level in self.down:
            for block, attn in zip(level.blocks, level.attns):
                yield "resblock", block
                if not isinstance(attn, nn.Identity):
                    yield "attn", attn
            if level.resample is not None:
                yield "resblock", level.resample
        yield "resblock", self.mid_block_0
        yield "attn", self.mid_attn
        yield "resblock", self.mid_block_1
        for level in self.up:
            for block in level.blocks:
                yield "resblock", block
            if not isinstance(level.attn, nn.Identity):
                yield "attn", level.attn
            if level.resample is not None:
                yield "resblock", level.resample
        yield "groupnorm", self.norm_out
        yield "conv", self.conv_out

    def output_convs(self) -> List[nn.Conv2d]:
        """The convolution that makes the output."""
        return [self.conv_out]




def unet_layout(data_shape: Sequence[int]) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """``(ch_mult, attn_resolutions)`` sized to an image: levels halve the resolution down to 4×4
    (or as far as the size divides by 2), channels ``[1, 2, 2, …]``; self-attention at 16×16 when
    that level exists (as DDPM and DDPM++ at 32×32), else at the coarsest level of a small image.

    E.g. 8×8 → ``(1, 2), (4,)``; 32×32 → ``(1, 2, 2, 2), (16,)``; 64×64 → ``(1, 2, 2, 2, 2), (16,)``.
    """
    shape = tuple(int(s) for s in data_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"UNet takes images with data_shape (C, H, W); got {shape}. For vectors use model=mlp.")
    _, height, width = shape
    levels = 1
    while min(height, width) // 2**levels >= 4 and height % 2**levels == 0 and width % 2**levels == 0:
        levels += 1
    ch_mult = (1,) + (2,) * (levels - 1)
    resolutions = [min(height, width) // 2**i for i in range(levels)]
    if 16 in resolutions:
        attn = (16,)
    elif resolutions[-1] < 16:
        attn = (resolutions[-1],)
    else:
        attn = ()
    return ch_mult, attn


def check_unet_args(
    data_shape: Sequence[int],
    ch: int,
    ch_mult: Optional[Sequence[int]],
    num_res_blocks: int,
    attn_resolutions: Optional[Sequence[int]],
    dropout: float,
) -> Tuple[Tuple[int, ...], Tuple[int, ...], List[int]]:
    """Validate the U-Net family's size arguments (shared by the U-Net and its encoder-only classifier).

    ``ch_mult=None`` / ``attn_resolutions=None`` take :func:`unet_layout`'s choice for the image.
    Returns ``(ch_mult, attn_resolutions, resolutions)``: the first two as int tuples and the
    spatial resolution of every level. Raises ``ValueError`` naming the offending argument.
    """
    auto_mult, auto_attn = unet_layout(data_shape)
    ch_mult = auto_mult if ch_mult is None else tuple(int(m) for m in ch_mult)
    if attn_resolutions is None:
        resolutions = [min(int(data_shape[1]), int(data_shape[2])) // 2**i for i in range(len(ch_mult))]
        attn_resolutions = tuple(r for r in auto_attn if r in resolutions) or (resolutions[-1],)
    attn_resolutions = tuple(int(r) for r in attn_resolutions)
    if ch < 1 or not ch_mult or min(ch_mult) < 1 or num_res_blocks < 1:
        raise ValueError(
            f"need ch >= 1, a non-empty ch_mult of positive ints and num_res_blocks >= 1; "
            f"got ch={ch}, ch_mult={ch_mult}, num_res_blocks={num_res_blocks}"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
    UNet.validate_data_shape(data_shape, ch_mult)
    _, height, width = (int(d) for d in data_shape)
    resolutions = [min(height, width) // 2**i for i in range(len(ch_mult))]
    unknown = sorted(set(attn_resolutions) - set(resolutions))
    if unknown:
        raise ValueError(
            f"attn_resolutions {list(unknown)} match no level of this U-Net: with image size "
            f"{height}x{width} and ch_mult={list(ch_mult)} the level resolutions are {resolutions}; "
            "pick attn_resolutions among them, or use a network built for this size: model=unet (levels and "
            "attention sized to the image), model=ddpmpp_cifar10 (32x32), model=unet_small (8x8)"
        )
    return ch_mult, attn_resolutions, resolutions


__all__ = ["UNet", "check_unet_args", "unet_layout"]
