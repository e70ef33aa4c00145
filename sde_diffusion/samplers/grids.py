r"""Time grids for reverse-time samplers, and :class:`EndPoint`, the end-point options every sampler shares.

A grid is ``steps + 1`` decreasing times from T to eps. Each kind is a function registered in
:data:`GRIDS`:

* ``uniform``  — t_i = T + i/N (eps − T).
* ``karras``   — EDM's ρ-spacing of the noise level σ̃(t) = σ(t)/m(t):
  σ̃_i = (σ̃_max^{1/ρ} + i/N (σ̃_min^{1/ρ} − σ̃_max^{1/ρ}))^ρ, mapped back to t through the log-SNR
  λ = −2 log σ̃ (``SDE.t_from_log_snr``), so it works for any SDE.
* ``logsnr``   — uniform in λ(t) between λ(T) and λ(eps) (DPM-Solver's choice).
* ``quadratic`` — t_i = eps + (T − eps)(1 − i/N)² (denser near the data, DDIM's quadratic).

``auto`` is not a grid of its own but a rule (:func:`auto_grid`): ``karras`` for a process that
keeps the signal (m ≡ 1: variance exploding), ``logsnr`` for one that decays it (m(T) < 1: VP,
sub-VP, cosine VP). The exponential integrators (DPM-Solver++) use it by default.

A new kind is one function of the fractions u_i = i/N::

    @GRIDS.register("cosine")
    def cosine(sde: SDE, u: Tensor, eps: float, rho: float) -> Tensor:
        return eps + (sde.T - eps) * 0.5 * (1 + torch.cos(math.pi * u))

after which ``grid="cosine"`` works for every step sampler. Grids are computed in float64 and
returned in the requested dtype/device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor

from ..registry import Registry
from ..sdes.sde import SDE
from .final_step import MAX_FINAL_ORDER

#: ``fn(sde, u [N + 1] float64 in [0, 1], eps, rho) -> [N + 1] float64 times``, t = T at u = 0 and
#: eps at u = 1, decreasing.
GridFn = Callable[[SDE, Tensor, float, float], Tensor]

GRIDS: Registry = Registry("time grid")
AUTO = "auto"


@GRIDS.register("uniform")
def uniform(sde: SDE, u: Tensor, eps: float, rho: float) -> Tensor:
    """Equal steps in t."""
    return sde.T + u * (eps - sde.T)


@GRIDS.register("quadratic")
def quadratic(sde: SDE, u: Tensor, eps: float, rho: float) -> Tensor:
    """t − eps quadratic in the step index: short steps near the data."""
    return eps + (sde.T - eps) * (1 - u) ** 2


@GRIDS.register("logsnr")
def logsnr(sde: SDE, u: Tensor, eps: float, rho: float) -> Tensor:
    """Equal steps in the log-SNR λ."""
    lam_T, lam_eps = _log_snr_ends(sde, eps)
    return _times_at_log_snr(sde, lam_T + u * (lam_eps - lam_T), eps)


@GRIDS.register("karras")
def karras(sde: SDE, u: Tensor, eps: float, rho: float) -> Tensor:
    """Equal steps in σ̃^{1/ρ}, σ̃ = σ/m = e^{−λ/2}."""
    lam_T, lam_eps = _log_snr_ends(sde, eps)
    s_max, s_min = torch.exp(-0.5 * torch.tensor([lam_T, lam_eps], dtype=torch.float64)).tolist()
    sig = (s_max ** (1 / rho) + u * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return _times_at_log_snr(sde, -2 * torch.log(sig), eps)


def _log_snr_ends(sde: SDE, eps: float) -> Tuple[float, float]:
    lam_T, lam_eps = sde.log_snr(torch.tensor([sde.T, eps], dtype=torch.float64)).tolist()
    return lam_T, lam_eps


def _times_at_log_snr(sde: SDE, lam: Tensor, eps: float) -> Tensor:
    ts = sde.t_from_log_snr(lam)
    ts[0], ts[-1] = sde.T, eps  # exact ends despite round-off of the inverse
    return ts


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


def check_grid_kind(kind: str) -> None:
    """Raise ValueError, listing the choices, unless ``kind`` is a registered grid or ``auto``."""
    if kind != AUTO and kind not in GRIDS:
        raise ValueError(f"unknown time grid {kind!r}; choose one of: {', '.join([*GRIDS, AUTO])}")


def time_grid(
    sde: SDE,
    steps: int,
    kind: str = "uniform",
    eps: Optional[float] = None,
    rho: float = 7.0,
    device: Optional[Union[str, torch.device]] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Return ``[steps + 1]`` times, ``ts[0] = sde.T`` down to ``ts[-1] = eps`` (default ``sde.sampling_eps``).

    ``kind`` is a name in :data:`GRIDS` or ``auto`` (:func:`auto_grid`); ``rho`` > 0 is passed to
    every grid function (only ``karras`` uses it).
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer ≥ 1, got {steps}")
    eps = sde.sampling_eps if eps is None else float(eps)
    if not 0 < eps < sde.T:
        raise ValueError(f"eps must lie in (0, T={sde.T}), got eps={eps}")
    check_grid_kind(kind)
    if rho <= 0:
        raise ValueError(f"rho must be positive, got rho={rho}")
    fn: GridFn = GRIDS.get(auto_grid(sde) if kind == AUTO else kind)
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    return fn(sde, u, eps, rho).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class EndPoint:
    """Where a reverse run stops and how its time grid gets there: the options every sampler shares.

    A sampler holds one as ``sampler.end``; its constructor takes either ``end=EndPoint(...)`` or
    the fields as flat keys (``grid=``, ``rho=``, ``eps=``, ``end_sigma=``, ``denoise=``), which is
    how configs and ``sample(..., eps=1e-3)`` spell them.

    Args:
        grid: time-grid kind, a name in :data:`GRIDS` or ``auto``; None stands for the sampler's
            ``default_grid`` (``uniform`` outside a sampler).
        rho: ρ > 0 of the ``karras`` grid.
        eps: final time of the reverse process (default ``sde.sampling_eps``); must lie in (0, T).
        end_sigma: stop where the noise-to-signal ratio σ(t)/m(t) equals this (instead of at a
            time ``eps``): the same noise level on every process, whose times differ (VP's default
            eps = 1e-3 is σ/m ≈ 0.01; sub-VP's is ≈ 1e-4). Clipped to [sde.eps, T). ``sample`` then
            returns the end state in the data's scale, x/m = x_0 + σ̃ ε (:func:`~.sampler.to_data_scale`).
        denoise: after the last step, take a final step to σ̃ = 0 (one more NFE): Tweedie's
            x̂_0 = (x + σ² s)/m, or with ``denoise_order`` > 1 the probability-flow ODE's flow to σ̃ = 0
            (:mod:`.final_step`).
        denoise_order: order 1–4 of that step: 1 is Tweedie's mean; k extrapolates the noise prediction
            ε̂ = −σ s in σ̃ through the end point and the k − 1 evaluations before it (no further NFE).
    """

    grid: Optional[str] = None
    rho: float = 7.0
    eps: Optional[float] = None
    end_sigma: Optional[float] = None
    denoise: bool = False
    denoise_order: int = 1

    def __post_init__(self) -> None:
        if self.eps is not None and self.end_sigma is not None:
            raise ValueError("give eps (a final time) or end_sigma (a final noise level σ/m), not both")
        if self.eps is not None and not (float(self.eps) > 0 and math.isfinite(float(self.eps))):
            raise ValueError(f"eps must be a positive final time below the SDE's T, got eps={self.eps}")
        if self.end_sigma is not None and not (float(self.end_sigma) > 0 and math.isfinite(float(self.end_sigma))):
            raise ValueError(f"end_sigma must be a positive number, got {self.end_sigma}")
        if not float(self.rho) > 0:
            raise ValueError(f"rho must be positive, got rho={self.rho}")
        if self.grid is not None:
            check_grid_kind(self.grid)
        # Normalise the types (a config may give ints or strings); frozen, hence object.__setattr__.
        object.__setattr__(self, "rho", float(self.rho))
        object.__setattr__(self, "eps", None if self.eps is None else float(self.eps))
        object.__setattr__(self, "end_sigma", None if self.end_sigma is None else float(self.end_sigma))
        object.__setattr__(self, "denoise", bool(self.denoise))
        if int(self.denoise_order) != self.denoise_order or not 1 <= int(self.denoise_order) <= MAX_FINAL_ORDER:
            raise ValueError(f"denoise_order must be 1, 2, 3 or 4, got {self.denoise_order}")
        object.__setattr__(self, "denoise_order", int(self.denoise_order))
        if self.denoise_order > 1 and not self.denoise:
            raise ValueError(f"denoise_order={self.denoise_order} is the order of the final denoising step; set "
                             "denoise=true as well (or leave denoise_order at 1)")

    def end_time(self, sde: SDE) -> float:
        """The final time on ``sde``: ``eps``, or the time where σ/m = ``end_sigma``, or ``sde.sampling_eps``."""
        if self.end_sigma is not None:
            lam = torch.tensor(-2.0 * math.log(self.end_sigma), dtype=torch.float64)
            t = float(sde.t_from_log_snr(lam))
            return min(max(t, float(sde.eps)), float(sde.T) * (1 - 1e-6))
        eps = sde.sampling_eps if self.eps is None else self.eps
        if not 0 < eps < sde.T:
            raise ValueError(f"eps must lie in (0, T={sde.T}), got eps={eps}")
        return eps

    def times(
        self, sde: SDE, steps: int, device: Optional[Union[str, torch.device]] = None, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """The ``[steps + 1]`` grid times from T down to :meth:`end_time` (see :func:`time_grid`)."""
        return time_grid(sde, steps, self.grid or "uniform", eps=self.end_time(sde), rho=self.rho, device=device, dtype=dtype)


__all__ = ["AUTO", "GRIDS", "GridFn", "EndPoint", "auto_grid", "check_grid_kind", "time_grid"]
