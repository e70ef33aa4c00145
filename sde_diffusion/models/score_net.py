r"""What every score network shares: the call contract and its input checks.

Contract: ``net(x [B, *data_shape], t [B] continuous time in [0, T], y [B] int64 | None = None)
-> [B, *data_shape]`` (the prediction, ε by default). Labels ``y`` lie in ``[0, num_classes)``;
``y == num_classes`` (or ``y=None``) is the null label. ``num_classes`` is ``None`` for an
unconditional network, which then ignores ``y`` so that callers may always pass the batch labels.

The checks below look only at shapes, never at tensor values, so they are static guards under
``torch.compile`` and cause no graph breaks.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn


class ScoreNet(nn.Module):
    """Base class: stores ``data_shape`` and ``num_classes`` and validates ``(x, t)`` in ``forward``."""

    def __init__(self, data_shape: Sequence[int], num_classes: Optional[int] = None) -> None:
        super().__init__()
        self.data_shape: Tuple[int, ...] = tuple(int(s) for s in data_shape)
        if num_classes is not None:
            num_classes = int(num_classes)
            if num_classes < 1:
                raise ValueError(
                    f"num_classes must be a positive integer, or None for an unconditional model; got {num_classes}"
                )
        self.num_classes: Optional[int] = num_classes

    @property
    def null_label(self) -> Optional[int]:
        """The label index meaning "no condition" (``num_classes``), or ``None`` if unconditional."""
        return self.num_classes

    def _check_inputs(self, x: Tensor, t: Tensor) -> Tensor:
        """Validate shapes and return ``t`` as a ``[B]`` tensor (a 0-dim ``t`` is broadcast)."""
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(
                f"{type(self).__name__} was built for data of shape {self.data_shape}; got x of shape "
                f"{tuple(x.shape)} (expected [B, {', '.join(map(str, self.data_shape))}])"
            )
        if not torch.is_tensor(t):
            t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape [B] = [{x.shape[0]}] (one time per sample), got {tuple(t.shape)}")
        return t

    def num_parameters(self) -> int:
        """Total number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def xavier_init_(module: nn.Module, zero: bool = False) -> nn.Module:
    """Initialise a Linear/Conv weight with Xavier-uniform (DDPM's fan-average scheme), or with zeros.

    Zero-initialising the last layer of a residual branch (and the output layer) makes the network
    start as the identity on its skip path, which stabilises early training of deep U-Nets.
    """
    weight = module.weight  # type: ignore[union-attr]
    if zero:
        nn.init.zeros_(weight)
    else:
        nn.init.xavier_uniform_(weight)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)  # type: ignore[arg-type]
    return module


__all__ = ["ScoreNet", "xavier_init_"]
