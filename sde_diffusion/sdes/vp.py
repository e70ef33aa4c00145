"""Variance-preserving processes: VP with a linear β(t), sub-VP, and the cosine-schedule VP."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .sde import SDE
from ..registry import SDES


def one_minus_exp(log_a: Tensor) -> Tensor:
    """1 − e^{log_a} for log_a ≤ 0 (e.g. 1 − ᾱ), ≥ 0 under any rounding.

    ``-expm1`` keeps full relative accuracy near 0, and the clamp keeps a log that rounding pushed a
    hair above 0 from turning into a negative variance (whose square root is NaN).
    """
    return -torch.expm1(torch.clamp(log_a, max=0.0))


@SDES.register("vp")
class VPSDE(SDE):
    r"""Variance-preserving SDE (DDPM in the limit of many steps).

    .. math::
        \beta(t) = \beta_{min} + t(\beta_{max} - \beta_{min}),\quad f(t) = -\tfrac12\beta(t),\quad
        g(t) = \sqrt{\beta(t)},

        \log\bar\alpha(t) = -\int_0^t\beta = -\big(\beta_{min}t + \tfrac12 t^2(\beta_{max}-\beta_{min})\big),
        \quad m(t) = \sqrt{\bar\alpha(t)},\quad \sigma(t) = \sqrt{1-\bar\alpha(t)},

    prior N(0, I). Example::

        sde = VPSDE(beta_min=0.1, beta_max=20.0)
        xt = sde.perturb(x0, torch.full((x0.shape[0],), 0.5), torch.randn_like(x0))
    """

    default_sampling_eps = 1e-3

    def __init__(
        self,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        T: float = 1.0,
        eps: float = 1e-5,
        sampling_eps: Optional[float] = None,
    ) -> None:
        super().__init__(T=T, eps=eps, sampling_eps=sampling_eps)
        if beta_min <= 0:
            raise ValueError(f"beta_min must be positive, got beta_min={beta_min}")
        if beta_min > beta_max:
            raise ValueError(
                f"beta_min must not exceed beta_max, got beta_min={beta_min} > beta_max={beta_max}; swap them"
            )
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha_bar(self, t: Tensor) -> Tensor:
        """log ᾱ(t) = −t (β_min + ½ t (β_max − β_min)): one product, exactly 0 at t = 0."""
        return -t * (self.beta_min + 0.5 * t * (self.beta_max - self.beta_min))

    def f(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta(t)

    def g(self, t: Tensor) -> Tensor:
        return torch.sqrt(self.beta(t))

    def m(self, t: Tensor) -> Tensor:
        return torch.exp(0.5 * self.log_alpha_bar(t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(one_minus_exp(self.log_alpha_bar(t)))

    @property
    def prior_std(self) -> float:
        return 1.0

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        # ᾱ = sigmoid(λ) ⇒ −log ᾱ = softplus(−λ) = β_min t + ½ t² Δβ: solve the quadratic.
        lam = torch.as_tensor(lam)
        return self._t_from_neg_log_alpha_bar(torch.nn.functional.softplus(-lam.to(torch.float64)), lam)

    def kernel_at_log_snr(self, lam: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        # m² = ᾱ = sigmoid(λ), σ² = 1 − ᾱ = sigmoid(−λ); −log ᾱ = softplus(−λ) gives t.
        lam = torch.as_tensor(lam).to(torch.float64)
        c = torch.nn.functional.softplus(-lam)
        t = self._t_from_neg_log_alpha_bar(c, lam)
        return t, torch.exp(-0.5 * c), torch.exp(-0.5 * torch.nn.functional.softplus(lam))

    def _t_from_neg_log_alpha_bar(self, c: Tensor, lam: Tensor) -> Tensor:
        """t with β_min t + ½ t² Δβ = c (float64), clipped to [0, T], in ``lam``'s dtype."""
        d = self.beta_max - self.beta_min
        if d == 0:
            t = c / self.beta_min
        else:
            t = 2 * c / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * d * c))
        return t.clamp(0.0, self.T).to(lam.dtype if lam.is_floating_point() else torch.get_default_dtype())

    def discrete_betas(self, N: int) -> Tensor:
        """DDPM's discrete schedule β_i = β(t_i)/N at t_i = i·T/N, i = 1..N (float64).

        ∏_{i≤k}(1 − β_i) → ᾱ(t_k) as N → ∞, with an O(1/N) error.
        """
        if N < 1:
            raise ValueError(f"N must be at least 1, got {N}")
        t = torch.arange(1, N + 1, dtype=torch.float64) * self.T / N
        return self.beta(t) * self.T / N

    def __repr__(self) -> str:
        return f"VPSDE(beta_min={self.beta_min}, beta_max={self.beta_max}, T={self.T})"


@SDES.register("subvp")
class SubVPSDE(VPSDE):
    r"""Sub-VP SDE: VP's drift with g(t)² = β(t)(1 − ᾱ(t)²); m = √ᾱ, σ = 1 − ᾱ; prior N(0, I)."""

    def g(self, t: Tensor) -> Tensor:
        return torch.sqrt(self.beta(t) * one_minus_exp(2 * self.log_alpha_bar(t)))

    def sigma(self, t: Tensor) -> Tensor:
        return one_minus_exp(self.log_alpha_bar(t))

    @staticmethod
    def _neg_log_alpha_bar(lam: Tensor) -> Tensor:
        # e^λ = r = ᾱ/(1 − ᾱ)² ⇒ r ᾱ² − (2r + 1) ᾱ + r = 0, whose root in (0, 1) is
        # ᾱ = 2r/(2r + 1 + √(4r + 1)), so −log ᾱ = log1p((1 + √(1 + 4r))/(2r)) (stable for all r).
        r = torch.exp(lam.to(torch.float64))
        return torch.log1p((1 + torch.sqrt(1 + 4 * r)) / (2 * r))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        lam = torch.as_tensor(lam)
        return self._t_from_neg_log_alpha_bar(self._neg_log_alpha_bar(lam), lam)

    def kernel_at_log_snr(self, lam: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        lam = torch.as_tensor(lam).to(torch.float64)
        c = self._neg_log_alpha_bar(lam)
        return self._t_from_neg_log_alpha_bar(c, lam), torch.exp(-0.5 * c), -torch.expm1(-c)

    def __repr__(self) -> str:
        return f"SubVPSDE(beta_min={self.beta_min}, beta_max={self.beta_max}, T={self.T})"


@SDES.register("cosine_vp")
class CosineVPSDE(SDE):
    r"""VP SDE with the cosine schedule of Nichol & Dhariwal (2021).

    .. math::
        \bar\alpha(t) = \frac{\cos^2\phi(t)}{\cos^2\phi(0)},\quad \phi(t) = \frac{t+s}{1+s}\frac\pi2,\quad
        \beta(t) = -\frac{d\log\bar\alpha}{dt} = \frac{\pi}{1+s}\tan\phi(t),

    f = −½β, g = √β, m = √ᾱ, σ = √(1 − ᾱ), prior N(0, I). β diverges at t = 1, so the default end
    time is T = 0.9946 (ᾱ(T) ≈ 7e-5), as in DPM-Solver's continuous cosine schedule.
    """

    default_sampling_eps = 1e-3

    def __init__(self, s: float = 0.008, T: float = 0.9946, eps: float = 1e-5, sampling_eps: Optional[float] = None) -> None:
        if not s > 0:
            raise ValueError(f"s must be positive, got s={s}")
        if not T < 1.0:
            raise ValueError(f"T must be < 1 for the cosine schedule (β(1) = ∞), got T={T}")
        super().__init__(T=T, eps=eps, sampling_eps=sampling_eps)
        self.s = float(s)
        phi0 = self.s / (1 + self.s) * math.pi / 2
        self._log_cos0 = math.log(math.cos(phi0))
        self._tan0 = math.tan(phi0)

    def _phi(self, t: Tensor) -> Tensor:
        return (t + self.s) / (1 + self.s) * math.pi / 2

    def log_alpha_bar(self, t: Tensor) -> Tensor:
        r"""log ᾱ(t) = 2 log(cos(φ0 + δ)/cos φ0), δ = φ(t) − φ0, as one expression that is exactly 0 at t = 0.

        cos(φ0 + δ)/cos φ0 = 1 − 2 sin²(δ/2) − tan φ0 · sin δ, so log ᾱ = 2 log1p(−2 sin²(δ/2) − tan φ0 sin δ).
        A difference of two rounded logarithms would leave ᾱ(0) one ulp above 1 on some CPUs.
        """
        delta = t / (1 + self.s) * (math.pi / 2)
        u = -2 * torch.sin(0.5 * delta) ** 2 - self._tan0 * torch.sin(delta)
        return torch.clamp(2 * torch.log1p(u), max=0.0)

    def beta(self, t: Tensor) -> Tensor:
        return math.pi / (1 + self.s) * torch.tan(self._phi(t))

    def f(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta(t)

    def g(self, t: Tensor) -> Tensor:
        return torch.sqrt(self.beta(t))

    def m(self, t: Tensor) -> Tensor:
        return torch.exp(0.5 * self.log_alpha_bar(t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(one_minus_exp(self.log_alpha_bar(t)))

    @property
    def prior_std(self) -> float:
        return 1.0

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        lam = torch.as_tensor(lam)
        log_m = -0.5 * torch.nn.functional.softplus(-lam.to(torch.float64))
        phi = torch.arccos(torch.exp(log_m + self._log_cos0).clamp(max=1.0))
        t = phi * 2 * (1 + self.s) / math.pi - self.s
        return t.clamp(0.0, self.T).to(lam.dtype if lam.is_floating_point() else torch.get_default_dtype())

    def __repr__(self) -> str:
        return f"CosineVPSDE(s={self.s}, T={self.T})"
