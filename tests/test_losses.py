"""Denoising score matching against closed forms for Gaussian data.

For x_0 ~ N(μ, Σ) and a linear SDE, p_t = N(mμ, Σ_t), Σ_t = m²Σ + σ²I. A "Gaussian-score network"
s'(x, t) = −A'(x − mμ'), A' = (m²Σ' + σ²I)^{-1}, has the exact expected DSM error per t

    E‖s' + ε/σ‖² = m² tr(A'ΣA') + tr((I/σ − σA')²) + m²‖A'(μ − μ')‖²,

which for (μ', Σ') = (μ, Σ) is the irreducible constant D/σ² − tr(Σ_t^{-1}). Integrating over t
with scipy's quad gives the expected loss of every weighting, independent of the code under test.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate
from torch import Tensor, nn

from sde_diffusion.losses import (
    ImportanceTimeSampler,
    ddpm_alpha_bars,
    dsm_loss,
    dsm_terms,
    uniform_draws,
)
from sde_diffusion.score import eps_from_x0, v_from_eps_x0
from sde_diffusion.sdes import VESDE, VPSDE, CosineVPSDE, SubVPSDE

pytestmark = pytest.mark.numeric

D = 3
MU = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)
_Q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
SIGMA = _Q @ torch.diag(torch.tensor([0.2, 0.5, 1.5], dtype=torch.float64)) @ _Q.T


def gaussian_data(n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, D, generator=g, dtype=torch.float64)
    return MU + z @ torch.linalg.cholesky(SIGMA).T


class GaussianScoreNet(nn.Module):
    """Predicts, for the Gaussian score s'(x, t) = −A'(x − mμ'), the output of type ``prediction``.

    With ``extra=True`` a linear term x ↦ W x + b (parameters at zero) is added to the ε output.
    """

    def __init__(self, sde, mean: Tensor, cov: Tensor, prediction: str = "eps", extra: bool = False) -> None:
        super().__init__()
        self.sde, self.mean, self.prediction = sde, mean, prediction
        self.lam, self.U = torch.linalg.eigh(cov)
        self.W = nn.Parameter(torch.zeros(D, D, dtype=torch.float64)) if extra else None
        self.b = nn.Parameter(torch.zeros(D, dtype=torch.float64)) if extra else None

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        m, s = self.sde.mean_coeff(t)[:, None], self.sde.marginal_std(t)[:, None]
        y = (x - m * self.mean) @ self.U
        return -((y / (m**2 * self.lam + s**2)) @ self.U.T)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        m, s = self.sde.mean_coeff(t)[:, None], self.sde.marginal_std(t)[:, None]
        score = self.score(x, t)
        eps = -s * score
        if self.W is not None:
            eps = eps + x @ self.W.T + self.b
            score = -eps / s
        x0 = (x + s**2 * score) / m
        if self.prediction == "eps":
            return eps
        if self.prediction == "score":
            return score
        if self.prediction == "x0":
            return x0
        return v_from_eps_x0(eps, x0, m, s)


def expected_error(sde, t: float, mean2: Tensor, cov2: Tensor) -> float:
    """E‖s'(x_t) + ε/σ‖² (summed over dimensions) at time t, closed form."""
    tt = torch.tensor(t, dtype=torch.float64)
    m, s = float(sde.mean_coeff(tt)), float(sde.marginal_std(tt))
    A = torch.linalg.inv(m**2 * cov2 + s**2 * torch.eye(D, dtype=torch.float64))
    B = torch.eye(D, dtype=torch.float64) / s - s * A
    delta = MU - mean2
    return float(m**2 * torch.trace(A @ SIGMA @ A) + torch.trace(B @ B) + m**2 * (A @ delta).pow(2).sum())


def expected_loss(sde, lam: str, eps: float, mean2: Tensor = MU, cov2: Tensor = SIGMA) -> float:
    """(1/(T − eps)) ∫_eps^T λ(t) E‖s' + ε/σ‖² dt by adaptive quadrature in log t."""

    def integrand(log_t: float) -> float:
        t = math.exp(log_t)
        tt = torch.tensor(t, dtype=torch.float64)
        w = float(sde.marginal_std(tt)) ** 2 if lam == "sigma2" else float(sde.diffusion(tt)) ** 2
        return w * expected_error(sde, t, mean2, cov2) * t

    val, _ = integrate.quad(integrand, math.log(eps), math.log(sde.T), limit=400, epsabs=1e-10, epsrel=1e-9)
    return val / (sde.T - eps)


def mc(sde, net, n: int, seed: int, **kw) -> tuple[float, float]:
    """Monte-Carlo mean and standard error of the per-sample loss."""
    x0 = gaussian_data(n, seed)
    with torch.no_grad():
        terms = dsm_terms(sde, net, x0, generator=torch.Generator().manual_seed(seed + 1), reduction="sum", **kw)
    vals = terms.loss
    return float(vals.mean()), float(vals.std() / math.sqrt(n))


SDES = {"vp": VPSDE(), "ve": VESDE(sigma_min=0.01, sigma_max=5.0), "subvp": SubVPSDE()}


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
@pytest.mark.parametrize("weighting", ["sigma2", "g2", "importance"])
def test_loss_at_exact_score_equals_irreducible_constant(sde_name: str, weighting: str) -> None:
    sde, eps = SDES[sde_name], 1e-3
    net = GaussianScoreNet(sde, MU, SIGMA)
    ref = expected_loss(sde, "sigma2" if weighting == "sigma2" else "g2", eps)
    # Independent check of the closed form: the irreducible constant D/σ² − tr(Σ_t^{-1}).
    t = 0.3
    tt = torch.tensor(t, dtype=torch.float64)
    m, s = sde.mean_coeff(tt), sde.marginal_std(tt)
    const = D / s**2 - torch.trace(torch.linalg.inv(m**2 * SIGMA + s**2 * torch.eye(D, dtype=torch.float64)))
    assert expected_error(sde, t, MU, SIGMA) == pytest.approx(float(const), rel=1e-12)

    mean, se = mc(sde, net, 200_000, seed=11, weighting=weighting, eps=eps, stratified=True)
    assert abs(mean - ref) < 4 * se, (mean, ref, se)
    assert se < 0.02 * ref  # the test has power: a 10 % error in λ would fail it


def test_importance_and_g2_have_the_same_expectation_for_a_wrong_score() -> None:
    sde, eps = SDES["subvp"], 1e-3
    mean2, cov2 = MU + torch.tensor([1.0, 0.0, -0.8], dtype=torch.float64), 0.4 * SIGMA
    net = GaussianScoreNet(sde, mean2, cov2)
    ref = expected_loss(sde, "g2", eps, mean2, cov2)
    assert ref > 1.1 * expected_loss(sde, "g2", eps)  # the network is really wrong
    m_g2, se_g2 = mc(sde, net, 200_000, seed=21, weighting="g2", eps=eps)
    m_is, se_is = mc(sde, net, 200_000, seed=22, weighting="importance", eps=eps)
    assert abs(m_g2 - ref) < 4 * se_g2, (m_g2, ref, se_g2)
    assert abs(m_is - ref) < 4 * se_is, (m_is, ref, se_is)
    assert abs(m_is - m_g2) < 4 * math.hypot(se_g2, se_is)
    assert se_is < 0.5 * se_g2  # the point of the proposal: lower variance


@pytest.mark.parametrize("weighting", ["sigma2", "g2"])
def test_gradient_vanishes_at_the_exact_score(weighting: str) -> None:
    sde, eps = SDES["vp"], 1e-3
    net = GaussianScoreNet(sde, MU, SIGMA, extra=True)

    def grads(scale: float, k: int = 6, n: int = 15_000) -> Tensor:
        with torch.no_grad():
            net.W.copy_(scale * torch.eye(D, dtype=torch.float64))
        out = []
        for i in range(k):
            net.zero_grad()
            x0 = gaussian_data(n, seed=100 + i)
            loss = dsm_loss(sde, net, x0, weighting=weighting, eps=eps, reduction="sum", generator=torch.Generator().manual_seed(200 + i))
            loss.backward()
            out.append(torch.cat([net.W.grad.flatten(), net.b.grad]).clone())
        return torch.stack(out)

    g0 = grads(0.0)
    g1 = grads(0.3)
    mean0, se0 = g0.mean(0), g0.std(0) / math.sqrt(g0.shape[0])
    assert (mean0.abs() < 4.5 * se0).all(), (mean0, se0)
    # Away from the optimum the same estimator sees a gradient far above its noise.
    assert mean0.norm() < 0.1 * g1.mean(0).norm()
    assert g1.mean(0).norm() > 20 * se0.norm()


def test_importance_sampler_table_and_distribution() -> None:
    for sde in (VPSDE(), SubVPSDE(), CosineVPSDE(), VESDE(), VESDE(exact_kernel=False)):
        eps = 1e-4
        s = ImportanceTimeSampler(sde, eps)
        lam = lambda t: float(sde.log_snr(torch.tensor(t, dtype=torch.float64)))  # noqa: E731
        # g²/σ² = −d log-SNR/dt for linear SDEs, so Z = log-SNR(eps) − log-SNR(T).
        assert s.Z == pytest.approx(lam(eps) - lam(sde.T), rel=1e-4)
        n = 100_000
        t = s.sample(torch.rand(n, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
        assert t.min() >= eps and t.max() <= sde.T
        for q in (0.01, 0.1, 0.5, 0.9):
            t_q = eps + q * (sde.T - eps)
            cdf = (lam(eps) - lam(t_q)) / s.Z
            emp = float((t <= t_q).double().mean())
            assert abs(emp - cdf) < 4 * math.sqrt(cdf * (1 - cdf) / n) + 1e-4, (type(sde).__name__, q, emp, cdf)


def test_predictions_give_the_same_loss() -> None:
    sde = SDES["vp"]
    x0 = gaussian_data(512, seed=1)
    t = torch.linspace(1e-3, 1.0, 512, dtype=torch.float64)
    noise = torch.randn(512, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    wrong_mean = MU + 0.5
    losses = {}
    for pred in ("eps", "score", "x0", "v"):
        net = GaussianScoreNet(sde, wrong_mean, SIGMA, prediction=pred)
        for weighting in ("sigma2", "g2"):
            losses[pred, weighting] = dsm_terms(
                sde, net, x0, prediction=pred, weighting=weighting, t=t, noise=noise, reduction="sum"
            ).loss
    for pred in ("score", "x0", "v"):
        for weighting in ("sigma2", "g2"):
            torch.testing.assert_close(losses[pred, weighting], losses["eps", weighting], rtol=1e-9, atol=1e-9)
    # And the ε-loss is literally ‖ε_θ − ε‖².
    net = GaussianScoreNet(sde, wrong_mean, SIGMA)
    xt = sde.perturb(x0, t, noise)
    direct = (net(xt, t) - noise).pow(2).sum(1)
    torch.testing.assert_close(losses["eps", "sigma2"], direct, rtol=1e-12, atol=1e-12)


def test_reduction_mean_is_sum_over_dimensions_divided_by_D() -> None:
    sde = SDES["vp"]
    net = GaussianScoreNet(sde, MU + 1.0, SIGMA)
    x0 = gaussian_data(64, seed=3)
    kw = dict(generator=None, t=torch.full((64,), 0.4, dtype=torch.float64), noise=torch.randn(64, D, dtype=torch.float64))
    s = dsm_loss(sde, net, x0, reduction="sum", **kw)
    m = dsm_loss(sde, net, x0, reduction="mean", **kw)
    assert float(m) == pytest.approx(float(s) / D, rel=1e-12)


def test_stratified_draws_fill_every_stratum_and_stay_uniform() -> None:
    g = torch.Generator().manual_seed(0)
    u = uniform_draws(64, stratified=True, generator=g, dtype=torch.float64)
    counts = torch.bincount((u * 64).long(), minlength=64)
    assert (counts == 1).all()
    # Marginally uniform: the first element over many batches has mean 1/2 and variance 1/12.
    firsts = torch.stack([uniform_draws(16, True, g, dtype=torch.float64)[0] for _ in range(4000)])
    assert abs(float(firsts.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / 4000)


def test_uniform_times_cover_eps_to_T() -> None:
    sde = CosineVPSDE()
    seen = []

    def net(x: Tensor, t: Tensor) -> Tensor:
        seen.append(t)
        return torch.zeros_like(x)

    dsm_loss(sde, net, torch.zeros(20_000, 2), eps=1e-2, generator=torch.Generator().manual_seed(0))
    t = seen[0].double()
    assert t.min() >= 1e-2 and t.max() <= sde.T
    assert float(t.mean()) == pytest.approx((1e-2 + sde.T) / 2, abs=4 * (sde.T / math.sqrt(12 * 20_000)))


@pytest.mark.parametrize("time_input", ["i/N", "(i-1)/(N-1)"])
def test_ddpm_discrete_loss_uses_the_discrete_schedule(time_input: str) -> None:
    sde, N = VPSDE(), 50
    betas = [float(sde.beta_min + (i / N) * (sde.beta_max - sde.beta_min)) / N for i in range(1, N + 1)]
    alpha_bar = np.cumprod([1 - b for b in betas])  # ᾱ_i = ∏(1 − β_i), written out independently
    torch.testing.assert_close(ddpm_alpha_bars(sde, N), torch.tensor(alpha_bar, dtype=torch.float64))
    x0 = gaussian_data(4096, seed=9)
    seen = {}

    class Oracle(nn.Module):
        # Knows x0, so it returns the exact ε if (and only if) x_i = √ᾱ_i x0 + √(1−ᾱ_i) ε with the
        # step i read back from the time input.
        def forward(self, x: Tensor, t: Tensor) -> Tensor:
            i = (t * N).round().long() if time_input == "i/N" else (t * (N - 1)).round().long() + 1
            seen["t"], seen["i"] = t, i
            ab = torch.tensor(alpha_bar, dtype=torch.float64)[i - 1][:, None]
            return eps_from_x0(x, x0, ab.sqrt(), (1 - ab).sqrt())

    loss = dsm_loss(sde, Oracle(), x0, discrete_steps=N, time_input=time_input, generator=torch.Generator().manual_seed(1))
    assert float(loss) < 1e-20
    i = seen["i"]
    assert i.min() == 1 and i.max() == N
    assert torch.bincount(i, minlength=N + 1)[1:].min() > 40  # i ~ U{1..N}: ~82 draws each
    with pytest.raises(ValueError, match="variance-preserving"):
        dsm_loss(SubVPSDE(), Oracle(), x0, discrete_steps=N)


def test_bad_options_raise_clear_errors() -> None:
    sde = VPSDE()
    net = lambda x, t: x  # noqa: E731
    x0 = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="weighting.*sigma2, g2, importance, p2"):
        dsm_loss(sde, net, x0, weighting="likelihood")
    with pytest.raises(ValueError, match="prediction"):
        dsm_loss(sde, net, x0, prediction="noise")
    with pytest.raises(ValueError, match="reduction"):
        dsm_loss(sde, net, x0, reduction="none")
    with pytest.raises(ValueError, match="eps must lie"):
        dsm_loss(sde, net, x0, eps=0.0)
    with pytest.raises(ValueError, match="returned shape"):
        dsm_loss(sde, lambda x, t: x[:, :1], x0)


def test_float32_and_labels_pass_through() -> None:
    sde = VPSDE()
    got = {}

    def net(x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        got["dtype"], got["y"] = x.dtype, y
        return torch.zeros_like(x)

    y = torch.arange(8)
    loss = dsm_loss(sde, net, torch.randn(8, 1, 4, 4), y=y)
    assert got["dtype"] == torch.float32 and got["y"] is y
    assert loss.dtype == torch.float32
    # ε_θ = 0 gives E‖ε‖²/D = 1 per dimension.
    big = dsm_loss(sde, lambda x, t: torch.zeros_like(x), torch.randn(20_000, 2), generator=torch.Generator().manual_seed(0))
    assert float(big) == pytest.approx(1.0, abs=4 * math.sqrt(2 / 2 / 20_000))


# ---------------------------------------------------------------------------------- p2 and discrete weightings
def test_p2_weighting_is_sigma2_over_k_plus_snr_to_the_gamma() -> None:
    sde = VPSDE()
    x0 = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    t = torch.linspace(0.01, 0.99, 64)
    noise = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    net = lambda x, t: 0.3 * x  # noqa: E731
    base = dsm_terms(sde, net, x0, t=t, noise=noise)
    snr = (sde.mean_coeff(t) / sde.marginal_std(t)) ** 2
    for k, gamma in [(1.0, 1.0), (0.5, 0.5)]:
        p2 = dsm_terms(sde, net, x0, t=t, noise=noise, weighting="p2", p2_k=k, p2_gamma=gamma)
        torch.testing.assert_close(p2.loss, base.eps_mse / (k + snr) ** gamma)
    flat = dsm_terms(sde, net, x0, t=t, noise=noise, weighting="p2", p2_gamma=0.0)
    torch.testing.assert_close(flat.loss, base.loss)
    with pytest.raises(ValueError, match="k > 0"):
        dsm_terms(sde, net, x0, weighting="p2", p2_k=0.0)


def test_discrete_weightings_estimate_the_same_bound() -> None:
    """With ε̂ = 0 every term is w_i‖ε‖²: g2 (uniform i, weight (N/T)w_i) and importance (i ∝ w_i, weight Σw/T) have
    the same mean, (1/T)Σ_i w_i·E‖ε‖²/D = Σ_i β_i/(α_i(1 − ᾱ_i))/T; p2 is (k + ᾱ_i/(1 − ᾱ_i))^−γ per step."""
    from sde_diffusion.losses import ddpm_alpha_bars

    sde, N = VPSDE(), 100
    ab = ddpm_alpha_bars(sde, N)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    beta = 1 - ab / prev
    w = beta / ((1 - beta) * (1 - ab))
    target = float(w.sum()) / sde.T
    x0 = torch.zeros(20000, 2, dtype=torch.float64)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    means = {}
    for weighting in ("g2", "importance"):
        terms = dsm_terms(sde, zero, x0, discrete_steps=N, weighting=weighting, generator=torch.Generator().manual_seed(3))
        means[weighting] = (float(terms.loss.mean()), float(terms.loss.std()) / math.sqrt(x0.shape[0]))
    for mean, se in means.values():
        assert mean == pytest.approx(target, abs=4 * se)
    assert means["importance"][1] < 0.8 * means["g2"][1]  # the proposal removes the spread over steps
    p2 = dsm_terms(sde, zero, x0[:64], discrete_steps=N, weighting="p2", generator=torch.Generator().manual_seed(4))
    plain = dsm_terms(sde, zero, x0[:64], discrete_steps=N, generator=torch.Generator().manual_seed(4))
    i = torch.round(p2.t.double() * N).long()  # the draws are shared; the network time is t_i = i/N
    snr = ab[i - 1] / (1 - ab[i - 1])
    torch.testing.assert_close(p2.loss, plain.eps_mse / (1 + snr).to(p2.loss.dtype))


def test_discrete_loss_on_the_cosine_process_uses_its_exact_marginals() -> None:
    from sde_diffusion.losses import ddpm_alpha_bars
    from sde_diffusion.sdes import CosineVPSDE

    sde = CosineVPSDE()
    ab = ddpm_alpha_bars(sde, 50)
    t = torch.arange(1, 51, dtype=torch.float64) * sde.T / 50
    torch.testing.assert_close(ab, sde.mean_coeff(t) ** 2, rtol=1e-10, atol=1e-12)
