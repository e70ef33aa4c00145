r"""2-D toy distributions, generated in torch from a seed, normalised to unit scale.

Each set is first drawn in its usual raw coordinates, then mapped affinely to model coordinates

.. math::  x = (x_{raw} - \mu) / s,\qquad s^2 = \tfrac12 \operatorname{tr} \operatorname{Cov}(x_{raw}),

with the exact μ and s of the *distribution* (closed forms below, not sample estimates), so the
data have mean 0 and average per-coordinate variance 1 whatever ``n`` is, and the shape keeps its
aspect ratio. Raw definitions (``noise`` = std of added isotropic Gaussian noise, raw units):

* ``swiss_roll``  t = 1.5π(1 + 2u), u ~ U(0,1);  x = (t cos t, t sin t) + noise·z.
  E x = (2, 2/(3π)),  E‖x‖² = E t² + 2 noise² = 9.75π² + 2 noise².
* ``moons``  c ~ Bernoulli(½), θ ~ U(0, π); outer (cos θ, sin θ), inner (1 − cos θ, ½ − sin θ).
  E x = (½, ¼),  Var x₁ = ¾,  Var x₂ = 5/8 − 1/π − 1/16;  y = c.
* ``checkerboard``  the 8 dark squares of a 4×4 board on [−2, 2]²: both marginals U(−2, 2),
  so μ = 0 and Var = 4/3 per coordinate.
* ``8gaussians``  ``GaussianMixture.ring(8, radius=2, std=noise)``;  y = component.
* ``gmm``  a ``GaussianMixture`` (``mixture="ring"``, ``"random"`` or an instance); y = component.
  ``Toy2D.mixture`` is the same mixture in model coordinates — the exact ground truth.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..toy import GaussianMixture
from .datamodule import BaseDataModule, TensorPairDataset
from .transforms import IdentityTransform
from ..registry import DATASETS

TOY_DATASETS: Tuple[str, ...] = ("swiss_roll", "moons", "8gaussians", "checkerboard", "gmm")

_DEFAULT_NOISE = {"swiss_roll": 0.5, "moons": 0.05, "checkerboard": 0.0, "8gaussians": 0.2, "gmm": 0.3}

# Offset that separates the default ``reference`` stream from the training stream of the same seed.
_REFERENCE_SEED_OFFSET = 0x5DEECE66D


def _check_toy_name(name: str) -> str:
    if name not in TOY_DATASETS:
        raise ValueError(f"unknown toy dataset {name!r}; choose one of: {', '.join(TOY_DATASETS)}")
    return name


class Toy2D:
    """A 2-D toy distribution with exact normalisation; ``sample(n, generator) -> (x, y)``.

    Args:
        name: one of ``TOY_DATASETS``.
        noise: std of the Gaussian noise in raw units (component std for the mixtures);
            ``None`` picks the set's default.
        normalize: map to mean 0, average per-coordinate variance 1 (see module docstring).
        mixture: for ``gmm`` only: ``"ring"`` (``components`` modes on a circle of ``radius``),
            ``"random"`` (``GaussianMixture.random(2, components, seed=mixture_seed)``) or a
            2-D ``GaussianMixture``.
    """

    def __init__(
        self,
        name: str,
        noise: Optional[float] = None,
        normalize: bool = True,
        mixture: Union[str, GaussianMixture] = "ring",
        components: int = 8,
        radius: float = 4.0,
        mixture_seed: int = 0,
    ) -> None:
        self.name = _check_toy_name(name)
        self.noise = float(_DEFAULT_NOISE[name] if noise is None else noise)
        if not math.isfinite(self.noise) or self.noise < 0:
            raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
        self.normalize = bool(normalize)
        self.raw_mixture = self._build_mixture(mixture, components, radius, mixture_seed)
        self.mean, self.scale = self._raw_moments()
        if not self.normalize:
            self.mean, self.scale = torch.zeros(2, dtype=torch.float64), 1.0

    # ------------------------------------------------------------------ construction
    def _build_mixture(self, mixture: Union[str, GaussianMixture], components: int, radius: float, mixture_seed: int) -> Optional[GaussianMixture]:
        if self.name == "8gaussians":
            return GaussianMixture.ring(k=8, radius=2.0, std=max(self.noise, 1e-6))
        if self.name != "gmm":
            return None
        if isinstance(mixture, GaussianMixture):
            gm = mixture
        elif mixture == "ring":
            gm = GaussianMixture.ring(k=int(components), radius=float(radius), std=max(self.noise, 1e-6))
        elif mixture == "random":
            gm = GaussianMixture.random(2, int(components), seed=int(mixture_seed))
        else:
            raise ValueError(f"mixture must be 'ring', 'random' or a GaussianMixture, got {mixture!r}")
        if gm.dim != 2:
            raise ValueError(f"toy2d needs a 2-D mixture, got dimension {gm.dim}")
        return gm

    def _raw_moments(self) -> Tuple[Tensor, float]:
        """Exact mean ``[2]`` and scale s = √(tr Cov / 2) of the raw distribution."""
        s2 = self.noise**2
        if self.raw_mixture is not None:
            mu = self.raw_mixture.mean()
            return mu, math.sqrt(float(torch.trace(self.raw_mixture.covariance())) / 2)
        if self.name == "swiss_roll":
            mu = torch.tensor([2.0, 2.0 / (3 * math.pi)], dtype=torch.float64)
            trace = 9.75 * math.pi**2 - float(mu @ mu) + 2 * s2
        elif self.name == "moons":
            mu = torch.tensor([0.5, 0.25], dtype=torch.float64)
            trace = 0.75 + (0.625 - 1 / math.pi - 0.0625) + 2 * s2
        else:  # checkerboard
            mu = torch.zeros(2, dtype=torch.float64)
            trace = 2 * (4.0 / 3.0) + 2 * s2
        return mu, math.sqrt(trace / 2)

    # ------------------------------------------------------------------ properties
    @property
    def num_classes(self) -> Optional[int]:
        """Number of distinct labels in ``y`` (mixture components, moons), else ``None``."""
        if self.raw_mixture is not None:
            return self.raw_mixture.num_components
        return 2 if self.name == "moons" else None

    @property
    def mixture(self) -> Optional[GaussianMixture]:
        """The exact mixture in model coordinates (``gmm``, ``8gaussians``), else ``None``.

        If x_raw ~ Σ w_k N(μ_k, Σ_k) then (x_raw − μ)/s ~ Σ w_k N((μ_k − μ)/s, Σ_k/s²).
        """
        gm = self.raw_mixture
        if gm is None:
            return None
        return GaussianMixture(gm.weights, (gm.means - self.mean) / self.scale, gm.covs / self.scale**2)

    # ------------------------------------------------------------------ sampling
    def sample_raw(self, n: int, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """``n`` draws in raw coordinates: x ``[n, 2]`` float64, y ``[n]`` int64."""
        g = generator
        f64 = torch.float64
        y = torch.zeros(n, dtype=torch.int64)
        if self.raw_mixture is not None:
            x, y = self.raw_mixture.sample(n, generator=g, return_labels=True)
            return x, y.to(torch.int64)
        if self.name == "swiss_roll":
            t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=f64))
            x = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1)
        elif self.name == "moons":
            y = torch.randint(0, 2, (n,), generator=g)
            th = math.pi * torch.rand(n, generator=g, dtype=f64)
            outer = torch.stack([torch.cos(th), torch.sin(th)], 1)
            inner = torch.stack([1 - torch.cos(th), 0.5 - torch.sin(th)], 1)
            x = torch.where(y[:, None] == 0, outer, inner)
        else:  # checkerboard: pick a column, then one of its two dark rows
            x1 = 4 * torch.rand(n, generator=g, dtype=f64) - 2
            row = torch.rand(n, generator=g, dtype=f64) - 2 * torch.randint(0, 2, (n,), generator=g)
            x = torch.stack([x1, row + torch.floor(x1).remainder(2)], 1)
        if self.noise > 0:
            x = x + self.noise * torch.randn(n, 2, generator=g, dtype=f64)
        return x, y

    def sample(self, n: int, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32) -> Tuple[Tensor, Tensor]:
        """``n`` draws in model coordinates: x ``[n, 2]`` (``dtype``), y ``[n]`` int64."""
        x, y = self.sample_raw(n, generator)
        return ((x - self.mean) / self.scale).to(dtype), y

    def to_raw(self, x: Tensor) -> Tensor:
        """Model coordinates → raw coordinates, x·s + μ (for plots in the familiar units)."""
        return x * self.scale + self.mean.to(x)

    def __repr__(self) -> str:
        return f"Toy2D({self.name!r}, noise={self.noise}, normalize={self.normalize})"


def make_toy(name: str, n: int, generator: Optional[torch.Generator] = None, **kwargs: Any) -> Tuple[Tensor, Tensor]:
    """Shortcut: ``Toy2D(name, **kwargs).sample(n, generator)`` → (x ``[n, 2]`` float32, y ``[n]``)."""
    return Toy2D(name, **kwargs).sample(n, generator)


@DATASETS.register("toy2d")
class Toy2DDataModule(BaseDataModule):
    """A 2-D toy set as a LightningDataModule; batches ``(x [B, 2], y [B])``.

    ``n`` training and ``n_val`` validation points are drawn once from ``seed``;
    ``reference(n)`` draws fresh points from the distribution itself.

    Args:
        dataset: one of ``TOY_DATASETS``.
        n: training-set size.
        n_val: validation-set size (default: n // 10).
        noise, normalize, mixture, components, radius, mixture_seed: see ``Toy2D``.
        batch_size, batch_per_device, num_workers, seed: see ``BaseDataModule``.
    """

    is_image = False
    data_shape = (2,)

    def __init__(
        self,
        dataset: str = "swiss_roll",
        n: int = 100_000,
        n_val: Optional[int] = None,
        noise: Optional[float] = None,
        normalize: bool = True,
        mixture: Union[str, GaussianMixture] = "ring",
        components: int = 8,
        radius: float = 4.0,
        mixture_seed: int = 0,
        batch_size: int = 512,
        num_workers: int = 0,
        seed: int = 0,
        batch_per_device: Optional[int] = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, val_fraction=0.0,
                         batch_per_device=batch_per_device)
        self.toy = Toy2D(dataset, noise=noise, normalize=normalize, mixture=mixture, components=components, radius=radius, mixture_seed=mixture_seed)
        self.dataset_name = dataset
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        self.n = n
        self.n_val = max(1, n // 10) if n_val is None else int(n_val)
        if self.n_val < 0:
            raise ValueError(f"n_val must be >= 0, got {n_val!r}")
        self.num_classes = self.toy.num_classes

    @property
    def mixture(self) -> Optional[GaussianMixture]:
        """Exact mixture in model coordinates (``gmm``, ``8gaussians``), else ``None``."""
        return self.toy.mixture

    def _build_splits(self) -> Tuple[Dataset, Dataset]:
        gen = torch.Generator().manual_seed(self.seed)
        x, y = self.toy.sample(self.n + self.n_val, gen)
        return TensorPairDataset(x[: self.n], y[: self.n]), TensorPairDataset(x[self.n :], y[self.n :])

    def _transform(self, train: bool) -> IdentityTransform:
        return IdentityTransform()

    def reference(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``n`` fresh draws ``[n, 2]`` (float32) from the distribution, independent of the
        training points; ``generator=None`` uses a fixed stream derived from ``seed``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        gen = generator if generator is not None else torch.Generator().manual_seed(self.seed + _REFERENCE_SEED_OFFSET)
        return self.toy.sample(n, gen)[0]


__all__ = ["TOY_DATASETS", "Toy2D", "make_toy", "Toy2DDataModule"]
