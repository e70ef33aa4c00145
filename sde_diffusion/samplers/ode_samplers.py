r"""Samplers that integrate the probability-flow ODE dx/dt = f(t)x − ½ g(t)² s(x, t) from T to eps.

* ``ode_heun``, ``ode_rk4`` — fixed steps on the sampler's time grid (any grid kind), torch on the
  device: NFE = 2·steps (Heun), 4·steps (RK4). They integrate in t (``variable="t"``) or in EDM's
  variables σ̃ = σ/m, x̃ = x/m (``variable="sigma"``), where the linear part of the ODE is exact.
* ``ode_dopri5`` — adaptive Dormand–Prince 5(4) in torch with a per-sample step size
  (:func:`~sde_diffusion.ode.odeint_dopri5`), so a sample does not depend on the rest of the batch.
* ``ode_scipy`` — ``scipy.integrate.solve_ivp`` (RK45, DOP853, …) on the flattened batch, in
  float64 on the CPU (:func:`~sde_diffusion.ode.odeint_scipy`); the reference solver. The batch
  shares one step size, so results depend on the batch within the tolerance.

Adaptive samplers ignore ``steps`` (their NFE is set by ``rtol``/``atol`` and reported from the
counter), have ``nfe_per_step = 0`` and do not support per-step hooks. Their trajectory, when
recorded, is the start and end state for ``ode_scipy`` and the state after every batched step for
``ode_dopri5`` (``times`` is then None, since every sample has its own times).

Every ODE sampler can also :meth:`encode` data to the prior by integrating the same ODE from eps
to T; decoding the code with ``sample(..., x_T=z)`` inverts it up to the solver error.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor

from ..ode import SCIPY_SOLVERS, ODEResult, odeint_dopri5, odeint_fixed, odeint_scipy
from ..score import CountingScore
from ..sdes.sde import SDE, ScoreFn, broadcast_to_x
from .final_step import from_data_scale
from .sampler import SAMPLERS, Sampler, SamplingContext, StepHook, StepSampler
from .coeffs import GridCoeffs


def _check_tol(rtol: float, atol: float) -> Tuple[float, float]:
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}")
    return float(rtol), float(atol)


VARIABLES = ("t", "sigma")


class FixedStepODE(StepSampler):
    r"""One Runge–Kutta step of the probability-flow ODE per grid interval, in one of two variables.

    * ``variable="t"``: the ODE as it stands, dx/dt = k(x, t) = f(t) x − ½ g(t)² s(x, t), stepped in t
      (``method`` of :func:`~sde_diffusion.ode.odeint_fixed`). f and g² come from the run's table; RK4's
      midpoint times t + h/2 (in the state's dtype, as odeint_fixed forms them) are tabulated in :meth:`begin`.
    * ``variable="sigma"``: the same ODE in σ̃ = σ(t)/m(t) and x̃ = x/m(t), where it reads

      .. math:: \frac{d\tilde x}{d\tilde\sigma} = -\sigma(t)\, s(m\tilde x, t) = \frac{\tilde x - D}{\tilde\sigma}

      with D the denoised estimate (EDM's form). Its solution is exactly linear in σ̃ when D does not
      change, so a large step on the long σ̃ range of a VE process stays stable, where the same number
      of steps in t (or in log σ̃, which t is for VE) blows up. The steps run between the grid's σ̃
      values; RK4's midpoint is the time whose σ̃ is the mean of the interval's end values
      (``SDE.t_from_log_snr``). Heun in σ̃ is ``edm_heun`` without its final Euler step.

    Both variables integrate the same ODE on the same grid times and converge to the same solution.
    """

    method: str = "heun"

    def __init__(self, variable: str = "t", **end: Any) -> None:
        super().__init__(**end)
        if variable not in VARIABLES:
            raise ValueError(f"variable must be one of {', '.join(VARIABLES)} (the ODE's integration variable), "
                             f"got {variable!r}")
        self.variable = variable

    def begin(self, x: Tensor, grid: GridCoeffs, ctx: SamplingContext) -> Tensor:
        if self.method == "rk4":
            ts = torch.stack(grid.times)
            if self.variable == "t":
                mids = ts[:-1] + 0.5 * (ts[1:] - ts[:-1])
            else:
                st = torch.tensor([lv.sigma_tilde for lv in grid.levels], dtype=torch.float64)
                mid_sigma = 0.5 * (st[:-1] + st[1:])
                mids = ctx.sde.t_from_log_snr(-2.0 * torch.log(mid_sigma)).to(dtype=ts.dtype, device=ts.device)
            ctx.state["mid"] = GridCoeffs.build(ctx.sde, mids)
        return x

    def _tableau(self, y: Tensor, h: float, slope: Callable[[Tensor, Any], Tensor], start: Any, mid: Any, end: Any) -> Tensor:
        """One Heun or RK4 step of size h from y, with ``slope(y, point)`` at the interval's start, midpoint, end."""
        k1 = slope(y, start)
        if self.method == "heun":
            k2 = slope(torch.add(y, k1, alpha=h), end)
            return torch.add(y, k1, alpha=0.5 * h).add_(k2, alpha=0.5 * h)
        k2 = slope(torch.add(y, k1, alpha=0.5 * h), mid)
        k3 = slope(torch.add(y, k2, alpha=0.5 * h), mid)
        k4 = slope(torch.add(y, k3, alpha=h), end)
        out = torch.add(y, k1, alpha=h / 6).add_(k2, alpha=h / 3).add_(k3, alpha=h / 3)
        return out.add_(k4, alpha=h / 6)

    def step(self, x: Tensor, i: int, grid: GridCoeffs, ctx: SamplingContext) -> Tensor:
        mid = ctx.state.get("mid")  # RK4: the midpoint of interval i is time i of this table
        if self.variable == "sigma":
            cur, nxt = grid.levels[i], grid.levels[i + 1]

            def in_sigma(xt: Tensor, lv: Any) -> Tensor:
                # dx̃/dσ̃ = −σ(t) s(m x̃, t): the slope (x̃ − D)/σ̃ without the division by σ̃
                return torch.mul(ctx.score(xt if lv.m == 1.0 else xt * lv.m, lv.t), -lv.sigma)

            xt = x if cur.m == 1.0 else x * (1.0 / cur.m)
            out = self._tableau(xt, nxt.sigma_tilde - cur.sigma_tilde, in_sigma, cur,
                                mid.levels[i] if mid is not None else None, nxt)
            return out if nxt.m == 1.0 else out.mul_(nxt.m)

        def in_t(y: Tensor, j: Tuple[GridCoeffs, int]) -> Tensor:
            table, k = j
            f, g2 = table.f[k], table.g2[k]
            s = ctx.score(y, table.times[k])
            return torch.mul(s, -0.5 * g2) if f == 0.0 else torch.mul(y, f).add_(s, alpha=-0.5 * g2)

        return self._tableau(x, grid.t[i + 1] - grid.t[i], in_t, (grid, i), (mid, i), (grid, i + 1))

    def encode(self, sde: SDE, score_fn: ScoreFn, x: Tensor, steps: int) -> ODEResult:
        """Integrate the ODE from eps to T on the reversed grid: x ``[B, ...]`` → latent ``[B, ...]``.

        With ``end_sigma`` the data are taken in the data's scale, as ``sample`` returns them, and first brought to
        the state m(t_end) x at the end time (:func:`~.sampler.from_data_scale`)."""
        ts = self.times(sde, steps, x.device, x.dtype).flip(0)
        if self.end.end_sigma is not None:
            x = from_data_scale(sde, x, self.end_time(sde))
        if self.variable == "t":
            return odeint_fixed(sde.probability_flow(score_fn), x, ts, method=self.method)
        grid = GridCoeffs.build(sde, ts)
        counted = CountingScore(score_fn)
        ctx = SamplingContext(sde, counted, None)
        y = self.begin(x, grid, ctx)
        for i in range(steps):
            y = self.step(y, i, grid, ctx)
        return ODEResult(y, counted.nfe, steps)


@SAMPLERS.register("ode_heun")
class ODEHeun(FixedStepODE):
    """Heun's (explicit trapezoidal) method on the probability-flow ODE; 2 NFE per step."""

    method = "heun"
    nfe_per_step = 2


@SAMPLERS.register("ode_rk4")
class ODERK4(FixedStepODE):
    """Classical 4th-order Runge–Kutta on the probability-flow ODE; 4 NFE per step."""

    method = "rk4"
    nfe_per_step = 4


def solver_flow(sde: SDE, score_fn: ScoreFn, shared_time: bool = False) -> Callable[[Tensor, Tensor], Tensor]:
    """The probability-flow drift f(t)x − ½ g(t)² s(x, t) for a solver's own times ``t`` ``[B]``.

    The same formula as ``sde.probability_flow`` (equal up to float rounding; the product and the
    difference are fused) but through the SDE's coefficient hooks directly: the solver only
    produces times inside [eps, T], so the per-call range check (a host sync per NFE) is skipped.
    With ``shared_time`` the caller promises that all of ``t`` holds one time (a solver with one
    step size for the whole batch): the coefficients are then computed once, in float64, as
    Python scalars, which halves the cost of a call outside the score.
    """

    if shared_time:

        def shared(x: Tensor, t: Tensor) -> Tensor:
            t0 = t[:1].detach().to(torch.float64)
            f, g = float(sde.f(t0)), float(sde.g(t0))
            return torch.mul(x, f).add_(score_fn(x, t), alpha=-0.5 * g * g)

        return shared

    def drift(x: Tensor, t: Tensor) -> Tensor:
        f = broadcast_to_x(sde.f(t), x)
        half_g2 = broadcast_to_x(0.5 * sde.g(t) ** 2, x)
        return torch.mul(f, x).addcmul_(half_g2, score_fn(x, t), value=-1.0)

    return drift


class AdaptiveODE(Sampler):
    """Base of adaptive probability-flow samplers: one solver call from T to eps; ``steps`` ignored."""

    nfe_per_step = 0

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-5, **end: Any) -> None:
        super().__init__(**end)
        self.rtol, self.atol = _check_tol(rtol, atol)

    def solve(self, sde: SDE, score_fn: ScoreFn, x: Tensor, t0: float, t1: float, record: bool) -> ODEResult:
        """Integrate the probability-flow ODE from t0 to t1."""
        raise NotImplementedError

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
        self.refuse_hook(hook, "is adaptive", "ode_heun, euler_maruyama or pc")
        res = self.solve(sde, score_fn, x, sde.T, self.end.end_time(sde), record)
        return res.y, self._trajectory(x, res, record), self._times(sde, x, record)

    def _trajectory(self, x: Tensor, res: ODEResult, record: bool) -> Optional[List[Tensor]]:
        return [x, res.y] if record else None

    def _times(self, sde: SDE, x: Tensor, record: bool) -> Optional[Tensor]:
        return torch.tensor([sde.T, self.end.end_time(sde)], dtype=x.dtype, device=x.device) if record else None

    def encode(self, sde: SDE, score_fn: ScoreFn, x: Tensor, steps: Optional[int] = None) -> ODEResult:
        """Integrate the ODE from eps to T: data x ``[B, ...]`` → latent ``[B, ...]`` (``steps`` ignored).

        With ``end_sigma`` the data are taken in the data's scale, as ``sample`` returns them, and first brought to
        the state m(t_end) x at the end time (:func:`~.sampler.from_data_scale`)."""
        x = from_data_scale(sde, x, self.end.end_time(sde)) if self.end.end_sigma is not None else x
        return self.solve(sde, score_fn, x, self.end.end_time(sde), sde.T, record=False)


@SAMPLERS.register("ode_dopri5")
class ODEDopri5(AdaptiveODE):
    """Adaptive Dormand–Prince 5(4) in torch, per-sample step size; NFE from the counter.

    Args:
        rtol, atol: error tolerances (RMS per sample).
        max_steps: cap on the number of batched steps (RuntimeError beyond).
        **end: eps, end_sigma, denoise (:class:`~.grids.EndPoint`).
    """

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 100_000, **end: Any) -> None:
        super().__init__(rtol=rtol, atol=atol, **end)
        if int(max_steps) != max_steps or max_steps < 1:
            raise ValueError(f"max_steps must be an integer ≥ 1, got {max_steps}")
        self.max_steps = int(max_steps)

    def solve(self, sde: SDE, score_fn: ScoreFn, x: Tensor, t0: float, t1: float, record: bool) -> ODEResult:
        return odeint_dopri5(
            solver_flow(sde, score_fn), x, t0, t1, rtol=self.rtol, atol=self.atol,
            max_steps=self.max_steps, return_trajectory=record,
        )

    def _trajectory(self, x: Tensor, res: ODEResult, record: bool) -> Optional[List[Tensor]]:
        return list(res.trajectory) if record else None

    def _times(self, sde: SDE, x: Tensor, record: bool) -> Optional[Tensor]:
        return None


SCIPY_METHODS = SCIPY_SOLVERS


@SAMPLERS.register("ode_scipy")
class ODEScipy(AdaptiveODE):
    """``scipy.integrate.solve_ivp`` on the flattened batch (float64 on the CPU); NFE from the counter.

    Args:
        method: a solve_ivp method (explicit ones: RK45, RK23, DOP853; the implicit Radau, BDF
            and LSODA estimate a Jacobian by finite differences, which costs many NFE).
        rtol, atol: solve_ivp tolerances.
        **end: eps, end_sigma, denoise (:class:`~.grids.EndPoint`).
    """

    def __init__(self, method: str = "RK45", rtol: float = 1e-5, atol: float = 1e-5, **end: Any) -> None:
        super().__init__(rtol=rtol, atol=atol, **end)
        if method not in SCIPY_METHODS:
            raise ValueError(f"unknown solve_ivp method {method!r}; choose one of: {', '.join(SCIPY_METHODS)}")
        self.method = method

    def solve(self, sde: SDE, score_fn: ScoreFn, x: Tensor, t0: float, t1: float, record: bool) -> ODEResult:
        return odeint_scipy(
            solver_flow(sde, score_fn, shared_time=True), x, t0, t1, rtol=self.rtol, atol=self.atol, method=self.method
        )


__all__ = ["FixedStepODE", "ODEHeun", "ODERK4", "AdaptiveODE", "ODEDopri5", "ODEScipy", "SCIPY_METHODS"]
