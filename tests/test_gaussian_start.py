"""The analytic first step of a Gaussian p_0 (samplers/gaussian_start.py) and the fits that begin with it."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sde_diffusion.samplers import build_sampler, sample
from sde_diffusion.samplers.fitted import START_NFE, FittedSchedule, fit_schedule
from sde_diffusion.samplers.gaussian_start import GaussianStart, start_factor, top_level
from sde_diffusion.sdes import VESDE, VPSDE, SubVPSDE
from sde_diffusion.testing import whitened_moment_kl
from sde_diffusion.toy import GaussianMixture

from custom_processes import ConstantBetaSDE

pytestmark = pytest.mark.numeric

SDES = [VPSDE(), SubVPSDE(), VESDE(), ConstantBetaSDE()]
IDS = ["vp", "subvp", "ve", "linear"]


def _gaussian(dim: int = 3):
    """A correlated Gaussian p_0: mean μ [D], covariance Σ [D, D] (stds 0.2–1.1)."""
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    lam = torch.linspace(0.04, 1.2, dim, dtype=torch.float64)
    return torch.tensor([0.5, -1.0, 0.25][:dim], dtype=torch.float64), (q * lam) @ q.T


def _exact_start(mu, cov, level: float) -> GaussianStart:
    lam, vec = torch.linalg.eigh(cov)
    return GaussianStart(level=level, mean=mu.tolist(), eigvals=lam.tolist(), eigvecs=vec.T.tolist(), residual=0.0,
                         shape=[mu.numel()])


def _gaussian_score(sde, mu, cov):
    def score(x, t):
        m = sde.mean_coeff(t).reshape(-1, 1, 1)
        s = sde.marginal_std(t).reshape(-1, 1, 1)
        prec = torch.linalg.inv(m**2 * cov + s**2 * torch.eye(mu.numel(), dtype=x.dtype))
        return -(prec @ (x - m.squeeze(-1) * mu).unsqueeze(-1)).squeeze(-1)

    return score


def _rk4_flow(sde, score, x, t0: float, t1: float, steps: int = 400):
    """The probability-flow ODE dx/dt = f x − ½ g² s(x, t) by classical RK4 in t (an independent integrator)."""

    def rhs(x, t):
        tt = torch.full((x.shape[0],), t, dtype=x.dtype)
        return sde.drift_coeff(tt)[:, None] * x - 0.5 * sde.diffusion(tt)[:, None] ** 2 * score(x, tt)

    h = (t1 - t0) / steps
    t = t0
    for _ in range(steps):
        k1 = rhs(x, t)
        k2 = rhs(x + 0.5 * h * k1, t + 0.5 * h)
        k3 = rhs(x + 0.5 * h * k2, t + 0.5 * h)
        k4 = rhs(x + h * k3, t + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        t += h
    return x


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_the_start_is_the_probability_flow_of_a_gaussian(sde) -> None:
    """From the same prior draws, the closed-form map agrees with RK4 on the ODE of the exact Gaussian score to 1e-6
    of the state, and carries the exact marginal at T to the exact marginal at the start level."""
    mu, cov = _gaussian()
    start = _exact_start(mu, cov, level=1.5)
    t_s = start.time(sde)
    ts = torch.tensor(t_s, dtype=torch.float64)
    assert float(sde.marginal_std(ts) / sde.mean_coeff(ts)) == pytest.approx(1.5, rel=1e-9)
    x_T = sde.prior_sample((64, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    closed = start.transport(sde, x_T)
    ode = _rk4_flow(sde, _gaussian_score(sde, mu, cov), x_T, float(sde.T), t_s)
    scale = float(ode.abs().max())
    assert float((closed - ode).abs().max()) < 1e-6 * scale
    # The map is affine, x_s = a + A x_T: A Cov_T Aᵀ must be the marginal covariance at t_s, and a + A m_T μ its mean.
    T = torch.tensor(sde.T, dtype=torch.float64)
    a = start.transport(sde, torch.zeros(1, 3, dtype=torch.float64))[0]
    A = (start.transport(sde, torch.eye(3, dtype=torch.float64)) - a).T
    m_T, s_T = float(sde.mean_coeff(T)), float(sde.marginal_std(T))
    m_s, s_s = float(sde.mean_coeff(ts)), float(sde.marginal_std(ts))
    cov_T = m_T**2 * cov + s_T**2 * torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(A @ cov_T @ A.T, m_s**2 * cov + s_s**2 * torch.eye(3, dtype=torch.float64),
                               rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a + A @ (m_T * mu), m_s * mu, rtol=1e-9, atol=1e-12)


def test_moments_from_samples_keep_the_leading_eigenpairs_and_average_the_rest() -> None:
    """Six coordinates with variances 4, 1, 0.25, 0.25, 0.09, 0.01 (rotated): rank 2 keeps 4 and 1 with their
    directions, and the other four share their mean variance 0.15; the level is factor × √λ_max = 2 × 2."""
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    var = torch.tensor([4.0, 1.0, 0.25, 0.25, 0.09, 0.01], dtype=torch.float64)
    n = 200_000
    x = torch.randn(n, 6, generator=g, dtype=torch.float64) * var.sqrt() @ q.T + torch.arange(6.0, dtype=torch.float64)
    start = GaussianStart.from_samples(x.reshape(n, 2, 3), factor=2.0, rank=2)
    assert start.shape == [2, 3] and start.samples == n
    torch.testing.assert_close(torch.tensor(start.mean, dtype=torch.float64), torch.arange(6.0, dtype=torch.float64), rtol=0, atol=0.02)
    assert start.eigvals == pytest.approx([4.0, 1.0], rel=0.02)
    V = torch.tensor(start.eigvecs, dtype=torch.float64)
    assert float((V @ q[:, :2]).diagonal().abs().min()) > 0.999
    assert start.residual == pytest.approx(float(var[2:].mean()), rel=0.02)
    assert start.level == pytest.approx(2 * math.sqrt(start.eigvals[0]))
    assert start.std_max == pytest.approx(2.0, rel=0.01)
    assert start_factor(5) == 2.0 and start_factor(10) == 4.0 and start_factor(30) is None


def test_bad_starts_are_refused(tmp_path: Path) -> None:
    sde = VPSDE()
    mu, cov = _gaussian()
    with pytest.raises(ValueError, match="positive noise level"):
        _exact_start(mu, cov, level=0.0)
    with pytest.raises(ValueError, match="mean of 3 numbers"):
        GaussianStart(level=1.0, mean=[0.0, 0.0], eigvals=[1.0], eigvecs=[[1.0, 0.0, 0.0]], residual=0.0, shape=[3])
    with pytest.raises(ValueError, match="negative variances"):
        GaussianStart(level=1.0, mean=[0.0], eigvals=[-1.0], eigvecs=[[1.0]], residual=0.0, shape=[1])
    with pytest.raises(ValueError, match="at least 2 samples"):
        GaussianStart.from_samples(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="non-finite"):
        GaussianStart.from_samples(torch.tensor([[0.0, 1.0], [math.nan, 0.0]]))
    with pytest.raises(ValueError, match="lacks eigvals"):
        GaussianStart.from_dict({"level": 1.0, "mean": [0.0], "eigvecs": [], "residual": 0.0, "shape": [1]})
    start = _exact_start(mu, cov, level=1.0)
    with pytest.raises(ValueError, match=r"shape \(3,\), these have shape \(4,\)"):
        start.transport(sde, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="not below the prior's"):
        _exact_start(mu, cov, level=2 * top_level(sde)).transport(sde, torch.zeros(2, 3))


def _mixture() -> GaussianMixture:
    """Five anisotropic modes in 3-D (not a problem of the benchmark families)."""
    g = torch.Generator().manual_seed(11)
    means = torch.randn(5, 3, generator=g) * 2.0
    covs = torch.stack([torch.diag(torch.tensor([0.3, 0.1, 0.05]) * (1 + k)) ** 2 for k in range(5)])
    return GaussianMixture(torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1]), means, covs)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(sigma_max=30.0)], ids=["vp", "ve"])
def test_a_fit_with_the_start_beats_one_from_t_at_few_steps(sde, tmp_path: Path) -> None:
    """The default sampler at 5 NFE on a 5-mode mixture with the exact score: the fit that begins with the Gaussian
    start has less than half the moment KL of the fit from T (VP: 0.29×, VE: 0.26× when this was written), and it
    stores, reloads and reproduces the same samples. Its cost: START_NFE more evaluations."""
    gm = _mixture()
    score = gm.score_fn(sde, compute_dtype=None)
    x_T = sde.prior_sample((4000, 3), generator=torch.Generator().manual_seed(2))
    results = {}
    for start in (False, True):
        smp = build_sampler("dpm_solver", order=2, corrector=True, grid="logsnr", end_sigma=0.03)
        x_fit = sde.prior_sample((64, 3), generator=torch.Generator().manual_seed(0))
        sched = fit_schedule(sde, score, smp, 5, x_fit, start=start)
        out = sample(sde, score, x_T.shape, sampler=smp, steps=5, x_T=x_T, schedule=sched,
                     generator=torch.Generator().manual_seed(3))
        assert out.nfe == 5
        results[start] = (sched, out.samples, whitened_moment_kl(gm, out.samples))
    (plain, _, kl_plain), (fitted, samples, kl_start) = results[False], results[True]
    assert fitted.start is not None and plain.start is None
    assert fitted.fit_nfe == plain.fit_nfe + START_NFE
    assert fitted.times[0] == pytest.approx(fitted.gaussian_start.time(sde))
    assert fitted.gaussian_start.level == pytest.approx(2 * fitted.gaussian_start.std_max)
    assert kl_start < 0.5 * kl_plain, (kl_start, kl_plain)
    path = fitted.save(tmp_path / "grid.json")
    back = FittedSchedule.load(path)
    assert back == fitted
    smp = build_sampler("dpm_solver", order=2, corrector=True, grid="logsnr", end_sigma=0.03)
    again = sample(sde, score, x_T.shape, sampler=smp, steps=5, x_T=x_T, schedule=str(path),
                   generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(again.samples, samples, rtol=0, atol=0)
    with pytest.raises(ValueError, match="Gaussian start"):
        sample(sde, score, x_T.shape, sampler=smp, steps=5, x_T=x_T, schedule=fitted.times)
    # A grid stored before the start existed (no 'start' key) still loads and starts at T.
    data = json.loads(Path(plain.save(tmp_path / "old.json")).read_text())
    data.pop("start")
    data["format"] = 1
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = FittedSchedule.load(tmp_path / "old.json")
    assert old.gaussian_start is None and old.times[0] == sde.T


def test_no_start_where_it_would_not_shorten_the_run() -> None:
    """On VE with σ_max = 3 and data of std 1.1 the level (2 × 1.1) is above half the prior's: the fit starts at T
    (and still spent the moments' evaluations)."""
    sde = VESDE(sigma_max=3.0)
    mu, cov = _gaussian()
    score = lambda x, t: _gaussian_score(sde, mu.float(), cov.float())(x, t)  # noqa: E731
    x_fit = sde.prior_sample((32, 3), generator=torch.Generator().manual_seed(0))
    with_start = fit_schedule(sde, score, build_sampler("ddim"), 5, x_fit, objective="curvature")
    without = fit_schedule(sde, score, build_sampler("ddim"), 5, x_fit, objective="curvature", start=False)
    assert with_start.start is None and with_start.times == without.times
    assert with_start.fit_nfe == without.fit_nfe + START_NFE


def test_no_start_and_no_cost_from_30_nfe() -> None:
    """From 30 NFE the start gained nothing on the tuning problems: the fit makes none and spends nothing on it."""
    sde = VPSDE()
    gm = _mixture()
    score = gm.score_fn(sde, compute_dtype=None)
    x_fit = sde.prior_sample((32, 3), generator=torch.Generator().manual_seed(0))
    smp = build_sampler("ddim")
    at30 = fit_schedule(sde, score, smp, 30, x_fit, objective="curvature")
    plain = fit_schedule(sde, score, smp, 30, x_fit, objective="curvature", start=False)
    assert at30.start is None and at30.times == plain.times and at30.fit_nfe == plain.fit_nfe
    at29 = fit_schedule(sde, score, smp, 29, x_fit, objective="curvature")
    assert at29.start is not None and at29.gaussian_start.level == pytest.approx(4 * at29.gaussian_start.std_max)


def test_a_model_whose_samples_diverge_is_fitted_from_t() -> None:
    """A score that sends samples to infinity gives no moments: the fit makes no start (and does not fail)."""
    sde = VPSDE()
    score = lambda x, t: torch.full_like(x, math.inf)  # noqa: E731
    x_fit = sde.prior_sample((16, 2), generator=torch.Generator().manual_seed(0))
    from sde_diffusion.samplers.fitted import fit_start

    start, nfe = fit_start(sde, score, build_sampler("ddim"), 5, x_fit)
    assert start is None and nfe == START_NFE


def test_a_start_keeps_the_shape_of_image_or_latent_samples() -> None:
    """Samples of shape [2, 4, 4] (a latent's, say): N(0.3, 0.2²) per coordinate, the exact score; the fit's start
    has that shape, and its level is 2√λ_max of the sample covariance of 256 draws: for white data the largest
    eigenvalue sits at the Marchenko–Pastur edge, 0.2² (1 + √(32/256))², so the level is 0.4 × 1.35 = 0.54 (a start
    a little higher than the data's own 2 × 0.2, which only costs a little of its gain). Sampling on the fitted
    grid returns that shape with the data's spread."""
    sde = VPSDE()

    def score(x, t):
        m = sde.mean_coeff(t).reshape(-1, 1, 1, 1)
        s = sde.marginal_std(t).reshape(-1, 1, 1, 1)
        return -(x - 0.3 * m) / (0.04 * m**2 + s**2)

    x_fit = sde.prior_sample((64, 2, 4, 4), generator=torch.Generator().manual_seed(0))
    sched = fit_schedule(sde, score, build_sampler("dpm_solver"), 5, x_fit, objective="curvature")
    start = sched.gaussian_start
    assert start.shape == [2, 4, 4] and start.level == pytest.approx(0.4 * (1 + math.sqrt(32 / 256)), rel=0.1)
    out = sample(sde, score, (2000, 2, 4, 4), sampler="dpm_solver", steps=5, schedule=sched,
                 generator=torch.Generator().manual_seed(1))
    assert out.samples.shape == (2000, 2, 4, 4)
    assert float(out.samples.mean()) == pytest.approx(0.3, abs=0.01)
    # 5 steps of DPM-Solver++(2M) from the start: 0.198 (from T on a fitted grid 0.177, on the rule's grid 0.146).
    assert float(out.samples.std()) == pytest.approx(0.2, rel=0.04)
