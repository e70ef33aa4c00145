"""Unit tests of the SDE-paper samplers against closed forms: predictors, correctors, PC, ODE, torchsde."""
from __future__ import annotations

import math

import pytest
import torch

from sde_diffusion import GaussianMixture
from sde_diffusion.samplers import CORRECTORS, PREDICTORS, SAMPLERS, build_sampler, sample
from sde_diffusion.samplers.sampler import SamplingContext
from sde_diffusion.samplers.coeffs import GridCoeffs
from sde_diffusion.samplers.grids import GRIDS
from sde_diffusion.samplers.ode_samplers import ODEDopri5, ODEHeun, ODERK4, ODEScipy
from sde_diffusion.sdes import SubVPSDE, VESDE, VPSDE

pytestmark = pytest.mark.numeric

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(single_thread: None) -> None:
    """Every test here runs with conftest's single intra-op thread."""


def gaussian_score(mu: float, s2: float, sde):
    """Exact score of p_t for data N(mu, s2 I): −(x − m mu)/(m² s2 + σ²)."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        m = sde.mean_coeff(t).to(x.dtype)[:, None]
        sig = sde.marginal_std(t).to(x.dtype)[:, None]
        return -(x - m * mu) / (m**2 * s2 + sig**2)

    return fn


def ctx_for(sde, score_fn, seed: int = 0) -> SamplingContext:
    return SamplingContext(sde, score_fn, torch.Generator().manual_seed(seed))


def one_step(sde, t_cur: torch.Tensor, t_next: torch.Tensor) -> GridCoeffs:
    """The coefficient table of a single step from t_cur to t_next (interval 0), as a step called
    outside a run takes it."""
    return GridCoeffs.build(sde, (t_cur, t_next))


# ---------------------------------------------------------------------------------- predictors
def test_registries_list_choices() -> None:
    assert PREDICTORS.names() == ["ancestral", "euler_maruyama", "none", "reverse_diffusion"]
    assert CORRECTORS.names() == ["annealed_langevin", "langevin", "none"]
    ours = ("euler_maruyama", "reverse_diffusion", "ancestral", "pc", "ode_heun", "ode_rk4", "ode_dopri5", "ode_scipy", "torchsde")
    for name in ours:
        assert name in SAMPLERS


def test_ancestral_is_ddpm_posterior_for_vp() -> None:
    """Mean and std equal DDPM's q(x_{i−1} | x_i, x̂_0) written with ᾱ (Ho et al. 2020, eq. 7)."""
    sde = VPSDE()
    t, s = torch.tensor(0.6, dtype=F64), torch.tensor(0.55, dtype=F64)
    score_fn = gaussian_score(0.7, 0.2, sde)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    ab_t, ab_s = torch.exp(sde.log_alpha_bar(t)), torch.exp(sde.log_alpha_bar(s))
    alpha = ab_t / ab_s
    beta = 1 - alpha
    x0 = (x + (1 - ab_t) * score_fn(x, t.expand(5))) / ab_t.sqrt()
    mean = ab_s.sqrt() * beta / (1 - ab_t) * x0 + alpha.sqrt() * (1 - ab_s) / (1 - ab_t) * x
    std = torch.sqrt((1 - ab_s) / (1 - ab_t) * beta)
    pred = PREDICTORS.get("ancestral")()
    got_mean = pred.predict(x, 0, one_step(sde, t, s), ctx_for(sde, score_fn), noise=False)
    torch.testing.assert_close(got_mean, mean, rtol=1e-10, atol=1e-12)
    got = pred.predict(x, 0, one_step(sde, t, s), ctx_for(sde, score_fn, seed=3), noise=True)
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    torch.testing.assert_close(got, mean + std * z, rtol=1e-10, atol=1e-12)


def test_ancestral_is_smld_step_for_ve() -> None:
    sde = VESDE(sigma_min=0.01, sigma_max=10.0)
    t, s = torch.tensor(0.5, dtype=F64), torch.tensor(0.4, dtype=F64)
    score_fn = gaussian_score(0.0, 1.0, sde)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    st2, ss2 = sde.marginal_std(t) ** 2, sde.marginal_std(s) ** 2
    mean = x + (st2 - ss2) * score_fn(x, t.expand(4))
    std = torch.sqrt(ss2 * (st2 - ss2) / st2)
    got = PREDICTORS.get("ancestral")().predict(x, 0, one_step(sde, t, s), ctx_for(sde, score_fn, seed=2))
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    torch.testing.assert_close(got, mean + std * z, rtol=1e-10, atol=1e-12)


def test_reverse_diffusion_is_ddpm_discretisation_for_vp() -> None:
    """x ← (2 − √(1−β))x + β s + √β z with 1 − β = ᾱ(t)/ᾱ(s) (Song et al. 2021, eq. 46)."""
    sde = VPSDE()
    t, s = torch.tensor(0.3, dtype=F64), torch.tensor(0.25, dtype=F64)
    score_fn = gaussian_score(-0.5, 0.3, sde)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    beta = 1 - torch.exp(sde.log_alpha_bar(t) - sde.log_alpha_bar(s))
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    expected = (2 - torch.sqrt(1 - beta)) * x + beta * score_fn(x, t.expand(6)) + beta.sqrt() * z
    got = PREDICTORS.get("reverse_diffusion")().predict(x, 0, one_step(sde, t, s), ctx_for(sde, score_fn, seed=5))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sde", [VPSDE(eps=1e-3), VESDE(sigma_max=5.0, eps=1e-3)], ids=["vp", "ve"])
@pytest.mark.parametrize(
    "name,opts",
    [
        ("euler_maruyama", {}), ("reverse_diffusion", {}), ("ancestral", {}),
        ("pc", {"corrector": "langevin"}), ("pc", {"predictor": "ancestral", "corrector": "annealed_langevin"}),
        ("torchsde", {"method": "euler"}), ("torchsde", {"method": "srk"}), ("torchsde", {"method": "reversible_heun"}),
    ],
)
def test_sde_samplers_gaussian_moments(sde, name: str, opts) -> None:
    """On Gaussian data N(mu, s2) the reverse SDE must return mean mu and variance s2 (float64, 1-D).

    Tolerance: 5 Monte-Carlo standard errors plus 0.01 for the O(1/N) discretisation bias.
    """
    mu, s2, n = 1.0, 0.2, 10000
    steps = 100 if opts.get("method") == "srk" else 200
    res = sample(sde, gaussian_score(mu, s2, sde), (n, 1), sampler=name, steps=steps,
                 generator=torch.Generator().manual_seed(0), dtype=F64, **opts)
    x = res.samples
    assert abs(float(x.mean()) - mu) < 5 * math.sqrt(s2 / n) + 0.01
    assert abs(float(x.var()) - s2) < 5 * s2 * math.sqrt(2 / n) + 0.01


def test_em_predictor_in_pc_equals_euler_maruyama() -> None:
    gm = GaussianMixture.ring()
    sde = VPSDE(eps=1e-3)
    kw = dict(steps=20)
    a = sample(sde, gm.score_fn(sde), (64, 2), sampler="euler_maruyama", generator=torch.Generator().manual_seed(9), **kw)
    b = sample(sde, gm.score_fn(sde), (64, 2), sampler="pc", predictor="euler_maruyama", corrector="none",
               generator=torch.Generator().manual_seed(9), **kw)
    assert torch.equal(a.samples, b.samples) and a.nfe == b.nfe == 20


@pytest.mark.parametrize("name", ["reverse_diffusion", "ancestral"])
def test_predictor_alone_equals_pc_without_corrector(name: str) -> None:
    gm = GaussianMixture.ring()
    sde = VESDE(sigma_max=12.0, eps=1e-3)
    a = sample(sde, gm.score_fn(sde), (64, 2), sampler=name, steps=15, generator=torch.Generator().manual_seed(2))
    b = sample(sde, gm.score_fn(sde), (64, 2), sampler="pc", predictor=name, corrector="none", steps=15,
               generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.samples, b.samples)


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE(sigma_max=12.0)], ids=["vp", "subvp", "ve"])
def test_variants_finite_for_few_steps(sde) -> None:
    """Every predictor × corrector pair and every torchsde method stays finite for 1–10 steps."""
    gm = GaussianMixture.ring()
    variants = [("pc", {"predictor": p, "corrector": c, "snr_norm": norm})
                for p in PREDICTORS.names() for c in CORRECTORS.names()
                for norm in (("batch", "sample") if c == "langevin" else ("batch",))
                if not (p == "none" and c == "none")]
    variants += [("torchsde", {"method": m}) for m in ("euler", "milstein", "srk", "reversible_heun")]
    for name, opts in variants:
        for steps in (1, 2, 5, 10):
            x = sample(sde, gm.score_fn(sde), (32, 2), sampler=name, steps=steps,
                       generator=torch.Generator().manual_seed(0), **opts).samples
            assert torch.isfinite(x).all(), (name, opts, steps)


# ---------------------------------------------------------------------------------- correctors
def test_langevin_step_size_matches_snr_rule() -> None:
    """δ = 2α(r‖z‖/‖s‖)² with batch-mean or per-sample norms; α = ᾱ(t)/ᾱ(t') on VP, 1 on VE."""
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    t, t_next = torch.tensor(0.5, dtype=F64), torch.tensor(0.45, dtype=F64)
    for sde in (VPSDE(), VESDE()):
        score_fn = gaussian_score(0.3, 0.5, sde)
        s = score_fn(x, t.expand(8))
        z = torch.randn(8, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
        alpha = float(torch.exp(sde.log_alpha_bar(t) - sde.log_alpha_bar(t_next))) if isinstance(sde, VPSDE) else 1.0
        for norm in ("batch", "sample"):
            sn, zn = s.norm(dim=1), z.norm(dim=1)
            if norm == "batch":
                sn, zn = sn.mean(), zn.mean()
            delta = (2 * alpha * (0.2 * zn / sn) ** 2) * torch.ones(8, dtype=F64)
            expected_mean = x + delta[:, None] * s
            expected = expected_mean + torch.sqrt(2 * delta)[:, None] * z
            corr = CORRECTORS.get("langevin")(snr=0.2, n_steps=1, snr_norm=norm)
            got, got_mean = corr.correct(x, 0, one_step(sde, t, t_next), ctx_for(sde, score_fn, seed=1))
            torch.testing.assert_close(got_mean, expected_mean, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_annealed_langevin_stationary_variance() -> None:
    """Unadjusted Langevin on N(0, v) with step δ is stationary at v/(1 − δ/(2v)) (exact for a Gaussian)."""
    sde = VESDE(sigma_min=0.01, sigma_max=5.0)
    t = torch.tensor(0.8, dtype=F64)
    score_fn = gaussian_score(0.0, 1.0, sde)  # p_t = N(0, 1 + σ(t)²)
    v = 1 + float(sde.marginal_std(t)) ** 2
    r = 0.5
    delta = 2 * (r * float(sde.marginal_std(t))) ** 2  # α = 1 on VE
    corr = CORRECTORS.get("annealed_langevin")(snr=r, n_steps=60)
    x0 = math.sqrt(v) * torch.randn(20000, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    x, _ = corr.correct(x0, 0, one_step(sde, t, t - 0.01), ctx_for(sde, score_fn, seed=1))
    target = v / (1 - delta / (2 * v))
    assert abs(float(x.var()) - target) < 5 * target * math.sqrt(2 / 20000)
    assert abs(target - v) > 10 * target * math.sqrt(2 / 20000)  # the test can see the ULA bias


def test_bad_pc_options() -> None:
    sde = VPSDE()
    fn = gaussian_score(0.0, 1.0, sde)
    for snr in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="snr"):
            sample(sde, fn, (4, 2), sampler="pc", steps=2, snr=snr)
    with pytest.raises(ValueError, match="n_corrector_steps"):
        sample(sde, fn, (4, 2), sampler="pc", steps=2, n_corrector_steps=-1)
    with pytest.raises(ValueError, match="ancestral.*euler_maruyama.*none.*reverse_diffusion"):
        build_sampler("pc", predictor="heun")
    with pytest.raises(ValueError, match="annealed_langevin.*langevin.*none"):
        build_sampler("pc", corrector="hmc")
    with pytest.raises(ValueError, match="snr_norm"):
        build_sampler("pc", snr_norm="median")
    with pytest.raises(ValueError, match="never evaluates"):
        build_sampler("pc", predictor="none", corrector="none")
    with pytest.raises(ValueError, match="grid"):
        sample(sde, fn, (4, 2), sampler="pc", steps=2, grid="cubic")


@pytest.mark.parametrize("predictor", ["euler_maruyama", "reverse_diffusion", "ancestral", "none"])
@pytest.mark.parametrize("corrector", ["langevin", "annealed_langevin", "none"])
def test_pc_nfe_formula(predictor: str, corrector: str) -> None:
    sde = SubVPSDE()
    for n_corr in (0, 1, 2):
        p = 0 if predictor == "none" else 1
        c = 0 if corrector == "none" else n_corr
        if p + c == 0:
            continue
        calls = [0]

        def fn(x, t):
            calls[0] += 1
            return -x

        res = sample(sde, fn, (3, 2), sampler="pc", steps=4, predictor=predictor, corrector=corrector,
                     n_corrector_steps=n_corr, denoise=True)
        assert res.nfe == calls[0] == 4 * (p + c) + 1


def test_noise_free_final() -> None:
    """With noise_free_final the last step adds no noise: the 1-step output is a function of x_T."""
    sde = VPSDE()
    fn = gaussian_score(0.0, 1.0, sde)
    x_T = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    for name, extra in [("pc", {"corrector": "none"}), ("ancestral", {}), ("reverse_diffusion", {})]:
        out = [sample(sde, fn, (6, 2), sampler=name, steps=1, x_T=x_T,
                      generator=torch.Generator().manual_seed(s), **extra).samples for s in (1, 2)]
        assert torch.equal(out[0], out[1])
        out = [sample(sde, fn, (6, 2), sampler=name, steps=1, x_T=x_T, noise_free_final=False,
                      generator=torch.Generator().manual_seed(s), **extra).samples for s in (1, 2)]
        assert not torch.allclose(out[0], out[1])


# ---------------------------------------------------------------------------------- ODE samplers
def gaussian_flow(x0: torch.Tensor, mu: float, s2: float, sde, t: float) -> torch.Tensor:
    """Probability-flow map of N(mu, s2 I) data from 0 to t: m mu + √((m² s2 + σ²)/s2)(x0 − mu)."""
    tt = torch.tensor(t, dtype=F64)
    m, sig = sde.mean_coeff(tt), sde.marginal_std(tt)
    return m * mu + torch.sqrt((m**2 * s2 + sig**2) / s2) * (x0 - mu)


@pytest.mark.parametrize(
    "sde", [VPSDE(eps=1e-3), SubVPSDE(eps=1e-3), VESDE(sigma_max=20.0, eps=1e-3)], ids=["vp", "subvp", "ve"]
)
def test_ode_samplers_follow_analytic_gaussian_flow(sde) -> None:
    mu, s2 = 0.8, 0.3
    score_fn = gaussian_score(mu, s2, sde)
    x_T = sde.prior_std * torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    # Invert the analytic map at T to get the exact decoded value at eps.
    tT = torch.tensor(sde.T, dtype=F64)
    m_T, s_T = sde.mean_coeff(tT), sde.marginal_std(tT)
    x0 = mu + (x_T - m_T * mu) * math.sqrt(s2) / torch.sqrt(m_T**2 * s2 + s_T**2)
    exact = gaussian_flow(x0, mu, s2, sde, sde.eps)
    for name, steps, opts, tol in [
        ("ode_heun", 200, {}, 1e-3), ("ode_rk4", 50, {}, 1e-4),
        ("ode_dopri5", 1, {"rtol": 1e-8, "atol": 1e-8}, 1e-5), ("ode_scipy", 1, {"rtol": 1e-8, "atol": 1e-8}, 1e-5),
    ]:
        got = sample(sde, score_fn, x_T.shape, sampler=name, steps=steps, x_T=x_T, **opts).samples
        err = float((got - exact).abs().max())
        assert err < tol, f"{name}: max error {err:.2e}"


@pytest.mark.parametrize("grid", GRIDS)
def test_ode_rk4_any_grid(grid: str) -> None:
    sde = VPSDE(eps=1e-3)
    mu, s2 = -0.4, 0.5
    x_T = torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    tT = torch.tensor(sde.T, dtype=F64)
    m_T, s_T = sde.mean_coeff(tT), sde.marginal_std(tT)
    x0 = mu + (x_T - m_T * mu) * math.sqrt(s2) / torch.sqrt(m_T**2 * s2 + s_T**2)
    got = sample(sde, gaussian_score(mu, s2, sde), x_T.shape, sampler="ode_rk4", steps=40, grid=grid, x_T=x_T)
    assert float((got.samples - gaussian_flow(x0, mu, s2, sde, sde.eps)).abs().max()) < 1e-3
    assert got.nfe == 160


def test_ode_round_trip() -> None:
    """Encode mixture data to the prior (eps → T) and decode with ode_dopri5 and ode_scipy."""
    gm = GaussianMixture.ring()
    sde = VPSDE(eps=1e-3)
    fn = gm.score_fn(sde)
    x = gm.sample(64, generator=torch.Generator().manual_seed(0))  # float64
    enc = ODEDopri5(rtol=1e-7, atol=1e-7).encode(sde, fn, x)
    z = enc.y
    assert enc.nfe > 0
    assert abs(float(z.std()) - 1.0) < 0.25  # the code looks like the N(0, I) prior, not like data
    for dec in (ODEDopri5(rtol=1e-7, atol=1e-7), ODEScipy(rtol=1e-7, atol=1e-7)):
        back = sample(sde, fn, x.shape, sampler=dec, steps=1, x_T=z).samples
        assert float((back - x).abs().max()) < 1e-4, type(dec).__name__
    for enc_fixed, steps in ((ODEHeun(), 400), (ODERK4(), 100)):
        z2 = enc_fixed.encode(sde, fn, x, steps).y
        assert float((z2 - z).abs().max()) < 1e-3


def test_adaptive_samplers_ignore_steps_and_reject_hooks() -> None:
    sde = VPSDE(eps=1e-3)
    fn = gaussian_score(0.0, 1.0, sde)
    x_T = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    for name in ("ode_dopri5", "ode_scipy"):
        a = sample(sde, fn, x_T.shape, sampler=name, steps=1, x_T=x_T)
        b = sample(sde, fn, x_T.shape, sampler=name, steps=50, x_T=x_T)
        assert torch.equal(a.samples, b.samples) and a.nfe == b.nfe
        assert SAMPLERS.get(name).nfe_per_step == 0 and build_sampler(name).expected_nfe(10) is None
    for name in ("ode_dopri5", "ode_scipy", "torchsde"):
        with pytest.raises(ValueError, match="hook"):
            sample(sde, fn, x_T.shape, sampler=name, steps=3, x_T=x_T, hook=lambda x, t: x)
    for bad in ({"rtol": 0.0}, {"atol": -1.0}):
        with pytest.raises(ValueError, match="rtol and atol"):
            build_sampler("ode_dopri5", **bad)
    with pytest.raises(ValueError, match="RK45"):
        build_sampler("ode_scipy", method="Euler")


@pytest.mark.parametrize("name", [n for n in SAMPLERS.names() if SAMPLERS.get(n).nfe_per_step])
def test_evaluations_per_step_match_a_counted_run(name: str) -> None:
    # ``nfe_per_step`` turns steps into the NFE that the named samplers' tables are keyed by, and sizes what a run
    # keeps for the final step: it must be what a run really spends per step (the last step may save one).
    sde = VPSDE()
    fn = gaussian_score(0.0, 0.5, sde)
    per_step = build_sampler(name).nfe_per_step
    for steps in (3, 6):
        nfe = sample(sde, fn, (4, 2), sampler=name, steps=steps, generator=torch.Generator().manual_seed(0)).nfe
        assert steps * per_step - 1 <= nfe <= steps * per_step, (name, steps, nfe)


def test_trajectories() -> None:
    sde = VPSDE(eps=1e-3)
    fn = gaussian_score(0.0, 1.0, sde)
    for name, opts in [("pc", {}), ("ode_rk4", {}), ("torchsde", {"method": "srk"}), ("ancestral", {})]:
        res = sample(sde, fn, (4, 2), sampler=name, steps=5, return_trajectory=True,
                     generator=torch.Generator().manual_seed(0), **opts)
        assert len(res.trajectory) == 6 and res.times.shape == (6,)
        assert torch.equal(res.trajectory[-1], res.samples)
        assert float(res.times[0]) == sde.T and abs(float(res.times[-1]) - 1e-3) < 1e-7


# ---------------------------------------------------------------------------------- torchsde
@pytest.mark.parametrize(
    "method,per_step,init", [("euler", 1, 0), ("milstein", 1, 0), ("srk", 3, 0), ("reversible_heun", 1, 1)]
)
def test_torchsde_nfe_and_seed(method: str, per_step: int, init: int) -> None:
    sde = VESDE(sigma_max=5.0, eps=1e-3)
    calls = [0]
    base = gaussian_score(0.0, 1.0, sde)

    def fn(x, t):
        calls[0] += 1
        return base(x, t)

    x = [sample(sde, fn, (7, 3), sampler="torchsde", method=method, steps=9, generator=torch.Generator().manual_seed(s))
         for s in (0, 0, 1)]
    assert x[0].nfe == x[1].nfe == 9 * per_step + init and calls[0] == 3 * x[0].nfe
    assert torch.equal(x[0].samples, x[1].samples) and not torch.allclose(x[0].samples, x[2].samples)


def test_torchsde_milstein_equals_euler() -> None:
    """g depends on t only, so Milstein's correction is zero: same Brownian path, same samples."""
    sde = VPSDE(eps=1e-3)
    fn = gaussian_score(0.5, 0.1, sde)
    a, b = (sample(sde, fn, (10, 2), sampler="torchsde", method=m, steps=12, generator=torch.Generator().manual_seed(3),
                   dtype=F64).samples for m in ("euler", "milstein"))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def test_torchsde_bad_method() -> None:
    with pytest.raises(ValueError, match="euler, milstein, srk, reversible_heun"):
        build_sampler("torchsde", method="heun")


# ---------------------------------------------------------------------------------- coefficient table
@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE(sigma_min=0.01, sigma_max=20.0)], ids=["vp", "subvp", "ve"])
def test_grid_coeffs_match_the_sde(sde) -> None:
    from sde_diffusion.samplers.coeffs import GridCoeffs

    ts = torch.tensor([1.0, 0.6, 0.25, 1e-3], dtype=torch.float32)
    grid = GridCoeffs.build(sde, ts)
    t64 = ts.to(F64)  # the coefficients are those of the float32-rounded times
    m, s = sde.mean_coeff(t64), sde.marginal_std(t64)
    assert torch.allclose(torch.tensor(grid.m, dtype=F64), m, rtol=1e-14, atol=0)
    assert torch.allclose(torch.tensor(grid.sigma, dtype=F64), s, rtol=1e-14, atol=0)
    assert torch.allclose(torch.tensor(grid.lam, dtype=F64), torch.log(m / s), rtol=1e-12, atol=1e-14)
    assert torch.allclose(torch.tensor(grid.f, dtype=F64), sde.drift_coeff(t64), rtol=1e-14, atol=0)
    assert torch.allclose(torch.tensor(grid.g2, dtype=F64), sde.diffusion(t64) ** 2, rtol=1e-14, atol=0)
    # a_i = m(t_i)/m(t_{i+1}), b_i² = σ_i² − a_i² σ_{i+1}² (forward transition t_{i+1} → t_i)
    a = m[:-1] / m[1:]
    b2 = s[:-1] ** 2 - a**2 * s[1:] ** 2
    assert torch.allclose(torch.tensor(grid.a, dtype=F64), a, rtol=1e-13, atol=0)
    assert torch.allclose(torch.tensor(grid.b, dtype=F64) ** 2, b2, rtol=1e-9, atol=0)
    assert all(t is u for t, u in zip(grid.times, grid.times))
    assert [float(t) for t in grid.times] == ts.tolist()


@pytest.mark.parametrize("name", ["euler_maruyama", "ancestral", "ddim", "dpm_solver", "edm_heun", "ode_rk4", "dpm_solver_2s"])
def test_a_step_outside_the_loop_takes_its_own_two_point_table(name: str) -> None:
    """Interval i of a run's table and the two-point table of the same two times hold the same
    numbers, and the last step (after begin) on either gives the same state (for dpm_solver: at
    order 1 on both, below 15 steps)."""
    sde = VPSDE()
    ts = torch.tensor([1.0, 0.5, 0.1], dtype=F64)
    grid = GridCoeffs.build(sde, ts)
    two = one_step(sde, grid.times[1], grid.times[2])
    assert two.steps == 1 and grid.steps == 2
    assert two.m == grid.m[1:] and two.sigma == grid.sigma[1:] and two.lam == grid.lam[1:]
    assert two.f == grid.f[1:] and two.g2 == grid.g2[1:] and two.a == grid.a[1:] and two.b == grid.b[1:]
    sampler = build_sampler(name)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    out = []
    for table, i in ((grid, 1), (two, 0)):  # the last step of each table
        ctx = ctx_for(sde, gaussian_score(0.3, 0.5, sde), seed=4)
        sampler.begin(x, table, ctx)
        out.append(sampler.step(x, i, table, ctx))
    torch.testing.assert_close(out[0], out[1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["ancestral", "euler_maruyama", "reverse_diffusion", "pc", "ddim", "dpm_solver",
                                  "dpm_solver_2s", "edm_heun", "ode_heun", "ode_rk4"])
def test_no_per_step_validation(name: str, monkeypatch) -> None:
    """The SDE's validating methods are called a fixed number of times per run, not per step."""
    sde = VPSDE()
    calls = [0]
    orig = sde._check_t

    def counting(t, like=None):
        calls[0] += 1
        return orig(t, like)

    monkeypatch.setattr(sde, "_check_t", counting)
    counts = []
    for steps in (4, 40):
        calls[0] = 0
        out = sample(sde, lambda x, t: -x, (8, 2), sampler=name, steps=steps, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(out.samples).all()
        counts.append(calls[0])
    assert counts[0] == counts[1], f"{name}: {counts[0]} checks at 4 steps, {counts[1]} at 40"


def test_auto_grid_is_karras_for_ve_and_logsnr_for_vp_types() -> None:
    from sde_diffusion.samplers.grids import time_grid

    ve, vp, subvp = VESDE(sigma_min=0.01, sigma_max=20.0), VPSDE(), SubVPSDE()
    for sde, kind in ((ve, "karras"), (vp, "logsnr"), (subvp, "logsnr")):
        auto = time_grid(sde, 10, "auto", dtype=F64)
        assert torch.equal(auto, time_grid(sde, 10, kind, dtype=F64))
    # On VE the karras grid is ρ-spaced in σ: σ_i^{1/7} is linear in i.
    ts = time_grid(ve, 10, "auto", dtype=F64)
    root = ve.marginal_std(ts) ** (1 / 7)
    assert torch.allclose(root[1:] - root[:-1], (root[-1] - root[0]) / 10 * torch.ones(10, dtype=F64), rtol=1e-8, atol=0)
    assert build_sampler("dpm_solver").end.grid == "auto" and build_sampler("dpm_solver_2s").end.grid == "auto"


# ---------------------------------------------------------------------------------- the end point
def test_end_point_flat_keys_and_object_build_the_same_sampler() -> None:
    from sde_diffusion.samplers import EndPoint

    sde = VPSDE()
    fn = gaussian_score(0.2, 0.4, sde)
    end = EndPoint(grid="logsnr", end_sigma=0.02, denoise=True)
    flat = build_sampler("dpm_solver", order=3, grid="logsnr", end_sigma=0.02, denoise=True)
    whole = build_sampler("dpm_solver", order=3, end=end)
    assert flat.end == whole.end == end and repr(flat) == repr(whole)
    runs = [sample(sde, fn, (8, 2), sampler=s, steps=6, generator=torch.Generator().manual_seed(0)) for s in (flat, whole)]
    assert torch.equal(runs[0].samples, runs[1].samples) and runs[0].nfe == runs[1].nfe == 7
    # sample(..., eps=...) and sample(..., end=EndPoint(...)) are the same run too.
    a = sample(sde, fn, (8, 2), sampler="pc", steps=4, eps=1e-2, generator=torch.Generator().manual_seed(1))
    b = sample(sde, fn, (8, 2), sampler="pc", steps=4, end=EndPoint(eps=1e-2), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.samples, b.samples) and float(a.times[-1]) == pytest.approx(1e-2)


def test_each_sampler_keeps_its_default_grid() -> None:
    from sde_diffusion.samplers import EndPoint

    expected = {"ddim": "uniform", "pc": "uniform", "edm_heun": "karras", "dpm_solver": "auto", "dpm_solver_2s": "auto"}
    for name, kind in expected.items():
        assert build_sampler(name).end.grid == kind
        assert build_sampler(name, end=EndPoint(eps=1e-2)).end.grid == kind  # None in the object: the default
        assert build_sampler(name, grid="quadratic").end.grid == "quadratic"
    for name in ("ode_dopri5", "ode_scipy", "torchsde", "dpm_solver_adaptive"):
        assert build_sampler(name).end.grid is None
        assert "grid" not in SAMPLERS.get(name).option_defaults()
        with pytest.raises(ValueError, match="chooses its own times"):
            build_sampler(name, grid="karras")


def test_end_point_validates_when_built() -> None:
    from sde_diffusion.samplers import EndPoint

    for bad, match in [({"eps": 1e-3, "end_sigma": 0.1}, "not both"), ({"end_sigma": 0.0}, "end_sigma"),
                       ({"end_sigma": float("nan")}, "end_sigma"), ({"eps": -1.0}, "eps"), ({"rho": 0.0}, "rho"),
                       ({"grid": "cubic"}, "cubic.*karras.*auto")]:
        with pytest.raises(ValueError, match=match):
            EndPoint(**bad)
        with pytest.raises(ValueError, match=match):
            build_sampler("ddim", **bad)
    with pytest.raises(ValueError, match="not both"):
        build_sampler("ddim", end=EndPoint(), eps=1e-3)
    # The final time depends on the SDE: checked against it.
    with pytest.raises(ValueError, match="eps must lie in"):
        EndPoint(eps=2.0).end_time(VPSDE())
    end = EndPoint(eps=1e-2, rho=3)
    assert end.rho == 3.0 and isinstance(end.rho, float) and end.end_time(VPSDE()) == 1e-2
    torch.testing.assert_close(end.times(VPSDE(), 4, dtype=F64),
                               torch.tensor([1.0, 0.7525, 0.505, 0.2575, 0.01], dtype=F64), rtol=0, atol=1e-15)


def test_option_defaults_list_own_and_end_point_options() -> None:
    assert list(SAMPLERS.get("ddim").option_defaults()) == ["eta", "grid", "rho", "eps", "end_sigma", "denoise", "denoise_order"]
    assert SAMPLERS.get("dpm_solver").option_defaults()["grid"] == "auto"
    assert list(SAMPLERS.get("torchsde").option_defaults()) == ["method", "eps", "end_sigma", "denoise", "denoise_order"]
    with pytest.raises(ValueError, match="accepted options: eta, grid, rho, eps, end_sigma, denoise, denoise_order"):
        build_sampler("ddim", not_an_option=1)


# ---------------------------------------------------------------------------------- time-grid registry
def test_a_registered_grid_kind_works_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    from sde_diffusion.samplers.grids import time_grid

    monkeypatch.setattr(GRIDS, "_entries", dict(GRIDS._entries))  # the registration ends with this test
    assert list(GRIDS) == ["karras", "logsnr", "quadratic", "uniform"] and "auto" not in GRIDS

    @GRIDS.register("cosine")
    def cosine(sde, u: torch.Tensor, eps: float, rho: float) -> torch.Tensor:
        return eps + (sde.T - eps) * 0.5 * (1 + torch.cos(math.pi * u))

    sde = VPSDE()
    ts = time_grid(sde, 8, "cosine", dtype=F64)
    assert ts[0] == sde.T and float(ts[-1]) == pytest.approx(sde.sampling_eps) and bool((ts[1:] < ts[:-1]).all())
    res = sample(sde, gaussian_score(0.0, 1.0, sde), (4, 2), sampler="ddim", steps=8, grid="cosine", dtype=F64,
                 return_trajectory=True)
    assert torch.equal(res.times, ts) and res.nfe == 8
    with pytest.raises(ValueError, match="unknown time grid 'cubic'; choose one of: cosine, karras.*auto"):
        time_grid(sde, 8, "cubic")


# ---------------------------------------------------------------------------------- make_sampler
def test_make_sampler_resolves_names_and_the_default_in_one_place() -> None:
    from sde_diffusion.samplers import make_sampler
    from sde_diffusion.samplers.defaults import default_sampler

    sde = VPSDE()
    sampler, steps, choice = make_sampler(sde, "pc", 7, {"snr": 0.2, "eps": 1e-2})
    assert isinstance(sampler, SAMPLERS.get("pc")) and steps == 7 and choice is None
    assert sampler.corrector.snr == 0.2 and sampler.end.eps == 1e-2
    for name in (None, "auto"):
        sampler, steps, choice = make_sampler(sde, name, 10, {}, "exact")
        assert choice == default_sampler(sde, 10) and steps == choice.steps
        assert repr(sampler) == repr(build_sampler(choice.name, **choice.options))
    # Options override the rule's; a denoising step keeps the NFE budget.
    sampler, steps, choice = make_sampler(sde, None, 10, {"end_sigma": None, "eps": 1e-3, "denoise": True})
    assert sampler.end.eps == 1e-3 and sampler.end.end_sigma is None and steps == 9
    assert sampler.expected_nfe(steps) == 10
    learned = make_sampler(sde, None, 10, {}, "learned")[2]
    assert learned.score == "learned"
    with pytest.raises(ValueError, match="unknown sampler 'nope'; choose one of: ancestral"):
        make_sampler(sde, "nope", 5, {})
    with pytest.raises(ValueError, match="accepted options: predictor, corrector"):
        make_sampler(sde, "pc", 5, {"order": 2})
    with pytest.raises(ValueError, match="eps must lie in"):
        make_sampler(sde, "ddim", 5, {"eps": 2.0})  # checked against the SDE
    with pytest.raises(ValueError, match="steps"):
        make_sampler(sde, "ddim", 0, {})


def test_sample_uses_make_sampler() -> None:
    from sde_diffusion.samplers import make_sampler

    sde = VESDE(sigma_max=5.0)
    fn = gaussian_score(0.0, 1.0, sde)
    for name, opts in ((None, {}), ("dpm_solver", {"grid": "logsnr", "end_sigma": 0.01})):
        sampler, steps, choice = make_sampler(sde, name, 12, opts)
        a = sample(sde, fn, (8, 2), sampler=name, steps=12, generator=torch.Generator().manual_seed(0), **opts)
        b = sample(sde, fn, (8, 2), sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0))
        assert torch.equal(a.samples, b.samples) and a.nfe == b.nfe and a.choice == choice


# ---------------------------------------------------------------------------------- a user's sampler
def test_a_user_step_sampler_runs_through_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """A StepSampler written outside the package, registered by decorator, is a full sampler: options
    of its own beside the end-point keys, sample() by name, NFE, denoising, trajectories, hooks."""
    from sde_diffusion.samplers import StepSampler

    monkeypatch.setattr(SAMPLERS, "_entries", dict(SAMPLERS._entries))  # the registration ends with this test

    @SAMPLERS.register("pf_euler")
    class PFEuler(StepSampler):
        """Euler's method on the probability-flow ODE, the score scaled by ``scale``."""

        def __init__(self, scale: float = 1.0, **end):
            super().__init__(**end)
            self.scale = scale

        def step(self, x, i, grid, ctx):
            dt = grid.t[i + 1] - grid.t[i]
            s = ctx.score(x, grid.times[i])
            return x + (grid.f[i] * x - 0.5 * self.scale * grid.g2[i] * s) * dt

    assert "pf_euler" in SAMPLERS
    assert list(PFEuler.option_defaults()) == ["scale", "grid", "rho", "eps", "end_sigma", "denoise", "denoise_order"]
    sde = VPSDE()
    mu, s2 = 0.8, 0.3
    fn = gaussian_score(mu, s2, sde)
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    res = sample(sde, fn, x_T.shape, sampler="pf_euler", steps=400, x_T=x_T, dtype=F64, return_trajectory=True)
    assert res.nfe == 400 and len(res.trajectory) == 401 and res.times.shape == (401,)
    # 1st order: within ~1/N of the exact flow (gaussian_flow from the exact x0 of x_T).
    tT = torch.tensor(sde.T, dtype=F64)
    m_T, s_T = sde.mean_coeff(tT), sde.marginal_std(tT)
    x0 = mu + (x_T - m_T * mu) * math.sqrt(s2) / torch.sqrt(m_T**2 * s2 + s_T**2)
    assert float((res.samples - gaussian_flow(x0, mu, s2, sde, sde.sampling_eps)).abs().max()) < 1e-2
    # End-point keys and own options pass through sample(); denoising and hooks come from the base.
    res = sample(sde, fn, (4, 2), sampler="pf_euler", steps=5, scale=0.5, grid="logsnr", end_sigma=0.05,
                 denoise=True, hook=lambda x, t: x.clamp(-3, 3), return_trajectory=True, dtype=F64)
    assert res.nfe == 6 and len(res.trajectory) == 7
    assert float(res.times[-1]) == pytest.approx(build_sampler("pf_euler", end_sigma=0.05).end.end_time(sde))
    with pytest.raises(ValueError, match="accepted options: scale, grid"):
        build_sampler("pf_euler", order=2)
