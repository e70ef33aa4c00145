"""The cache directory for evaluation networks, and atomic writes into it.

Resolution order: the ``SDE_DIFFUSION_CACHE`` environment variable, else
``$XDG_CACHE_HOME/sde_diffusion``, else ``~/.cache/sde_diffusion``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..io import atomic_path

ENV_CACHE = "SDE_DIFFUSION_CACHE"
PathLike = Union[str, "os.PathLike[str]"]


def cache_dir(override: Optional[PathLike] = None) -> Path:
    """The directory for cached evaluation files (not created here)."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sde_diffusion"


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    """``torch.save`` through :func:`sde_diffusion.io.atomic_path`, so readers never see a partial file."""
    target = Path(path).expanduser()
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)
    return target


__all__ = ["ENV_CACHE", "cache_dir", "atomic_torch_save"]
