r"""The reverse-time SDE solved by ``torchsde.sdeint`` (euler, milstein, srk, reversible_heun).

torchsde integrates forward in time, so the sampler solves the time-reversed process
y(k) = x(t(k)) on k ∈ [0, N], t(k) = T − k h, h = (T − eps)/N (the uniform grid, one solver step
per unit of k). With dt = −h dk the reverse SDE dx = [f(t)x − g(t)² s(x, t)] dt + g(t) dw̄ becomes

.. math:: dy = -h\,[f(t)y - g(t)^2 s(y, t)]\,dk + \sqrt h\, g(t)\, dW_k,\qquad t = t(k).

Measuring time in steps makes every step exactly dt = 1, so torchsde's fixed-step loop takes
exactly N steps (no round-off remainder step) and lands on eps.

* The noise is ``diagonal`` with g broadcast over the state: each coordinate has its own Brownian
  motion, as in the SDE. (``scalar`` noise would drive all coordinates with one Brownian motion —
  a different process.)
* g depends on t only, so ∂g/∂y = 0: Milstein's correction vanishes (milstein gives exactly the
  euler samples for the same Brownian path) and the Itô and Stratonovich drifts coincide, so the
  same drift serves ``reversible_heun`` (Stratonovich) and the Itô methods.
* Randomness: a ``BrownianInterval`` whose entropy is drawn from the run's generator, so the same
  seed gives the same samples. ``srk`` uses the space-time Lévy area it needs.
* NFE: the drift is memoised on (k, y) for the few most recent calls, because torchsde evaluates
  it more than once at the same point (its shape check, and SRK's stage recomputations). The
  counted NFE is then N for euler and milstein, 3N for srk and N + 1 for reversible_heun (its
  initial drift), plus 1 with ``denoise``.

States are flattened to ``[B, D]`` for torchsde and reshaped for the score. Per-step hooks are
not supported; the noise is kept on the last step.

``reversible_heun`` is not A-stable: on dy/dt = −λy with step h its parasitic root
−hλ − √(1 + h²λ²) has modulus > 1 for λ > 0, and the reverse-time drift is strongly contracting
(λ = g²/(σ² + v) for data of variance v, so ∫λ dt ≈ log((σ_max² + v)/v) on VE), so its errors are
amplified by up to exp(2∫λ dt). It is accurate on broad Gaussian data but needs far more steps
than euler or srk on narrow mixture modes (its purpose is memory-efficient adjoints, not sampling).
"""
from __future__ import annotations

import math
from collections import deque
from typing import Deque, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..sdes.base import SDE, ScoreFn
from .base import SAMPLERS, Sampler, StepHook
from .coeffs import GridCoeffs
from .grids import time_grid


class _Method(NamedTuple):
    sde_type: str
    levy_area: str
    nfe_per_step: int
    nfe_init: int


TORCHSDE_METHODS: Dict[str, _Method] = {
    "euler": _Method("ito", "none", 1, 0),
    "milstein": _Method("ito", "none", 1, 0),
    "srk": _Method("ito", "space-time", 3, 0),
    "reversible_heun": _Method("stratonovich", "none", 1, 1),
}


class ReversedSDE(torch.nn.Module):
    """The reverse-time SDE of ``sde`` in torchsde's form, in step units k ∈ [0, N] (see module doc).

    ``f(k, y)`` and ``g(k, y)`` take a 0-dim time and a flat state ``[B, D]``.
    """

    noise_type = "diagonal"

    def __init__(self, sde: SDE, score_fn: ScoreFn, shape: Tuple[int, ...], t_end: float, steps: int, sde_type: str) -> None:
        super().__init__()
        self.sde = sde
        self.score_fn = score_fn
        self.shape = tuple(shape)
        self.sde_type = sde_type
        self.T = sde.T
        self.h = (sde.T - t_end) / steps
        self.steps = steps
        self._memo: Deque[Tuple[float, Tensor, Tensor]] = deque(maxlen=4)
        self._coeff_cache: Dict[float, Tuple[Tensor, float, float]] = {}
        self._grid: Dict[float, Tuple[Tensor, float, float]] = {}

    def tabulate(self, like: Tensor) -> None:
        """Coefficients at the integer k = 0 … N (every step's start) in one table."""
        ks = torch.arange(self.steps + 1, dtype=torch.float64)
        ts = (self.T - ks * self.h).clamp(min=0.0).to(dtype=like.dtype, device=like.device)
        grid = GridCoeffs.build(self.sde, ts)
        self._grid = {float(k): (t, f, math.sqrt(g2)) for k, t, f, g2 in zip(ks.tolist(), grid.times, grid.f, grid.g2)}

    def time(self, k: Tensor, like: Tensor) -> Tensor:
        """t(k) = T − k h, computed in float64 and returned in ``like``'s dtype (0-dim)."""
        t = self.T - torch.as_tensor(k, dtype=torch.float64) * self.h
        return t.clamp(min=0.0).to(dtype=like.dtype, device=like.device)

    def _coeffs(self, k: Tensor, like: Tensor) -> Tuple[Tensor, float, float]:
        """(t(k), f(t), g(t)) per distinct k, computed once (torchsde revisits the same k)."""
        key = float(k)
        hit = self._grid.get(key) or self._coeff_cache.get(key)
        if hit is None:
            t = self.time(k, like)
            row = GridCoeffs.build(self.sde, (t,))
            hit = (t, row.f[0], math.sqrt(row.g2[0]))
            if len(self._coeff_cache) > 64:  # only the current step's stages are ever reused
                self._coeff_cache.clear()
            self._coeff_cache[key] = hit
        return hit

    def f(self, k: Tensor, y: Tensor) -> Tensor:
        key = float(k)
        for k_old, y_old, out in self._memo:
            if k_old == key and y_old.shape == y.shape and (y_old is y or torch.equal(y_old, y)):
                return out
        t, f, g = self._coeffs(k, y)
        x = y.reshape(self.shape)
        # −h [f x − g² s]
        out = torch.mul(self.score_fn(x, t.expand(x.shape[0])), self.h * g * g).reshape(y.shape)
        if f != 0.0:
            out.add_(y, alpha=-self.h * f)
        self._memo.append((key, y, out))
        return out

    def g(self, k: Tensor, y: Tensor) -> Tensor:
        _, _, g = self._coeffs(k, y)
        return torch.full((), g * math.sqrt(self.h), dtype=y.dtype, device=y.device).expand_as(y)


@SAMPLERS.register("torchsde")
class TorchSDESampler(Sampler):
    """Reverse SDE through ``torchsde.sdeint`` on the uniform grid of ``steps`` steps.

    Args:
        method: ``euler``, ``milstein``, ``srk`` (strong order 1.5, 3 NFE per step) or
            ``reversible_heun`` (Stratonovich).
        eps, denoise: as for :class:`~.base.Sampler`.

    NFE = steps (euler, milstein), 3·steps (srk), steps + 1 (reversible_heun); +1 with ``denoise``.
    """

    def __init__(self, method: str = "euler", eps: Optional[float] = None, denoise: bool = False) -> None:
        super().__init__(eps=eps, denoise=denoise)
        if method not in TORCHSDE_METHODS:
            raise ValueError(f"unknown torchsde method {method!r}; choose one of: {', '.join(TORCHSDE_METHODS)}")
        self.method = method
        self.nfe_per_step = TORCHSDE_METHODS[method].nfe_per_step

    def expected_nfe(self, steps: int) -> Optional[int]:
        return self.nfe_per_step * steps + TORCHSDE_METHODS[self.method].nfe_init + int(self.denoise)

    def run(
        self,
        sde: SDE,
        score_fn: ScoreFn,
        x: Tensor,
        steps: int,
        generator: Optional[torch.Generator] = None,
        progress: bool = False,
        record: bool = False,
        hook: Optional[StepHook] = None,
    ) -> tuple[Tensor, Optional[List[Tensor]], Optional[Tensor]]:
        import torchsde

        if hook is not None:
            raise ValueError("the torchsde sampler cannot apply a per-step hook; use euler_maruyama or pc with hooks")
        spec = TORCHSDE_METHODS[self.method]
        t_end = self.end_time(sde)
        B = x.shape[0]
        y0 = x.reshape(B, -1)
        rsde = ReversedSDE(sde, score_fn, tuple(x.shape), t_end, steps, spec.sde_type)
        rsde.tabulate(x)
        gen_device = generator.device if generator is not None else "cpu"
        entropy = int(torch.randint(0, 2**62, (), generator=generator, device=gen_device))
        bm = torchsde.BrownianInterval(
            t0=0.0, t1=float(steps), size=tuple(y0.shape), dtype=x.dtype, device=x.device,
            entropy=entropy, dt=1.0, levy_area_approximation=spec.levy_area,
        )
        # Integer times: k + 1 is exact in floating point, so the solver takes exactly `steps` steps.
        ks = torch.arange(steps + 1, dtype=torch.float64) if record else torch.tensor([0.0, steps], dtype=torch.float64)
        ys = torchsde.sdeint(rsde, y0, ks, bm=bm, method=self.method, dt=1.0)
        out = ys[-1].reshape(x.shape)
        if not record:
            return out, None, None
        traj = [y.reshape(x.shape) for y in ys]
        traj[0] = x
        return out, traj, time_grid(sde, steps, "uniform", eps=t_end, device=x.device, dtype=x.dtype)


__all__ = ["TORCHSDE_METHODS", "ReversedSDE", "TorchSDESampler"]
