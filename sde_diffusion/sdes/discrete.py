r"""DDPM's discrete forward process: an explicit β schedule of N steps, or the discretisation of a VP SDE.

Mathematics (Ho et al. 2020; Nichol & Dhariwal 2021)
----------------------------------------------------
.. math::
    q(x_i \mid x_{i-1}) = \mathcal N(\sqrt{1-\beta_i}\,x_{i-1},\ \beta_i I),\quad i = 1..N,\qquad
    \alpha_i = 1-\beta_i,\quad \bar\alpha_i = \prod_{j\le i}\alpha_j,\quad \bar\alpha_0 = 1,

so q(x_i | x_0) = N(√ᾱ_i x_0, (1 − ᾱ_i) I), and the posterior of one step back is

.. math::
    q(x_{i-1}\mid x_i, x_0) = \mathcal N\big(c_0\,x_0 + c_i\,x_i,\ \tilde\beta_i I\big),\quad
    c_0 = \frac{\sqrt{\bar\alpha_{i-1}}\,\beta_i}{1-\bar\alpha_i},\quad
    c_i = \frac{\sqrt{\alpha_i}\,(1-\bar\alpha_{i-1})}{1-\bar\alpha_i},\quad
    \tilde\beta_i = \frac{1-\bar\alpha_{i-1}}{1-\bar\alpha_i}\,\beta_i .

With x_0 = (x_i − √(1 − ᾱ_i) ε)/√ᾱ_i the posterior mean is (x_i − β_i/√(1 − ᾱ_i) ε)/√α_i, which is
how a noise prediction ε̂ gives the model's mean μ_θ (Algorithm 2).

Schedules:

* :meth:`DiscreteVP.linear` — β_i linear from ``beta_start`` to ``beta_end`` (DDPM: 1e-4 → 0.02);
* :meth:`DiscreteVP.cosine` — ᾱ_i = f(i/N)/f(0), f(u) = cos²((u + s)/(1 + s)·π/2), β_i ≤ 0.999;
* :meth:`DiscreteVP.from_sde` — from any variance-preserving SDE (m² + σ² = 1), with the network
  time of step i t_i = i·T/N: ``rule="exact"`` gives ᾱ_i = ᾱ(t_i) = m(t_i)² exactly;
  ``rule="ddpm"`` gives β_i = β(t_i)·T/N (the VP SDE's own Euler discretisation, which the
  discrete-time loss ``loss.discrete_steps`` trains on; for β_min = 0.1, β_max = 20, N = 1000 this
  is DDPM's linear schedule).

:meth:`DiscreteVP.respace` keeps K of the N steps (Nichol & Dhariwal's respacing): for kept steps
S_1 < … < S_K the new process has ᾱ'_k = ᾱ_{S_k} and β'_k = 1 − ᾱ_{S_k}/ᾱ_{S_{k−1}}.

Usage::

    proc = DiscreteVP.from_sde(VPSDE(), 1000)           # or DiscreteVP.linear(1000)
    times = proc.network_times(sde)                      # [N] the t at which the network sees step i
    fast = proc.respace(50)                              # 50 of the 1000 steps
    fast.beta, fast.beta_tilde, fast.alpha_bar           # [50] each, float64
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .sde import SDE

SCHEDULES = ("sde", "ddpm", "linear", "cosine")
RULES = ("exact", "ddpm")


def check_variance_preserving(sde: SDE, what: str) -> None:
    """Raise a ValueError unless m(t)² + σ(t)² = 1 on [0, T] (VP, cosine VP, a VP :class:`LinearSDE`)."""
    t = torch.linspace(0.0, float(sde.T), 9, dtype=torch.float64)
    total = sde.mean_coeff(t) ** 2 + sde.marginal_std(t) ** 2
    if not torch.allclose(total, torch.ones_like(total), atol=1e-6):
        k = int((total - 1).abs().argmax())
        raise ValueError(
            f"{what} needs a variance-preserving process (m(t)² + σ(t)² = 1: sde=vp or sde=cosine_vp), got {sde!r} "
            f"with m² + σ² = {float(total[k]):.4g} at t = {float(t[k]):.3g}; DDPM's discrete chain is defined only for those"
        )


class DiscreteVP:
    """DDPM's N-step forward process (see the module docstring).

    Args:
        beta: ``[N]`` β_1..β_N in (0, 1) (float64).
        times: ``[N]`` the network time t_i of step i, or None: matched to an SDE by log-SNR
            (:meth:`network_times`).
        steps: ``[N]`` the step indices in the original process (1-based; ``1..N`` unless respaced).
        name: a short description for reports.
    """

    def __init__(self, beta: Tensor, times: Optional[Tensor] = None, steps: Optional[Tensor] = None,
                 name: str = "custom") -> None:
        beta = torch.as_tensor(beta, dtype=torch.float64).flatten()
        if beta.numel() < 1:
            raise ValueError("a discrete process needs at least one step")
        if not (torch.isfinite(beta).all() and (beta > 0).all() and (beta < 1).all()):
            raise ValueError(f"every beta_i must lie in (0, 1); got min {float(beta.min()):.3g}, max {float(beta.max()):.3g}")
        if times is not None:
            times = torch.as_tensor(times, dtype=torch.float64).flatten()
            if times.shape != beta.shape:
                raise ValueError(f"times has {times.numel()} entries for {beta.numel()} steps")
        self.beta = beta
        self.times = times
        self.steps = torch.arange(1, beta.numel() + 1) if steps is None else torch.as_tensor(steps).long()
        self.name = name
        self.log_alpha = torch.log1p(-beta)
        self.log_alpha_bar = torch.cumsum(self.log_alpha, 0)
        self.alpha_bar = torch.exp(self.log_alpha_bar)
        # ᾱ_{i−1}, with ᾱ_0 = 1.
        self.log_alpha_bar_prev = torch.cat([torch.zeros(1, dtype=torch.float64), self.log_alpha_bar[:-1]])
        self.alpha_bar_prev = torch.exp(self.log_alpha_bar_prev)
        # 1 − ᾱ as one expression (≥ 0 under any rounding).
        self.one_minus_alpha_bar = -torch.expm1(self.log_alpha_bar)
        self.one_minus_alpha_bar_prev = -torch.expm1(self.log_alpha_bar_prev)
        self.beta_tilde = beta * self.one_minus_alpha_bar_prev / self.one_minus_alpha_bar  # β̃_1 = 0

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def linear(cls, N: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "DiscreteVP":
        """DDPM's linear schedule β_i = β_start + (i − 1)/(N − 1)·(β_end − β_start), scaled as DDPM does for N ≠ 1000
        (by 1000/N, so the process ends at the same ᾱ_N)."""
        N = _check_n(N)
        scale = 1000.0 / N
        beta = torch.linspace(scale * beta_start, scale * beta_end, N, dtype=torch.float64)
        return cls(beta, name=f"linear(N={N})")

    @classmethod
    def cosine(cls, N: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "DiscreteVP":
        """Nichol & Dhariwal's cosine schedule: ᾱ_i = f(i/N)/f(0), β_i = min(1 − ᾱ_i/ᾱ_{i−1}, max_beta)."""
        N = _check_n(N)
        u = torch.arange(N + 1, dtype=torch.float64) / N
        log_f = 2 * torch.log(torch.cos((u + s) / (1 + s) * math.pi / 2).clamp(min=1e-300))
        beta = (-torch.expm1(log_f[1:] - log_f[:-1])).clamp(max=max_beta)
        return cls(beta, name=f"cosine(N={N})")

    @classmethod
    def from_sde(cls, sde: SDE, N: int = 1000, rule: str = "exact") -> "DiscreteVP":
        """The N-step chain of a variance-preserving ``sde`` at the times t_i = i·T/N (see the module docstring)."""
        N = _check_n(N)
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; choose one of: {', '.join(RULES)}")
        check_variance_preserving(sde, "the discrete process")
        t = torch.arange(0, N + 1, dtype=torch.float64) * sde.T / N
        if rule == "ddpm":
            if not hasattr(sde, "beta"):
                raise ValueError(f"rule='ddpm' needs an SDE with a β(t) (sde=vp or cosine_vp), got {sde!r}")
            beta = sde.beta(t[1:]) * sde.T / N
        else:
            log_ab = 2 * torch.log(sde.mean_coeff(t))
            beta = -torch.expm1(log_ab[1:] - log_ab[:-1])
        return cls(beta.clamp(max=0.999), times=t[1:], name=f"{type(sde).__name__}.{rule}(N={N})")

    @classmethod
    def build(cls, schedule: str, sde: Optional[SDE], N: int = 1000) -> "DiscreteVP":
        """By name: ``sde`` (:meth:`from_sde` ``rule="exact"``), ``ddpm`` (``rule="ddpm"``), ``linear``, ``cosine``."""
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown discrete schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        if schedule in ("sde", "ddpm"):
            if sde is None:
                raise ValueError(f"schedule={schedule!r} discretises an SDE; give one")
            return cls.from_sde(sde, N, rule="exact" if schedule == "sde" else "ddpm")
        return cls.linear(N) if schedule == "linear" else cls.cosine(N)

    # ----------------------------------------------------------------------------- derived
    @property
    def N(self) -> int:
        return int(self.beta.numel())

    def respace(self, K: int) -> "DiscreteVP":
        """K of the N steps, evenly spaced and always including the last (Improved DDPM's respacing)."""
        K = _check_n(K)
        if K > self.N:
            raise ValueError(f"cannot respace {self.N} steps to {K}; use at most {self.N} steps")
        if K == self.N:
            return self
        keep = torch.round(torch.linspace(0, self.N - 1, K, dtype=torch.float64)).long().unique()
        log_ab = self.log_alpha_bar[keep]
        prev = torch.cat([torch.zeros(1, dtype=torch.float64), log_ab[:-1]])
        beta = -torch.expm1(log_ab - prev)
        times = None if self.times is None else self.times[keep]
        return DiscreteVP(beta, times=times, steps=self.steps[keep], name=f"{self.name}[{K} steps]")

    def network_times(self, sde: SDE) -> Tensor:
        """``[N]`` float64: the time at which a network trained on ``sde`` sees step i: the stored t_i, or else
        the time of equal log-SNR, t with m(t)²/σ(t)² = ᾱ_i/(1 − ᾱ_i), clipped to [0, T] (DDPM's linear schedule
        ends at ᾱ_N = 4.0e-5, a little past the default VP process's ᾱ(T) = 4.5e-5)."""
        if self.times is not None:
            return self.times
        lam = self.log_alpha_bar - torch.log(self.one_minus_alpha_bar)
        return sde.t_from_log_snr(lam).to(torch.float64)

    def variance(self, kind: str, frac: Optional[Tensor] = None, index: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """(σ², log σ²) of the reverse step: ``beta`` (β_i), ``beta_tilde`` (β̃_i, with β̃_1 replaced by β̃_2 so the
        log is finite, as Improved DDPM clips it), or ``learned``: log σ² = v log β + (1 − v) log β̃ with
        ``frac`` = v (any shape). ``index`` selects one step (0-based), else all ``[N]``."""
        log_beta = torch.log(self.beta)
        bt = self.beta_tilde.clone()
        bt[0] = self.beta_tilde[1] if self.N > 1 else self.beta[0]
        log_bt = torch.log(bt)
        if index is not None:
            log_beta, log_bt = log_beta[index], log_bt[index]
        if kind == "beta":
            log_var = log_beta
        elif kind == "beta_tilde":
            log_var = log_bt
        elif kind == "learned":
            if frac is None:
                raise ValueError("variance='learned' needs the network's interpolation v")
            log_var = frac * log_beta.to(frac) + (1 - frac) * log_bt.to(frac)
        else:
            raise ValueError(f"unknown variance {kind!r}; choose one of: beta, beta_tilde, learned")
        return torch.exp(log_var), log_var

    def __repr__(self) -> str:
        return f"DiscreteVP({self.name}, N={self.N}, beta=[{float(self.beta[0]):.3g} .. {float(self.beta[-1]):.3g}])"


def _check_n(N: int) -> int:
    if isinstance(N, bool) or int(N) != N or N < 1:
        raise ValueError(f"the number of steps must be an integer >= 1, got {N!r}")
    return int(N)


__all__ = ["DiscreteVP", "SCHEDULES", "RULES", "check_variance_preserving"]
