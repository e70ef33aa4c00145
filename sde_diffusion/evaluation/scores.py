r"""Inception score and kernel inception distance from a feature network's outputs.

* Inception score (Salimans et al. 2016), over ``splits`` equal parts of the samples:
  IS = exp(E_x KL(p(y|x) ‖ p(y))) with p(y) the part's mean of p(y|x); reported as the mean and
  standard deviation over the parts (10 in the usual protocol, 50k samples).
* KID (Bińkowski et al. 2018): the unbiased MMD² with the cubic polynomial kernel
  k(a, b) = (aᵀb/d + 1)³ between generated and real features ``[N, d]``, averaged over ``subsets``
  random subsets of ``subset_size`` per side (100 × 1000 as in StyleGAN2-ADA's metric); reported
  with the standard deviation over subsets. Unlike FID it is unbiased at any n.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def inception_score(probs: Tensor, splits: int = 10) -> Tuple[float, float]:
    """(mean, std) of exp(E KL(p(y|x) ‖ p(y))) over ``splits`` parts of ``probs`` ``[N, K]`` (rows sum to 1)."""
    p = torch.as_tensor(probs).detach().to(torch.float64)
    if p.dim() != 2 or p.shape[0] < 1:
        raise ValueError(f"probabilities must have shape [N, K], got {tuple(p.shape)}")
    splits = max(1, min(int(splits), p.shape[0]))
    scores = []
    for part in torch.tensor_split(p, splits):
        marginal = part.mean(0, keepdim=True)
        # xlogy: 0·log 0 = 0 for classes a sample gives no mass.
        kl = (torch.special.xlogy(part, part) - torch.special.xlogy(part, marginal)).sum(1)
        scores.append(torch.exp(kl.mean()))
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(unbiased=False)) if len(scores) > 1 else 0.0


def kernel_inception_distance(gen: Tensor, real: Tensor, subsets: int = 100, subset_size: int = 1000,
                              generator: Optional[torch.Generator] = None) -> Tuple[float, float]:
    """(mean, std) over subsets of the unbiased MMD² with k(a, b) = (aᵀb/d + 1)³; features ``[N, d]``, ``[M, d]``."""
    x_all, y_all = torch.as_tensor(gen).detach().double(), torch.as_tensor(real).detach().double()
    if x_all.dim() != 2 or y_all.dim() != 2 or x_all.shape[1] != y_all.shape[1]:
        raise ValueError(f"features must be [N, d] and [M, d] with the same d, got {tuple(x_all.shape)}, {tuple(y_all.shape)}")
    m = min(x_all.shape[0], y_all.shape[0], int(subset_size))
    if m < 2:
        raise ValueError(f"KID needs at least 2 feature vectors a side, got {x_all.shape[0]} and {y_all.shape[0]}")
    d = x_all.shape[1]
    gen_ = generator if generator is not None else torch.Generator().manual_seed(0)
    values = []
    for _ in range(int(subsets)):
        x = x_all[torch.randperm(x_all.shape[0], generator=gen_)[:m]]
        y = y_all[torch.randperm(y_all.shape[0], generator=gen_)[:m]]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        off = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        values.append(off - 2 * kxy.mean())
    v = torch.stack(values)
    return float(v.mean()), float(v.std(unbiased=False)) if len(values) > 1 else 0.0


__all__ = ["inception_score", "kernel_inception_distance"]
