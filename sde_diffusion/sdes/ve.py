"""Variance-exploding process (SMLD / NCSN in the limit of many noise levels)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .sde import SDE
from ..registry import SDES


@SDES.register("ve")
class VESDE(SDE):
    r"""Variance-exploding SDE.

    .. math::
        \sigma_v(t) = \sigma_{min}(\sigma_{max}/\sigma_{min})^t,\quad f = 0,\quad
        g(t) = \sigma_v(t)\sqrt{2\log(\sigma_{max}/\sigma_{min})},\quad m = 1,

    and, with ``exact_kernel=True`` (default), the kernel variance is the exact
    σ(t)² = ∫_0^t g² = σ_v(t)² − σ_min², so σ(0) = 0. With ``exact_kernel=False`` σ(t) = σ_v(t), the
    convention of the reference code (a kernel that starts from data already blurred by σ_min).
    Prior N(0, σ_max² I). Choose σ_max ≈ the largest pairwise distance in the data.
    """

    def __init__(
        self,
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        T: float = 1.0,
        eps: float = 1e-5,
        exact_kernel: bool = True,
        sampling_eps: Optional[float] = None,
    ) -> None:
        super().__init__(T=T, eps=eps, sampling_eps=sampling_eps)
        if not sigma_min > 0:
            raise ValueError(f"sigma_min must be positive, got sigma_min={sigma_min}")
        if not sigma_min < sigma_max:
            raise ValueError(
                f"sigma_min must be smaller than sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}"
            )
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.exact_kernel = bool(exact_kernel)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def sigma_v(self, t: Tensor) -> Tensor:
        return self.sigma_min * torch.exp(t / self.T * self._log_ratio)

    def f(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def g(self, t: Tensor) -> Tensor:
        return self.sigma_v(t) * math.sqrt(2 * self._log_ratio / self.T)

    def m(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def sigma(self, t: Tensor) -> Tensor:
        if not self.exact_kernel:
            return self.sigma_v(t)
        return self.sigma_min * torch.sqrt(torch.expm1(2 * t / self.T * self._log_ratio))

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        lam = torch.as_tensor(lam)
        var = torch.exp(-lam.to(torch.float64))  # σ(t)² = e^{−λ}
        if self.exact_kernel:
            t = 0.5 * torch.log1p(var / self.sigma_min**2) / self._log_ratio * self.T
        else:
            t = 0.5 * torch.log(var / self.sigma_min**2) / self._log_ratio * self.T
        return t.clamp(0.0, self.T).to(lam.dtype if lam.is_floating_point() else torch.get_default_dtype())

    def __repr__(self) -> str:
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, T={self.T})"
