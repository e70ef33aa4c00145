r"""Time-dependent classifier networks ``(x [B, *data_shape], t [B]) -> logits [B, num_classes]``.

Registry ``CLASSIFIERS``, keyed like ``MODELS`` so that a classifier is built from the same
``model`` config group as the score network of the run:

* ``"mlp"`` — :class:`MLPClassifier`: the residual MLP of the score network (time embedding added
  in every block) with a linear head, for vectors ``[B, D]``;
* ``"unet"`` — :class:`UNetEncoderClassifier`: the down path and middle of the DDPM++ U-Net (the
  same residual/attention blocks and time embedding), then GroupNorm → SiLU → global average
  pooling → linear head, for images ``[B, C, H, W]`` (the classifier of Dhariwal & Nichol 2021
  with mean instead of attention pooling).

Training them is :mod:`sde_diffusion.tasks.classifier`.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import Registry
from .score_net import xavier_init_
from .embeddings import TimeEmbedding
from .layers import AttnBlock, Downsample, ResBlock, conv3x3, group_norm
from .mlp import ResidualMLPBlock
from .unet import check_unet_args

CLASSIFIERS: Registry = Registry("classifier")


# ---------------------------------------------------------------------------------- networks
class TimeClassifier(nn.Module):
    """Base of the classifier networks: ``data_shape``, ``num_classes`` and the ``(x, t)`` checks."""

    def __init__(self, data_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.data_shape: Tuple[int, ...] = tuple(int(s) for s in data_shape)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"a classifier needs num_classes >= 2 (an integer), got {num_classes!r}")
        self.num_classes = num_classes

    def _check_inputs(self, x: Tensor, t: Union[Tensor, float]) -> Tensor:
        """Validate shapes and return ``t`` as ``[B]`` in x's dtype (a scalar ``t`` is broadcast)."""
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(
                f"{type(self).__name__} was built for data of shape {self.data_shape}; got x of shape "
                f"{tuple(x.shape)} (expected [B, {', '.join(map(str, self.data_shape))}])"
            )
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape [B] = [{x.shape[0]}] (one time per sample), got {tuple(t.shape)}")
        return t


@CLASSIFIERS.register("mlp")
class MLPClassifier(TimeClassifier):
    """Residual MLP ``(x [B, D], t [B]) -> logits [B, num_classes]``.

    ``h = Linear(D, w)(x)``, ``num_blocks`` × :class:`~sde_diffusion.models.mlp.ResidualMLPBlock`
    (each adds its projection of the time embedding), logits ``= Linear(w, C)(SiLU(LN(h)))``.
    The arguments are those of :class:`~sde_diffusion.models.mlp.MLP`, so ``conf/model/mlp.yaml``
    configures both; ``zero_init`` starts the residual branches (not the head) at zero.
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        num_classes: int,
        hidden: int = 128,
        num_blocks: int = 3,
        time_dim: int = 64,
        embedding_type: str = "fourier",
        embedding_scale: Optional[float] = None,
        dropout: float = 0.0,
        zero_init: bool = True,
    ) -> None:
        super().__init__(data_shape, num_classes)
        if len(self.data_shape) != 1 or self.data_shape[0] < 1:
            raise ValueError(
                f"the 'mlp' classifier takes vectors with data_shape (D,), got {self.data_shape}; "
                "for images use model=unet_small (or another 'unet' config)"
            )
        if hidden < 1 or num_blocks < 0:
            raise ValueError(f"need hidden >= 1 and num_blocks >= 0, got hidden={hidden}, num_blocks={num_blocks}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        emb_dim = 4 * time_dim
        self.time_embed = TimeEmbedding(embedding_type, time_dim, emb_dim, embedding_scale)
        self.input = xavier_init_(nn.Linear(self.data_shape[0], hidden))
        self.blocks = nn.ModuleList([ResidualMLPBlock(hidden, emb_dim, dropout, zero_init) for _ in range(num_blocks)])
        self.out_norm = nn.LayerNorm(hidden)
        self.head = xavier_init_(nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor, t: Union[Tensor, float]) -> Tensor:
        t = self._check_inputs(x, t)
        emb = self.time_embed(t)
        h = self.input(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.head(F.silu(self.out_norm(h)))


@CLASSIFIERS.register("unet")
class UNetEncoderClassifier(TimeClassifier):
    """The DDPM++ U-Net's down path and middle, pooled: ``(x [B, C, H, W], t [B]) -> logits [B, num_classes]``.

    ``conv3×3(C → ch)``; per level ``num_res_blocks`` × ResBlock (+ attention at
    ``attn_resolutions``) and, between levels, a downsampling ResBlock (or Downsample layer);
    middle ResBlock → Attn → ResBlock; then GN → SiLU → mean over H, W → Linear(·, num_classes).
    Every ResBlock receives the time embedding (width ``4·ch``). The arguments are those of
    :class:`~sde_diffusion.models.unet.UNet` (same validation of the image size), so a
    ``conf/model/<unet config>.yaml`` configures both.
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        num_classes: int,
        ch: int = 64,
        ch_mult: Optional[Sequence[int]] = (1, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Optional[Sequence[int]] = (),
        dropout: float = 0.1,
        embedding_type: str = "sinusoidal",
        embedding_scale: Optional[float] = None,
        skip_rescale: bool = True,
        resblock_updown: bool = True,
        resamp_with_conv: bool = True,
        num_heads: int = 1,
        zero_init: bool = True,
        scale_shift_norm: bool = False,
    ) -> None:
        super().__init__(data_shape, num_classes)
        ch_mult, attn_resolutions, resolutions = check_unet_args(
            self.data_shape, ch, ch_mult, num_res_blocks, attn_resolutions, dropout
        )
        channels = self.data_shape[0]
        self.resblock_updown = resblock_updown
        emb_dim = 4 * ch
        self.time_embed = TimeEmbedding(embedding_type, ch, emb_dim, embedding_scale)

        def res(in_c: int, out_c: int, down: bool = False) -> ResBlock:
            return ResBlock(in_c, out_c, emb_dim, dropout, skip_rescale, down=down, zero_init=zero_init,
                            scale_shift_norm=scale_shift_norm)

        self.conv_in = conv3x3(channels, ch)
        blocks: List[nn.Module] = []
        in_c = ch
        for i, mult in enumerate(ch_mult):
            out_c = ch * mult
            for _ in range(num_res_blocks):
                blocks.append(res(in_c, out_c))
                in_c = out_c
                if resolutions[i] in attn_resolutions:
                    blocks.append(AttnBlock(in_c, num_heads, skip_rescale, zero_init))
            if i < len(ch_mult) - 1:
                blocks.append(res(in_c, in_c, down=True) if resblock_updown else Downsample(in_c, resamp_with_conv))
        blocks += [res(in_c, in_c), AttnBlock(in_c, num_heads, skip_rescale, zero_init), res(in_c, in_c)]
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = group_norm(in_c)
        self.head = xavier_init_(nn.Linear(in_c, num_classes))

    def forward(self, x: Tensor, t: Union[Tensor, float]) -> Tensor:
        t = self._check_inputs(x, t)
        emb = self.time_embed(t)
        h = self.conv_in(x)
        for block in self.blocks:
            # Residual blocks take the time embedding; attention and plain resampling do not.
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
        h = F.silu(self.norm_out(h)).mean(dim=(2, 3))
        return self.head(h)


__all__ = ["CLASSIFIERS", "TimeClassifier", "MLPClassifier", "UNetEncoderClassifier"]
