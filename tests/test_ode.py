"""ODE integrators against analytic solutions.

Test problems:
* linear, time-dependent: y' = a(t) y with a(t) = cos(3t) − ½, so y(t) = y(t0)·exp(A(t) − A(t0)),
  A(t) = sin(3t)/3 − t/2 (per-sample rates k_b scale a for the batch-invariance test);
* logistic (non-linear): y' = y(1 − y), y(t) = 1 / (1 + (1/y0 − 1) e^{−(t − t0)}).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sde_diffusion.ode import ODEResult, odeint_dopri5, odeint_fixed, odeint_scipy

F64 = torch.float64
pytestmark = [pytest.mark.numeric, pytest.mark.usefixtures("single_thread")]


def _a(t: torch.Tensor) -> torch.Tensor:
    return torch.cos(3 * t) - 0.5


def _A(t: float) -> float:
    return math.sin(3 * t) / 3 - 0.5 * t


def linear_rhs(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """y' = a(t)·y for y [B, ...] and t [B]."""
    return _a(t).reshape(-1, *([1] * (y.dim() - 1))) * y


def linear_exact(y0: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
    return y0 * math.exp(_A(t1) - _A(t0))


def logistic_rhs(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return y * (1 - y)


def logistic_exact(y0: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
    return 1 / (1 + (1 / y0 - 1) * math.exp(-(t1 - t0)))


def _y0(dtype: torch.dtype = F64) -> torch.Tensor:
    # image-shaped batch [B, C, H] with values of both signs and sizes
    return torch.linspace(-2.0, 3.0, 24, dtype=dtype).reshape(4, 2, 3)


# --------------------------------------------------------------------------- fixed-step methods
@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2), ("rk4", 4)])
def test_fixed_step_convergence_order(method: str, order: int) -> None:
    y0 = _y0()
    exact = linear_exact(y0, 0.0, 2.0)
    Ns = np.array([32, 64, 128, 256, 512])  # h·max|a′| < 1: the asymptotic regime
    errs = []
    for N in Ns:
        res = odeint_fixed(linear_rhs, y0, torch.linspace(0.0, 2.0, int(N) + 1, dtype=F64), method=method)
        errs.append(float((res.y - exact).abs().max()))
        assert res.nfe == {"euler": 1, "heun": 2, "rk4": 4}[method] * N and res.steps == N
    slope = -np.polyfit(np.log(Ns), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.25, f"{method}: fitted order {slope:.3f}, errors {errs}"


@pytest.mark.parametrize("method", ["euler", "heun", "rk4"])
def test_fixed_step_runs_backward_with_trajectory(method: str) -> None:
    y1 = _y0()
    ts = torch.linspace(1.5, 0.0, 401, dtype=F64)
    res = odeint_fixed(linear_rhs, y1, ts, method=method, return_trajectory=True)
    tol = {"euler": 1e-2, "heun": 1e-5, "rk4": 1e-10}[method]
    torch.testing.assert_close(res.y, linear_exact(y1, 1.5, 0.0), rtol=tol, atol=tol)
    assert len(res.trajectory) == 401 and torch.equal(res.trajectory[-1], res.y)
    torch.testing.assert_close(res.trajectory[200], linear_exact(y1, 1.5, float(ts[200])), rtol=tol, atol=tol)


def test_fixed_step_passes_batched_time() -> None:
    seen = []

    def rhs(y, t):
        seen.append(t)
        return torch.zeros_like(y)

    odeint_fixed(rhs, torch.zeros(5, 2), torch.linspace(0, 1, 3), method="heun")
    assert all(t.shape == (5,) for t in seen)
    assert [float(t[0]) for t in seen] == [0.0, 0.5, 0.5, 1.0]


def test_fixed_step_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="unknown fixed-step method 'rk5'; choose one of: euler, heun, rk4"):
        odeint_fixed(linear_rhs, _y0(), torch.linspace(0, 1, 5, dtype=F64), method="rk5")
    with pytest.raises(ValueError, match="at least two times"):
        odeint_fixed(linear_rhs, _y0(), torch.zeros(1, dtype=F64))


# --------------------------------------------------------------------------- dopri5
@pytest.mark.parametrize("tol", [1e-4, 1e-6, 1e-8])
@pytest.mark.parametrize(
    "rhs,exact,y0,t0,t1",
    [
        (linear_rhs, linear_exact, _y0(), 0.0, 2.0),
        (linear_rhs, linear_exact, _y0(), 2.0, 0.0),  # backwards in time
        (logistic_rhs, logistic_exact, torch.linspace(0.05, 0.9, 8, dtype=F64)[:, None], 0.0, 4.0),
        (logistic_rhs, logistic_exact, torch.linspace(0.05, 0.9, 8, dtype=F64)[:, None], 4.0, 1.0),
    ],
    ids=["linear-forward", "linear-backward", "logistic-forward", "logistic-backward"],
)
def test_dopri5_meets_tolerance(rhs, exact, y0, t0: float, t1: float, tol: float) -> None:
    res = odeint_dopri5(rhs, y0, t0, t1, rtol=tol, atol=tol)
    ref = exact(y0, t0, t1)
    # Local error control bounds the global error by a small multiple of atol + rtol·|y|: local
    # errors are amplified by the ODE's growth (up to e^{1.1} here), so allow 20×.
    err = ((res.y - ref).abs() / (tol + tol * ref.abs())).max()
    assert err <= 20, f"error {float(err):.3g} × tolerance"
    assert res.nfe == 1 + 6 * res.steps  # FSAL: one initial call plus six per attempted step


def test_dopri5_error_shrinks_with_tolerance() -> None:
    y0 = _y0()
    errs, nfes = [], []
    for tol in (1e-3, 1e-6, 1e-9):
        res = odeint_dopri5(linear_rhs, y0, 0.0, 2.0, rtol=tol, atol=tol)
        errs.append(float((res.y - linear_exact(y0, 0.0, 2.0)).abs().max()))
        nfes.append(res.nfe)
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-8
    assert nfes[0] < nfes[1] < nfes[2]


def _rate_rhs(k: torch.Tensor):
    """y_b' = k_b·a(t)·y_b: one rate per sample."""
    return lambda y, t: k[:, None] * _a(t)[:, None] * y


def test_dopri5_is_batch_invariant() -> None:
    """Each sample controls its own step: its result does not depend on the rest of the batch."""
    k = torch.tensor([0.1, 1.0, 40.0, 3.0], dtype=F64)  # very different per-sample rates
    y0 = torch.tensor([[1.0, -2.0], [0.5, 0.1], [3.0, 1.0], [-1.0, 2.0]], dtype=F64)
    batch = odeint_dopri5(_rate_rhs(k), y0, 0.0, 2.0, rtol=1e-7, atol=1e-9)
    nfe_alone = []
    for b in range(4):
        alone = odeint_dopri5(_rate_rhs(k[b : b + 1]), y0[b : b + 1], 0.0, 2.0, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(alone.y, batch.y[b : b + 1], rtol=1e-13, atol=1e-15)
        exact = y0[b] * math.exp(float(k[b]) * (_A(2.0) - _A(0.0)))
        torch.testing.assert_close(alone.y[0], exact, rtol=1e-5, atol=1e-8)
        nfe_alone.append(alone.nfe)
    # the batch costs as much as its hardest sample; the easy one alone is much cheaper
    assert batch.nfe == max(nfe_alone) and nfe_alone[0] < batch.nfe / 2


def test_dopri5_gives_each_sample_its_own_time() -> None:
    times = []

    def rhs(y, t):
        times.append(t.clone())
        return -torch.tensor([0.1, 30.0], dtype=F64)[:, None] * y

    odeint_dopri5(rhs, torch.ones(2, 1, dtype=F64), 0.0, 1.0, rtol=1e-6, atol=1e-8)
    assert all(t.shape == (2,) for t in times)
    assert any(float(t[0]) != float(t[1]) for t in times)
    assert all(((t >= 0) & (t <= 1)).all() for t in times)


def test_dopri5_trajectory_and_trivial_span() -> None:
    y0 = _y0()
    res = odeint_dopri5(linear_rhs, y0, 0.0, 1.0, return_trajectory=True)
    assert isinstance(res, ODEResult) and len(res.trajectory) == res.steps + 1
    assert torch.equal(res.trajectory[-1], res.y)
    same = odeint_dopri5(linear_rhs, y0, 0.5, 0.5)
    assert same.nfe == 0 and torch.equal(same.y, y0)


def test_dopri5_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="rtol and atol must be positive"):
        odeint_dopri5(linear_rhs, _y0(), 0.0, 1.0, rtol=0.0)
    with pytest.raises(RuntimeError, match="max_steps"):
        odeint_dopri5(linear_rhs, _y0(), 0.0, 1.0, rtol=1e-12, atol=1e-12, max_steps=3)


# --------------------------------------------------------------------------- scipy bridge
@pytest.mark.parametrize("t0,t1", [(0.0, 2.0), (2.0, 0.5)])
def test_scipy_bridge_agrees(t0: float, t1: float) -> None:
    y0 = _y0()
    ref = linear_exact(y0, t0, t1)
    res = odeint_scipy(linear_rhs, y0, t0, t1, rtol=1e-9, atol=1e-9)
    assert res.y.shape == y0.shape and res.nfe > 0
    torch.testing.assert_close(res.y, ref, rtol=1e-7, atol=1e-7)
    ours = odeint_dopri5(linear_rhs, y0, t0, t1, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(res.y, ours.y, rtol=1e-7, atol=1e-7)


# --------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_is_preserved(dtype: torch.dtype) -> None:
    y0 = _y0(dtype)
    ts = torch.linspace(1.0, 0.0, 11, dtype=dtype)
    outs = {
        "euler": odeint_fixed(linear_rhs, y0, ts, "euler").y,
        "heun": odeint_fixed(linear_rhs, y0, ts, "heun").y,
        "rk4": odeint_fixed(linear_rhs, y0, ts, "rk4").y,
        "dopri5": odeint_dopri5(linear_rhs, y0, 1.0, 0.0).y,
        "scipy": odeint_scipy(linear_rhs, y0, 1.0, 0.0).y,
    }
    assert all(v.dtype == dtype for v in outs.values()), {k: v.dtype for k, v in outs.items()}
    ref = linear_exact(y0.double(), 1.0, 0.0)
    tol = 1e-4 if dtype == torch.float32 else 1e-5
    for name in ("rk4", "dopri5", "scipy"):
        torch.testing.assert_close(outs[name].double(), ref, rtol=tol * 10, atol=tol * 10)


def test_scipy_bridge_stops_at_max_nfe() -> None:
    """A problem needing many evaluations fails with a clear error instead of running on."""
    fast = lambda y, t: torch.cos(1000.0 * t)[:, None] * torch.ones_like(y)  # noqa: E731
    y0 = torch.zeros(1, 1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="max_nfe=200"):
        odeint_scipy(fast, y0, 0.0, 10.0, rtol=1e-10, atol=1e-12, max_nfe=200)


@pytest.mark.parametrize("method", ["RK23", "DOP853"])
def test_scipy_bridge_other_methods_and_exact_nfe(method: str) -> None:
    """Every explicit solve_ivp method reaches the exact solution; NFE is the number of calls."""
    y0 = _y0()
    calls = [0]

    def counted(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return linear_rhs(y, t)

    res = odeint_scipy(counted, y0, 1.0, 0.0, rtol=1e-8, atol=1e-8, method=method)
    torch.testing.assert_close(res.y, linear_exact(y0, 1.0, 0.0), rtol=1e-5, atol=1e-5)
    assert res.nfe == calls[0] and res.steps >= 1


def test_scipy_bridge_rejects_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown scipy method 'RK99'.*RK45"):
        odeint_scipy(linear_rhs, _y0(), 1.0, 0.0, method="RK99")
