"""The package's shape: one job per module, and no two modules with one name."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import sde_diffusion

PKG = Path(sde_diffusion.__file__).parent


def test_no_two_modules_share_a_name() -> None:
    # `from .base import ...` in five packages, or three modules called classifier, make a reader
    # (and a traceback) ambiguous; every module name is unique in the package.
    names = Counter(p.stem for p in PKG.rglob("*.py") if p.name != "__init__.py")
    assert [n for n, k in names.items() if k > 1] == []


def test_the_package_root_offers_the_api_names() -> None:
    # The names the README's Python examples import from the package root.
    for name in ("sample", "make_sampler", "EndPoint", "SDES", "SAMPLERS", "LinearSDE", "VPSDE", "GaussianMixture",
                 "load_checkpoint", "load_classifier", "load_autoencoder", "fit", "Task", "TASKS"):
        assert getattr(sde_diffusion, name) is not None, name
