r"""The Inception-v3 feature network for FID, loaded from a local file (never downloaded by default).

Which network: the TensorFlow FID Inception graph (2015-12-05) exported to TorchScript by NVIDIA for
StyleGAN2-ADA / EDM (``inception-2015-12-05.pt``). It reproduces the original TensorFlow FID
features (bilinear resize to 299×299 inside the graph, pixels in [0, 255]) and needs neither
torchvision nor torch-fidelity — neither of which installs beside this torch build.

Where the file is looked for, in order:

1. the ``path`` argument;
2. the ``SDE_DIFFUSION_INCEPTION`` environment variable (a file path);
3. ``<cache>/inception-2015-12-05.pt`` with ``<cache>`` = ``cache_dir`` argument, else
   :func:`~sde_diffusion.evaluation.cache.cache_dir` (``$SDE_DIFFUSION_CACHE`` or
   ``~/.cache/sde_diffusion``) and then torch hub's ``<TORCH_HOME>/hub/checkpoints``.

If it is nowhere, :class:`InceptionWeightsMissing` says which file to fetch from where and where
to put it; ``download=True`` fetches it into the cache when a network is available.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import torch
from torch import Tensor, nn

from .cache import PathLike, cache_dir

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_FILENAME = "inception-2015-12-05.pt"
ENV_INCEPTION = "SDE_DIFFUSION_INCEPTION"


class InceptionWeightsMissing(FileNotFoundError):
    """The Inception weights file is not available locally."""


def _candidates(cache: Optional[PathLike]) -> List[Path]:
    if cache is not None:
        return [Path(cache).expanduser() / INCEPTION_FILENAME]
    return [cache_dir() / INCEPTION_FILENAME, Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME]


def missing_message(cache: Optional[PathLike] = None) -> str:
    target = _candidates(cache)[0]
    looked = ", ".join(str(p) for p in _candidates(cache))
    return (
        f"Inception weights for FID not found (looked in: {looked}). Download {INCEPTION_URL} "
        f"and place it at {target}, or point the {ENV_INCEPTION} environment variable (or the "
        f"weights_path argument) at the file. With network access, FID(download=True) fetches it."
    )


def inception_weights_path(
    path: Optional[PathLike] = None, *, cache: Optional[PathLike] = None, download: bool = False
) -> Path:
    """Resolve the Inception weights file (see the module docstring for the search order)."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InceptionWeightsMissing(f"Inception weights file {p} does not exist. " + missing_message(cache))
        return p
    env = os.environ.get(ENV_INCEPTION)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise InceptionWeightsMissing(
                f"{ENV_INCEPTION}={env} does not name an existing file. " + missing_message(cache)
            )
        return p
    for p in _candidates(cache):
        if p.is_file():
            return p
    if not download:
        raise InceptionWeightsMissing(missing_message(cache))
    target = _candidates(cache)[0]
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Writes to a temporary file and renames it into place.
        torch.hub.download_url_to_file(INCEPTION_URL, str(target), progress=False)
    except Exception as err:  # any network failure ends in the same instruction
        raise InceptionWeightsMissing(f"download failed ({err}). " + missing_message(cache)) from err
    return target


class InceptionFeatures(nn.Module):
    """Pool-3 features ``[B, 2048]`` of images ``[B, C, H, W]`` in [0, 1] (C = 1 or 3).

    Images are quantised to 8 bits (round(255·x)), as when samples are saved as PNG for the
    reference TensorFlow implementation; grey images are repeated to RGB. The TorchScript graph
    resizes to 299×299 itself. ``num_features`` is read off one forward pass.
    """

    def __init__(
        self, weights_path: Optional[PathLike] = None, *, cache: Optional[PathLike] = None, download: bool = False
    ) -> None:
        super().__init__()
        path = inception_weights_path(weights_path, cache=cache, download=download)
        try:
            self.model = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as err:
            raise ValueError(
                f"{path} is not a loadable TorchScript Inception file ({err}); expected {INCEPTION_FILENAME} "
                f"from {INCEPTION_URL}"
            ) from err
        self.weights_path = path
        with torch.no_grad():
            self.num_features = int(self.model(torch.zeros(1, 3, 299, 299), return_features=True).shape[-1])

    @staticmethod
    def _pixels(images: Tensor) -> Tensor:
        """[0, 1] floats or uint8 → 8-bit RGB values as float32 (what the graph takes)."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape [B, 1 or 3, H, W] with values in [0, 1], got {tuple(images.shape)}")
        x = images.to(torch.float32)
        if images.dtype == torch.uint8:
            x = x / 255.0
        x = torch.round(x.clamp(0, 1) * 255.0)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.model(self._pixels(images), return_features=True)

    @torch.no_grad()
    def probabilities(self, images: Tensor) -> Tensor:
        """Class probabilities ``[B, 1008]`` for the Inception score: the graph's softmax without the
        output layer's bias (``no_output_bias=True``), as the original TensorFlow IS code computes it."""
        return self.model(self._pixels(images), no_output_bias=True)


__all__ = [
    "INCEPTION_URL",
    "INCEPTION_FILENAME",
    "ENV_INCEPTION",
    "InceptionWeightsMissing",
    "inception_weights_path",
    "missing_message",
    "InceptionFeatures",
]
