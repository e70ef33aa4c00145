"""DDPM's discrete chain (sdes/discrete.py) and Algorithm 2 (samplers/ddpm.py) against independent formulas."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sde_diffusion.samplers import SAMPLERS, sample
from sde_diffusion.samplers.ddpm import DDPM
from sde_diffusion.score import ScoreModel, learned_variance_source
from sde_diffusion.sdes import CosineVPSDE, SubVPSDE, VESDE, VPSDE
from sde_diffusion.sdes.discrete import DiscreteVP, check_variance_preserving

pytestmark = pytest.mark.numeric


# ---------------------------------------------------------------------------------- the chain
def test_linear_and_cosine_schedules_match_their_definitions() -> None:
    lin = DiscreteVP.linear(1000)
    assert float(lin.beta[0]) == pytest.approx(1e-4) and float(lin.beta[-1]) == pytest.approx(0.02)
    ab = 1.0
    for i in (0, 1, 499, 999):
        expected = math.prod(1 - (1e-4 + j * (0.02 - 1e-4) / 999) for j in range(i + 1))
        assert float(lin.alpha_bar[i]) == pytest.approx(expected, rel=1e-10)
    cos = DiscreteVP.cosine(100)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for i in (1, 50, 90):  # below the 0.999 clip
        assert float(cos.alpha_bar[i - 1]) == pytest.approx(f(i / 100) / f(0), rel=1e-9)
    assert float(cos.beta.max()) <= 0.999


@pytest.mark.parametrize("sde", [VPSDE(), CosineVPSDE(), VPSDE(beta_min=0.5, beta_max=8.0, T=2.0)])
def test_exact_discretisation_hits_the_marginals_at_the_network_times(sde) -> None:
    proc = DiscreteVP.from_sde(sde, 200)
    t = proc.network_times(sde)
    torch.testing.assert_close(t, torch.arange(1, 201, dtype=torch.float64) * sde.T / 200)
    torch.testing.assert_close(proc.alpha_bar, sde.mean_coeff(t) ** 2, rtol=1e-10, atol=1e-12)


def test_ddpm_rule_is_the_vp_sdes_own_euler_discretisation() -> None:
    sde = VPSDE()
    proc = DiscreteVP.from_sde(sde, 1000, rule="ddpm")
    torch.testing.assert_close(proc.beta, sde.discrete_betas(1000))
    # For N = 1000 this is DDPM's linear schedule shifted by one step of the continuous β.
    assert float((proc.beta - DiscreteVP.linear(1000).beta).abs().max()) < 2.1e-5


def test_posterior_variance_is_bayes_rule() -> None:
    proc = DiscreteVP.linear(50)
    for i in (1, 10, 49):  # 0-based step k = i: x_{i+1} -> x_i
        prior_var, lik_var = float(proc.one_minus_alpha_bar[i - 1]), float(proc.beta[i])
        alpha = 1 - float(proc.beta[i])
        # x_{i} | x_0 ~ N(., 1 - ᾱ_{i}); x_{i+1} | x_i ~ N(√α x_i, β): precision adds.
        expected = 1.0 / (1.0 / prior_var + alpha / lik_var)
        assert float(proc.beta_tilde[i]) == pytest.approx(expected, rel=1e-10)
    assert float(proc.beta_tilde[0]) == 0.0


def test_respacing_keeps_the_marginals_of_the_kept_steps() -> None:
    proc = DiscreteVP.from_sde(VPSDE(), 1000)
    fast = proc.respace(50)
    assert fast.N == 50 and int(fast.steps[0]) == 1 and int(fast.steps[-1]) == 1000
    torch.testing.assert_close(fast.alpha_bar, proc.alpha_bar[fast.steps - 1], rtol=1e-12, atol=0)
    torch.testing.assert_close(fast.times, proc.times[fast.steps - 1])
    assert proc.respace(1000) is proc
    with pytest.raises(ValueError, match="at most 1000"):
        proc.respace(1001)


def test_network_times_match_log_snr_for_explicit_schedules() -> None:
    sde = VPSDE()
    proc = DiscreteVP.linear(1000)
    t = proc.network_times(sde)
    inside = proc.alpha_bar > sde.mean_coeff(torch.tensor(sde.T, dtype=torch.float64)) ** 2
    assert 990 < int(inside.sum()) < 1000 and bool((t[~inside] == sde.T).all())  # the schedule ends past T: clipped
    torch.testing.assert_close(sde.mean_coeff(t[inside]) ** 2, proc.alpha_bar[inside], rtol=1e-6, atol=1e-12)


def test_variances_and_their_interpolation() -> None:
    proc = DiscreteVP.linear(100)
    b, _ = proc.variance("beta")
    bt, _ = proc.variance("beta_tilde")
    torch.testing.assert_close(b, proc.beta)
    torch.testing.assert_close(bt[1:], proc.beta_tilde[1:])
    assert float(bt[0]) == float(proc.beta_tilde[1])  # clipped: log β̃_1 = −∞
    v1, _ = proc.variance("learned", frac=torch.ones(100, dtype=torch.float64))
    v0, _ = proc.variance("learned", frac=torch.zeros(100, dtype=torch.float64))
    torch.testing.assert_close(v1, b)
    torch.testing.assert_close(v0, bt)
    half, _ = proc.variance("learned", frac=torch.full((100,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(half, torch.sqrt(b * bt))


@pytest.mark.parametrize("sde", [SubVPSDE(), VESDE()])
def test_non_variance_preserving_processes_are_refused(sde) -> None:
    with pytest.raises(ValueError, match="variance-preserving"):
        check_variance_preserving(sde, "x")
    with pytest.raises(ValueError, match="variance-preserving"):
        sample(sde, lambda x, t: -x, (4, 2), sampler="ddpm", steps=10)


# ---------------------------------------------------------------------------------- Algorithm 2
def _gaussian_score(sde, mu: float, s2: float):
    def score(x, t):
        m, sig = sde.mean_coeff(t)[:, None], sde.marginal_std(t)[:, None]
        return -(x - m * mu) / (m**2 * s2 + sig**2)

    return score


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_algorithm_2_step_by_step(variance: str) -> None:
    """The sampler against a direct transcription of Algorithm 2 with the same noise."""
    sde, N = VPSDE(), 30
    score = _gaussian_score(sde, 0.5, 0.3)
    proc = DiscreteVP.linear(N)
    betas = [1e-4 * 1000 / N + j * (0.02 - 1e-4) * 1000 / N / (N - 1) for j in range(N)]
    abar = [math.prod(1 - b for b in betas[: j + 1]) for j in range(N)]
    gen = torch.Generator().manual_seed(3)
    x_T = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    got = sample(sde, score, (5, 2), sampler="ddpm", steps=N, beta_schedule="linear", train_steps=N, variance=variance,
                 x_T=x_T, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert got.nfe == N
    g = torch.Generator().manual_seed(7)
    x = x_T.clone()
    t_net = proc.network_times(sde)
    for i in reversed(range(N)):
        eps = -sde.marginal_std(t_net[i]) * score(x, t_net[i].expand(5))
        mean = (x - betas[i] / math.sqrt(1 - abar[i]) * eps) / math.sqrt(1 - betas[i])
        if i == 0:
            x = mean
            continue
        var = betas[i] if variance == "beta" else betas[i] * (1 - abar[i - 1]) / (1 - abar[i])
        x = mean + math.sqrt(var) * torch.randn(5, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(got.samples, x, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_1000_steps_sample_the_data_distribution(variance: str) -> None:
    sde, mu, s2, n = VPSDE(), 0.7, 0.25, 20000
    res = sample(sde, _gaussian_score(sde, mu, s2), (n, 1), sampler="ddpm", steps=1000, variance=variance,
                 generator=torch.Generator().manual_seed(0))
    x = res.samples.double()
    assert float(x.mean()) == pytest.approx(mu, abs=4 * math.sqrt(s2 / n) + 0.01)
    assert float(x.var()) == pytest.approx(s2, rel=0.05)


def test_respaced_sampling_brackets_the_data_variance() -> None:
    """Respaced to 50 steps the mean stays exact; the true reverse variance lies between β̃ and β, so β̃
    under-disperses and β over-disperses (the gap a learned Σ closes)."""
    sde, mu, s2, n = VPSDE(), 0.7, 0.25, 20000
    out = {}
    for variance in ("beta", "beta_tilde"):
        res = sample(sde, _gaussian_score(sde, mu, s2), (n, 1), sampler="ddpm", steps=50, variance=variance,
                     generator=torch.Generator().manual_seed(1))
        assert res.nfe == 50
        assert float(res.samples.mean()) == pytest.approx(mu, abs=4 * math.sqrt(s2 / n) + 0.005)
        out[variance] = float(res.samples.var())
    assert out["beta_tilde"] < 0.9 * s2 and out["beta"] > 1.02 * s2


class _LearnedSigmaNet(nn.Module):
    """ε-network of Gaussian data N(0, s2) with a constant v output."""

    def __init__(self, sde, s2: float, v: float) -> None:
        super().__init__()
        self.sde, self.s2, self.v = sde, s2, v
        self.learn_sigma = True

    def forward(self, x, t):
        m, sig = self.sde.mean_coeff(t)[:, None], self.sde.marginal_std(t)[:, None]
        eps = sig * x / (m**2 * self.s2 + sig**2)
        return torch.cat([eps, torch.full_like(x, self.v)], dim=1)


@pytest.mark.parametrize("v, fixed", [(1.0, "beta"), (-1.0, "beta_tilde")])
def test_learned_variance_at_its_ends_equals_the_fixed_ones(v: float, fixed: str) -> None:
    sde = VPSDE()
    model = ScoreModel(_LearnedSigmaNet(sde, 0.5, v), sde, learn_sigma=True)
    assert learned_variance_source(lambda x, t: model(x, t)) is model
    x_T = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    learned = sample(sde, model, (64, 3), sampler="ddpm", steps=40, variance="learned", x_T=x_T,
                     generator=torch.Generator().manual_seed(1))
    ref = sample(sde, model, (64, 3), sampler="ddpm", steps=40, variance=fixed, x_T=x_T,
                 generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(learned.samples, ref.samples, rtol=1e-5, atol=1e-5)


def test_bad_input_is_refused_with_the_reason() -> None:
    sde = VPSDE()
    score = _gaussian_score(sde, 0.0, 1.0)
    with pytest.raises(ValueError, match="model.learn_sigma=true"):
        sample(sde, score, (4, 1), sampler="ddpm", steps=10, variance="learned")
    with pytest.raises(ValueError, match="at most train_steps=1000"):
        sample(sde, score, (4, 1), sampler="ddpm", steps=2000)
    with pytest.raises(ValueError, match="unknown variance 'sigma'; choose one of: beta, beta_tilde, learned"):
        DDPM(variance="sigma")
    with pytest.raises(ValueError, match="no eps, end_sigma or denoise"):
        DDPM(eps=1e-3)
    with pytest.raises(ValueError, match="unknown beta_schedule"):
        DDPM(beta_schedule="quadratic")
    assert "ddpm" in SAMPLERS.names()
