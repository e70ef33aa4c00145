r"""Sampler benchmark: every registered sampler, judged exactly with the analytic score of
Gaussian mixtures, quality versus NFE, beside k-diffusion's samplers fed the same denoiser.

For each problem (mixture) × SDE (VP, sub-VP, VE) × sampler × NFE budget the sampler integrates
from one fixed x_T (an exact draw of the marginal p_T, the same for every sampler; ``--start prior``
uses the SDE's prior instead) with a fixed seed for its step noise, and the samples are scored
against p_0 with three metrics (see ``sde_diffusion/testing/mixture_metrics.py``): (a) moment KL, (b) sliced W2, (c) excess
cross-entropy, each beside its true-vs-true noise floor. Fixed-step samplers get the largest step
count whose NFE fits the budget; adaptive ones sweep their tolerance and report their actual NFE.
k-diffusion (optional) runs in EDM coordinates σ̃ = σ/m, x̃ = x/m on its Karras schedule from
σ̃(eps) to σ̃(T) with the exact denoiser (``benchmarks.common.EDMDenoiser``). Separately, each sampler's
own overhead per NFE is timed with a free score (s = −x/2).

Usage::

    python -m benchmarks.samplers --quick                     # < 3 min smoke run
    python -m benchmarks.samplers --jobs 2 --write            # full run → benchmarks/RESULTS.md
    python -m benchmarks.samplers --problems ring8 --sdes vp --samplers dpm_solver,pc
    python -m benchmarks.samplers --variant dpm_solver:order=3,grid=karras
    python -m benchmarks.samplers --overhead-only             # µs per NFE vs k-diffusion, ~1 min

Targets (PASS/FAIL lines, on metric (a); σ_a = the standard deviation of its noise floor):
1. at 10 and 20 NFE our best sampler is at least as good as the best k-diffusion sampler, on
   every problem × SDE (within 1 σ_a: both start from the same x_T and noise seed);
2. at ≤ 50 NFE our best sampler matches the reference PC sampler (reverse diffusion + Langevin,
   snr 0.16, one corrector step) at 1000 NFE (within 2 σ_a: a deterministic sampler and pc give
   independent sample sets, so each value carries its own σ_a of sampling noise);
3. every sampler's overhead per NFE is no larger than the median of k-diffusion's samplers of the same
   kind: deterministic fixed-step, stochastic fixed-step (they draw noise every step) or adaptive.
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from sde_diffusion import SAMPLERS, sample
from sde_diffusion.samplers import build_sampler
from sde_diffusion.testing import METRIC_LABELS, METRICS, SDE_NAMES, Problem, Truth, make_problems, make_sde, marginal_sample

from . import common
from .common import EDMDenoiser, best_time, fmt, md_table, sigma_tilde_range

HERE = Path(__file__).resolve().parent

NFE_GRID = (10, 20, 50, 100, 250, 1000)
QUICK_NFE_GRID = (10, 20, 50, 1000)
RTOL_SWEEP = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4, 1e-5)
QUICK_RTOL_SWEEP = (1e-1, 1e-2, 1e-3)

# Options the benchmark sets on top of a sampler's conf/sampler/<name>.yaml (only the ones its
# constructor accepts are used). pc is the reference of Song et al. 2021: reverse diffusion +
# Langevin, snr 0.16, one corrector step (2 NFE per step).
OVERRIDES: Dict[str, Dict[str, Any]] = {
    "pc": {"predictor": "reverse_diffusion", "corrector": "langevin", "snr": 0.16, "n_corrector_steps": 1},
}
# Extra configurations worth a row of their own (skipped when the sampler or option is missing).
VARIANTS: Tuple[Tuple[str, Dict[str, Any]], ...] = (
    ("dpm_solver", {"order": 3}),
    ("dpm_solver", {"stochastic": True}),
    ("dpm_solver", {"corrector": True}),  # UniPC, conf/sampler/unipc.yaml
    # The end time k-diffusion's runs are given (σ̃(sde.eps)): a deterministic sampler returns
    # p_eps, which for modes of std ~0.02 differs measurably from p_0 at the default eps = 1e-3.
    ("dpm_solver", {"eps": 1e-5}),
    ("dpm_solver", {"stochastic": True, "eps": 1e-5}),
)
REFERENCE = "pc"
KD_SAMPLERS = (
    "sample_euler",
    "sample_heun",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpm_2",
    "sample_lms",
    "sample_euler_ancestral",
)
# k-diffusion's adaptive solver (DPM-Solver-23, Lu et al. 2022); it sweeps rtol = atol like ours.
KD_ADAPTIVE = ("sample_dpm_adaptive",)
KD_PREFIX = "k-diffusion "
PRIOR_SEED, NOISE_SEED = 20240, 777
TARGET1_TOL, TARGET2_TOL = 1.0, 2.0  # tolerances in units of the floor's std of metric (a)
OVERHEAD_SHAPE = (1000, 16)
OVERHEAD_NFE = 200


# --------------------------------------------------------------------------------- sampler specs


@dataclass
class Spec:
    """One sampler configuration: registry name, options, and how its NFE is controlled."""

    name: str
    options: Dict[str, Any]
    label: str
    adaptive: bool = False
    kd: bool = False  # a k-diffusion sampler (name = function name)
    error: str = ""

    def build(self, **extra: Any):
        return build_sampler(self.name, **{**self.options, **extra})


def _accepted(cls: type) -> Optional[set]:
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {p for p in params if p != "self"}


def _conf_options(name: str) -> Dict[str, Any]:
    path = HERE.parent / "conf" / "sampler" / f"{name}.yaml"
    if not path.exists():
        return {}
    import yaml

    cfg = yaml.safe_load(path.read_text()) or {}
    return {k: v for k, v in cfg.items() if k not in ("name", "steps")}


def _label(name: str, options: Dict[str, Any], shown: Sequence[str]) -> str:
    extra = ",".join(f"{k}={options[k]}" for k in shown)
    return f"{name}({extra})" if extra else name


def our_specs(only: Optional[Sequence[str]], variants: Sequence[Tuple[str, Dict[str, Any]]]) -> List[Spec]:
    """Default configuration of every registered sampler (conf YAML + OVERRIDES), then VARIANTS."""
    specs: List[Spec] = []
    entries = [(n, {}, False) for n in SAMPLERS.names()] + [(n, o, True) for n, o in variants]
    for name, extra, is_variant in entries:
        if name not in SAMPLERS or (only and name not in only):
            continue
        cls = SAMPLERS.get(name)
        accepted = _accepted(cls)
        opts = {**_conf_options(name), **OVERRIDES.get(name, {})}
        if accepted is not None:
            opts = {k: v for k, v in opts.items() if k in accepted}
            if any(k not in accepted for k in extra):
                continue
        opts.update(extra)
        label = _label(name, opts, list(extra) if is_variant else [])
        spec = Spec(name, opts, label)
        try:
            inst = spec.build()
            spec.adaptive = inst.expected_nfe(1) is None
        except Exception as err:  # noqa: BLE001 - a broken sampler is reported, not fatal
            spec.error = f"{type(err).__name__}: {err}"
        specs.append(spec)
    return specs


def steps_for(spec: Spec, target: int) -> Optional[int]:
    """Largest step count whose expected NFE is ≤ target (None if even 1 step is too many)."""
    inst = spec.build()
    if inst.expected_nfe(1) > target:
        return None
    lo, hi = 1, target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if inst.expected_nfe(mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


# --------------------------------------------------------------------------------- k-diffusion

_KD: Dict[str, Any] = {}


def kdiffusion() -> Tuple[Any, str]:
    if "module" not in _KD:
        _KD["module"], _KD["status"] = common.load_kdiffusion_sampling()
    return _KD["module"], _KD["status"]


def kd_specs(only: Optional[Sequence[str]]) -> List[Spec]:
    kd, _ = kdiffusion()
    if kd is None:
        return []
    out = []
    for fn in KD_SAMPLERS + KD_ADAPTIVE:
        if only and fn not in only and (KD_PREFIX + fn) not in only and "k-diffusion" not in only:
            continue
        out.append(Spec(fn, {}, KD_PREFIX + fn, adaptive=fn in KD_ADAPTIVE, kd=True,
                        error="" if hasattr(kd, fn) else "not in this k-diffusion"))
    return out


def _kd_call(fn_name: str, denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    kd, _ = kdiffusion()
    fn = getattr(kd, fn_name)
    kwargs: Dict[str, Any] = {"disable": True}
    if "noise_sampler" in inspect.signature(fn).parameters:
        # Step noise from the run's generator, like ours (default: global RNG / Brownian tree).
        kwargs["noise_sampler"] = lambda s, s_next: torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
    return fn(denoiser, x, sigmas, **kwargs)


def _kd_adaptive_call(fn_name: str, denoiser: Callable, x: torch.Tensor, s_min: float, s_max: float, rtol: float) -> torch.Tensor:
    """k-diffusion's adaptive solver from σ̃_max to σ̃_min (deterministic: eta = 0), rtol = atol."""
    kd, _ = kdiffusion()
    return getattr(kd, fn_name)(denoiser, x, s_min, s_max, rtol=rtol, atol=rtol, disable=True)


_KD_NFE_LAW: Dict[str, Tuple[int, int]] = {}


def kd_nfe_law(fn_name: str) -> Tuple[int, int]:
    """(a, b) with NFE(n steps) = a·n + b, from counted dry runs with a free denoiser (n = 2, 3, 4)."""
    if fn_name not in _KD_NFE_LAW:
        kd, _ = kdiffusion()
        counts = []
        for n in (2, 3, 4):
            calls = [0]

            def den(x, s):
                calls[0] += 1
                return x * 0

            sig = kd.get_sigmas_karras(n, 0.01, 10.0, rho=7.0).to(torch.float64)
            _kd_call(fn_name, den, torch.ones(2, 1, dtype=torch.float64), sig, torch.Generator().manual_seed(0))
            counts.append(calls[0])
        a, b = counts[1] - counts[0], counts[0] - 2 * (counts[1] - counts[0])
        if counts[2] != 4 * a + b or a <= 0:
            raise RuntimeError(f"{fn_name}: NFE is not affine in the step count ({counts})")
        _KD_NFE_LAW[fn_name] = (a, b)
    return _KD_NFE_LAW[fn_name]


def kd_steps_for(fn_name: str, target: int) -> Optional[int]:
    a, b = kd_nfe_law(fn_name)
    n = (target - b) // a
    return int(n) if n >= 1 else None


def kd_settings(funcs: Sequence[str], budget: int, sigma_mins: Sequence[Any], eps_sigma: float) -> Iterator[Tuple[str, int, Any, float]]:
    """The peer's sweep at ``budget`` NFE: ``(function, steps, σ_min as given, σ_min)`` for every function of ``funcs``
    with at least one step in the budget and every σ_min (``"eps"`` stands for ``eps_sigma``, σ̃ at the SDE's eps)."""
    for fn in funcs:
        n = kd_steps_for(fn, budget)
        if n is None:
            continue
        for smin in sigma_mins:
            yield fn, n, smin, eps_sigma if smin == "eps" else float(smin)


# --------------------------------------------------------------------------------- runs


@dataclass
class Run:
    problem: str
    sde: str
    label: str
    kd: bool
    target: Optional[int]  # NFE budget (None for adaptive runs)
    steps: Optional[int]
    nfe: int
    wall: float
    metrics: Dict[str, float] = field(default_factory=dict)
    rtol: Optional[float] = None
    error: str = ""


# Worker globals, set before the pool forks (problems, truths, settings).
_STATE: Dict[str, Any] = {}


def _case_inputs(problem: Problem, sde_name: str):
    sde = make_sde(sde_name, problem.ve_sigma_max)
    dtype = _STATE["dtype"]
    n = _STATE["truths"][problem.name].n
    gen = torch.Generator().manual_seed(PRIOR_SEED + 1000 * list(_STATE["problems"]).index(problem.name) + SDE_NAMES.index(sde_name))
    if _STATE["start"] == "marginal":
        x_T = marginal_sample(problem.mixture, sde, n, sde.T, gen, dtype)
    else:
        x_T = sde.prior_sample((n, problem.mixture.dim), generator=gen, dtype=dtype)
    # The exact score, computed in the samples' dtype (float32 by default: the fast path).
    return sde, problem.mixture.score_fn(sde, compute_dtype=None), x_T


def run_task(task: Tuple[str, str, Spec]) -> List[Run]:
    """All NFE budgets of one sampler on one problem × SDE."""
    pname, sde_name, spec = task
    torch.set_num_threads(1)
    problem = _STATE["problems"][pname]
    truth: Truth = _STATE["truths"][pname]
    sde, score_fn, x_T = _case_inputs(problem, sde_name)
    runs: List[Run] = []

    def record(target, steps, rtol, fn):
        gen = torch.Generator().manual_seed(NOISE_SEED)
        torch.manual_seed(NOISE_SEED)
        t0 = time.perf_counter()
        try:
            x, nfe = fn(gen)
            wall = time.perf_counter() - t0
            runs.append(Run(pname, sde_name, spec.label, spec.kd, target, steps, nfe, wall, truth.evaluate(x), rtol))
        except Exception as err:  # noqa: BLE001 - keep benchmarking the others, report this one
            msg = f"{type(err).__name__}: {err}".splitlines()[0][:200]
            if _STATE.get("verbose"):
                traceback.print_exc()
            runs.append(Run(pname, sde_name, spec.label, spec.kd, target, steps, 0, time.perf_counter() - t0, {}, rtol, msg))

    if spec.error:
        return [Run(pname, sde_name, spec.label, spec.kd, None, None, 0, 0.0, {}, None, spec.error)]
    if spec.kd:
        s_min, s_max = sigma_tilde_range(sde)
        m_T = float(sde.mean_coeff(torch.tensor(sde.T, dtype=torch.float64)))
        kd, _ = kdiffusion()
        if spec.adaptive:
            # It stops at σ̃_min = σ̃(sde.eps) (no step to σ̃ = 0): x = m(eps) x̃ there.
            m_eps = float(sde.mean_coeff(torch.tensor(sde.eps, dtype=torch.float64)))
            for rtol in _STATE["rtols"]:

                def go(gen, rtol=rtol):
                    den = EDMDenoiser(sde, score_fn)
                    out = _kd_adaptive_call(spec.name, den, x_T / m_T, s_min, s_max, rtol)
                    return out * m_eps, den.nfe

                record(None, None, rtol, go)
            return runs
        for target in _STATE["nfe_grid"]:
            n = kd_steps_for(spec.name, target)
            if n is None:
                continue
            sigmas = kd.get_sigmas_karras(n, s_min, s_max, rho=7.0).to(x_T.dtype)

            def go(gen, sigmas=sigmas):
                den = EDMDenoiser(sde, score_fn)
                out = _kd_call(spec.name, den, x_T / m_T, sigmas, gen)
                return out, den.nfe  # σ̃ = 0 ⇒ t = 0, m = 1: x̃ is x

            record(target, n, None, go)
        return runs
    try:
        spec.build().validate(sde)
    except ValueError as err:
        return [Run(pname, sde_name, spec.label, False, None, None, 0, 0.0, {}, None, f"n/a: {err}")]
    shape = tuple(x_T.shape)
    if spec.adaptive:
        for rtol in _STATE["rtols"]:
            inst = spec.build(**_tol_options(spec, rtol))

            def go(gen, inst=inst):
                res = sample(sde, score_fn, shape, sampler=inst, steps=1, generator=gen, x_T=x_T.clone(), dtype=x_T.dtype)
                return res.samples, res.nfe

            record(None, None, rtol, go)
        return runs
    grid = sorted(set(_STATE["nfe_grid"]) | ({1000} if spec.label == REFERENCE else set()))
    for target in grid:
        steps = steps_for(spec, target)
        if steps is None:
            continue

        def go(gen, steps=steps):
            res = sample(sde, score_fn, shape, sampler=spec.build(), steps=steps, generator=gen, x_T=x_T.clone(), dtype=x_T.dtype)
            return res.samples, res.nfe

        record(target, steps, None, go)
    return runs


def _tol_options(spec: Spec, rtol: float) -> Dict[str, Any]:
    accepted = _accepted(SAMPLERS.get(spec.name))
    opts: Dict[str, Any] = {}
    for key in ("rtol", "atol"):
        if accepted is None or key in accepted:
            opts[key] = rtol
    return opts


# --------------------------------------------------------------------------------- overhead


@dataclass
class Overhead:
    label: str
    kd: bool
    us_per_nfe: float
    nfe: int
    kind: str = ""  # "deterministic" | "stochastic" (fixed steps) | "adaptive"
    error: str = ""
    note: str = ""


# Candidate tolerances for adaptive samplers in the overhead table (the one nearest OVERHEAD_NFE is kept).
OVERHEAD_RTOLS = tuple(10 ** (-k / 2) for k in range(4, 21))
KINDS = ("deterministic", "stochastic", "adaptive")


def _free_score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """s = −x/2: one multiply, and a probability-flow drift (−β x/4 on VP) that does not vanish,
    so adaptive solvers take real steps (with s = −x, the VP flow is 0 and they stop at once)."""
    return x * -0.5


def _free_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The same free score as k-diffusion's denoiser: D = x̃ + σ̃² m s = x̃ (1 − σ̃²/(2(1 + σ̃²)))."""
    s2 = sigma * sigma
    return x * (1 - 0.5 * s2 / (1 + s2)).reshape(-1, *([1] * (x.dim() - 1)))


def _overhead_runner(spec: Spec, sde, x_T: torch.Tensor) -> Callable[[Any, int], Tuple[torch.Tensor, int]]:
    """run(param, seed) → (samples, NFE); param is the step count (fixed) or rtol (adaptive)."""
    shape = tuple(x_T.shape)
    s_min, s_max = sigma_tilde_range(sde)
    kd = kdiffusion()[0] if spec.kd else None

    def run(param: Any, seed: int) -> Tuple[torch.Tensor, int]:
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # a sampler drawing from the global RNG is then seen as stochastic too
        if spec.kd:
            calls = [0]

            def den(x, sigma):
                calls[0] += 1
                return _free_denoiser(x, sigma)

            if spec.adaptive:
                out = _kd_adaptive_call(spec.name, den, x_T, s_min, s_max, param)
            else:
                out = _kd_call(spec.name, den, x_T, kd.get_sigmas_karras(param, s_min, s_max, rho=7.0), gen)
            return out, calls[0]
        inst = spec.build(**_tol_options(spec, param)) if spec.adaptive else spec.build()
        res = sample(sde, _free_score, shape, sampler=inst, steps=1 if spec.adaptive else param, generator=gen, x_T=x_T)
        return res.samples, res.nfe

    return run


def _scipy_own_cost(rtol: float, x_T: torch.Tensor, repeats: int) -> Tuple[float, int]:
    """µs/NFE of scipy's RK45 alone on the same flow with a numpy right-hand side (no torch)."""
    from scipy.integrate import RK45

    from sde_diffusion import VPSDE

    sde = VPSDE()
    b0, db = sde.beta_min, sde.beta_max - sde.beta_min
    y0 = x_T.double().numpy().reshape(-1).copy()
    nfe = [0]

    def go():
        solver = RK45(lambda t, y: (-0.25 * (b0 + db * t)) * y, sde.T, y0, sde.sampling_eps, rtol=rtol, atol=rtol)
        while solver.status == "running":
            solver.step()
        nfe[0] = solver.nfev

    wall = best_time(go, repeats)
    return wall / max(nfe[0], 1) * 1e6, nfe[0]


def measure_overhead(spec: Spec, repeats: int = 3) -> Overhead:
    """Wall time per NFE of one sampler with a free score (VP, fixed batch, ~OVERHEAD_NFE NFE).

    Fixed-step samplers take the step count whose NFE fits OVERHEAD_NFE; adaptive ones the rtol
    (= atol) of OVERHEAD_RTOLS whose NFE is nearest to it. The kind (deterministic or stochastic)
    is observed, not declared: two runs with different seeds give equal samples or not.
    """
    torch.set_num_threads(1)
    from sde_diffusion import VPSDE

    sde = VPSDE()
    x_T = torch.randn(OVERHEAD_SHAPE, generator=torch.Generator().manual_seed(0))
    try:
        if spec.error:
            raise RuntimeError(spec.error)
        run = _overhead_runner(spec, sde, x_T)
        note = ""
        if spec.adaptive:
            kind = "adaptive"
            best_param, best_gap = None, math.inf
            for rtol in OVERHEAD_RTOLS:
                n = run(rtol, 1)[1]
                if abs(n - OVERHEAD_NFE) < best_gap:
                    best_param, best_gap = rtol, abs(n - OVERHEAD_NFE)
                if n > 2 * OVERHEAD_NFE:
                    break
            param = best_param
            note = f"rtol = atol = {param:.0e}"
        else:
            param = kd_steps_for(spec.name, OVERHEAD_NFE) if spec.kd else steps_for(spec, OVERHEAD_NFE)
            probe = 3 if spec.kd else 2
            kind = "deterministic" if torch.equal(run(probe, 1)[0], run(probe, 2)[0]) else "stochastic"
        nfe = [0]

        def go():
            nfe[0] = run(param, 1)[1]

        wall = best_time(go, repeats)
        if not spec.kd and spec.name == "ode_scipy" and spec.options.get("method", "RK45") == "RK45":
            own, own_nfe = _scipy_own_cost(param, x_T, repeats)
            note += f"; scipy's RK45 alone (numpy right-hand side): {own:.0f} µs/NFE ({own_nfe} NFE)"
        return Overhead(spec.label, spec.kd, wall / max(nfe[0], 1) * 1e6, nfe[0], kind, note=note)
    except Exception as err:  # noqa: BLE001
        return Overhead(spec.label, spec.kd, math.nan, 0, error=f"{type(err).__name__}: {err}"[:200])


def kd_medians(overheads: List[Overhead]) -> Dict[str, float]:
    """Median µs/NFE of k-diffusion's samplers per kind, and over all of them ("all")."""
    out: Dict[str, float] = {}
    for kind in KINDS + ("all",):
        vals = [o.us_per_nfe for o in overheads if o.kd and math.isfinite(o.us_per_nfe) and kind in ("all", o.kind)]
        if vals:
            out[kind] = statistics.median(vals)
    return out


def overhead_peer(o: Overhead, medians: Dict[str, float]) -> Tuple[str, float]:
    """What a sampler's overhead is judged against: k-diffusion's median of the same kind (a
    stochastic step draws noise and an adaptive one estimates its error, which a deterministic
    fixed step does neither of), or the median of all when k-diffusion has none of that kind."""
    if o.kind in medians:
        return o.kind, medians[o.kind]
    return "all", medians.get("all", math.nan)


def overhead_table(overheads: List[Overhead]) -> str:
    """Markdown table of µs/NFE with the ratio to k-diffusion's median of the same kind and of all."""
    med = kd_medians(overheads)
    rows = []
    for o in overheads:
        ok = math.isfinite(o.us_per_nfe)
        kind, peer = overhead_peer(o, med)
        same = f"{o.us_per_nfe / peer:.2f}" if ok and math.isfinite(peer) else "—"
        every = f"{o.us_per_nfe / med['all']:.2f}" if ok and "all" in med else "—"
        rows.append([o.label, o.kind or "—", f"{o.us_per_nfe:.0f}" if ok else "—", same, every, str(o.nfe),
                     (o.error or o.note.lstrip("; "))[:160]])
    meds = ", ".join(f"{k} {v:.0f}" for k, v in med.items())
    head = (f"Free score s = −x/2 on VP, batch {OVERHEAD_SHAPE}, ~{OVERHEAD_NFE} NFE, best of the repeats, 1 thread. "
            f"k-diffusion medians (µs/NFE): {meds or 'n/a'}.\n\n")
    return head + md_table(["sampler", "kind", "µs / NFE", "÷ k-diff same kind", "÷ k-diff all", "NFE", "note"], rows)


# --------------------------------------------------------------------------------- report


def _buckets(runs: List[Run], grid: Sequence[int]) -> Dict[int, Run]:
    """Runs by NFE column: fixed-step runs by their budget; adaptive runs in the smallest budget
    ≥ their actual NFE (the largest-NFE run of each bucket, i.e. the closest to the budget)."""
    out: Dict[int, Run] = {}
    for r in runs:
        if r.error:
            continue
        if r.target is not None:
            out[r.target] = r
            continue
        col = next((g for g in grid if r.nfe <= g), None)
        if col is not None and (col not in out or r.nfe > out[col].nfe):
            out[col] = r
    return out


def best_within(runs: List[Run], budget: int, kd: bool, metric: str = "mkl") -> Optional[Run]:
    """The best run (lowest metric) among ``kd`` (k-diffusion or ours) runs with NFE ≤ budget."""
    cands = [r for r in runs if r.kd == kd and not r.error and r.nfe <= budget and metric in r.metrics]
    return min(cands, key=lambda r: r.metrics[metric]) if cands else None


def reference_run(runs: List[Run]) -> Optional[Run]:
    for r in runs:
        if r.label == REFERENCE and r.target == 1000 and not r.error:
            return r
    return None


def _cell(r: Optional[Run], metric: str, target: int, best: float) -> str:
    if r is None or metric not in r.metrics:
        return "–"
    v = r.metrics[metric]
    s = fmt(v)
    if metric != "xent" and math.isfinite(v) and v <= best:
        s = f"**{s}**"
    if r.nfe != target:
        s += f" ({r.nfe})"
    return s


def case_table(runs: List[Run], labels: List[str], metric: str, grid: Sequence[int]) -> str:
    by_label: Dict[str, List[Run]] = {}
    for r in runs:
        by_label.setdefault(r.label, []).append(r)
    cols = {g: [] for g in grid}
    bucketed = {lab: _buckets(by_label.get(lab, []), grid) for lab in labels}
    for lab in labels:
        for g, r in bucketed[lab].items():
            if metric in r.metrics and g in cols:
                cols[g].append(r.metrics[metric])
    best = {g: min(v) if v else math.inf for g, v in cols.items()}
    rows = []
    for lab in labels:
        rs = by_label.get(lab, [])
        errs = sorted({r.error for r in rs if r.error})
        cells = [_cell(bucketed[lab].get(g), metric, g, best[g]) for g in grid]
        wall = sum(r.wall for r in rs if not r.error)
        note = "; ".join(e[:90] for e in errs)
        rows.append([lab] + cells + [f"{wall:.1f}", note])
    return md_table(["sampler"] + [f"NFE {g}" for g in grid] + ["wall s", "note"], rows)


def targets(runs: List[Run], truths: Dict[str, Truth], cases: List[Tuple[str, str]], overheads: List[Overhead], has_kd: bool) -> Tuple[List[str], Dict[str, bool]]:
    lines: List[str] = []
    verdict: Dict[str, bool] = {}
    # 1. ours vs k-diffusion at 10 and 20 NFE
    t1: List[bool] = []
    for budget in (10, 20):
        for p, s in cases:
            rs = [r for r in runs if r.problem == p and r.sde == s]
            tol = TARGET1_TOL * truths[p].floor["mkl"][1]
            ours, theirs = best_within(rs, budget, False), best_within(rs, budget, True)
            if not has_kd:
                continue
            if ours is None or theirs is None:
                lines.append(f"FAIL target1 {p}/{s} @{budget} NFE: no run (ours={ours and ours.label}, k-diffusion={theirs and theirs.label})")
                t1.append(False)
                continue
            ok = ours.metrics["mkl"] <= theirs.metrics["mkl"] + tol
            t1.append(ok)
            lines.append(
                f"{'PASS' if ok else 'FAIL'} target1 {p}/{s} @{budget} NFE: ours {fmt(ours.metrics['mkl'])} ({ours.label}, {ours.nfe}) "
                f"vs k-diffusion {fmt(theirs.metrics['mkl'])} ({theirs.label[len(KD_PREFIX):]}, {theirs.nfe}); tol {fmt(tol)}"
            )
    verdict["1: best ours ≤ best k-diffusion at 10 and 20 NFE"] = bool(t1) and all(t1) if has_kd else None  # type: ignore[assignment]
    # 2. ours at ≤ 50 NFE vs reference PC at 1000 NFE
    t2: List[bool] = []
    for p, s in cases:
        rs = [r for r in runs if r.problem == p and r.sde == s]
        ref = reference_run(rs)
        ours = best_within(rs, 50, False)
        tol = TARGET2_TOL * truths[p].floor["mkl"][1]
        if ref is None or ours is None:
            lines.append(f"FAIL target2 {p}/{s}: no run (reference pc@1000={ref is not None}, ours≤50={ours is not None})")
            t2.append(False)
            continue
        ok = ours.metrics["mkl"] <= ref.metrics["mkl"] + tol
        t2.append(ok)
        lines.append(
            f"{'PASS' if ok else 'FAIL'} target2 {p}/{s}: ours ≤50 NFE {fmt(ours.metrics['mkl'])} ({ours.label}, {ours.nfe}) "
            f"vs pc@1000 {fmt(ref.metrics['mkl'])}; tol {fmt(tol)}"
        )
    verdict["2: best ours at ≤ 50 NFE matches pc at 1000 NFE"] = bool(t2) and all(t2)
    # 3. overhead per NFE vs k-diffusion's median of the same kind
    med = kd_medians(overheads)
    key = "3: overhead per NFE ≤ k-diffusion's median (same kind)"
    if med:
        t3 = []
        for o in overheads:
            if o.kd:
                continue
            kind, peer = overhead_peer(o, med)
            ok = math.isfinite(o.us_per_nfe) and o.us_per_nfe <= peer
            t3.append(ok)
            lines.append(f"{'PASS' if ok else 'FAIL'} target3 {o.label} ({o.kind or 'n/a'}): {o.us_per_nfe:.0f} µs/NFE "
                         f"vs k-diffusion median ({kind}) {peer:.0f} µs/NFE")
        verdict[key] = bool(t3) and all(t3)
    else:
        verdict[key] = None  # type: ignore[assignment]
    return lines, verdict


def render(args, runs: List[Run], truths: Dict[str, Truth], cases: List[Tuple[str, str]], specs: List[Spec], overheads: List[Overhead], kd_status: str, elapsed: float) -> str:
    grid = sorted(set(args.nfe_grid) | {1000})  # pc@1000, the reference, always runs
    out: List[str] = ["## Samplers", ""]
    out.append(f"Command: `{args.command}`  ")
    out.append(
        f"Run {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}: {elapsed / 60:.1f} min wall, {args.cpu_seconds / 60:.1f} min CPU, "
        f"{os.cpu_count()} cores ({args.jobs} worker{'s' if args.jobs > 1 else ''}), torch {torch.__version__}, Python {platform.python_version()}, "
        f"dtype {args.dtype}, x_T from the {'exact marginal p_T' if args.start == 'marginal' else 'prior'}; "
        f"seeds: x_T {PRIOR_SEED}+case, step noise {NOISE_SEED}.  "
    )
    out.append(f"k-diffusion: {kd_status}.")
    if getattr(args, "resumed", 0):
        out.append("")
        out.append(f"**Resumed**: {args.resumed} sampler × case tasks (their runs, wall times included) come from the checkpoint "
                   "of an earlier run with the same options; the times above are this run's only. The overhead table is "
                   "always measured in this run.")
    if getattr(args, "partial", 0):
        out.append("")
        out.append(f"**Partial run**: {args.partial} sampler × case tasks did not run (stopped by `--deadline`); their cells are "
                   "empty and the targets cover only what ran.")
    out.append("")
    out.append(
        "Metrics against p_0 (see `sde_diffusion/testing/mixture_metrics.py`): **(a)** moment KL = KL(w‖ŵ) + Σ_k w_k KL(N(μ̂_k, Σ̂_k) ‖ N(μ_k, Σ_k)) "
        "with samples assigned to modes by their posterior under p_0 (nats; unbiased for true samples, → ∞ for collapsed modes); "
        "**(b)** sliced W2 (256 directions, vs true quantiles); **(c)** excess cross-entropy E[−log p_0] − H(p_0) "
        "(negative when samples crowd the modes, so never read alone). Floors: the same metrics for true samples of the same size "
        "(mean ± std over 10 draws). Fixed-step samplers run the largest step count that fits each NFE budget (actual NFE in "
        "parentheses when it differs); adaptive ones sweep rtol = atol over "
        f"{', '.join(f'{r:g}' for r in args.rtols)} and sit in the smallest column ≥ their actual NFE. Bold: best of the column. "
        "k-diffusion runs on its Karras schedule (ρ = 7) from σ̃(eps) to σ̃(T) and a last step to σ̃ = 0, NFE = its denoiser calls."
    )
    out.append("")
    lines, verdict = targets(runs, truths, cases, overheads, any(s.kd for s in specs))
    out.append("### Targets")
    out.append("")
    out.append(
        f"Judged on metric (a) per problem × SDE, σ_a = std of its floor: (1) tolerance {TARGET1_TOL:g} σ_a (paired: same x_T "
        f"and noise seed); (2) tolerance {TARGET2_TOL:g} σ_a (independent realizations); (3) each of our samplers vs the median "
        "of k-diffusion's overheads for samplers of its kind (see the overhead table). \"Ours\" includes the extra configurations (rows with options)."
    )
    out.append("")
    for k, v in verdict.items():
        out.append(f"- {'PASS' if v else ('n/a' if v is None else 'FAIL')} — target {k}")
    out.append("")
    fails = [l for l in lines if l.startswith("FAIL")]
    if fails:
        out.append("Failing cases:")
        out.append("")
        out += [f"    {l}" for l in fails]
        out.append("")
    out.append("<details><summary>All target lines</summary>")
    out.append("")
    out += [f"    {l}" for l in lines]
    out.append("")
    out.append("</details>")
    out.append("")
    # summary
    out.append("### Summary (metric (a); best sampler in parentheses)")
    out.append("")
    rows = []
    for p, s in cases:
        rs = [r for r in runs if r.problem == p and r.sde == s]
        fl = truths[p].floor["mkl"]
        row = [f"{p}/{s}", f"{fmt(fl[0])} ± {fmt(fl[1])}"]
        for budget in (10, 20):
            for kdflag in (False, True):
                b = best_within(rs, budget, kdflag)
                row.append(f"{fmt(b.metrics['mkl'])} ({b.label.replace(KD_PREFIX, '')})" if b else "–")
        b = best_within(rs, 50, False)
        row.append(f"{fmt(b.metrics['mkl'])} ({b.label}, {b.nfe})" if b else "–")
        ref = reference_run(rs)
        row.append(fmt(ref.metrics["mkl"]) if ref else "–")
        rows.append(row)
    out.append(md_table(["case", "floor", "ours @10", "k-diff @10", "ours @20", "k-diff @20", "ours ≤50", "pc @1000"], rows))
    out.append("")
    # overhead
    out.append("### Overhead per NFE")
    out.append("")
    out.append(overhead_table(overheads))
    out.append("")
    # per case tables
    labels = [s.label for s in specs]
    for pname in dict.fromkeys(p for p, _ in cases):
        tr = truths[pname]
        prob = _STATE["problems"][pname]
        out.append(f"### {pname}: {prob.description}")
        out.append("")
        out.append(
            f"n = {tr.n}; floors: " + ", ".join(f"{m} {fmt(tr.floor[m][0])} ± {fmt(tr.floor[m][1])}" for m in METRICS)
            + f"; H(p_0) = {tr.entropy:.3f} ± {tr.entropy_se:.3f} nats; VE σ_max = {prob.ve_sigma_max:g}."
        )
        out.append("")
        for s in [s for p, s in cases if p == pname]:
            rs = [r for r in runs if r.problem == pname and r.sde == s]
            out.append(f"#### {pname} / {s} — (a) moment KL [nats]")
            out.append("")
            out.append(case_table(rs, labels, "mkl", grid))
            out.append("")
            for metric in ("sw2", "xent"):
                out.append(f"<details><summary>{pname} / {s} — {METRIC_LABELS[metric]}</summary>")
                out.append("")
                out.append(case_table(rs, labels, metric, grid))
                out.append("")
                out.append("</details>")
                out.append("")
    return "\n".join(out).rstrip() + "\n"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sample sizes, NFE {10, 20, 50, 1000}, problems ring8 and gmm16, "
                    "SDEs vp and ve, no extra variants (< 3 min)")
    ap.add_argument("--problems", default=None, help="comma list (default: all; quick: ring8,gmm16)")
    ap.add_argument("--sdes", default=None, help="comma list of vp,subvp,ve (default: all; quick: vp,ve)")
    ap.add_argument("--samplers", default=None, help="comma list of registered names / k-diffusion function names (default: all)")
    ap.add_argument("--variant", action="append", default=[], help="extra configuration name:key=val,key=val (repeatable)")
    ap.add_argument("--no-variants", action="store_true", help="skip the built-in extra configurations")
    ap.add_argument("--no-kdiffusion", action="store_true")
    ap.add_argument("--n", type=int, default=None, help="override the sample size of every problem")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--start", choices=("marginal", "prior"), default="marginal", help="x_T from the exact p_T or the SDE prior")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes, 1 thread each (default 2)")
    ap.add_argument("--write", nargs="?", const=str(HERE / "RESULTS.md"), default=None, help="write the section into RESULTS.md")
    ap.add_argument("--json", default=None, help="also dump all runs as JSON here")
    ap.add_argument("--nfe", default=None, help="comma list of NFE budgets (default 10,20,50,100,250,1000); pc always also runs at 1000")
    ap.add_argument("--rtols", default=None, help="comma list of rtol = atol for adaptive samplers")
    ap.add_argument("--checkpoint", default=None, help="append every finished task to this JSON-lines file")
    ap.add_argument("--resume", action="store_true", help="with --checkpoint: keep the tasks that file already holds "
                    "(same problems, SDEs and labels) and run only the others; use the same options as the run that wrote it")
    ap.add_argument("--deadline", type=float, default=None, help="stop launching tasks after this many minutes; report what finished")
    ap.add_argument("--overhead-only", action="store_true", help="only time each sampler's overhead per NFE (free score) and "
                    "print that table with the ratio to k-diffusion's median (~1 min); --samplers and variants apply")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per sampler in the overhead table (best is kept)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    args.command = "python -m benchmarks.samplers " + " ".join(argv if argv is not None else sys.argv[1:])
    return args


def _parse_variant(text: str) -> Tuple[str, Dict[str, Any]]:
    import yaml

    if ":" not in text:
        raise ValueError(f"--variant needs name:key=val[,key=val], got {text!r}")
    name, rest = text.split(":", 1)
    opts = {}
    for kv in filter(None, rest.split(",")):
        k, v = kv.split("=", 1)
        opts[k] = yaml.safe_load(v)
    return name, opts


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    common.set_malloc()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    problems = make_problems()
    sel_p = args.problems.split(",") if args.problems else (["ring8", "gmm16"] if args.quick else list(problems))
    sel_s = args.sdes.split(",") if args.sdes else (["vp", "ve"] if args.quick else list(SDE_NAMES))
    for p in sel_p:
        if p not in problems:
            raise SystemExit(f"unknown problem {p!r}; choose from {', '.join(problems)}")
    for s in sel_s:
        if s not in SDE_NAMES:
            raise SystemExit(f"unknown SDE {s!r}; choose from {', '.join(SDE_NAMES)}")
    args.nfe_grid = tuple(int(v) for v in args.nfe.split(",")) if args.nfe else (QUICK_NFE_GRID if args.quick else NFE_GRID)
    args.rtols = tuple(float(v) for v in args.rtols.split(",")) if args.rtols else (QUICK_RTOL_SWEEP if args.quick else RTOL_SWEEP)
    only = args.samplers.split(",") if args.samplers else None
    variants = ([] if args.no_variants or args.quick else list(VARIANTS)) + [_parse_variant(v) for v in args.variant]
    specs = our_specs(only, variants)
    kd_status = "disabled (--no-kdiffusion)"
    if not args.no_kdiffusion:
        _, kd_status = kdiffusion()
        specs += kd_specs(only)
    if not specs:
        raise SystemExit("no sampler selected")
    print(f"samplers: {', '.join(s.label for s in specs)}", file=sys.stderr)
    print(f"k-diffusion: {kd_status}", file=sys.stderr)
    if args.overhead_only:
        print(overhead_table([measure_overhead(spec, args.repeats) for spec in specs]))
        return 0

    truths: Dict[str, Truth] = {}
    for p in sel_p:
        prob = problems[p]
        n = args.n or (prob.n_quick if args.quick else prob.n_full)
        truths[p] = Truth.build(prob.mixture, n, entropy_n=20_000 if args.quick else 100_000, ref_factor=10 if args.quick else 20)
        print(f"{p}: n={n}, floors " + ", ".join(f"{k}={fmt(a)}±{fmt(b)}" for k, (a, b) in truths[p].floor.items()), file=sys.stderr)
    _STATE.update(problems={p: problems[p] for p in sel_p}, truths=truths, dtype=getattr(torch, args.dtype), start=args.start,
                  nfe_grid=args.nfe_grid, rtols=args.rtols, verbose=args.verbose)
    cases = [(p, s) for p in sel_p for s in sel_s]
    # Cheap problems first: with --deadline, the cases that do finish are complete.
    cost = {p: truths[p].n * problems[p].mixture.num_components * problems[p].mixture.dim ** 2 for p in sel_p}
    tasks = sorted(((p, s, spec) for p, s in cases for spec in specs), key=lambda t: cost[t[0]])
    runs = execute(tasks, args, t_start)
    args.partial = len(tasks) - len({(r.problem, r.sde, r.label) for r in runs})
    overheads = [measure_overhead(spec) for spec in specs]
    elapsed = time.perf_counter() - t_start
    args.cpu_seconds = sum(
        resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    report = render(args, runs, truths, cases, specs, overheads, kd_status, elapsed)
    print(report)
    if args.write:
        common.write_results_section(Path(args.write), "## Samplers", report)
        print(f"wrote the Samplers section of {args.write}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": [asdict(r) for r in runs], "overheads": [asdict(o) for o in overheads]}, indent=1))
    return 0


def execute(tasks: List[Tuple[str, str, Spec]], args: argparse.Namespace, t_start: float) -> List[Run]:
    """Run the tasks (in worker processes when ``--jobs`` > 1), append each finished one to
    ``--checkpoint`` (JSON lines), and launch no new task once ``--deadline`` minutes have passed."""
    runs: List[Run] = []
    deadline = t_start + 60 * args.deadline if args.deadline else math.inf
    if args.checkpoint and args.resume and Path(args.checkpoint).exists():
        kept = load_checkpoint(Path(args.checkpoint), tasks)
        runs.extend(kept)
        finished = {(r.problem, r.sde, r.label) for r in kept}
        tasks = [t for t in tasks if (t[0], t[1], t[2].label) not in finished]
        args.resumed = len(finished)
        print(f"resumed {len(finished)} finished tasks from {args.checkpoint}; {len(tasks)} to run", file=sys.stderr)
    elif args.checkpoint:
        Path(args.checkpoint).write_text("")

    def finish(res: List[Run], done: int) -> None:
        runs.extend(res)
        if args.checkpoint and res:
            with open(args.checkpoint, "a") as fh:
                fh.write(json.dumps([asdict(r) for r in res]) + "\n")
        _progress(done, len(tasks), res, t_start)

    if args.jobs <= 1:
        for done, task in enumerate(tasks, 1):
            if time.perf_counter() >= deadline:
                break
            finish(run_task(task), done)
        return runs
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, wait

    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("fork")) as pool:
        queue, running, done = list(tasks), set(), 0
        while queue or running:
            while queue and len(running) < args.jobs and time.perf_counter() < deadline:
                running.add(pool.submit(run_task, queue.pop(0)))
            if not running:
                break
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                done += 1
                finish(fut.result(), done)
    return runs


def load_checkpoint(path: Path, tasks: List[Tuple[str, str, Spec]]) -> List[Run]:
    """The runs of ``path`` (JSON lines written by :func:`execute`) that belong to ``tasks``.

    A truncated last line (a run killed while writing) is ignored: that task runs again.
    """
    wanted = {(p, s, spec.label) for p, s, spec in tasks}
    runs: List[Run] = []
    for line in path.read_text().splitlines():
        try:
            rows = json.loads(line)
        except json.JSONDecodeError:
            continue
        runs += [Run(**row) for row in rows if (row["problem"], row["sde"], row["label"]) in wanted]
    return runs


def _progress(done: int, total: int, res: List[Run], t0: float) -> None:
    if not res:
        return
    r = res[0]
    errs = [x.error for x in res if x.error]
    print(
        f"[{done}/{total} {time.perf_counter() - t0:6.0f}s] {r.problem}/{r.sde} {r.label}: "
        + " ".join(f"{x.nfe}:{fmt(x.metrics.get('mkl', math.nan))}" for x in res if not x.error)
        + (f" ERR {errs[0][:80]}" if errs else ""),
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
