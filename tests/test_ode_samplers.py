"""The fixed-step probability-flow integrators in their two variables (sde_diffusion/samplers/ode_samplers.py).

Ground truth: for Gaussian data N(μ, s²) the probability-flow ODE maps x_T to
x_t = m(t) μ + sqrt(m(t)² s² + σ(t)²) · (x_T − m(T) μ) / sqrt(m(T)² s² + σ(T)²), for every linear SDE.
"""
from __future__ import annotations

import math

import pytest
import torch

from sde_diffusion.samplers import build_sampler, sample
from sde_diffusion.sdes import SDE, SubVPSDE, VESDE, VPSDE

pytestmark = pytest.mark.numeric

MU, S = 1.5, 0.3


def gaussian_score(sde: SDE):
    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        m = sde.mean_coeff(t).view(-1, 1).to(x.dtype)
        sig = sde.marginal_std(t).view(-1, 1).to(x.dtype)
        return -(x - m * MU) / (m * m * S * S + sig * sig)

    return score


def kernel(sde: SDE, t: float):
    tt = torch.tensor(t, dtype=torch.float64)
    return float(sde.mean_coeff(tt)), float(sde.marginal_std(tt))


def exact_map(sde: SDE, x: torch.Tensor, t_from: float, t_to: float) -> torch.Tensor:
    m0, s0 = kernel(sde, t_from)
    m1, s1 = kernel(sde, t_to)
    return m1 * MU + math.sqrt(m1 * m1 * S * S + s1 * s1) * (x.double() - m0 * MU) / math.sqrt(m0 * m0 * S * S + s0 * s0)


def prior(sde: SDE, n: int = 512) -> torch.Tensor:
    return sde.prior_sample((n, 1), generator=torch.Generator().manual_seed(0)).double()


def max_error(sde: SDE, name: str, variable: str, steps: int) -> float:
    x_T = prior(sde)
    sampler = build_sampler(name, variable=variable, grid="karras")
    out = sample(sde, gaussian_score(sde), x_T.shape, sampler=sampler, steps=steps, x_T=x_T.clone())
    return float((out.samples - exact_map(sde, x_T, sde.T, sampler.end_time(sde))).abs().max())


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=["vp", "subvp", "ve"])
@pytest.mark.parametrize("name, order", [("ode_heun", 2), ("ode_rk4", 4)])
def test_sigma_variable_converges_at_its_order(sde: SDE, name: str, order: int) -> None:
    # Halving the step divides the error by ~2^order once the steps resolve the path (float64 state).
    coarse, fine = max_error(sde, name, "sigma", 32), max_error(sde, name, "sigma", 64)
    assert fine < 1e-2
    assert coarse / fine > 2 ** order * 0.6


@pytest.mark.parametrize("name", ["ode_heun", "ode_rk4"])
def test_sigma_variable_stays_stable_on_ve_where_t_blows_up(name: str) -> None:
    # VE's σ spans 4 decades: 2–4 steps in t (= in log σ) are unstable, steps in σ̃ are not.
    sde = VESDE()
    for steps in (2, 4):
        in_sigma, in_t = max_error(sde, name, "sigma", steps), max_error(sde, name, "t", steps)
        assert in_sigma < in_t / 10


@pytest.mark.parametrize("name", ["ode_heun", "ode_rk4"])
def test_both_variables_reach_the_exact_solution(name: str) -> None:
    sde = VPSDE()
    for variable in ("t", "sigma"):
        assert max_error(sde, name, variable, 200) < 2e-3


@pytest.mark.parametrize("name", ["ode_heun", "ode_rk4"])
def test_sigma_variable_encode_inverts_sampling(name: str) -> None:
    sde = VPSDE()
    sampler = build_sampler(name, variable="sigma", grid="logsnr")
    x_T = prior(sde, 64)
    x_0 = sample(sde, gaussian_score(sde), x_T.shape, sampler=sampler, steps=200, x_T=x_T.clone()).samples
    enc = sampler.encode(sde, gaussian_score(sde), x_0, 200)
    assert enc.nfe == sampler.expected_nfe(200)
    assert torch.allclose(enc.y, exact_map(sde, x_0, sampler.end_time(sde), sde.T), atol=2e-3)
    assert torch.allclose(enc.y, x_T, atol=2e-3)


@pytest.mark.parametrize("name", ["ode_heun", "ode_rk4"])
def test_nfe_is_counted_in_the_sigma_variable(name: str) -> None:
    sde = VESDE()
    calls = []

    def score(x, t):
        calls.append(1)
        return gaussian_score(sde)(x, t)

    out = sample(sde, score, (8, 1), sampler=name, steps=5, variable="sigma", denoise=True,
                 generator=torch.Generator().manual_seed(1))
    assert out.nfe == len(calls) == build_sampler(name, variable="sigma", denoise=True).expected_nfe(5)


def test_unknown_variable_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="variable must be one of t, sigma"):
        build_sampler("ode_rk4", variable="lambda")


@pytest.mark.parametrize("name", ["ode_heun", "ode_rk4", "ode_dopri5"])
def test_encode_inverts_a_run_that_stops_at_a_noise_level(name: str) -> None:
    # sample() returns x/m at the end level; encode takes data in that scale (sub-VP: m(t_end) ≈ 0.995 here).
    sde = SubVPSDE()
    opts = {"end_sigma": 0.01} if name == "ode_dopri5" else {"end_sigma": 0.01, "grid": "logsnr"}
    sampler = build_sampler(name, **opts)
    x_T = prior(sde, 64)
    x_0 = sample(sde, gaussian_score(sde), x_T.shape, sampler=sampler, steps=200, x_T=x_T.clone()).samples
    t_end = sampler.end_time(sde)
    m_end, s_end = kernel(sde, t_end)
    assert 0.99 < m_end < 0.999
    # In the data's scale: x_0 + σ̃ ε, the exact map divided by m(t_end).
    assert torch.allclose(x_0, exact_map(sde, x_T, sde.T, t_end) / m_end, atol=2e-3)
    enc = sampler.encode(sde, gaussian_score(sde), x_0, 200)
    assert torch.allclose(enc.y, x_T, atol=2e-3)
