r"""The random family of exact-score test problems, as tensors: one draw per seed.

The family (every choice independent, uniform on the stated scale):

* dimension D = round(2^u), u ~ U[1, 8] (log-uniform over 2…256);
* K ~ U{2, …, 12} modes with weights w_k ∝ e^{v_k}, v_k ~ U[0, log 50] (ratios up to 1:50);
* a scale per mode s_k, log-uniform over [0.03, 3] (scales spanning 1:100), and within each mode
  stds s_k·e^{a}, a ~ U[−1, 1] per axis, on random rotated axes (full covariances);
* separation r, log-uniform over [0.5, 20] (overlapping → isolated): the means are
  r·median(s)·√(2/D)·z_k with z_k ~ N(0, I_D), so pairwise distances are ≈ 2r·median(s).

:func:`sde_diffusion.testing.random_family` wraps a draw in a
:class:`~sde_diffusion.toy.GaussianMixture`. This module needs nothing from the library, so any
part of it can build the family without an import cycle.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor


def random_family_parameters(seed: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(weights ``[K]``, means ``[K, D]``, covariances ``[K, D, D]``) of draw ``seed``, float64.

    The same seed gives the same tensors on every machine (one CPU generator, float64 draws).
    """
    gen = torch.Generator().manual_seed(int(seed))
    u = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))  # noqa: E731
    dim = max(2, int(round(2 ** u(1.0, 8.0))))
    k = int(torch.randint(2, 13, (), generator=gen))
    w = torch.exp(math.log(50.0) * torch.rand(k, generator=gen, dtype=torch.float64))
    scales = torch.exp(math.log(0.03) + math.log(100.0) * torch.rand(k, generator=gen, dtype=torch.float64))
    aniso = torch.exp(2 * torch.rand(k, dim, generator=gen, dtype=torch.float64) - 1)
    stds = scales[:, None] * aniso
    q, _ = torch.linalg.qr(torch.randn(k, dim, dim, generator=gen, dtype=torch.float64))
    covs = q @ torch.diag_embed(stds**2) @ q.transpose(1, 2)
    covs = 0.5 * (covs + covs.transpose(1, 2))
    sep = math.exp(u(math.log(0.5), math.log(20.0)))
    means = sep * float(scales.median()) * torch.randn(k, dim, generator=gen, dtype=torch.float64) * math.sqrt(2.0 / dim)
    return w, means, covs


def _structured_parameters(gen: torch.Generator) -> Tuple[Tensor, Tensor, Tensor]:
    """Many sharp modes in few dimensions: a lattice, a ring or a scatter (see :func:`wide_family_parameters`)."""
    u = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))  # noqa: E731
    dim = int(torch.randint(2, 9, (), generator=gen))
    k = max(2, min(64, int(round(2 ** u(1.0, 6.0)))))
    layout = ("grid", "ring", "scatter")[int(torch.randint(0, 3, (), generator=gen))]
    if layout == "grid":
        side = math.ceil(math.sqrt(k))
        ij = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
        pick = torch.randperm(side * side, generator=gen)[:k]
        flat = ij[pick].to(torch.float64)  # unit spacing
    elif layout == "ring":
        angle = 2 * math.pi * torch.arange(k, dtype=torch.float64) / k
        radius = 0.5 / math.sin(math.pi / k)  # unit spacing between neighbours
        flat = radius * torch.stack([angle.cos(), angle.sin()], -1)
    else:
        flat = None
    if flat is not None:
        basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
        means = flat @ basis[:, :2].T  # the layout in a random plane
    else:
        means = (k ** (1.0 / dim)) * torch.rand(k, dim, generator=gen, dtype=torch.float64)
        nearest = torch.cdist(means, means).fill_diagonal_(math.inf).min(1).values
        means = means / nearest.median()  # unit median nearest-neighbour distance
    means = means - means.mean(0)
    # mode std : spacing from 1:2 down to 1:50; the absolute scale from 0.03 to 1.
    ratio = math.exp(u(math.log(1 / 50), math.log(1 / 2)))
    std = math.exp(u(math.log(0.03), math.log(1.0)))
    means = means * (std / ratio)
    w = torch.exp(math.log(50.0) * torch.rand(k, generator=gen, dtype=torch.float64))
    stds = std * torch.exp(0.3 * (2 * torch.rand(k, 1, generator=gen, dtype=torch.float64) - 1)) \
        * torch.exp(0.5 * (2 * torch.rand(k, dim, generator=gen, dtype=torch.float64) - 1))
    q, _ = torch.linalg.qr(torch.randn(k, dim, dim, generator=gen, dtype=torch.float64))
    covs = q @ torch.diag_embed(stds**2) @ q.transpose(1, 2)
    return w, means, 0.5 * (covs + covs.transpose(1, 2))


def wide_family_parameters(seed: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(weights ``[K]``, means ``[K, D]``, covariances ``[K, D, D]``) of draw ``seed`` of the wider family, float64.

    Half the draws (a fair coin per seed) are :func:`random_family_parameters` (2–256 D, 2–12 modes).
    The other half have many sharp, well-separated modes in few dimensions:

    * D ~ U{2, …, 8}; K = round(2^u), u ~ U[1, 6] (2…64 modes), weights up to 1:50 as above;
    * layout, each with probability 1/3: a square lattice (K of its sites, at random), a ring (K
      equally spaced points), both in a random 2-D plane of R^D, or a uniform scatter in a cube;
    * nearest-neighbour spacing d and mode std s with s/d log-uniform over [1/50, 1/2], s
      log-uniform over [0.03, 1]; per mode s·e^{U[−0.3, 0.3]}, per axis e^{U[−0.5, 0.5]}, on random
      rotated axes.
    """
    gen = torch.Generator().manual_seed(int(seed) + 7_000_003)
    if float(torch.rand((), generator=gen, dtype=torch.float64)) < 0.5:
        return random_family_parameters(seed)
    return _structured_parameters(gen)


def wide_family_kind(seed: int) -> str:
    """``"structured"`` (many modes, 2–8 D) or ``"random"`` (the original family) for draw ``seed``."""
    gen = torch.Generator().manual_seed(int(seed) + 7_000_003)
    return "random" if float(torch.rand((), generator=gen, dtype=torch.float64)) < 0.5 else "structured"


__all__ = ["random_family_parameters", "wide_family_parameters", "wide_family_kind"]
