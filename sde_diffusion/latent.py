r"""The latent space of a trained autoencoder, as seen by a score model (LSGM / latent diffusion).

A :class:`LatentCodec` wraps the frozen encoder and decoder of a ``task=autoencoder`` checkpoint
with its measured scale c = 1/std(training latents):

* ``encode(x) = c · μ_φ(x)`` — the posterior *mean*, scaled (deterministic: the same image always
  has the same latent, and the scale was measured on these means);
* ``decode(u) = D_ψ(u / c)``.

A density of u converts to one of z = u/c by log p_z(z) = log p_u(c z) + d·log c (d = latent
dimension); :meth:`LatentCodec.log_det_scale` is that d·log c.

The codec is identified by a digest of the autoencoder's weights (``weights_sha256``); a latent
score model records it and refuses any other autoencoder.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .models.kl_autoencoder import KLAutoencoder


def weights_digest(state: Mapping[str, Tensor]) -> str:
    """sha256 over the names, shapes, dtypes and bytes of a state dict, in key order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


class LatentCodec:
    """Frozen encoder/decoder with its scale. Attributes: ``autoencoder``, ``scale_factor``,
    ``data_shape``, ``latent_shape``, ``path``, ``weights_sha256``."""

    def __init__(self, autoencoder: KLAutoencoder, scale_factor: float, path: Optional[Path] = None,
                 weights_sha256: Optional[str] = None) -> None:
        if not scale_factor > 0 or not math.isfinite(scale_factor):
            raise ValueError(f"the latent scale factor must be positive and finite, got {scale_factor}")
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.scale_factor = float(scale_factor)
        self.data_shape = tuple(autoencoder.data_shape)
        self.latent_shape = tuple(autoencoder.latent_shape)
        self.path = path
        self.weights_sha256 = weights_sha256 or weights_digest(autoencoder.state_dict())

    def _on(self, like: Tensor) -> KLAutoencoder:
        ref = next(self.autoencoder.parameters())
        if ref.device != like.device or ref.dtype != like.dtype:
            self.autoencoder.to(device=like.device, dtype=like.dtype)
        return self.autoencoder

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Images ``[B, *data_shape]`` (model range) → scaled latents ``[B, *latent_shape]``."""
        mean, _ = self._on(x).encode(x)
        return mean * self.scale_factor

    @torch.no_grad()
    def decode(self, u: Tensor) -> Tensor:
        """Scaled latents ``[B, *latent_shape]`` → images ``[B, *data_shape]`` (model range)."""
        return self._on(u).decode(u / self.scale_factor)

    @property
    def log_det_scale(self) -> float:
        """d·log c: add it to log p_u(u) to get log p_z(z) of the unscaled latents z = u/c."""
        return math.prod(self.latent_shape) * math.log(self.scale_factor)

    def info(self) -> Dict[str, Any]:
        """What a latent score checkpoint records about its autoencoder."""
        return {"path": str(self.path) if self.path is not None else None, "weights_sha256": self.weights_sha256,
                "scale_factor": self.scale_factor, "latent_shape": list(self.latent_shape),
                "data_shape": list(self.data_shape), "encoding": "scale_factor * posterior mean"}


def load_latent_codec(path: Union[str, Path], expect_sha256: Optional[str] = None) -> LatentCodec:
    """The codec of a ``task=autoencoder`` run directory or checkpoint (``latent=<path>``).

    With ``expect_sha256`` (what a latent score model recorded), a different autoencoder is refused.
    """
    from .checkpoints import load, resolve_checkpoint_path

    file = resolve_checkpoint_path(path, key="latent")
    module = load(file, kind="autoencoder", key="latent")
    if module.scale_factor is None:
        raise ValueError(f"{file} records no latent scale (it was saved before any training data was seen)")
    net = module.net
    digest = weights_digest(net.state_dict())
    if expect_sha256 is not None and digest != expect_sha256:
        raise ValueError(
            f"latent={path} is not the autoencoder this score model was trained with: its weights digest is "
            f"{digest[:12]}…, the checkpoint needs {expect_sha256[:12]}…; give that autoencoder's run "
            "(latent=<run dir or .ckpt>) or train a new score model on this one"
        )
    return LatentCodec(net, float(module.scale_factor), path=file.resolve(), weights_sha256=digest)


def codec_for_task(
    source: Optional[Union[str, Path]], data_shape: Sequence[int], recorded: Optional[Mapping[str, Any]] = None
) -> Optional[LatentCodec]:
    """The codec a training task works through: ``None`` without ``source`` (``cfg.latent`` or a
    moved run), else the autoencoder there, refused when its weights are not the ``recorded`` ones
    (what a checkpoint saved) or when it was trained on images of another shape than ``data_shape``."""
    if not source:
        return None
    codec = load_latent_codec(source, expect_sha256=(recorded or {}).get("weights_sha256"))
    if codec.data_shape != tuple(int(s) for s in data_shape):
        raise ValueError(
            f"latent={source}: the autoencoder was trained on images {codec.data_shape}, but the data "
            f"gives {tuple(data_shape)}; use the data (and data.size) it was trained on"
        )
    return codec


__all__ = ["LatentCodec", "codec_for_task", "load_latent_codec", "weights_digest"]
