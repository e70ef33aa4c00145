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
* Randomness: every method here queries the Brownian motion only on whole solver steps [k, k+1],
  so :class:`GridBrownian` draws those increments (and, for ``srk``, the space-time Lévy area) from
  the run's generator in one ``randn`` and answers by lookup; the same seed gives the same samples.
  A method not known to query only grid steps would get torchsde's ``BrownianInterval`` (entropy
  from the same generator) instead.
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
from typing import Any, Deque, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from torchsde import BaseBrownian

from ..sdes.sde import SDE, ScoreFn
from .sampler import SAMPLERS, Sampler, StepHook
from .coeffs import GridCoeffs
from .grids import time_grid


class _Method(NamedTuple):
    sde_type: str
    levy_area: str
    nfe_per_step: int
    nfe_init: int
    grid_queries: bool  # queries bm(k, k + 1) only (checked in torchsde's step functions)


TORCHSDE_METHODS: Dict[str, _Method] = {
    "euler": _Method("ito", "none", 1, 0, True),
    "milstein": _Method("ito", "none", 1, 0, True),
    "srk": _Method("ito", "space-time", 3, 0, True),
    "reversible_heun": _Method("stratonovich", "none", 1, 1, True),
}

# Increments held at once (elements); larger problems draw the grid in consecutive blocks.
_BLOCK_ELEMENTS = 1 << 24


class GridBrownian(BaseBrownian):
    r"""Brownian motion of shape ``size`` sampled exactly on the grid t_k = k·dt, k = 0 … steps.

    Only whole grid steps are answered: ``bm(t_k, t_{k+1})`` returns W_k = W(t_{k+1}) − W(t_k) ~ N(0, dt)
    and, with ``levy_area_approximation="space-time"`` and ``return_U=True``, also torchsde's
    U_k = ∫_{t_k}^{t_{k+1}} (W(s) − W(t_k)) ds = dt (W_k / 2 + H_k) with H_k ~ N(0, dt/12)
    independent of W_k, so Var U_k = dt³/3 and Cov(U_k, W_k) = dt²/2. Steps are independent.

    The increments come from ``generator`` in one ``randn`` of ``[steps, (2,) *size]`` (in blocks of
    consecutive steps when that exceeds ``_BLOCK_ELEMENTS``), so a seed fixes the path. Blocks are
    drawn as the queries advance and earlier ones dropped, so steps must come in non-decreasing order
    of k across blocks (torchsde's fixed-step solvers do); ``ta == tb`` gives zeros. Any other query
    (point evaluation, partial or multi-step intervals, a step of a dropped block) raises
    ``ValueError``: the stored increments alone do not answer it exactly.
    """

    def __init__(
        self,
        steps: int,
        size: Tuple[int, ...],
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device | str] = None,
        generator: Optional[torch.Generator] = None,
        dt: float = 1.0,
        levy_area_approximation: str = "none",
    ) -> None:
        if steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps}")
        if not dt > 0:
            raise ValueError(f"dt must be positive, got {dt}")
        if levy_area_approximation not in ("none", "space-time"):
            raise ValueError(
                f"GridBrownian supports levy_area_approximation 'none' or 'space-time', got {levy_area_approximation!r}; "
                "use torchsde.BrownianInterval for 'davie' or 'foster'"
            )
        self._steps = int(steps)
        self._size = torch.Size(size)
        self._dtype = dtype
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._generator = generator
        self._dt = float(dt)
        self._levy = levy_area_approximation
        self._have_U = levy_area_approximation == "space-time"
        per_step = max(1, self._size.numel()) * (2 if self._have_U else 1)
        self._block = max(1, min(self._steps, _BLOCK_ELEMENTS // per_step))
        self._first = -self._block  # index of the first step in the current block; none drawn yet
        self._W: Tensor = torch.empty(0)
        self._U: Optional[Tensor] = None

    def _draw_next_block(self) -> None:
        first = self._first + self._block
        n = min(self._block, self._steps - first)
        gen_device = self._generator.device if self._generator is not None else self._device
        lead = (n, 2) if self._have_U else (n,)
        z = torch.randn(*lead, *self._size, generator=self._generator, dtype=self._dtype, device=gen_device)
        z = z.to(self._device)
        if self._have_U:
            self._W = z[:, 0].mul_(math.sqrt(self._dt))
            # U = dt (W/2 + H), H = sqrt(dt/12) z'
            self._U = z[:, 1].mul_(self._dt * math.sqrt(self._dt / 12.0)).add_(self._W, alpha=0.5 * self._dt)
        else:
            self._W = z.mul_(math.sqrt(self._dt))
        self._first = first

    def _step_index(self, ta: float, tb: float) -> int:
        k = round(ta / self._dt)
        tol = 1e-9 * max(1.0, abs(ta))
        if not (0 <= k < self._steps and abs(ta - k * self._dt) <= tol and abs(tb - (k + 1) * self._dt) <= tol):
            raise ValueError(
                f"GridBrownian answers whole grid steps [k dt, (k+1) dt] with dt={self._dt}, k < {self._steps}; "
                f"got [{ta}, {tb}]. Use torchsde.BrownianInterval for arbitrary queries."
            )
        return k

    def __call__(self, ta, tb=None, return_U: bool = False, return_A: bool = False):
        if tb is None:
            raise ValueError("GridBrownian does not support point evaluation; query an interval bm(ta, tb)")
        if return_A:
            raise ValueError("GridBrownian has no Lévy area A; use torchsde.BrownianInterval with 'davie' or 'foster'")
        if return_U and not self._have_U:
            raise ValueError("return_U needs levy_area_approximation='space-time'")
        ta, tb = float(ta), float(tb)
        if ta == tb:
            W = torch.zeros(self._size, dtype=self._dtype, device=self._device)
            return (W, torch.zeros_like(W)) if return_U else W
        k = self._step_index(ta, tb)
        if k < self._first:
            raise ValueError(f"GridBrownian step {k} was queried after step {self._first}; steps must be queried in order")
        while k >= self._first + self._block:
            self._draw_next_block()
        i = k - self._first
        if return_U:
            assert self._U is not None
            return self._W[i], self._U[i]
        return self._W[i]

    def __repr__(self) -> str:
        return (f"GridBrownian(steps={self._steps}, size={tuple(self._size)}, dt={self._dt}, dtype={self._dtype}, "
                f"device={self._device}, levy_area_approximation={self._levy!r})")

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def shape(self) -> torch.Size:
        return self._size

    @property
    def levy_area_approximation(self) -> str:
        return self._levy


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

    # g is a scalar per step, so g·v is one scalar multiply (torchsde's default would build the
    # broadcast g tensor first); euler, milstein and srk call these on every step.
    def g_prod(self, k: Tensor, y: Tensor, v: Tensor) -> Tensor:
        _, _, g = self._coeffs(k, y)
        return v * (g * math.sqrt(self.h))

    def f_and_g_prod(self, k: Tensor, y: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        return self.f(k, y), self.g_prod(k, y, v)


@SAMPLERS.register("torchsde")
class TorchSDESampler(Sampler):
    """Reverse SDE through ``torchsde.sdeint`` on the uniform grid of ``steps`` steps.

    Args:
        method: ``euler``, ``milstein``, ``srk`` (strong order 1.5, 3 NFE per step) or
            ``reversible_heun`` (Stratonovich).
        **end: eps, end_sigma, denoise (:class:`~.grids.EndPoint`); the grid is always uniform.

    NFE = steps (euler, milstein), 3·steps (srk), steps + 1 (reversible_heun); +1 with ``denoise``.
    """

    def __init__(self, method: str = "euler", **end: Any) -> None:
        super().__init__(**end)
        if method not in TORCHSDE_METHODS:
            raise ValueError(f"unknown torchsde method {method!r}; choose one of: {', '.join(TORCHSDE_METHODS)}")
        self.method = method
        self.nfe_per_step = TORCHSDE_METHODS[method].nfe_per_step

    def expected_nfe(self, steps: int) -> Optional[int]:
        return self.nfe_per_step * steps + TORCHSDE_METHODS[self.method].nfe_init + int(self.end.denoise)

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

        self.refuse_hook(hook, "hands its steps to torchsde.sdeint", "euler_maruyama or pc")
        spec = TORCHSDE_METHODS[self.method]
        t_end = self.end.end_time(sde)
        B = x.shape[0]
        y0 = x.reshape(B, -1)
        rsde = ReversedSDE(sde, score_fn, tuple(x.shape), t_end, steps, spec.sde_type)
        rsde.tabulate(x)
        bm: BaseBrownian
        if spec.grid_queries:
            bm = GridBrownian(steps, tuple(y0.shape), dtype=x.dtype, device=x.device, generator=generator,
                              levy_area_approximation=spec.levy_area)
        else:
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


__all__ = ["TORCHSDE_METHODS", "GridBrownian", "ReversedSDE", "TorchSDESampler"]
