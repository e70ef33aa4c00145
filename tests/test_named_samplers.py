"""Named samplers at their measured best: the `auto` options of conf/sampler/<name>.yaml (NAMED_RULES)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from sde_diffusion import sample
from sde_diffusion.config import parse_sample
from sde_diffusion.jobs import cli
from sde_diffusion.jobs.sample_job import choose_sampler
from sde_diffusion.samplers import build_sampler
from sde_diffusion.samplers.defaults import FAMILIES, NAMED_RULES, SCORE_KINDS, fill_tuned, tuned_options, tuned_table
from sde_diffusion.sdes import SubVPSDE, VESDE, VPSDE
from sde_diffusion.testing import grid_mixture, make_sde, marginal_sample, whitened_moment_kl

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TUNED = {p.stem: yaml.safe_load(p.read_text()).get("tuned") for p in sorted((CONF / "sampler").glob("*.yaml"))}
TUNED_CONFIGS = sorted(k for k, v in TUNED.items() if v)
PAPER = ("pc", "euler_maruyama", "reverse_diffusion", "ancestral", "ddpm")


def _choice(config: str, steps: int, *overrides: str, sde=None):
    cfg = parse_sample(cli.compose([f"sampler={config}", f"steps={steps}", *overrides], CONF))
    return choose_sampler(sde or VPSDE(), cfg)


def test_every_fast_named_sampler_has_a_measured_table() -> None:
    assert set(TUNED_CONFIGS) >= {"dpm_solver", "unipc", "dpm_solver_sde", "dpm_solver_2s", "ddim", "edm_heun",
                                  "ode_heun", "ode_rk4"}
    for config in TUNED_CONFIGS:
        assert TUNED[config] == config and TUNED[config] in NAMED_RULES
        for kind in SCORE_KINDS:
            assert kind in NAMED_RULES[config]
        for key, rules in NAMED_RULES[config].items():
            kind, _, family = key.partition("/")
            assert kind in SCORE_KINDS and family in ("", *FAMILIES), key
            assert rules[0].min_nfe == 1 and [r.min_nfe for r in rules] == sorted(r.min_nfe for r in rules)


@pytest.mark.parametrize("config", ["ode_heun", "ode_rk4"])
def test_a_family_with_its_own_table_takes_it(config: str) -> None:
    # VE has its own tables for the ODE integrators (they step in σ̃ there), and so has sub-VP, whose grid in t
    # differs from VP's (its learned table is VP's own, copied).
    for kind in SCORE_KINDS:
        assert tuned_table(config, VESDE(), kind) == f"{kind}/ve"
        assert tuned_table(config, VPSDE(), kind) == kind and tuned_table(config, SubVPSDE(), kind) == f"{kind}/subvp"
    assert NAMED_RULES[config]["learned/subvp"] == NAMED_RULES[config]["learned"]
    assert tuned_table("ddim", VESDE(), "exact") == "exact"
    per_step = build_sampler(config).nfe_per_step
    for steps in (2, 5, 12):
        ve, vp = _choice(config, steps, sde=VESDE()), _choice(config, steps, sde=VPSDE())
        assert ve.sampler.variable == ve.options["variable"] == tuned_options(config, VESDE(), steps * per_step, "learned")["variable"]
        assert vp.options["variable"] == vp.sampler.variable == "t"
    assert _choice(config, 12, sde=VESDE()).sampler.variable == "sigma"  # 24–48 NFE: σ̃ on VE
    # A value given on the command line still wins.
    assert _choice(config, 5, "sampler.variable=t", sde=VESDE()).sampler.variable == "t"


@pytest.mark.parametrize("config", ["dpm_solver", "unipc", "ddim", "edm_heun", "dpm_solver_sde"])
@pytest.mark.parametrize("steps", [3, 10, 25])
def test_named_config_takes_the_table_for_its_budget(config: str, steps: int) -> None:
    choice = _choice(config, steps)
    assert "tuned" not in choice.options and "auto" not in choice.options.values()
    nfe = steps * (choice.sampler.nfe_per_step or 1)
    best = tuned_options(config, VPSDE(), nfe, "learned")
    for key, value in best.items():
        assert choice.options[key] == value, (config, steps, key)
    assert choice.tuned == config and choice.default_rule is None
    # The built sampler carries them.
    if "end_sigma" in best:
        assert choice.sampler.end.end_sigma == pytest.approx(best["end_sigma"])
    assert choice.sampler.end.denoise == bool(best.get("denoise", False))


def test_a_value_given_on_the_command_line_beats_the_table() -> None:
    choice = _choice("dpm_solver", 10, "sampler.end_sigma=0.05", "sampler.grid=uniform", "sampler.order=1")
    assert choice.options["end_sigma"] == 0.05 and choice.options["grid"] == "uniform" and choice.options["order"] == 1
    # An end time given by the user replaces the table's end noise level (both cannot hold).
    choice = _choice("ddim", 10, "sampler.eps=0.002")
    assert "end_sigma" not in choice.options and choice.sampler.end.eps == 0.002
    # null keeps the class default (the SDE's eps).
    assert _choice("ddim", 10, "sampler.end_sigma=null").sampler.end.end_sigma is None


@pytest.mark.parametrize("config", PAPER)
def test_the_papers_algorithms_keep_their_own_settings(config: str) -> None:
    raw = yaml.safe_load((CONF / "sampler" / f"{config}.yaml").read_text())
    assert "tuned" not in raw and "auto" not in [v for v in raw.values() if isinstance(v, str)]
    choice = _choice(config, 10)
    assert choice.tuned is None
    assert choice.sampler.end.end_sigma is None and not choice.sampler.end.denoise
    if config in ("pc", "euler_maruyama"):
        assert choice.options["grid"] == "uniform"


def test_fill_tuned_errors_and_passthrough() -> None:
    with pytest.raises(ValueError, match="no measured settings for sampler 'nope'.*dpm_solver"):
        fill_tuned(VPSDE(), "dpm_solver", 10, {"tuned": "nope", "grid": "auto"}, build=build_sampler)
    # Without `auto` values nothing is looked up, and the key is removed.
    assert fill_tuned(VPSDE(), "ddim", 10, {"tuned": "nope", "grid": "uniform"}, build=build_sampler) == {"grid": "uniform"}
    with pytest.raises(ValueError, match="score must be one of"):
        tuned_options("ddim", VPSDE(), 10, "trained")


def test_python_api_takes_the_same_table() -> None:
    torch.manual_seed(0)
    x_T = torch.randn(16, 2, dtype=torch.float64)
    score = lambda x, t: -x  # noqa: E731
    opts = {"tuned": "unipc", "order": "auto", "grid": "auto", "end_sigma": "auto", "denoise": "auto", "corrector": True}
    a = sample(VPSDE(), score, x_T.shape, sampler="dpm_solver", steps=8, x_T=x_T, dtype=torch.float64, **opts)
    resolved = fill_tuned(VPSDE(), "dpm_solver", 8, opts, "exact", build=build_sampler)
    b = sample(VPSDE(), score, x_T.shape, sampler="dpm_solver", steps=8, x_T=x_T, dtype=torch.float64, **resolved)
    assert torch.equal(a.samples, b.samples)


@pytest.mark.numeric
def test_measured_defaults_beat_the_shipped_ones_on_a_mixture_nobody_tuned() -> None:
    """On a 25-mode lattice (not among the tuning problems), with the exact score, over VP, sub-VP and VE,
    dpm_solver, ddim and edm_heun, and 5, 10 and 20 NFE: the named samplers with their table's options land
    closer to p_0 than with the options they shipped with (the class's grid and end time, no denoising step),
    by a geometric mean of the error ratio below 0.7. Cells may go either way; the table is a rule for the
    family, not for this problem."""
    import math

    gm = grid_mixture(side=5, spacing=2.0, std=0.1)
    logs = []
    for sde_name in ("vp", "subvp", "ve"):
        sde = make_sde(sde_name, gm.diameter())
        score = gm.score_fn(sde, compute_dtype=None)
        x_T = marginal_sample(gm, sde, 2000, sde.T, torch.Generator().manual_seed(3), torch.float32)
        for cls in ("dpm_solver", "ddim", "edm_heun"):
            for budget in (5, 10, 20):
                probe = build_sampler(cls)
                steps = max(n for n in range(1, budget + 1) if probe.expected_nfe(n) <= budget)
                shipped = sample(sde, score, x_T.shape, sampler=cls, steps=steps, x_T=x_T)
                best = tuned_options(cls, sde, steps * (probe.nfe_per_step or 1), "exact")
                steps = max(n for n in range(1, budget + 1) if build_sampler(cls, **best).expected_nfe(n) <= budget)
                tuned = sample(sde, score, x_T.shape, sampler=cls, steps=steps, x_T=x_T, **best)
                assert tuned.nfe <= budget and shipped.nfe <= budget
                logs.append(math.log(whitened_moment_kl(gm, tuned.samples) / whitened_moment_kl(gm, shipped.samples)))
    assert math.exp(sum(logs) / len(logs)) < 0.7


@pytest.mark.numeric
def test_ve_tables_of_the_ode_integrators_beat_the_shared_ones_on_a_mixture_nobody_tuned() -> None:
    """On the 25-mode lattice with the exact score of a VE process, ode_heun and ode_rk4 with VE's own tables
    (steps in σ̃) land closer to p_0 than with the tables VP and sub-VP use (steps in t, unstable over VE's σ
    range with few steps): at 10 NFE by more than 2× each, and by a geometric mean below 0.4 over 10 and
    20 NFE (measured 0.21; at 20 NFE RK4's two tables are within 10 %)."""
    import math

    gm = grid_mixture(side=5, spacing=2.0, std=0.1)
    sde = make_sde("ve", gm.diameter())
    score = gm.score_fn(sde, compute_dtype=None)
    x_T = marginal_sample(gm, sde, 2000, sde.T, torch.Generator().manual_seed(4), torch.float32)
    logs = []
    for cls in ("ode_heun", "ode_rk4"):
        for budget in (10, 20):
            errors = []
            for table in (NAMED_RULES[cls]["exact/ve"], NAMED_RULES[cls]["exact"]):
                opts = dict([r for r in table if r.min_nfe <= budget][-1].options)
                steps = max(n for n in range(1, budget + 1) if build_sampler(cls, **opts).expected_nfe(n) <= budget)
                out = sample(sde, score, x_T.shape, sampler=cls, steps=steps, x_T=x_T, **opts)
                errors.append(whitened_moment_kl(gm, out.samples) if torch.isfinite(out.samples).all() else float("inf"))
            logs.append(math.log(errors[0] / errors[1]))
            if budget == 10:
                assert errors[0] < 0.5 * errors[1], (cls, errors)
    assert math.exp(sum(logs) / len(logs)) < 0.4


def test_named_deterministic_sampler_is_clamped_on_images_by_default() -> None:
    """clip_denoised=auto: the data-range clamp for a measured (default or named, tuned) deterministic sampler on
    bounded image data; not for a stochastic one, and never for the paper's algorithms."""
    from sde_diffusion.samplers.sampler import is_deterministic

    assert is_deterministic(_choice("ddim", 5).sampler, VPSDE())
    assert not is_deterministic(_choice("dpm_solver_sde", 5).sampler, VPSDE())
    assert not is_deterministic(_choice("pc", 5).sampler, VPSDE())
    for sde in (SubVPSDE(), VESDE()):
        assert is_deterministic(_choice("edm_heun", 5, sde=sde).sampler, sde)
