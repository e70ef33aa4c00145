"""The final step to σ̃ = 0 (samplers/final_step.py): exact quadrature weights, the probability-flow ODE's own
map on a Gaussian, its cost and its errors."""
from __future__ import annotations

import math

import pytest
import torch

from sde_diffusion import GaussianMixture, VESDE, VPSDE, sample
from sde_diffusion.samplers import build_sampler
from sde_diffusion.samplers.final_step import lagrange_weights

pytestmark = [pytest.mark.numeric, pytest.mark.usefixtures("single_thread")]


def test_lagrange_weights_integrate_polynomials_exactly() -> None:
    # ∫_0^a p for p of degree < k from its values at k nodes above a (extrapolation, as the final step does).
    gen = torch.Generator().manual_seed(0)
    for k in (1, 2, 3, 4):
        nodes = [0.01 * (1.4 ** j) for j in range(k)]
        coef = torch.randn(k, generator=gen, dtype=torch.float64).tolist()

        def p(x: float) -> float:
            return sum(c * x**i for i, c in enumerate(coef))

        exact = sum(c * 0.01 ** (i + 1) / (i + 1) for i, c in enumerate(coef))
        got = sum(w * p(s) for w, s in zip(lagrange_weights(nodes, 0.01), nodes))
        assert got == pytest.approx(exact, rel=1e-9, abs=1e-15)
    assert lagrange_weights([1.0, 2.0], 1.0) == pytest.approx([1.5, -0.5])  # ∫_0^1 of the line = its value at ½


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(sigma_min=0.01, sigma_max=20.0)], ids=["vp", "ve"])
def test_the_final_step_follows_the_ode_to_zero_on_a_gaussian(sde) -> None:
    # p_0 = N(0, s² I): the probability-flow ODE maps x̃ at σ̃ to x̃ · s/√(s² + σ̃²) at 0, sample by sample. From the
    # run's own state at σ̃ = 0.05, Tweedie's step lands at s²/(s² + σ̃²) of it instead (3 % short here); the final
    # step of order k extrapolates the noise prediction through the run's last evaluations and lands on the map.
    s, dim, n = 0.2, 3, 2000
    gm = GaussianMixture([1.0], torch.zeros(1, dim), [s**2])
    T = torch.tensor(sde.T, dtype=torch.float64)
    m_T, sig_T = float(sde.mean_coeff(T)), float(sde.marginal_std(T))
    x_T = math.sqrt(m_T**2 * s**2 + sig_T**2) * torch.randn(n, dim, generator=torch.Generator().manual_seed(1),
                                                           dtype=torch.float64)
    run = dict(sampler="dpm_solver", steps=40, x_T=x_T, dtype=torch.float64, order=3, grid="logsnr", end_sigma=0.05)
    at_end = sample(sde, gm.score_fn(sde), x_T.shape, **run).samples  # x̃ at σ̃ = 0.05
    exact = at_end * s / math.sqrt(s**2 + 0.05**2)
    errors = {}
    for order in (1, 2, 3, 4):
        out = sample(sde, gm.score_fn(sde), x_T.shape, denoise=True, denoise_order=order, **run)
        assert out.nfe == 41  # the step's order costs no evaluation
        errors[order] = float(((out.samples - exact).norm(dim=1) / exact.norm(dim=1)).max())
    assert errors[1] == pytest.approx(1 - s / math.sqrt(s**2 + 0.05**2), rel=1e-6)  # 1 − s/√(s²+σ̃²): Tweedie
    # Left: the run's own error, in the earlier evaluations the polynomial goes through (~0.1 %).
    assert max(errors[2], errors[3], errors[4]) < errors[1] / 10
    assert errors[4] < errors[2]


@pytest.mark.parametrize("name, steps", [("edm_heun", 20), ("ode_heun", 20), ("ode_rk4", 10), ("dpm_solver_2s", 20),
                                         ("ddim", 40)])
def test_multi_stage_samplers_keep_enough_levels_for_the_final_step(name: str, steps: int) -> None:
    # A step of several evaluations repeats noise levels (Heun's second stage at the next level, RK4's two midpoint
    # stages): the run must keep enough evaluations that orders 2 and 3 find distinct levels. On the Gaussian of the
    # test above each order must close most of Tweedie's 3 % gap to the ODE's map, at one evaluation.
    sde, s, dim, n = VPSDE(), 0.2, 3, 500
    gm = GaussianMixture([1.0], torch.zeros(1, dim), [s**2])
    x_T = torch.randn(n, dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    run = dict(sampler=name, steps=steps, x_T=x_T, dtype=torch.float64, grid="logsnr", end_sigma=0.05)
    at_end = sample(sde, gm.score_fn(sde), x_T.shape, **run)
    exact = at_end.samples * s / math.sqrt(s**2 + 0.05**2)
    errors = {}
    for order in (1, 2, 3):
        out = sample(sde, gm.score_fn(sde), x_T.shape, denoise=True, denoise_order=order, **run)
        assert out.nfe == at_end.nfe + 1
        errors[order] = float(((out.samples - exact).norm(dim=1) / exact.norm(dim=1)).max())
    assert errors[1] == pytest.approx(1 - s / math.sqrt(s**2 + 0.05**2), rel=1e-6)
    assert errors[2] < errors[1] / 5 and errors[3] < errors[1] / 5, errors


def test_denoise_order_is_checked_and_recorded() -> None:
    with pytest.raises(ValueError, match="set denoise=true as well"):
        build_sampler("dpm_solver", denoise_order=3)
    with pytest.raises(ValueError, match="denoise_order must be 1, 2, 3 or 4, got 5"):
        build_sampler("dpm_solver", denoise=True, denoise_order=5)
    s = build_sampler("ddim", denoise=True, denoise_order=3)
    assert s.end.denoise_order == 3 and s.expected_nfe(10) == 11
    assert build_sampler("ode_heun", denoise=True).end.denoise_order == 1  # Tweedie unless asked
    # Each sample on its own times: no shared nodes for the polynomial.
    gm = GaussianMixture([0.5, 0.5], torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), [0.1, 0.2])
    with pytest.raises(ValueError, match="needs one time per step for the whole batch"):
        sample(VPSDE(), gm.score_fn(VPSDE()), (16, 2), sampler="dpm_solver_adaptive", step_control="sample",
               denoise=True, denoise_order=3)
