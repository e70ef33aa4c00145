r"""A residual MLP score network for vector data (2-D toys, low-dimensional densities).

Architecture (width ``w = hidden``, time/label embedding ``e [B, 4w']``, ``w' = time_dim``)::

    h = Linear(D, w)(x)
    repeat num_blocks:  h = h + Linear(w, w)(drop(SiLU(LN(Linear(w, w)(SiLU(LN(h)))) + Linear(e))))
    out = Linear(w, D)(SiLU(LN(h)))

``e = TimeEmbedding(t) + LabelEmbedding(y)``; each block adds its own projection of ``SiLU(e)``,
so every block sees the time. With ``zero_init`` the last linear layer of every block and the
output layer start at zero (the network outputs exactly 0 at initialisation).

Shapes: ``x [B, D]``, ``t [B]``, ``y [B] | None`` → ``[B, D]``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .score_net import ScoreNet, xavier_init_
from .embeddings import LabelEmbedding, TimeEmbedding
from ..registry import MODELS


class ResidualMLPBlock(nn.Module):
    """``h + W2 · drop(SiLU(LN(W1 · SiLU(LN(h)) + P · SiLU(e))))`` for ``h [B, w]``, ``e [B, e_dim]``."""

    def __init__(self, width: int, emb_dim: int, dropout: float = 0.0, zero_init: bool = True) -> None:
        super().__init__()
        self.norm_0 = nn.LayerNorm(width)
        self.linear_0 = xavier_init_(nn.Linear(width, width))
        self.emb_proj = xavier_init_(nn.Linear(emb_dim, width))
        self.norm_1 = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)
        self.linear_1 = xavier_init_(nn.Linear(width, width), zero=zero_init)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        z = self.linear_0(F.silu(self.norm_0(h)))
        z = z + self.emb_proj(F.silu(emb))
        z = self.linear_1(self.dropout(F.silu(self.norm_1(z))))
        return h + z


@MODELS.register("mlp")
class MLP(ScoreNet):
    """Residual MLP ``net(x [B, D], t [B], y [B] | None) -> [B, D]``.

    Args:
        data_shape: ``(D,)``.
        num_classes: number of classes for label conditioning, or ``None``.
        hidden: width ``w`` of the residual stream.
        num_blocks: number of residual blocks.
        time_dim: width of the fixed time features; the embedding MLP widens them to ``4 · time_dim``.
        embedding_type: ``"fourier"`` or ``"sinusoidal"``.
        embedding_scale: Fourier frequency std or sinusoidal time factor (``None`` = default 16 / 1000).
        dropout: dropout probability inside the blocks.
        zero_init: start the blocks' last layers and the output layer at zero.
        learn_sigma: also output Improved DDPM's variance interpolation v: ``[B, 2D]`` = (prediction, v).
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        num_classes: Optional[int] = None,
        hidden: int = 128,
        num_blocks: int = 3,
        time_dim: int = 64,
        embedding_type: str = "fourier",
        embedding_scale: Optional[float] = None,
        dropout: float = 0.0,
        zero_init: bool = True,
        learn_sigma: bool = False,
    ) -> None:
        super().__init__(data_shape, num_classes)
        self.validate_data_shape(self.data_shape)
        self.learn_sigma = bool(learn_sigma)
        if hidden < 1 or num_blocks < 0:
            raise ValueError(f"need hidden >= 1 and num_blocks >= 0, got hidden={hidden}, num_blocks={num_blocks}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        (dim,) = self.data_shape
        emb_dim = 4 * time_dim
        self.time_embed = TimeEmbedding(embedding_type, time_dim, emb_dim, embedding_scale)
        self.label_embed = LabelEmbedding(self.num_classes, emb_dim) if self.num_classes is not None else None
        self.input = xavier_init_(nn.Linear(dim, hidden))
        self.blocks = nn.ModuleList(
            [ResidualMLPBlock(hidden, emb_dim, dropout, zero_init) for _ in range(num_blocks)]
        )
        self.out_norm = nn.LayerNorm(hidden)
        self.output = xavier_init_(nn.Linear(hidden, dim * (2 if self.learn_sigma else 1)), zero=zero_init)

    @classmethod
    def validate_data_shape(cls, data_shape: Sequence[int]) -> None:
        """Raise ``ValueError`` unless ``data_shape`` is a single positive dimension ``(D,)``."""
        shape = tuple(data_shape)
        if len(shape) != 1 or shape[0] < 1:
            raise ValueError(
                f"MLP takes vector data with data_shape (D,); got {shape}. For images use model 'unet', "
                "or flatten the data first."
            )

    def forward(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        t = self._check_inputs(x, t)
        emb = self.time_embed(t)
        if self.label_embed is not None:
            emb = emb + self.label_embed(y, x.shape[0])
        h = self.input(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.output(F.silu(self.out_norm(h)))


__all__ = ["MLP", "ResidualMLPBlock"]
