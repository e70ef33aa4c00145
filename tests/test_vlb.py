"""DDPM's variational bound (vlb.py) and the hybrid loss's L_vlb (losses.py) against closed forms."""
from __future__ import annotations

import math

import pytest
import torch

from sde_diffusion.losses import dsm_terms, hybrid_vlb_term
from sde_diffusion.sdes import VPSDE
from sde_diffusion.sdes.discrete import DiscreteVP
from sde_diffusion.vlb import discretized_gaussian_log_prob, prior_kl, proposal, vlb

pytestmark = pytest.mark.numeric


def _gaussian_score(sde, mu: float, s2: float):
    def score(x, t):
        m, sig = sde.mean_coeff(t)[:, None], sde.marginal_std(t)[:, None]
        return -(x - m * mu) / (m**2 * s2 + sig**2)

    return score


def _closed_form(proc: DiscreteVP, variance: str, mu: float, s2: float, D: int) -> float:
    """E[L_T + Σ L_{i−1} + L_0] for data N(mu, s2 I_D), the optimal ε̂ = E[ε | x_i] and a Gaussian decoder."""
    ab, oma, beta = proc.alpha_bar, proc.one_minus_alpha_bar, proc.beta
    var, log_var = proc.variance(variance)
    resid = ab * s2 / (ab * s2 + oma)  # Var(ε | x_i) per element
    r = proc.beta_tilde / var
    w = beta**2 / ((1 - beta) * oma * var)
    kl = 0.5 * D * (r[1:] - 1 - torch.log(r[1:]) + w[1:] * resid[1:])
    L_T = 0.5 * D * (float(ab[-1]) * (mu**2 + s2) - float(ab[-1]) - math.log1p(-float(ab[-1])))
    L_0 = 0.5 * D * (math.log(2 * math.pi) + float(log_var[0]) + float(w[0] * resid[0]))
    return L_T + float(kl.sum()) + L_0


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_bound_on_gaussian_data_equals_its_closed_form(variance: str, float64) -> None:
    sde, mu, s2, D, n = VPSDE(), 0.3, 0.5, 3, 3000
    proc = DiscreteVP.from_sde(sde, 60)
    g = torch.Generator().manual_seed(1)
    x0 = mu + math.sqrt(s2) * torch.randn(n, D, generator=g)
    res = vlb(sde, _gaussian_score(sde, mu, s2), x0, proc, variance=variance, decoder="gaussian", generator=g)
    assert res.nfe == 60 and res.per_step.shape == (n, 60)
    torch.testing.assert_close(res.total, res.prior + res.middle + res.decoder)
    se = float(res.total.std()) / math.sqrt(n)
    assert float(res.total.mean()) == pytest.approx(_closed_form(proc, variance, mu, s2, D), abs=4 * se)


def test_bound_of_a_point_mass_with_its_exact_posterior_mean_is_exact(float64) -> None:
    """Data δ(c): the exact score gives ε̂ = ε, μ_θ = the posterior mean, so each L_{i−1} is the variance KL alone."""
    sde, D = VPSDE(), 4
    c = torch.tensor([0.5, -0.25, 1.0, 0.0])
    proc = DiscreteVP.from_sde(sde, 40)

    def score(x, t):
        m, sig = sde.mean_coeff(t)[:, None], sde.marginal_std(t)[:, None]
        return -(x - m * c) / sig**2

    x0 = c.expand(8, D).clone()
    for variance in ("beta", "beta_tilde"):
        res = vlb(sde, score, x0, proc, variance=variance, decoder="gaussian", generator=torch.Generator().manual_seed(0))
        var, _ = proc.variance(variance)
        r = proc.beta_tilde[1:] / var[1:]
        expected = 0.5 * D * (r - 1 - torch.log(r))
        torch.testing.assert_close(res.per_step[:, 1:], expected.expand(8, -1), rtol=1e-8, atol=1e-10)
    # With σ² = β̃ every middle term vanishes.
    res = vlb(sde, score, x0, proc, variance="beta_tilde", decoder="gaussian")
    assert float(res.middle.abs().max()) < 1e-9


def test_prior_term_is_the_gaussian_kl(float64) -> None:
    proc = DiscreteVP.linear(1000)
    x0 = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ab = proc.alpha_bar[-1]
    q = torch.distributions.Normal(ab.sqrt() * x0, (1 - ab).sqrt())
    p = torch.distributions.Normal(torch.zeros_like(x0), torch.ones_like(x0))
    expected = torch.distributions.kl_divergence(q, p).reshape(5, -1).sum(1)
    torch.testing.assert_close(prior_kl(x0, proc), expected, rtol=1e-9, atol=1e-12)
    assert float(prior_kl(torch.zeros(1, 1), proc)) >= 0.0


def test_discretized_decoder_is_a_probability_over_the_levels(float64) -> None:
    levels, lo, hi = 17, -1.0, 1.0
    values = torch.linspace(lo, hi, levels)
    for mean, log_var in [(0.1, math.log(0.01)), (-0.95, math.log(1e-4)), (3.0, math.log(0.5)), (0.0, math.log(1e-8))]:
        lp = discretized_gaussian_log_prob(values, torch.full_like(values, mean), torch.full_like(values, log_var),
                                           lo, hi, levels)
        assert float(torch.logsumexp(lp, 0)) == pytest.approx(0.0, abs=1e-9)
    # An interior bin against the normal CDF directly.
    normal = torch.distributions.Normal(0.1, 0.2)
    k = 9
    half = (hi - lo) / (levels - 1) / 2
    direct = math.log(float(normal.cdf(values[k] + half) - normal.cdf(values[k] - half)))
    lp = discretized_gaussian_log_prob(values[k:k + 1], torch.tensor([0.1]), torch.tensor([math.log(0.04)]), lo, hi, levels)
    assert float(lp) == pytest.approx(direct, rel=1e-10)
    # 84 standard deviations into the tail the log stays finite: log(Φ(b) − Φ(a)) = log Φ(b) + log(1 − Φ(a)/Φ(b)).
    from scipy.stats import norm

    lp = discretized_gaussian_log_prob(torch.tensor([0.0]), torch.tensor([0.9]), torch.tensor([math.log(1e-4)]), lo, hi, levels)
    b, a = (half - 0.9) / 0.01, (-half - 0.9) / 0.01
    expected = norm.logcdf(b) + math.log1p(-math.exp(norm.logcdf(a) - norm.logcdf(b)))
    assert math.isfinite(float(lp)) and float(lp) == pytest.approx(expected, rel=1e-9)


def test_importance_sampled_estimate_is_unbiased_with_honest_errors(float64) -> None:
    sde, mu, s2, D, n = VPSDE(), 0.3, 0.5, 3, 6000
    proc = DiscreteVP.from_sde(sde, 100)
    g = torch.Generator().manual_seed(2)
    x0 = mu + math.sqrt(s2) * torch.randn(n, D, generator=g)
    res = vlb(sde, _gaussian_score(sde, mu, s2), x0, proc, decoder="gaussian", terms=4, generator=g)
    assert res.nfe == 5 and res.per_step is None and (res.stderr > 0).all()
    se = float(res.total.std()) / math.sqrt(n)
    assert float(res.total.mean()) == pytest.approx(_closed_form(proc, "beta", mu, s2, D), abs=4 * se)
    q = proposal(proc, mu**2 + s2, "beta")
    assert float(q[0]) == 0.0 and float(q.sum()) == pytest.approx(1.0) and float(q[1:].min()) >= 0.1 / 99 - 1e-12


def test_bad_input_is_refused() -> None:
    sde = VPSDE()
    proc = DiscreteVP.from_sde(sde, 10)
    x0 = torch.zeros(2, 2)
    score = lambda x, t: -x  # noqa: E731
    with pytest.raises(ValueError, match="decoder='gaussian'"):
        vlb(sde, score, x0, proc, decoder="discretized")
    with pytest.raises(ValueError, match="unknown decoder"):
        vlb(sde, score, x0, proc, decoder="bernoulli")
    with pytest.raises(ValueError, match="terms must be"):
        vlb(sde, score, x0, proc, decoder="gaussian", terms=0)
    with pytest.raises(ValueError, match="learn_sigma"):
        vlb(sde, score, x0, proc, decoder="gaussian", variance="learned")


# ---------------------------------------------------------------------------------- hybrid loss
def test_hybrid_term_trains_only_v_towards_the_optimal_variance(float64) -> None:
    """min over σ² of E KL_i is σ² = β̃ + β²/(α(1 − ᾱ))·E(ε̂ − ε)²; the gradient never reaches ε̂."""
    proc = DiscreteVP.from_sde(VPSDE(), 100)
    ab = proc.alpha_bar
    k = 30  # 0-based; step i = 31
    beta, bt = float(proc.beta[k]), float(proc.beta_tilde[k])
    w = beta**2 / ((1 - beta) * float(proc.one_minus_alpha_bar[k]))
    err2 = 0.5 * (beta - bt) / w  # puts the optimum inside [β̃, β]
    target = bt + w * err2
    noise = torch.zeros(1, 1)
    eps_hat = torch.full((1, 1), math.sqrt(err2), requires_grad=True)
    v = torch.zeros(1, 1, requires_grad=True)
    opt = torch.optim.LBFGS([v], lr=0.5, max_iter=200, tolerance_grad=1e-14, tolerance_change=1e-16)
    i = torch.tensor([k + 1])

    def closure():
        opt.zero_grad()
        loss = hybrid_vlb_term(eps_hat, noise, v, ab, i, "mean").sum()
        loss.backward()
        return loss

    opt.step(closure)
    frac = (float(v.detach()) + 1) / 2
    sigma2 = math.exp(frac * math.log(beta) + (1 - frac) * math.log(bt))
    assert sigma2 == pytest.approx(target, rel=1e-6)
    assert eps_hat.grad is None or float(eps_hat.grad.abs().max()) == 0.0


def test_learned_sigma_loss_adds_the_weighted_bound(float64) -> None:
    sde = VPSDE()
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    v_out = 0.3

    def net(x, t):
        return torch.cat([0.5 * x, torch.full_like(x, v_out)], dim=1)

    plain = dsm_terms(sde, lambda x, t: 0.5 * x, x0, discrete_steps=50, generator=torch.Generator().manual_seed(1))
    hyb = dsm_terms(sde, net, x0, discrete_steps=50, learn_sigma=True, hybrid_lambda=0.01,
                    generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(hyb.eps_mse, plain.eps_mse)
    extra = hyb.loss - plain.loss
    assert (extra != 0).all()
    with pytest.raises(ValueError, match="prediction='eps'"):
        dsm_terms(sde, net, x0, learn_sigma=True, prediction="x0")
    with pytest.raises(ValueError, match=r"\[B, 2C, \.\.\.\]"):
        dsm_terms(sde, lambda x, t: x, x0, learn_sigma=True)
