r"""ODE integrators in torch (stay on the device) and a scipy bridge.

All solvers integrate dy/dt = func(y, t) with ``y: [B, ...]`` and ``t: [B]`` from t0 to t1 (t1 may
be smaller than t0), and count function evaluations (NFE = batched calls of ``func``).

* :func:`odeint_fixed` — Euler, Heun (2nd order) or classical RK4 on a given time grid.
* :func:`odeint_dopri5` — adaptive Dormand–Prince 5(4) with a *per-sample* step size: each sample
  controls its own error and ends exactly at t1, so results do not depend on what else is in the
  batch (unlike a solver that flattens the batch into one state).
* :func:`odeint_scipy` — scipy's ``solve_ivp`` solvers (RK45 etc.) on the flattened batch (one
  shared step size, copies to the CPU at each step; use it as the reference).

Usage::

    res = odeint_dopri5(lambda y, t: -y, y0, t0=1.0, t1=0.0, rtol=1e-6, atol=1e-6)
    res.y, res.nfe
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

ODEFunc = Callable[[Tensor, Tensor], Tensor]


@dataclass
class ODEResult:
    """Final state ``y`` ``[B, ...]``, number of function evaluations, accepted steps, trajectory."""

    y: Tensor
    nfe: int
    steps: int
    trajectory: List[Tensor] = field(default_factory=list)


def _bt(c: Tensor, y: Tensor) -> Tensor:
    return c.reshape(c.shape[0], *([1] * (y.dim() - 1)))


def odeint_fixed(
    func: ODEFunc, y0: Tensor, ts: Tensor, method: str = "heun", return_trajectory: bool = False
) -> ODEResult:
    """Fixed-step integration over the grid ``ts`` (``[N+1]``, monotone).

    NFE: Euler N, Heun 2N, RK4 4N for N = len(ts) − 1 steps.
    """
    steppers = {"euler": 1, "heun": 2, "rk4": 4}
    if method not in steppers:
        raise ValueError(f"unknown fixed-step method {method!r}; choose one of: {', '.join(steppers)}")
    if ts.dim() != 1 or ts.numel() < 2:
        raise ValueError("ts must be a 1-D grid with at least two times")
    B = y0.shape[0]
    y = y0
    traj = [y0] if return_trajectory else []
    nfe = 0

    def call(yy: Tensor, tt: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        return func(yy, tt.expand(B))

    for i in range(ts.numel() - 1):
        t, tn = ts[i], ts[i + 1]
        h = tn - t
        if method == "euler":
            y = y + h * call(y, t)
        elif method == "heun":
            k1 = call(y, t)
            k2 = call(y + h * k1, tn)
            y = y + 0.5 * h * (k1 + k2)
        else:
            k1 = call(y, t)
            k2 = call(y + 0.5 * h * k1, t + 0.5 * h)
            k3 = call(y + 0.5 * h * k2, t + 0.5 * h)
            k4 = call(y + h * k3, tn)
            y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if return_trajectory:
            traj.append(y)
    return ODEResult(y, nfe, ts.numel() - 1, traj)


# Dormand–Prince 5(4) tableau.
_C = [0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0]
_A = [
    [],
    [1 / 5],
    [3 / 40, 9 / 40],
    [44 / 45, -56 / 15, 32 / 9],
    [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
    [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
    [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84],
]
_B5 = _A[6] + [0.0]  # FSAL: the 5th-order weights are the last stage's row
_B4 = [5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40]
_E = [b5 - b4 for b5, b4 in zip(_B5, _B4)]


def _combine(coefs: Sequence[float], ks: Sequence[Tensor]) -> Tensor:
    """Σ_j c_j k_j over the nonzero c_j, accumulated in one buffer (no temporary per term)."""
    terms = [(c, k) for c, k in zip(coefs, ks) if c != 0.0]
    acc = torch.mul(terms[0][1], terms[0][0])
    for c, k in terms[1:]:
        acc.add_(k, alpha=c)
    return acc


def odeint_dopri5(
    func: ODEFunc,
    y0: Tensor,
    t0: float,
    t1: float,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    first_step: Optional[float] = None,
    max_steps: int = 100_000,
    return_trajectory: bool = False,
) -> ODEResult:
    """Adaptive Dormand–Prince 5(4) with per-sample step-size control (FSAL: 6 NFE per step).

    The error of sample b is the RMS over its elements of err / (atol + rtol·max(|y|, |y_new|));
    a step is accepted where that is ≤ 1. Samples that reached t1 stay fixed. The trajectory,
    if asked for, holds the state after every batched step.
    """
    if rtol <= 0 or atol <= 0:
        raise ValueError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}")
    if t0 == t1:
        return ODEResult(y0, 0, 0, [y0] if return_trajectory else [])
    B = y0.shape[0]
    dtype, dev = y0.dtype, y0.device
    direction = 1.0 if t1 > t0 else -1.0
    span = abs(t1 - t0)
    t = torch.full((B,), float(t0), dtype=dtype, device=dev)
    t_end = torch.full((B,), float(t1), dtype=dtype, device=dev)
    y = y0
    nfe = 0

    def call(yy: Tensor, tt: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        return func(yy, tt)

    def rms(v: Tensor) -> Tensor:
        return v.reshape(B, -1).pow(2).mean(1).sqrt()

    k1 = call(y, t)
    if first_step is None:
        scale = atol + rtol * y.abs()
        d0, d1 = rms(y / scale), rms(k1 / scale)
        h = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
        h = h.clamp(min=1e-6 * span, max=0.1 * span)
    else:
        h = torch.full((B,), abs(float(first_step)), dtype=dtype, device=dev)
    traj = [y0] if return_trajectory else []
    steps = 0
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    while True:
        remaining = (t_end - t).abs()
        done = done | (remaining <= 1e-12 * max(1.0, span))
        if bool(done.all()):
            break
        steps += 1
        if steps > max_steps:
            raise RuntimeError(f"odeint_dopri5: more than max_steps={max_steps} steps; loosen rtol/atol")
        h = torch.minimum(h, remaining)
        hs = torch.where(done, torch.zeros_like(h), h) * direction
        hb = _bt(hs, y)
        ks = [k1]
        for i in range(1, 7):
            yi = torch.addcmul(y, hb, _combine(_A[i], ks))
            ks.append(call(yi, t + _C[i] * hs))
        y_new = yi  # first same as last: the last stage is evaluated at the 5th-order solution
        err = _combine(_E, ks).mul_(hb)
        scale = torch.maximum(y.abs(), y_new.abs()).mul_(rtol).add_(atol)
        en = rms(err.div_(scale))
        accept = (en <= 1.0) & ~done
        ab = _bt(accept, y)
        y = torch.where(ab, y_new, y)
        t = torch.where(accept, t + hs, t)
        # Land exactly on t1 where the last step was meant to reach it.
        t = torch.where(accept & (h >= remaining), t_end, t)
        k1 = torch.where(ab, ks[6], k1)
        factor = torch.clamp(0.9 * en.clamp(min=1e-10) ** -0.2, 0.2, 10.0)
        factor = torch.where(accept, factor, torch.clamp(factor, max=1.0))
        h = h * factor
        if return_trajectory:
            traj.append(y)
    return ODEResult(y, nfe, steps, traj)


def odeint_scipy(
    func: ODEFunc,
    y0: Tensor,
    t0: float,
    t1: float,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "RK45",
    max_nfe: int = 1_000_000,
) -> ODEResult:
    """A ``scipy.integrate`` solver (RK45, RK23, DOP853, Radau, BDF, LSODA) on the flattened batch,
    float64 on the CPU, with ``solve_ivp``'s defaults for everything but the tolerances.

    The solver class is stepped directly rather than through ``solve_ivp``, which would also
    stack the state of every step into its result (one more copy of the whole batch per step)
    only for this function to keep the last one. Past ``max_nfe`` evaluations (a diverging or very
    stiff problem; scipy has no step limit of its own) this raises RuntimeError.
    """
    import scipy.integrate

    solver_cls = getattr(scipy.integrate, method, None)
    if method not in SCIPY_SOLVERS or solver_cls is None:
        raise ValueError(f"unknown scipy method {method!r}; choose one of: {', '.join(SCIPY_SOLVERS)}")
    shape, dtype, dev = y0.shape, y0.dtype, y0.device
    B = shape[0]
    calls = 0

    def rhs(t: float, yflat: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls > max_nfe:
            raise RuntimeError(f"odeint_scipy: more than max_nfe={max_nfe} evaluations; loosen rtol/atol or check the drift")
        yy = torch.from_numpy(yflat).to(device=dev, dtype=dtype).reshape(shape)
        tt = torch.full((B,), t, dtype=dtype, device=dev)
        # A fresh array per call: scipy keeps references to earlier evaluations.
        return func(yy, tt).detach().reshape(-1).to("cpu", torch.float64).numpy()

    if t0 == t1:
        return ODEResult(y0, 0, 0)
    y_start = y0.detach().reshape(-1).to("cpu", torch.float64).numpy().copy()
    solver = solver_cls(rhs, float(t0), y_start, float(t1), rtol=rtol, atol=atol)
    steps = 0
    while solver.status == "running":
        message = solver.step()
        if solver.status == "failed":
            raise RuntimeError(f"scipy {method} failed at t={solver.t:g}: {message}")
        steps += 1
    y = torch.as_tensor(solver.y, dtype=dtype, device=dev).reshape(shape)
    return ODEResult(y, calls, steps)


SCIPY_SOLVERS = ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")


__all__ = ["ODEResult", "SCIPY_SOLVERS", "odeint_fixed", "odeint_dopri5", "odeint_scipy"]
