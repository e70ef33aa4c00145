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


__all__ = ["random_family_parameters"]
