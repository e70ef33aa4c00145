r"""Time grids for reverse-time samplers: ``steps + 1`` decreasing times from T to eps.

* ``uniform``  — t_i = T + i/N (eps − T).
* ``karras``   — EDM's ρ-spacing of the noise level σ̃(t) = σ(t)/m(t):
  σ̃_i = (σ̃_max^{1/ρ} + i/N (σ̃_min^{1/ρ} − σ̃_max^{1/ρ}))^ρ, mapped back to t through the log-SNR
  λ = −2 log σ̃ (``SDE.t_from_log_snr``), so it works for any SDE.
* ``logsnr``   — uniform in λ(t) between λ(T) and λ(eps) (DPM-Solver's choice).
* ``quadratic`` — t_i = eps + (T − eps)(1 − i/N)² (denser near the data, DDIM's quadratic).
* ``auto``     — chosen by the process family (:func:`auto_grid`): ``karras`` for a process
  that keeps the signal (m ≡ 1: variance exploding), ``logsnr`` for one that decays it (m(T) < 1:
  VP, sub-VP, cosine VP). The exponential integrators (DPM-Solver++) use it by default.

Grids are computed in float64 and returned in the requested dtype/device.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ..sdes.base import SDE

GRIDS = ("uniform", "karras", "logsnr", "quadratic")
AUTO = "auto"


def auto_grid(sde: SDE) -> str:
    r"""The grid kind ``auto`` stands for on ``sde``: ``karras`` if m(T) = 1, else ``logsnr``.

    Both grids are functions of σ̃ = σ/m only; they differ in where the steps go. Uniform λ spends
    equal log-SNR steps over the whole range [λ(T), λ(eps)]. For a process that scales the
    signal away (VP-type) that range is centred on the data scale (σ̃ from ~1/m(T) ≫ 1 down to
    σ̃(eps) ~ 1e-2), which is what DPM-Solver's uniform-λ choice assumes. A variance-exploding
    process keeps the signal (m ≡ 1, σ̃ = σ), starts at σ_max ≈ the data's diameter and, with its
    tiny sampling eps, ends orders of magnitude below the data scale: uniform λ then puts a third
    or more of the steps where the denoiser is already the identity and too few where the modes
    separate. EDM's ρ-spacing, derived for exactly this parametrisation (σ̃ = σ, σ_max ≈ diameter),
    takes short steps at high and medium σ and long λ-steps at the low-noise end.
    """
    m_T = float(sde.mean_coeff(torch.tensor(sde.T, dtype=torch.float64)))
    return "karras" if m_T >= 1.0 - 1e-9 else "logsnr"


def time_grid(
    sde: SDE,
    steps: int,
    kind: str = "uniform",
    eps: Optional[float] = None,
    rho: float = 7.0,
    device: Optional[Union[str, torch.device]] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Return ``[steps + 1]`` times, ``ts[0] = sde.T`` down to ``ts[-1] = eps`` (default ``sde.sampling_eps``)."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer ≥ 1, got {steps}")
    eps = sde.sampling_eps if eps is None else float(eps)
    if not 0 < eps < sde.T:
        raise ValueError(f"eps must lie in (0, T={sde.T}), got eps={eps}")
    if kind == AUTO:
        kind = auto_grid(sde)
    if kind not in GRIDS:
        raise ValueError(f"unknown time grid {kind!r}; choose one of: {', '.join(GRIDS + (AUTO,))}")
    if rho <= 0:
        raise ValueError(f"rho must be positive, got rho={rho}")
    T = sde.T
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    if kind == "uniform":
        ts = T + u * (eps - T)
    elif kind == "quadratic":
        ts = eps + (T - eps) * (1 - u) ** 2
    else:
        ends = torch.tensor([T, eps], dtype=torch.float64)
        lam_T, lam_eps = sde.log_snr(ends).tolist()
        if kind == "logsnr":
            lam = lam_T + u * (lam_eps - lam_T)
        else:
            s_max, s_min = torch.exp(-0.5 * torch.tensor([lam_T, lam_eps], dtype=torch.float64)).tolist()
            sig = (s_max ** (1 / rho) + u * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
            lam = -2 * torch.log(sig)
        ts = sde.t_from_log_snr(lam)
        ts[0], ts[-1] = T, eps  # exact ends despite round-off of the inverse
    return ts.to(device=device, dtype=dtype)


__all__ = ["AUTO", "GRIDS", "auto_grid", "time_grid"]
