"""The exact-score test problems and metrics of ``sde_diffusion.testing``, and every registered
sampler, at its defaults, on draws from the random problem family (``testing.random_family``):
finite samples at every step count ≥ 1, on every process."""
from __future__ import annotations

import math

import pytest
import torch

from sde_diffusion import CosineVPSDE, GaussianMixture, VESDE, VPSDE, sample
from sde_diffusion.metrics import wasserstein_1d
from sde_diffusion.samplers import SAMPLERS, build_sampler
from sde_diffusion.testing import (
    SDE_NAMES,
    Truth,
    make_problems,
    make_sde,
    marginal_sample,
    moment_kl,
    projections,
    random_family,
    reference_quantiles,
    sliced_w2,
    whitened_moment_kl,
    wide_family,
)

pytestmark = [pytest.mark.numeric, pytest.mark.usefixtures("single_thread")]

FAMILY_SEEDS = (0, 1, 3)  # D = 221 (3 modes), 3 (7 modes), 2 (9 modes)


def test_family_spans_what_it_states() -> None:
    draws = [random_family(s) for s in range(200)]
    dims = [g.dim for g in draws]
    assert min(dims) == 2 and 200 <= max(dims) <= 256
    ratios = [float(g.weights.max() / g.weights.min()) for g in draws]
    assert max(ratios) <= 50 and max(ratios) > 30
    scales = torch.cat([g.eigvals.sqrt().flatten() for g in draws])
    assert float(scales.max() / scales.min()) > 100  # per-mode scales 1:100, times the anisotropy
    assert all(not torch.allclose(g.covs[0], torch.diag(torch.diagonal(g.covs[0]))) for g in draws[:5])  # full
    again = random_family(7)
    assert torch.equal(again.means, draws[7].means) and torch.equal(again.covs, draws[7].covs)
    assert [(g.dim, g.num_components) for g in (draws[s] for s in FAMILY_SEEDS)] == [(221, 3), (3, 7), (2, 9)]


def test_wide_family_spans_what_it_states() -> None:
    """Half the draws are the original family; the other half have 2–64 sharp modes in 2–8 D whose std to
    nearest-neighbour spacing runs down to 1:50."""
    from sde_diffusion.testing.draws import random_family_parameters, wide_family_kind

    seeds = range(300)
    kinds = [wide_family_kind(s) for s in seeds]
    assert 0.4 < kinds.count("structured") / len(kinds) < 0.6
    structured = [wide_family(s) for s, k in zip(seeds, kinds) if k == "structured"]
    assert {g.dim for g in structured} == set(range(2, 9))
    modes = [g.num_components for g in structured]
    assert min(modes) == 2 and 56 <= max(modes) <= 64
    spread = []
    for g in structured:
        d = torch.cdist(g.means, g.means).fill_diagonal_(math.inf).min(1).values
        spread.append(float(g.eigvals.sqrt().mean() / d.median()))
    assert min(spread) < 1 / 30 and max(spread) < 1.5  # down to ~1:50, never overlapping beyond ~1:2 (×anisotropy)
    for s, k in list(zip(seeds, kinds))[:20]:
        if k == "random":  # the original family's draw, unchanged
            w, m, c = random_family_parameters(s)
            assert torch.equal(wide_family(s).means, m) and torch.equal(wide_family(s).covs, c)
    assert torch.equal(wide_family(3011).means, wide_family(3011).means)


@pytest.mark.parametrize("seed", FAMILY_SEEDS)
@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve", "cosine_vp"])
def test_every_sampler_is_finite_at_every_step_count(seed: int, sde_name: str) -> None:
    gm = random_family(seed)
    sde = CosineVPSDE() if sde_name == "cosine_vp" else make_sde(sde_name, gm.diameter())
    score_fn = gm.score_fn(sde)
    for name in SAMPLERS.names():
        try:
            build_sampler(name).validate(sde)
        except ValueError as err:  # a sampler defined for some processes only (ddpm: variance-preserving)
            assert "variance-preserving" in str(err), (name, err)
            continue
        for steps in (1, 2, 5):
            out = sample(sde, score_fn, (16, gm.dim), sampler=name, steps=steps, generator=torch.Generator().manual_seed(steps))
            assert out.samples.shape == (16, gm.dim)
            assert torch.isfinite(out.samples).all(), (name, steps)
            assert out.nfe >= 1


# --------------------------------------------------------------------------- problems
def test_make_sde_and_the_benchmark_problems() -> None:
    assert [type(make_sde(n, 7.0)).__name__ for n in SDE_NAMES] == ["VPSDE", "SubVPSDE", "VESDE"]
    ve = make_sde("ve", 7.0)
    assert isinstance(ve, VESDE) and ve.sigma_min == 0.01 and ve.sigma_max == 7.0
    with pytest.raises(ValueError, match="unknown SDE 'heat'; choose one of: vp, subvp, ve, cosine"):
        make_sde("heat", 1.0)
    # The processes with other parameters, checked against their closed forms at the ends of time.
    from sde_diffusion.samplers.defaults import lowest_noise_level
    from sde_diffusion.testing import OTHER_SDE_NAMES

    other = {n: make_sde(n, 7.0) for n in OTHER_SDE_NAMES}
    one = torch.tensor(1.0, dtype=torch.float64)

    def sigma_tilde(sde, t):
        return float(sde.marginal_std(t) / sde.mean_coeff(t))

    assert sigma_tilde(other["vp_beta10"], one) == pytest.approx(math.sqrt(math.expm1(0.05 + 0.5 * 9.95)), rel=1e-9)
    assert sigma_tilde(other["linear_beta8"], one) == pytest.approx(math.sqrt(math.expm1(8.0)), rel=1e-9)
    assert lowest_noise_level(other["linear_beta8"]) == pytest.approx(math.sqrt(math.expm1(8e-5)), rel=1e-6)
    assert float(other["ve_edm"].marginal_std(one)) == pytest.approx(math.sqrt(80.0**2 - 0.002**2), rel=1e-12)
    assert float(other["ve_ref"].marginal_std(torch.tensor(0.0, dtype=torch.float64))) == pytest.approx(0.01)
    assert type(other["cosine"]).__name__ == "CosineVPSDE"
    problems = make_problems()
    assert list(problems) == ["ring8", "grid25", "gmm16", "gmm64"]
    assert [(p.mixture.dim, p.mixture.num_components) for p in problems.values()] == [(2, 8), (2, 25), (16, 10), (64, 8)]
    grid = problems["grid25"].mixture
    assert float(grid.weights.max() / grid.weights.min()) == pytest.approx(20.0)


def test_marginal_sample_has_the_moments_of_p_t() -> None:
    gm = GaussianMixture([1.0], [[1.0, -2.0]], [[0.5, 2.0]])
    sde = VPSDE()
    x = marginal_sample(gm, sde, 20_000, 0.5, torch.Generator().manual_seed(0), torch.float32)
    assert x.dtype == torch.float32 and x.shape == (20_000, 2)
    t = torch.tensor(0.5, dtype=torch.float64)
    m, s = float(sde.mean_coeff(t)), float(sde.marginal_std(t))
    var = torch.tensor([m * m * 0.5 + s * s, m * m * 2.0 + s * s])
    mean = m * torch.tensor([1.0, -2.0])
    assert ((x.mean(0) - mean).abs() <= 5 * (var / 20_000).sqrt()).all()
    assert ((x.var(0) - var).abs() <= 5 * var * math.sqrt(2 / 20_000)).all()


# --------------------------------------------------------------------------- metrics
def test_whitened_moment_kl_floor_and_errors() -> None:
    gm = random_family(3)  # 2-D, 9 modes
    n = 4000
    exact = [whitened_moment_kl(gm, gm.sample(n, torch.Generator().manual_seed(s))) for s in range(3)]
    # Estimation noise only: about Σ_k w_k·D/n_k = K·D/n for exact draws.
    assert max(exact) < 3 * gm.num_components * gm.dim / n
    x = gm.sample(n, torch.Generator().manual_seed(9))
    spread = whitened_moment_kl(gm, gm.mean() + 1.5 * (x - gm.mean()))
    assert spread > 20 * max(exact)
    x[0, 0] = float("nan")
    assert whitened_moment_kl(gm, x) == math.inf


def test_moment_kl_parts_and_collapse() -> None:
    gm = GaussianMixture.ring(k=4, radius=3.0, std=0.3)
    x = gm.sample(2000, torch.Generator().manual_seed(1))
    total, weight, gauss = moment_kl(gm, x, parts=True)
    assert total == pytest.approx(weight + gauss) and 0 <= total < 0.05
    collapsed = gm.means[torch.arange(2000) % 4]  # every sample on its mode's mean
    assert moment_kl(gm, collapsed) > 100 * total


def test_sliced_w2_is_the_rms_quantile_gap() -> None:
    gm = random_family(1)
    n = 500
    proj = projections(gm.dim, num=32, seed=0)
    q = reference_quantiles(gm.sample(20 * n, torch.Generator().manual_seed(2)), proj, n)
    assert bool((q[1:] >= q[:-1]).all())  # quantiles increase along each direction
    x = gm.sample(n, torch.Generator().manual_seed(3))
    direct = float(((torch.sort(x @ proj, dim=0).values - q) ** 2).mean().sqrt())
    assert sliced_w2(x, q, proj) == pytest.approx(direct, rel=1e-12)
    assert sliced_w2(x, q, proj) ** 2 == pytest.approx(float(wasserstein_1d(x @ proj, q).mean()), rel=1e-12)
    assert sliced_w2(x + 1.0, q, proj) > 3 * sliced_w2(x, q, proj)
    with pytest.raises(ValueError, match="needs 500 samples"):
        sliced_w2(x[:10], q, proj)


def test_truth_floors_are_the_metrics_of_exact_draws() -> None:
    gm = GaussianMixture.ring(k=4, radius=3.0, std=0.3)
    truth = Truth.build(gm, 300, repeats=3, entropy_n=5000, ref_factor=5)
    assert set(truth.floor) == {"mkl", "sw2", "xent"}
    assert all(math.isfinite(m) and math.isfinite(s) and s >= 0 for m, s in truth.floor.values())
    # H(p_0) of four well separated modes: log 4 + the entropy of one 2-D Gaussian of std 0.3.
    h = math.log(4) + 1 + math.log(2 * math.pi * 0.09)
    assert abs(truth.entropy - h) < 5 * truth.entropy_se + 1e-3
    far = truth.evaluate(gm.sample(300, torch.Generator().manual_seed(5)) * 2.0)
    assert all(far[k] > truth.floor[k][0] + 5 * truth.floor[k][1] for k in ("mkl", "sw2"))


def test_the_family_benchmark_names_its_processes_and_refuses_unknown_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import sampler_family as sf

    rows = [{"sde": s} for s in ("ve_ref", "vp", "cosine", "vp")]
    assert sf.sdes_of(rows) == ("vp", "cosine", "ve_ref")  # the order of SDE_NAMES + OTHER_SDE_NAMES
    monkeypatch.setattr("sys.argv", ["sampler_family", "--sdes", "vp,heat", "--limit", "1"])
    with pytest.raises(SystemExit, match="unknown SDE\\(s\\) heat; choose from vp, subvp, ve, cosine"):
        sf.main()
    # Round 6's candidates take the rule's solver order for the budget.
    assert all(opts["order"] == sf.RULE_ORDER and opts["denoise"] for _, opts in sf.CANDIDATES_ROUND6.values())


def test_round_7_picks_each_named_samplers_best_setting_by_its_geometric_mean_ratio() -> None:
    from benchmarks import sampler_family as sf

    # Two problems: the peer's best error is 1 and 2; ddim's config is 4× / 4× it, the order-4 step at σ/m = 0.03
    # 2× / 4.5× (geo-mean 3), the order-2 step at 0.05 3× / 3.5× (geo-mean 3.24).
    rows = []
    for seed, peer in ((1, 1.0), (2, 2.0)):
        base = {"seed": seed, "sde": "vp", "budget": 15, "nfe": 15}
        rows.append({**base, "kind": "kd", "label": "lms", "metric": peer})
        for label, ratio in (("ddim", 4.0), ("ddim-s0.03-f4", 2.0 if seed == 1 else 4.5),
                             ("ddim-s0.05-f2", 3.0 if seed == 1 else 3.5)):
            rows.append({**base, "kind": "ours", "label": label, "metric": ratio * peer})
    header, body = sf.named_table(rows, round7=True)
    assert header[2] == "config before: geo-mean ratio"
    assert body == [["ddim", "15", "4.00", "s0.03-f4", "3.00"]]
    # Every round-7 candidate is a named deterministic sampler with the final step of order 2–4.
    assert {base for base, _ in sf.CANDIDATES_ROUND7.values()} == set(sf.NAMED_DETERMINISTIC)
    assert all(o["denoise"] and 2 <= o["denoise_order"] <= 4 for _, o in sf.CANDIDATES_ROUND7.values())


def test_the_end_level_benchmark_pairs_each_case_with_its_kept_level() -> None:
    from benchmarks import fit_end_levels as fe

    rows = []
    for seed, (kept, moved) in enumerate(((1.0, 0.5), (2.0, 2.0), (1.0, 1.5))):
        base = {"seed": seed, "sde": "vp", "dim": 3, "budget": 15, "level": 0.03}
        rows += [{**base, "kind": fe.KINDS[1], "metric": kept}, {**base, "kind": fe.KINDS[2], "metric": moved}]
    # Ratios 0.5, 1 and 1.5: geometric mean 0.75^(1/3) = 0.909; one better, one worse by more than 2 %.
    assert fe.paired(rows) == [["low-D", "15", "0.909", "1 / 1 of 3"]]


def test_counterparts_take_the_peers_best_sweep_of_the_same_method_and_extra_files_add_only_sweeps(tmp_path) -> None:
    import gzip
    import json

    from benchmarks import sampler_family as sf

    # ddim against k-diffusion's euler: two problems, the best of euler's σ_min sweep is 2 and 1 (its worse setting and
    # dpm_2 do not count); ddim's errors 3 and 1.2 give ratios 1.5 and 1.2, geometric mean √1.8 = 1.34, both ≤ 1.5.
    sweep, ours = [], []
    for seed, (best, other, mine) in enumerate(((2.0, 5.0, 3.0), (1.0, 4.0, 1.2))):
        base = {"seed": seed, "sde": "vp", "dim": 2, "budget": 10, "nfe": 10}
        sweep += [{**base, "kind": "kd_select", "label": "euler σmin=0.01 ρ=7", "metric": best},
                  {**base, "kind": "kd_select", "label": "euler σmin=0.05 ρ=7", "metric": other},
                  {**base, "kind": "kd_select", "label": "dpm_2 σmin=0.01 ρ=7", "metric": 0.1},
                  {**base, "kind": "kd", "label": "dpm_2 σmin=0.01 ρ=7", "metric": 0.1}]
        ours += [{**base, "kind": "ours", "label": "ddim", "metric": mine},
                 {**base, "kind": "kd", "label": "lms σmin=0.05 ρ=7", "metric": 1.0},
                 {**base, "kind": "ours", "label": "default", "metric": 0.9},
                 {**base, "kind": "floor", "label": "floor", "budget": 0, "metric": 0.5}]
    header, body = sf.counterpart_table(ours + sweep)
    line = next(b for b in body if b[0] == "ddim / euler")
    assert line[header.index("NFE 10")] == "1.34 (2/2)"
    # A results file and a peer sweep on the same seeds: the report takes only the sweep's kd_select rows, so the
    # peer's best on the scoring draw (the "kd" rows) stays the first file's.
    meta = {"seeds_name": "held-out", "seeds": [0, 1], "command": "c", "wall_seconds": 60, "jobs": 1, "family": "wide"}
    main_file, extra = tmp_path / "named.json.gz", tmp_path / "sweep.json"
    with gzip.open(main_file, "wt") as f:
        json.dump({**meta, "rows": ours}, f)
    extra.write_text(json.dumps({**meta, "rows": sweep}))
    text = sf.report(main_file, write=False, extra=[extra])
    assert "| ddim / euler | – | 1.34 (2/2) |" in text
    assert "| vp | 10 | 2/2 (100 %) | 0.900 |" in text  # the default against lms (1.0), not dpm_2's 0.1


def test_scaled_problems_and_the_end_level_sweep_at_another_scale() -> None:
    """``--data-scale s`` multiplies the data (means × s, covariances × s²); the paired sweep of
    benchmarks/data_scale.py runs the rule and its variants on the same draws (a variant at the rule's own level
    reproduces the rule's error exactly), and leaves the fit's end-level factors as shipped."""
    from benchmarks import data_scale as ds
    from benchmarks import sampler_family as sf
    from sde_diffusion.samplers import fitted

    base, scaled = sf.family_draw("wide", 5000), sf.family_draw("wide", 5000, 0.05)
    torch.testing.assert_close(scaled.means, 0.05 * base.means)
    torch.testing.assert_close(scaled.covs, 0.0025 * base.covs)
    torch.testing.assert_close(scaled.weights, base.weights)
    assert ds.seed_range("5000-5002") == [5000, 5001, 5002] and ds.seed_range("7") == [7]
    shipped = fitted.END_FACTORS
    rows = ds.run([5002], 0.05, [20], [0.01, 0.001], fit_factors=[1 / 3, 1.0], sdes=("vp",))
    assert fitted.END_FACTORS is shipped
    (row,) = rows
    assert row["end 0.01"] == row["rule"]  # the rule stops at σ/m = 0.01 at 20 NFE
    assert row["end 0.001"] != row["rule"] and all(math.isfinite(row[k]) for k in row if k not in ("seed", "sde"))
    assert "| 20 | end 0.001 | low-D |" in ds.table(rows)
