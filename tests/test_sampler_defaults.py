"""The default sampler (samplers/defaults.py): the rule maps every SDE family and budget to a
registered configuration that spends exactly the budget, is near the best listed configuration on
a fixed problem, and is what ``sample()`` and ``sample.py`` use when no sampler is named."""
from __future__ import annotations

import math

import pytest
import torch

from sde_diffusion import CosineVPSDE, GaussianMixture, SubVPSDE, VESDE, VPSDE, sample
from sde_diffusion.samplers import SAMPLERS, build_sampler
from sde_diffusion.samplers.defaults import RULES, default_sampler, resolve_sampler, rules_table, sde_family
from sde_diffusion.sdes import LinearSDE
from sde_diffusion.testing import random_family, whitened_moment_kl

pytestmark = [pytest.mark.numeric, pytest.mark.usefixtures("single_thread")]

SDES = {
    "vp": VPSDE(),
    "subvp": SubVPSDE(),
    "ve": VESDE(sigma_min=0.01, sigma_max=20.0),
    "cosine_vp": CosineVPSDE(),
}


def test_families() -> None:
    assert [sde_family(SDES[k]) for k in ("vp", "subvp", "ve", "cosine_vp")] == ["vp", "subvp", "ve", "vp"]

    class ConstantBeta(LinearSDE):
        def f(self, t):
            return -torch.ones_like(t)

        def g(self, t):
            return math.sqrt(2.0) * torch.ones_like(t)

    assert sde_family(ConstantBeta()) == "vp"


@pytest.mark.parametrize("sde_name", sorted(SDES))
@pytest.mark.parametrize("nfe", [1, 2, 3, 5, 10, 15, 20, 30, 50, 100])
def test_default_spends_exactly_the_budget(sde_name: str, nfe: int) -> None:
    sde = SDES[sde_name]
    gm = random_family(3)  # 2-D, 9 modes
    out = sample(sde, gm.score_fn(sde), (8, gm.dim), steps=nfe, generator=torch.Generator().manual_seed(nfe))
    assert out.nfe == nfe
    assert torch.isfinite(out.samples).all()
    choice = out.choice
    assert choice is not None and choice.nfe == nfe and choice.family == sde_family(sde)
    assert choice.name in SAMPLERS.names()
    assert build_sampler(choice.name, **choice.options).expected_nfe(choice.steps) == nfe


def test_every_rule_builds_and_the_table_is_ordered() -> None:
    for fam, rules in RULES.items():
        assert rules[0].min_nfe == 1, fam  # every budget is covered
        assert [r.min_nfe for r in rules] == sorted({r.min_nfe for r in rules})
        for r in rules:
            build_sampler(r.sampler, **r.options)  # a bad option would raise here
    assert {row[0] for row in rules_table()} == set(RULES)


def test_a_named_sampler_is_untouched_and_options_override_the_choice() -> None:
    sde = VPSDE()
    assert resolve_sampler(sde, "pc", 1000, {"snr": 0.16}) == ("pc", 1000, {"snr": 0.16}, None)
    name, steps, opts, choice = resolve_sampler(sde, None, 10, {"eps": 1e-3})
    assert opts["eps"] == 1e-3 and choice.name == name
    # Switching the denoising step on or off keeps the budget.
    _, steps_d, opts_d, _ = resolve_sampler(sde, "auto", 10, {"denoise": True})
    _, steps_n, opts_n, _ = resolve_sampler(sde, "auto", 10, {"denoise": False})
    assert (steps_d, steps_n) == (9, 10)
    with pytest.raises(ValueError, match="integer ≥ 1"):
        default_sampler(sde, 0)
    # sample(sampler=...) with a name still means that sampler, bit for bit.
    gm = random_family(3)
    a = sample(sde, gm.score_fn(sde), (8, 2), sampler="pc", steps=5, generator=torch.Generator().manual_seed(0))
    b = sample(sde, gm.score_fn(sde), (8, 2), sampler=build_sampler("pc"), steps=5, generator=torch.Generator().manual_seed(0))
    assert a.choice is None and torch.equal(a.samples, b.samples)


# Configurations a user could pick by hand at 10 NFE (each spends exactly 10).
LISTED = {
    "dpm_solver": {},
    "dpm_solver order=3": {"order": 3},
    "unipc": {"corrector": True},
    "unipc order=3": {"order": 3, "corrector": True},
    "dpm_solver karras": {"grid": "karras"},
    "dpm_solver logsnr": {"grid": "logsnr"},
    "ddim": 10,
    "edm_heun": 5,  # Heun: 2 evaluations per step, the last step Euler (9 NFE)
}


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_default_is_near_the_best_listed_configuration_at_10_nfe(sde_name: str) -> None:
    # A fixed problem outside the benchmark's seeds: 11 unequal anisotropic modes in 3-D.
    gm = random_family(5000)
    sde = VPSDE() if sde_name == "vp" else VESDE(sigma_min=0.01, sigma_max=gm.diameter())
    n = 4000
    g = torch.Generator().manual_seed(1)
    x_T = sde.prior_sample((n, gm.dim), generator=g) if sde_name == "vp" else None
    if x_T is None:
        # VE: the exact marginal at T (its prior N(0, σ_max²) ignores the data's spread).
        x0 = gm.sample(n, torch.Generator().manual_seed(2), dtype=torch.float32)
        t = torch.tensor(sde.T)
        x_T = sde.mean_coeff(t) * x0 + sde.marginal_std(t) * torch.randn(n, gm.dim, generator=g)
    score = gm.score_fn(sde)

    def err(**kw) -> float:
        out = sample(sde, score, x_T.shape, x_T=x_T, generator=torch.Generator().manual_seed(3), **kw)
        assert out.nfe <= 10
        return whitened_moment_kl(gm, out.samples)

    listed = {}
    for label, opts in LISTED.items():
        if isinstance(opts, int):
            listed[label] = err(sampler=label, steps=opts)
        else:
            listed[label] = err(sampler="dpm_solver", steps=10, **opts)
    floor = whitened_moment_kl(gm, gm.sample(n, torch.Generator().manual_seed(4)))
    best = min(listed.values())
    default = err(steps=10)
    assert math.isfinite(default)
    # Within a factor 1.5 of the best listed configuration (above the floor of exact draws).
    assert default - floor <= 1.5 * max(best - floor, 0.0) + 0.05 * floor, (default, listed, floor)


@pytest.mark.parametrize("sde_name", sorted(SDES))
def test_end_sigma_stops_at_that_noise_level(sde_name: str) -> None:
    sde = SDES[sde_name]
    for target in (1e-3, 0.01, 0.3):
        s = build_sampler("dpm_solver", end_sigma=target)
        t = torch.tensor(s.end.end_time(sde), dtype=torch.float64)
        got = float(sde.marginal_std(t) / sde.mean_coeff(t))
        if float(t) > sde.eps:
            assert got == pytest.approx(target, rel=1e-6)
        else:  # below what the process reaches at its smallest time: clipped there
            assert target < got
    with pytest.raises(ValueError, match="not both"):
        build_sampler("dpm_solver", end_sigma=0.01, eps=1e-3)
    with pytest.raises(ValueError, match="end_sigma must be a positive number"):
        build_sampler("dpm_solver", end_sigma=0.0)


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
def test_end_sigma_on_a_gaussian_gives_the_exact_marginal_there(sde_name: str) -> None:
    # Data N(0, s² I): the probability-flow ODE maps p_T to p_t = N(0, (m² s² + σ²) I) exactly, so a converged
    # solver stopped at σ/m = 0.3 holds that state, and returns it in the data's scale, x/m = x_0 + 0.3 ε:
    # variance s² + 0.09 on every process (Monte-Carlo tolerance).
    s2 = 0.25
    gm = GaussianMixture(torch.ones(1), torch.zeros(1, 2), s2 * torch.eye(2)[None])
    sde = SDES[sde_name]
    n = 20000
    g = torch.Generator().manual_seed(0)
    T = torch.tensor(sde.T, dtype=torch.float64)
    x_T = (torch.randn(n, 2, generator=g, dtype=torch.float64)
           * torch.sqrt(sde.mean_coeff(T) ** 2 * s2 + sde.marginal_std(T) ** 2))
    out = sample(sde, gm.score_fn(sde), x_T.shape, sampler="dpm_solver", steps=40, x_T=x_T, end_sigma=0.3,
                 dtype=torch.float64)
    expected = s2 + 0.3**2
    var = float(out.samples.var(0).mean())
    assert var == pytest.approx(expected, rel=4 * math.sqrt(2 / (2 * n)) + 1e-3)


def test_every_sampler_takes_end_sigma() -> None:
    sde = SubVPSDE()
    for name in SAMPLERS.names():
        if name == "ddpm":  # Algorithm 2's chain ends at x_0 itself: an end point is refused, not ignored
            with pytest.raises(ValueError, match="ends at x_0"):
                build_sampler(name, end_sigma=0.02)
            continue
        t = torch.tensor(build_sampler(name, end_sigma=0.02).end.end_time(sde), dtype=torch.float64)
        assert float(sde.marginal_std(t) / sde.mean_coeff(t)) == pytest.approx(0.02, rel=1e-6), name



def test_learned_scores_get_the_learned_rule() -> None:
    from sde_diffusion.guidance import ClassifierFreeGuidance
    from sde_diffusion.samplers.defaults import LEARNED_RULES, is_learned_score
    from sde_diffusion.score import DataRangeClip, ScoreModel

    sde = VPSDE()
    net = torch.nn.Linear(2, 2)
    gm = random_family(3)

    def closure(x, t):
        return net(x)

    assert not is_learned_score(gm.score_fn(sde))  # analytic: the exact-score rule
    assert is_learned_score(net) and is_learned_score(closure)
    assert is_learned_score(DataRangeClip(closure, sde, -1.0, 1.0))
    model = ScoreModel(torch.nn.Identity(), sde, "eps")
    assert is_learned_score(ClassifierFreeGuidance(model, y=torch.zeros(2, dtype=torch.long), scale=1.0, null_label=3))
    for nfe in (1, 10, 50):
        choice = default_sampler(sde, nfe, score="learned")
        rule = [r for r in LEARNED_RULES["vp"] if r.min_nfe <= nfe][-1]
        assert (choice.name, choice.options, choice.score) == (rule.sampler, rule.options, "learned")
    out = sample(sde, closure, (4, 2), steps=10, generator=torch.Generator().manual_seed(0))
    assert out.choice.score == "learned" and out.nfe == 10
    assert sample(sde, closure, (4, 2), steps=10, score_kind="exact").choice.score == "exact"
    with pytest.raises(ValueError, match="score must be one of"):
        default_sampler(sde, 10, score="other")


@pytest.mark.numeric
def test_vp_and_subvp_give_the_same_samples_at_a_noise_level() -> None:
    # In σ̃ = σ/m and x̃ = x/m the probability-flow ODE is the same for VP and sub-VP, so from the same x̃_T the
    # default's log-SNR solver lands on the same samples of x_0 + σ̃ ε. Sub-VP reaches σ̃ = 0.003 at t ≈ 0.013,
    # where m ≈ 0.9985: returned as the raw state, its samples would sit 0.15 % closer to the origin, 50× the
    # width of these modes apart at the lattice's corners.
    from sde_diffusion.testing import grid_mixture

    gm = grid_mixture(side=5, spacing=2.0, std=0.002)
    x_tilde = 60.0 * torch.randn(512, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    outs = []
    for sde in (VPSDE(), SubVPSDE()):
        m_T = float(sde.mean_coeff(torch.tensor(sde.T, dtype=torch.float64)))
        out = sample(sde, gm.score_fn(sde), x_tilde.shape, sampler="dpm_solver", steps=30, x_T=x_tilde * m_T,
                     dtype=torch.float64, grid="logsnr", end_sigma=0.003, order=2)
        outs.append(out.samples)
    gap = (outs[0] - outs[1]).norm(dim=1)
    assert float(gap.max()) < 0.002  # well below a mode's width, 0.002·√2


def _constant_beta_8() -> LinearSDE:
    """VP-type with a constant β = 8 and eps = 1e-4: σ̃(eps) = √(e^{8e-4} − 1) = 0.028, more than twice the rules'
    σ/m = 0.01 (and the 0.003 of some named samplers' tables)."""
    from sde_diffusion.testing import ConstantBetaSDE

    return ConstantBetaSDE(8.0, eps=1e-4)


def test_an_end_point_the_process_cannot_reach_adds_the_denoising_step() -> None:
    from sde_diffusion.samplers.defaults import UNREACHABLE_END, lowest_noise_level, tuned_options

    sde = _constant_beta_8()
    assert lowest_noise_level(sde) == pytest.approx(math.sqrt(math.expm1(8e-4)), rel=1e-6)
    for nfe in (5, 10, 12, 15, 20, 50):
        rule = [r for r in RULES["vp"] if r.min_nfe <= nfe][-1]
        choice = default_sampler(sde, nfe)
        far = lowest_noise_level(sde) > UNREACHABLE_END * rule.options["end_sigma"]
        assert far == (rule.options["end_sigma"] <= 0.01)  # 0.03 is within reach (σ̃(eps) < 2 · 0.03)
        assert choice.options.get("denoise", False) == (far or rule.options.get("denoise", False))
        if not rule.options.get("denoise", False):
            assert choice.options.get("denoise_order", 1) == 1  # the added step is Tweedie's
        assert choice.steps == nfe - int(choice.options.get("denoise", False))
        assert build_sampler(choice.name, **choice.options).expected_nfe(choice.steps) == nfe
        named = tuned_options("dpm_solver_sde", sde, nfe)  # the named samplers' tables get the same step
        assert named["denoise"] == (lowest_noise_level(sde) > UNREACHABLE_END * named["end_sigma"]), nfe
    assert tuned_options("dpm_solver_sde", sde, 20)["denoise"] is True  # its table ends at σ/m = 0.003 there
    # The library's processes reach every level of the rules: their choices are the table's, untouched.
    for name, lib_sde in SDES.items():
        for nfe in (5, 10, 20, 50):
            rule = [r for r in RULES[sde_family(lib_sde)] if r.min_nfe <= nfe][-1]
            assert default_sampler(lib_sde, nfe).options == rule.options, (name, nfe)
    # Just out of reach (σ̃(eps) = σ_min = 0.01 against the 10-NFE rule's 0.01): no step, which would cost one.
    ve_ref = VESDE(sigma_min=0.01, sigma_max=20.0, exact_kernel=False)
    assert "denoise" not in default_sampler(ve_ref, 10).options
    assert tuned_options("dpm_solver_sde", ve_ref, 20)["denoise"] is True  # 0.003: more than 2× below


@pytest.mark.numeric
def test_the_denoising_step_at_an_unreachable_end_is_exact_on_a_gaussian() -> None:
    # p_0 = N(0, s² I) with s = 0.03, near the process's floor σ̃(eps) = 0.028: the 10-NFE rule's σ/m = 0.01 is out
    # of reach, so the run stops at eps and spends its 10th evaluation on Tweedie's step, which maps the end state
    # x̃ to s²/(s² + σ̃²) x̃ sample by sample. For the exact flow's x̃ ~ N(0, s² + σ̃²) that is variance s⁴/(s² + σ̃²)
    # and, per dimension with r = σ̃²/s², KL(q ‖ p_0) = ½(1/(1+r) − 1 + log(1 + r)) = 0.083 against
    # ½(r − log(1 + r)) = 0.127 for stopping.
    from sde_diffusion.samplers.defaults import lowest_noise_level

    sde, s, dim, n = _constant_beta_8(), 0.03, 4, 512
    gm = GaussianMixture([1.0], torch.zeros(1, dim), [s**2])
    sig2 = lowest_noise_level(sde) ** 2
    x_T = torch.randn(n, dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = sample(sde, gm.score_fn(sde), x_T.shape, steps=10, x_T=x_T, dtype=torch.float64)
    assert out.choice.options["denoise"] is True and out.nfe == 10 and out.choice.steps == 9
    stop = {k: v for k, v in out.choice.options.items() if k != "denoise"}
    at_eps = sample(sde, gm.score_fn(sde), x_T.shape, sampler=out.choice.name, steps=9, x_T=x_T, dtype=torch.float64,
                    **stop).samples
    torch.testing.assert_close(out.samples, at_eps * (s**2 / (s**2 + sig2)), rtol=1e-6, atol=1e-9)
    r = sig2 / s**2
    assert 0.5 * (1 / (1 + r) - 1 + math.log1p(r)) < 0.7 * 0.5 * (r - math.log1p(r))


def test_turning_the_rules_final_step_off_keeps_the_budget() -> None:
    # From 13 NFE the rule ends with a final step of order 3; denoise=false turns it off with its order, and the
    # step's evaluation goes back to the run.
    sde, gm = VPSDE(), random_family(3)
    out = sample(sde, gm.score_fn(sde), (8, gm.dim), steps=20, denoise=False, generator=torch.Generator().manual_seed(0))
    assert out.nfe == 20 and torch.isfinite(out.samples).all()
    name, steps, options, _ = resolve_sampler(sde, None, 20, {"denoise": False})
    assert (steps, options.get("denoise"), "denoise_order" in options) == (20, False, False)
    assert default_sampler(sde, 1).options.get("denoise_order") is None
