r"""Per-run coefficient tables: every SDE coefficient a sampler needs, for all grid times at once.

A reverse sampler only ever evaluates the process's scalar coefficients at the ``N + 1`` times of
its grid (plus, for some, fixed intermediate times such as midpoints). :class:`GridCoeffs`
computes them once per run — one validated, vectorised call per coefficient, in float64 — and
stores them as Python floats, so a step reads floats and spends its time on a few fused tensor
ops on x: no per-step validation, host sync, dtype cast or 0-dim tensor arithmetic.

For the times t_0 > t_1 > … > t_N (given in the state's dtype; the float64 values are those of
the rounded times, so coefficients match the times the score sees):

* ``m[i]``, ``sigma[i]``    — kernel x_t = m(t) x_0 + σ(t) ε;
* ``lam[i]`` = log(m/σ)     — half the log-SNR (DPM-Solver's λ; ±inf where m or σ is 0);
* ``f[i]``, ``g2[i]``       — drift f(t) and squared diffusion g(t)²;
* ``a[i]``, ``b[i]``        — exact forward transition from t_{i+1} to t_i:
  x_{t_i} | x_{t_{i+1}} ~ N(a x, b² I) (``SDE.transition_coeffs``); empty unless the times
  decrease.

A step sampler's ``step(x, i, grid, ctx)`` receives the run's table and reads the coefficients
of its interval, from time ``i`` to ``i + 1``::

    x_next = torch.add(x, ctx.score(x, grid.times[i]), alpha=grid.b[i] ** 2)

Outside a run, the table of two times is ``GridCoeffs.build(sde, (t_cur, t_next))`` with ``i = 0``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence, Tuple

import torch
from torch import Tensor

from ..sdes.sde import SDE

Floats = Tuple[float, ...]


@dataclass(frozen=True)
class Level:
    """Kernel coefficients at one time ``t`` (0-dim tensor in the state's dtype and device)."""

    t: Tensor
    m: float
    sigma: float
    lam: float  # half log-SNR log(m/σ)

    @property
    def sigma_tilde(self) -> float:
        """EDM's noise level σ̃ = σ/m."""
        return self.sigma / self.m


@dataclass(frozen=True)
class GridCoeffs:
    """Coefficients of ``sde`` at the times ``times`` (see the module docstring for the fields)."""

    times: Tuple[Tensor, ...]
    t: Floats
    m: Floats
    sigma: Floats
    lam: Floats
    f: Floats
    g2: Floats
    a: Floats
    b: Floats

    @classmethod
    def build(cls, sde: SDE, ts: Tensor | Sequence[Tensor]) -> "GridCoeffs":
        """Table at the times ``ts`` (a ``[K]`` tensor or a sequence of 0-dim tensors, any dtype).

        The 0-dim tensors in ``times`` are the ones the score receives: views of ``ts`` (or the
        given tensors themselves), in their dtype and device.
        """
        if torch.is_tensor(ts):
            if ts.dim() != 1:
                raise ValueError(f"ts must be a 1-D tensor of times, got shape {tuple(ts.shape)}")
            times = tuple(ts.unbind(0))
            t64 = ts.detach().to(device="cpu", dtype=torch.float64)
        else:
            times = tuple(ts)
            t64 = torch.stack([t.detach().reshape(()).to(device="cpu", dtype=torch.float64) for t in times])
        # One validated call per coefficient for the whole grid (host floats: devices such as MPS
        # lack float64).
        m = sde.mean_coeff(t64)
        sigma = sde.marginal_std(t64)
        lam = torch.log(m) - torch.log(sigma)
        f = sde.drift_coeff(t64)
        g2 = sde.diffusion(t64) ** 2
        a: Floats = ()
        b: Floats = ()
        if len(times) > 1 and bool((t64[1:] <= t64[:-1]).all()):
            a_t, b_t = sde.transition_coeffs(t64[1:], t64[:-1])
            a, b = tuple(a_t.tolist()), tuple(b_t.tolist())
        return cls(
            times=times, t=tuple(t64.tolist()), m=tuple(m.tolist()), sigma=tuple(sigma.tolist()),
            lam=tuple(lam.tolist()), f=tuple(f.tolist()), g2=tuple(g2.tolist()), a=a, b=b,
        )

    def __len__(self) -> int:
        return len(self.times)

    @property
    def steps(self) -> int:
        """Number of intervals (a run's step count); interval ``steps − 1`` is the last step."""
        return len(self.times) - 1

    def level(self, i: int) -> Level:
        """The :class:`Level` (t, m, σ, λ) of time ``i``."""
        return Level(self.times[i], self.m[i], self.sigma[i], self.lam[i])

    @cached_property
    def levels(self) -> Tuple[Level, ...]:
        """All levels, checked for m > 0 and σ > 0 (what the denoiser-based solvers need); built
        on first use, then cached with the table."""
        for ti, mi, si in zip(self.t, self.m, self.sigma):
            if not (mi > 0 and si > 0):
                raise ValueError(
                    f"the SDE has m={mi:g}, sigma={si:g} at t={ti:g}; the fast solvers need m > 0 and "
                    "sigma > 0 on the whole time grid (use eps > 0)"
                )
        return tuple(self.level(i) for i in range(len(self)))

    def transition(self, i: int) -> Tuple[float, float]:
        """(a, b) of the forward transition from time ``i + 1`` to time ``i``."""
        if not self.a:
            raise ValueError("transition coefficients need decreasing times (t_next < t_cur)")
        return self.a[i], self.b[i]


def levels_at_lambda(sde: SDE, lams: Sequence[float], like: Tensor) -> Tuple[Level, ...]:
    """Levels at the times whose half log-SNR is ``lams`` (clipped to [0, T]), vectorised.

    The times are rounded to ``like``'s dtype first, so the coefficients are those of the times
    the score receives.
    """
    if not len(lams):
        return ()
    lam = torch.tensor([2.0 * v for v in lams], dtype=torch.float64)
    ts = sde.t_from_log_snr(lam).to(device=like.device, dtype=like.dtype)
    return GridCoeffs.build(sde, ts).levels


def sigma_tilde_to_lambda(sigma_tilde: float) -> float:
    """λ = −log σ̃ (EDM's noise level σ̃ = σ/m = e^{−λ})."""
    return -math.log(sigma_tilde)


__all__ = ["GridCoeffs", "Level", "levels_at_lambda", "sigma_tilde_to_lambda"]
