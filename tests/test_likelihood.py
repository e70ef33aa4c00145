"""Probability-flow likelihoods against the analytic densities of Gaussian mixtures, and bits/dim."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from sde_diffusion import SubVPSDE, VESDE, VPSDE
from sde_diffusion.likelihood import (
    _exact_divergence_batched,
    _exact_divergence_loop,
    bits_per_dim,
    dequantize,
    log_likelihood,
    resolve_divergence,
)
from sde_diffusion.toy import GaussianMixture

pytestmark = pytest.mark.numeric

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small kernels on a shared 2-core machine: extra threads only add contention.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SDE_FACTORIES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": lambda: VESDE(sigma_min=0.01, sigma_max=20.0)}


@pytest.fixture(scope="module")
def gm3() -> GaussianMixture:
    return GaussianMixture.random(3, 3, seed=0)


def _data(gm: GaussianMixture, n: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return gm.sample(n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _true_prior(gm: GaussianMixture, sde):
    return lambda z: gm.log_prob_t(z, sde.T, sde)


# ---------------------------------------------------------------------- exact trace
@pytest.mark.parametrize("name", sorted(SDE_FACTORIES))
def test_exact_trace_matches_analytic_log_p_eps(gm3, name):
    sde = SDE_FACTORIES[name]()
    x = _data(gm3, 32)
    res = log_likelihood(sde, gm3.score_fn(sde), x, prior_logp=_true_prior(gm3, sde))
    truth = gm3.log_prob_t(x, sde.eps, sde)
    assert res.logp.shape == (32,) and res.z.shape == x.shape
    assert (res.logp - truth).abs().mean() / 3 < 1e-3
    # The same integration with the SDE's own Gaussian prior differs only by the prior term.
    res_std = log_likelihood(sde, gm3.score_fn(sde), x)
    assert torch.allclose(res_std.prior_logp, sde.prior_logp(res_std.z))
    assert torch.allclose(res_std.delta_logp, res.delta_logp, atol=1e-6)
    assert torch.allclose(res_std.logp, res_std.prior_logp + res_std.delta_logp)


def test_tight_tolerance_converges_to_analytic(gm3):
    sde = VPSDE()
    x = _data(gm3, 16, seed=1)
    res = log_likelihood(sde, gm3.score_fn(sde), x, rtol=1e-8, atol=1e-8, prior_logp=_true_prior(gm3, sde))
    assert (res.logp - gm3.log_prob_t(x, sde.eps, sde)).abs().max() < 1e-5


def test_end_point_is_the_probability_flow_image(gm3):
    # z must follow the prior-time marginal: for VP it is the mixture at T, close to N(0, I).
    sde = VPSDE()
    x = _data(gm3, 512, seed=2)
    z = log_likelihood(sde, gm3.score_fn(sde), x, solver="rk4", steps=40).z
    se = 1 / math.sqrt(512)
    assert (z.mean(0).abs() < 5 * se).all()
    assert ((z.var(0) - 1).abs() < 5 * math.sqrt(2) * se).all()


def test_solvers_agree_and_fixed_steps_converge_at_their_order(gm3):
    sde = VPSDE()
    x = _data(gm3, 16, seed=3)
    ref = log_likelihood(sde, gm3.score_fn(sde), x, rtol=1e-8, atol=1e-8)
    a = log_likelihood(sde, gm3.score_fn(sde), x, solver="dopri5")
    b = log_likelihood(sde, gm3.score_fn(sde), x, solver="scipy")
    c = log_likelihood(sde, gm3.score_fn(sde), x, solver="rk4", steps=50)
    assert (a.logp - b.logp).abs().max() / 3 < 1e-3
    assert (a.logp - c.logp).abs().max() / 3 < 1e-3
    assert c.nfe == 4 * 50 and a.nfe > 0 and b.nfe > 0
    # Heun is second order: doubling the steps divides the error by ≈ 4.
    errs = [(log_likelihood(sde, gm3.score_fn(sde), x, solver="heun", steps=n).logp - ref.logp).abs().max() for n in (25, 50)]
    assert 3.0 < errs[0] / errs[1] < 5.0


def test_eps_argument_changes_the_target_density(gm3):
    sde = VPSDE()
    x = _data(gm3, 16, seed=4)
    res = log_likelihood(sde, gm3.score_fn(sde), x, eps=0.05, prior_logp=_true_prior(gm3, sde))
    truth = gm3.log_prob_t(x, 0.05, sde)
    assert (res.logp - truth).abs().mean() / 3 < 1e-3
    # …and it is not log p_eps at the default eps.
    assert (res.logp - gm3.log_prob_t(x, sde.eps, sde)).abs().mean() > 1e-2


def test_float32_and_no_grad_context(gm3):
    sde = VPSDE()
    x = _data(gm3, 16, seed=5, dtype=torch.float32)
    with torch.no_grad():
        res = log_likelihood(sde, gm3.score_fn(sde), x, prior_logp=_true_prior(gm3, sde))
    assert res.logp.dtype == torch.float32 and res.z.dtype == torch.float32
    assert (res.logp - gm3.log_prob_t(x.double(), sde.eps, sde).float()).abs().mean() / 3 < 1e-3


def test_image_shaped_input_equals_flat(gm3):
    gm = GaussianMixture.random(4, 2, seed=7)
    sde = VPSDE()
    x = _data(gm, 8, seed=6)

    def score_img(xi, t):
        return gm.score(xi.reshape(xi.shape[0], 4), t, sde).reshape(xi.shape)

    flat = log_likelihood(sde, gm.score_fn(sde), x)
    img = log_likelihood(sde, score_img, x.reshape(8, 1, 2, 2))
    assert img.z.shape == (8, 1, 2, 2)
    assert torch.allclose(img.logp, flat.logp, atol=1e-8)


class _CubeNoVmap(torch.autograd.Function):
    """x³ whose backward reads a host scalar, which vmap cannot batch."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        one = float(g.abs().max().item()) * 0.0 + 1.0
        return g * 3 * x**2 * one


def test_exact_divergence_paths_agree_with_jacobian_trace():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    s = torch.tanh(x @ A) * x
    truth = torch.stack([torch.trace(torch.autograd.functional.jacobian(lambda v: torch.tanh(v @ A) * v, x[i].detach())) for i in range(3)])
    assert torch.allclose(_exact_divergence_batched(s, x, chunk=2), truth)
    assert torch.allclose(_exact_divergence_loop(s, x), truth)


def test_score_that_cannot_be_vmapped_falls_back_to_the_loop():
    gm = GaussianMixture.random(2, 1, seed=3)
    sde = VPSDE()
    x = _data(gm, 8, seed=8)

    def score_cube(xx, t):
        # s(x) = score(x) + x³ − x³: the same field through a non-vmappable op.
        return gm.score(xx, t, sde) + _CubeNoVmap.apply(xx) - xx**3

    ref = log_likelihood(sde, gm.score_fn(sde), x, solver="rk4", steps=20)
    res = log_likelihood(sde, score_cube, x, solver="rk4", steps=20)
    assert torch.allclose(res.logp, ref.logp, atol=1e-8)


# ---------------------------------------------------------------------- Hutchinson–Skilling
def _score_part_log_jacobian(gm: GaussianMixture, sde) -> torch.Tensor:
    """For one Gaussian N(μ, UΛUᵀ): M = ∫_eps^T −½g² ∂s/∂x dt = U diag(½log(v_T/v_eps) − log(m_T/m_eps)) Uᵀ,

    v(t) = m²λ + σ², since the flow is linear and its log-Jacobian is ∫(f·I + M'(t))dt.
    """
    lam, U = gm.eigvals[0], gm.eigvecs[0]
    T, e = torch.tensor(sde.T, dtype=torch.float64), torch.tensor(sde.eps, dtype=torch.float64)

    def v(t):
        return sde.mean_coeff(t) ** 2 * lam + sde.marginal_std(t) ** 2

    d = 0.5 * torch.log(v(T) / v(e)) - torch.log(sde.mean_coeff(T) / sde.mean_coeff(e))
    return U @ torch.diag(d) @ U.T


@pytest.mark.parametrize("noise,n_probes", [("gaussian", 1), ("rademacher", 1), ("rademacher", 4)])
def test_hutchinson_mean_and_variance_match_theory(noise, n_probes):
    # With probes fixed over the integration the estimate is vᵀMv: mean tr M, variance
    # 2‖M‖_F²/K (Gaussian) or 2(‖M‖_F² − Σ M_ii²)/K (Rademacher), M symmetric here.
    gm = GaussianMixture.random(4, 1, seed=1, std_range=(0.3, 2.0))
    sde = VPSDE()
    B = 2000
    x = _data(gm, B, seed=9)
    kw = dict(solver="rk4", steps=30)
    exact = log_likelihood(sde, gm.score_fn(sde), x, **kw)
    est = log_likelihood(
        sde, gm.score_fn(sde), x, divergence="hutchinson", noise=noise, n_probes=n_probes,
        generator=torch.Generator().manual_seed(11), **kw,
    )
    M = _score_part_log_jacobian(gm, sde)
    fro2, diag2 = (M**2).sum(), (torch.diag(M) ** 2).sum()
    var = (2 * fro2 if noise == "gaussian" else 2 * (fro2 - diag2)) / n_probes
    err = est.delta_logp - exact.delta_logp
    assert abs(err.mean()) < 5 * math.sqrt(var / B)
    # Sample variance of a quadratic form: Var(s²) ≈ (κ4 + 2κ2²)/B with κ4 = 48 Σμ⁴/K³ (Gaussian);
    # 25 % is several standard errors for B = 2000 in every case here.
    assert abs(err.var() / var - 1) < 0.25
    assert torch.equal(est.z, exact.z)  # the state trajectory does not depend on the probes


def test_hutchinson_unbiased_on_a_mixture_and_reproducible(gm3):
    sde = VPSDE()
    B = 256
    x = _data(gm3, B, seed=10)
    kw = dict(solver="rk4", steps=30)
    exact = log_likelihood(sde, gm3.score_fn(sde), x, **kw)
    a = log_likelihood(sde, gm3.score_fn(sde), x, divergence="hutchinson", noise="rademacher",
                       generator=torch.Generator().manual_seed(0), **kw)
    b = log_likelihood(sde, gm3.score_fn(sde), x, divergence="hutchinson", noise="rademacher",
                       generator=torch.Generator().manual_seed(0), **kw)
    err = a.logp - exact.logp
    assert torch.equal(a.logp, b.logp)
    assert abs(err.mean()) < 5 * err.std() / math.sqrt(B)
    assert err.abs().max() > 0  # it is an estimate, not the exact trace


# ---------------------------------------------------------------------- input checks
def test_bad_arguments_raise(gm3):
    sde = VPSDE()
    x = _data(gm3, 4)
    fn = gm3.score_fn(sde)
    with pytest.raises(ValueError, match="divergence"):
        log_likelihood(sde, fn, x, divergence="skilling")
    with pytest.raises(ValueError, match="solver"):
        log_likelihood(sde, fn, x, solver="rk45")
    with pytest.raises(ValueError, match="noise"):
        log_likelihood(sde, fn, x, divergence="hutchinson", noise="uniform")
    with pytest.raises(ValueError, match="eps"):
        log_likelihood(sde, fn, x, eps=1.5)
    with pytest.raises(ValueError, match="batch dimension"):
        log_likelihood(sde, fn, x[0])
    with pytest.raises(ValueError, match="autograd"):
        log_likelihood(sde, lambda xx, t: gm3.score(xx.detach(), t, sde), x, solver="euler", steps=2)


# ---------------------------------------------------------------------- bits per dimension
def test_bits_per_dim_8bit_in_minus_one_one_is_nll_bits_plus_seven():
    logp = torch.tensor([-1000.0, -2500.0], dtype=torch.float64)
    D = 3 * 8 * 8
    expected = -logp / (D * math.log(2)) + 7.0
    assert torch.allclose(bits_per_dim(logp, (3, 8, 8), scale=2.0), expected)
    # [0, 1) data (a = 1) gives + 8 bits.
    assert torch.allclose(bits_per_dim(logp, (3, 8, 8), scale=1.0), expected + 1.0)


@pytest.mark.parametrize("levels", [17, 256])
def test_bits_per_dim_against_discretised_gaussian(levels):
    # Model density in [-1, 1]: independent N(mu, s²) per dimension. Its discrete model on
    # L levels is P(k) = Φ((x_{k+1} − mu)/s) − Φ((x_k − mu)/s), x_k = −1 + 2k/L. The mean bpd of
    # uniformly dequantised data upper-bounds −E log2 P(k)/D by the Jensen gap, which for a
    # Gaussian is Var_U(log p)/2 + O(h⁴ d²/s⁶) = [d² h²/(24 s⁴) + h⁴/(1440 s⁴)]/ln 2 per dimension
    # (h = 2/L, d = x_c − mu, x_c the cell centre).
    mu, s, D, n = 0.1, 0.3, 3, 20000
    a, b = 2.0, -1.0
    rng = np.random.default_rng(0)
    cont = rng.normal(mu, s, size=(4 * n, D))
    cont = cont[(np.abs(cont) < 1).all(1)][:n]  # keep samples inside the range
    k = np.floor((cont - b) / a * levels).astype(np.int64)
    lo, hi = b + a * k / levels, b + a * (k + 1) / levels
    log2_P = np.log2(norm.cdf((hi - mu) / s) - norm.cdf((lo - mu) / s)).sum(1)
    discrete_bits = -log2_P.mean() / D

    u = dequantize(torch.from_numpy(k), levels, generator=torch.Generator().manual_seed(1)).double()
    x = a * u + b
    logp = torch.distributions.Normal(mu, s).log_prob(x).sum(1)
    bpd = bits_per_dim(logp, (D,), scale=a, levels=levels)
    h = a / levels
    centre = (lo + hi) / 2
    gap = ((centre - mu) ** 2 * h**2 / (24 * s**4) + h**4 / (1440 * s**4)).sum(1).mean() / (D * math.log(2))
    # Paired per sample, so only the dequantisation noise enters the standard error.
    paired = bpd.numpy() + log2_P / D
    se = paired.std() / math.sqrt(n)
    diff = bpd.mean().item() - discrete_bits
    assert diff > -4 * se
    assert abs(diff - gap) < 4 * se + 0.05 * gap
    if levels == 256:
        assert abs(diff) < 2e-3  # the Jacobian terms are right to far below one bit


def test_dequantize_range_and_errors():
    k = torch.tensor([[0, 5, 16]])
    u = dequantize(k, 17, generator=torch.Generator().manual_seed(0))
    assert u.dtype == torch.float32 and ((u * 17).floor() == k).all()
    with pytest.raises(ValueError, match="integers"):
        dequantize(torch.tensor([17]), 17)
    with pytest.raises(ValueError, match="integers"):
        dequantize(torch.tensor([0.5]), 17)
    with pytest.raises(ValueError, match="scale"):
        bits_per_dim(torch.zeros(1), (2,), scale=0.0)


def test_score_independent_of_x_has_zero_divergence():
    # s(x, t) = c(t)·w with a parameter w (differentiable, but not in x): ∫∇·f̃ = D∫f = D log(m_T/m_eps).
    sde = VPSDE()
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    x = torch.zeros(3, 2, dtype=torch.float64)
    T, e = torch.tensor(sde.T, dtype=torch.float64), torch.tensor(sde.eps, dtype=torch.float64)
    expected = 2 * torch.log(sde.mean_coeff(T) / sde.mean_coeff(e))
    for divergence in ("exact", "hutchinson"):
        res = log_likelihood(sde, lambda xx, t: 0 * xx.detach() + w, x, divergence=divergence, solver="rk4", steps=10)
        assert torch.allclose(res.delta_logp, expected.expand(3))


# ---------------------------------------------------------------------------------- auto divergence, standard error
def test_auto_divergence_is_exact_up_to_16_dims_then_hutchinson():
    sde = VPSDE()
    for dim, want in ((2, "exact"), (16, "exact"), (17, "hutchinson"), (64, "hutchinson")):
        gm = GaussianMixture.random(dim, 2, seed=3)
        x = _data(gm, 4, seed=1)
        kw = dict(solver="rk4", steps=4)
        auto = log_likelihood(sde, gm.score_fn(sde), x, generator=torch.Generator().manual_seed(0), **kw)
        assert auto.divergence == want and resolve_divergence("auto", dim) == want
        same = log_likelihood(sde, gm.score_fn(sde), x, divergence=want, generator=torch.Generator().manual_seed(0), **kw)
        assert torch.equal(auto.logp, same.logp)
        if want == "exact":
            assert torch.equal(auto.logp_stderr, torch.zeros(4, dtype=x.dtype)) and auto.delta_logp_probes is None
        else:
            assert auto.logp_stderr is None  # one probe: its error cannot be estimated from itself
            assert auto.delta_logp_probes.shape == (4, 1)
    with pytest.raises(ValueError, match="choose one of: auto, exact, hutchinson"):
        resolve_divergence("trace", 3)


def test_hutchinson_standard_error_matches_theory():
    """With K probes per example, logp_stderr² estimates Var(one probe)/K, known in closed form here."""
    gm = GaussianMixture.random(4, 1, seed=1, std_range=(0.3, 2.0))
    sde = VPSDE()
    B, K = 2000, 4
    x = _data(gm, B, seed=9)
    kw = dict(solver="rk4", steps=30)
    exact = log_likelihood(sde, gm.score_fn(sde), x, divergence="exact", **kw)
    est = log_likelihood(sde, gm.score_fn(sde), x, divergence="hutchinson", n_probes=K,
                         generator=torch.Generator().manual_seed(5), **kw)
    M = _score_part_log_jacobian(gm, sde)
    var_one = 2 * ((M**2).sum() - (torch.diag(M) ** 2).sum())  # Rademacher, one probe
    assert est.delta_logp_probes.shape == (B, K)
    torch.testing.assert_close(est.delta_logp_probes.mean(1), est.delta_logp)
    assert abs(float((est.logp_stderr**2).mean() * K / var_one) - 1) < 0.15
    # The reported error describes the actual error: about 68 % of examples within one standard error.
    inside = ((est.logp - exact.logp).abs() <= est.logp_stderr).double().mean()
    assert 0.5 < float(inside) < 0.85


def test_progress_reports_the_integrated_fraction(gm3):
    sde = VPSDE()
    seen = []
    log_likelihood(sde, gm3.score_fn(sde), _data(gm3, 3, seed=2), solver="rk4", steps=5, progress=seen.append)
    assert seen[0] == 0.0 and seen[-1] == 1.0 and all(a <= b for a, b in zip(seen, seen[1:]))
    assert len(seen) == 4 * 5 + 1  # every rk4 stage, then done
