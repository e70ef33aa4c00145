r"""The default sampler: the configuration measured best for an SDE family and an NFE budget.

``sample(sde, score_fn, shape, steps=N)`` with no ``sampler`` (and ``python sample.py steps=N``
with no ``sampler=``) calls :func:`default_sampler`, which maps (family of ``sde``, N, kind of
score) to one configuration through a fixed table: :data:`RULES` for an exact (analytic) score,
:data:`LEARNED_RULES` for a trained network (``sample.py`` always; ``sample()`` when the score is or
wraps an ``nn.Module``, see :func:`is_learned_score`). It is a documented rule, not a per-problem
search: it reads nothing but the SDE's family, the budget and whether the score is learned — and,
where a rule stops at a noise level the process cannot reach, adds the final denoising step
(:func:`reach_end`).

* family: ``"ve"`` when the process keeps the signal (m(T) = 1: VE), ``"subvp"`` for sub-VP,
  ``"vp"`` for any other process that scales the signal away (VP, cosine VP, a decaying
  ``LinearSDE``);
* budget N = score evaluations (NFE). The configuration spends exactly N: its step count is N
  minus the final denoising step when it takes one.

The table was chosen on the tuning seeds of ``benchmarks/sampler_family.py`` (random exact-score
mixtures, 2–256 dimensions) by the geometric-mean ratio of the error to the best k-diffusion
setting, and checked on held-out seeds (benchmarks/RESULTS.md, "Random family").

Example::

    choice = default_sampler(VPSDE(), 10)
    choice.name, choice.options, choice.steps   # ('dpm_solver', {'order': 2, 'corrector': True, ...}, 10)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import torch

from ..sdes.sde import SDE

FAMILIES = ("vp", "subvp", "ve")


@dataclass(frozen=True)
class Rule:
    """Use ``sampler`` with ``options`` for budgets ``nfe >= min_nfe`` (the rule with the largest
    ``min_nfe`` not above the budget applies)."""

    min_nfe: int
    sampler: str
    options: Dict[str, Any] = field(default_factory=dict)


def _unipc(order: int, end_sigma: float, final_order: int = 0) -> Dict[str, Any]:
    """UniPC on the log-SNR grid to ``end_sigma``; ``final_order`` > 0 adds the final step to σ̃ = 0 of that order."""
    out: Dict[str, Any] = {"order": order, "corrector": True, "grid": "logsnr", "end_sigma": end_sigma}
    if final_order:
        out.update(denoise=True, denoise_order=final_order)
    return out


# Measured on the tuning seeds (benchmarks/RESULTS.md, "Random family", and re-derived on the wider family's
# tuning seeds, "Wider family: tuning seeds"): the same configurations won on VP, sub-VP and VE once the end
# point is a noise level σ/m rather than a time. UniPC (DPM-Solver++ with the UniC corrector) on a uniform
# log-SNR grid; the fewer the steps, the higher the noise level to stop at (a step spent below σ/m ≈ 0.01 at
# 5–10 NFE is a step missing where the modes separate). The order schedule: order 2 up to 17 NFE (at 15 NFE
# order 3 is 5 % worse on the wider family), order 3 from 18 (a tie at 20, 1 % better at 30 and 50).
# From 13 NFE the run stops at σ/m = 0.01 and takes a final step of order 3 to σ̃ = 0 (round 6, "Final step to
# σ̃ = 0"): it follows the ODE's flow below 0.01 by extrapolating the noise prediction, as k-diffusion's LMS does
# from its σ_min, where the run to σ/m = 0.003 spent more steps there (low-D geometric-mean ratio to the peer
# 0.59 against 0.68 at 15 NFE, 0.76 against 0.82 at 20; ties at 30 and 50 and high-D). Below 13 NFE the step it
# costs is worth more (0.59 against 0.36 at 10 NFE).
# From 40 NFE the run stops at σ/m = 0.001: the levels above are absolute, and data whose finest structure lies
# below them (the same problems with their data × 0.05) lost 8–28× to the peer at 50 NFE; stopping at 0.001 cut the
# error 5.7× (low-D) and 16× (high-D) there at 40 NFE, for 1–3 % more at scales 1 and 20 (RESULTS.md, "Data at
# another scale"). Below 40 NFE the lower level costs 2–15 % at scale 1, and `schedule=fit` finds the level per problem.
_SHARED: Tuple[Rule, ...] = (
    Rule(1, "dpm_solver", _unipc(2, 0.03)),
    Rule(8, "dpm_solver", _unipc(2, 0.01)),
    Rule(13, "dpm_solver", _unipc(2, 0.01, final_order=3)),
    Rule(18, "dpm_solver", _unipc(3, 0.01, final_order=3)),
    Rule(40, "dpm_solver", _unipc(3, 0.001, final_order=3)),
)
RULES: Dict[str, Tuple[Rule, ...]] = {"vp": _SHARED, "subvp": _SHARED, "ve": _SHARED}

# For a trained network. Measured on the demo's networks (benchmarks/RESULTS.md, "Trained models" and
# "Learned-score rule per budget"): the probability-flow ODE of a learned score can be poor whatever the solver
# (on the moons model every deterministic solver, converged or not, puts ~1.5 % of samples far outside the
# data), while the stochastic DPM-Solver++(2M) SDE — whose injected noise corrects errors of the score, as in
# EDM's stochastic sampler — matched Euler–Maruyama at 200 NFE from 20 NFE on. Its end point depends on the
# budget: at 5 NFE, ending at the network's eps (σ/m ≈ 0.003 on the demo's VP) wastes the last step where the
# score is worst (digits-FD 210 at 5 NFE); stopping at σ/m = 0.03 gives 14, and is the best or tied at 10 NFE
# too. A final denoising step does not pay below 15 NFE: the step it costs is worth more (at 5 NFE, four steps
# and a denoising step leave the stochastic multistep solver unstable on the demo's digits). From 15 NFE,
# σ/m = 0.01 with the denoising step ties the rest.
_LEARNED: Tuple[Rule, ...] = (
    Rule(1, "dpm_solver", {"order": 2, "stochastic": True, "end_sigma": 0.03}),
    Rule(15, "dpm_solver", {"order": 2, "stochastic": True, "end_sigma": 0.01, "denoise": True}),
)
LEARNED_RULES: Dict[str, Tuple[Rule, ...]] = {"vp": _LEARNED, "subvp": _LEARNED, "ve": _LEARNED}
SCORE_KINDS = ("exact", "learned")


def is_learned_score(score_fn: Any, depth: int = 4) -> bool:
    """Whether ``score_fn`` is (or wraps) a trained network: an ``nn.Module``, found directly, in a
    wrapper's ``score_fn`` / ``cond_score`` / ``score`` attribute, or in a closure (``lambda x, t:
    model(x, t, y=y)``), up to ``depth`` levels."""
    if isinstance(score_fn, torch.nn.Module):
        return True
    if depth <= 0 or score_fn is None:
        return False
    inner = [getattr(score_fn, name, None) for name in ("score_fn", "cond_score", "score")]
    inner += [c.cell_contents for c in (getattr(score_fn, "__closure__", None) or ()) if _filled(c)]
    return any(is_learned_score(f, depth - 1) for f in inner if callable(f) and f is not score_fn)


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class DefaultChoice:
    """What the rule picked: registry ``name``, constructor ``options``, ``steps`` for the budget,
    the ``family`` and ``nfe`` it was picked for."""

    name: str
    options: Dict[str, Any]
    steps: int
    family: str
    nfe: int
    score: str = "exact"

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return (f"{self.name}({opts}) with {self.steps} steps = {self.nfe} NFE "
                f"(default for {self.family} SDEs, {self.score} score)")

    def as_dict(self) -> Dict[str, Any]:
        table = "RULES" if self.score == "exact" else "LEARNED_RULES"
        return {"sampler": self.name, "options": dict(self.options), "steps": self.steps, "family": self.family,
                "nfe": self.nfe, "score": self.score, "rule": f"sde_diffusion.samplers.defaults.{table}"}


def sde_family(sde: SDE) -> str:
    """``"ve"`` if m(T) = 1, ``"subvp"`` for :class:`~sde_diffusion.sdes.SubVPSDE`, else ``"vp"``."""
    from ..sdes import SubVPSDE

    m_T = float(sde.mean_coeff(torch.tensor(sde.T, dtype=torch.float64)))
    if m_T >= 1.0 - 1e-9:
        return "ve"
    return "subvp" if isinstance(sde, SubVPSDE) else "vp"


#: A rule that stops at a noise level σ/m (``end_sigma``) below the lowest one the process reaches, σ̃(eps), stops
#: at eps instead, with noise σ̃(eps) left in the samples. Where that is more than ``UNREACHABLE_END`` times the
#: rule's level, the final Tweedie step (``denoise``) is added: on the wider family's tuning seeds 2000–2007, with a
#: constant-β LinearSDE (σ̃(eps) = 0.009) and VE with ``exact_kernel=False`` (σ̃(eps) = σ_min = 0.01), a rule ending
#: at σ/m = 0.003 (3× below) did better with the step in 29 of 32 cases at 20 and 30 NFE (error over the floor
#: 3.12 → 1.45 at most), while a rule ending at 0.01 (reached or 1.1× below) did worse with it (the step it costs
#: was worth more). The library's VP, sub-VP and VE (exact kernel) reach every level of the rules.
UNREACHABLE_END = 2.0


def lowest_noise_level(sde: SDE) -> float:
    """σ̃(eps) = σ(eps)/m(eps): the lowest noise level a sampler on ``sde`` can stop at (its end time is ≥ eps)."""
    eps = torch.tensor(float(sde.eps), dtype=torch.float64)
    return float(sde.marginal_std(eps) / sde.mean_coeff(eps))


def reach_end(sde: SDE, options: Dict[str, Any]) -> Dict[str, Any]:
    """``options`` with ``denoise=True`` where they stop at an ``end_sigma`` the process cannot reach by more than
    :data:`UNREACHABLE_END` (see there); unchanged otherwise, and where ``denoise`` is already set to True."""
    end_sigma = options.get("end_sigma")
    if end_sigma is None or options.get("denoise") is True:
        return options
    if lowest_noise_level(sde) > UNREACHABLE_END * float(end_sigma):
        return {**options, "denoise": True}
    return options


def default_sampler(sde: SDE, nfe: int, score: str = "exact") -> DefaultChoice:
    """The configuration for ``sde``'s family and a budget of ``nfe`` score evaluations: from
    :data:`RULES` for an exact score (``score="exact"``), from :data:`LEARNED_RULES` for a trained
    network (``score="learned"``)."""
    if int(nfe) != nfe or nfe < 1:
        raise ValueError(f"the NFE budget (steps) must be an integer ≥ 1, got {nfe}")
    if score not in SCORE_KINDS:
        raise ValueError(f"score must be one of {SCORE_KINDS}, got {score!r}")
    nfe = int(nfe)
    family = sde_family(sde)
    table = RULES if score == "exact" else LEARNED_RULES
    rule = [r for r in table[family] if r.min_nfe <= nfe][-1]
    options = reach_end(sde, dict(rule.options))
    denoise = bool(options.get("denoise", False))
    if denoise and nfe < 2:
        options["denoise"] = False  # one evaluation cannot pay for a step and a denoising step
        options.pop("denoise_order", None)
        denoise = False
    return DefaultChoice(rule.sampler, options, nfe - int(denoise), family, nfe, score)


# ------------------------------------------------------------------------- named samplers at their best
#: The measured best options of each named sampler config (``sampler=<name>``, its ``tuned:`` key) per score
#: kind, chosen like :data:`RULES`: benchmarks/sampler_family.py round 4 (exact scores, the wider family's tuning
#: seeds) and round 7 (the deterministic ones: end point and final step of order 2–4 on top of round 4's grid,
#: order and variable; a lower order where it was within 1 % of the best), and benchmarks/learned_rule.py (the
#: demo's networks). ``min_nfe`` compares with the NFE of the requested steps (steps × evaluations per step).
#: Only options whose config value is ``auto`` are filled.
def _end(end_sigma: float, denoise: bool, grid: str, **more: Any) -> Dict[str, Any]:
    return {"grid": grid, "end_sigma": end_sigma, "denoise": denoise, **more}


def _named(cls: str, exact: Tuple[Tuple[int, Dict[str, Any]], ...],
           learned: Tuple[Tuple[int, Dict[str, Any]], ...]) -> Dict[str, Tuple[Rule, ...]]:
    return {"exact": tuple(Rule(n, cls, o) for n, o in exact), "learned": tuple(Rule(n, cls, o) for n, o in learned)}


def _named_family(family: str, cls: str, exact: Tuple[Tuple[int, Dict[str, Any]], ...],
                  learned: Tuple[Tuple[int, Dict[str, Any]], ...]) -> Dict[str, Tuple[Rule, ...]]:
    """Tables measured apart for one process family: keys ``"exact/<family>"``, ``"learned/<family>"``."""
    return {f"{k}/{family}": v for k, v in _named(cls, exact, learned).items()}


def _in(variable: str, *rules: Tuple[int, Dict[str, Any]]) -> Tuple[Tuple[int, Dict[str, Any]], ...]:
    """``rules`` for an ODE integrator stepping in ``variable`` (``t`` or ``sigma``)."""
    return tuple((n, {**o, "variable": variable}) for n, o in rules)


def _ls(end_sigma: float, denoise: bool = False, **more: Any) -> Dict[str, Any]:
    return _end(end_sigma, denoise, "logsnr", **more)


# Learned scores (benchmarks/RESULTS.md, "Named samplers on trained networks": the demo's digits and moons at 5
# and 10 NFE): most samplers are best stopping at σ/m = 0.03 below 15 NFE; from 15 NFE the tables follow the
# learned default (σ/m = 0.01 with the denoising step), measured for the default sampler only.
_LEARNED_END = ((1, _ls(0.03)), (15, _ls(0.01, True)))
_SHIPPED_END = {"end_sigma": None, "denoise": False}  # the class's own end time (the SDE's eps)
_ODE_LEARNED_IN_T = _in("t", (1, _ls(0.01)), (15, _ls(0.01, True)))  # the ODE integrators' learned table in t
NAMED_RULES: Dict[str, Dict[str, Tuple[Rule, ...]]] = {
    "dpm_solver": _named("dpm_solver",
                         ((1, _ls(0.05, True, order=2, denoise_order=3)), (8, _ls(0.01, order=2)),
                          (18, _ls(0.01, True, order=2, denoise_order=3))),
                         tuple((n, {**o, "order": 2}) for n, o in _LEARNED_END)),
    # UniPC is the exact-score default's configuration: its table is RULES.
    "unipc": {"exact": RULES["vp"],
              "learned": tuple(Rule(n, "dpm_solver", {**o, "order": 2}) for n, o in _LEARNED_END)},
    "dpm_solver_sde": _named("dpm_solver",
                             ((1, _ls(0.03)), (13, _ls(0.01)), (18, _ls(0.003)), (25, _ls(0.003, True))),
                             _LEARNED_END),
    "dpm_solver_2s": _named("dpm_solver_2s",
                            ((1, _ls(0.05, True, denoise_order=3)), (8, _ls(0.01)), (13, _ls(0.03, True, denoise_order=4)),
                             (18, _ls(0.01, True, denoise_order=3))),
                            _LEARNED_END),
    # DDIM and EDM at 5 NFE on the digits: their own grids ending at eps beat σ/m = 0.03 (32.8 vs 36.7; 14.1 vs 90).
    "ddim": _named("ddim", ((1, _ls(0.05, True, denoise_order=3)), (13, _ls(0.03, True, denoise_order=4))),
                   ((1, {"grid": "uniform", **_SHIPPED_END}), (8, _ls(0.03)), (15, _ls(0.01, True)))),
    "edm_heun": _named("edm_heun",
                       ((1, _end(0.03, False, "karras")), (8, _end(0.05, True, "karras", denoise_order=4)),
                        (13, _ls(0.03)), (18, _ls(0.03, True, denoise_order=4)), (25, _ls(0.01, True, denoise_order=3))),
                       ((1, {"grid": "karras", **_SHIPPED_END}), (8, _ls(0.03)), (15, _ls(0.01, True)))),
    # The ODE integrators on learned scores: σ/m = 0.01 best on the moons at 5 and 10 NFE (all diverge on the digits).
    # They step in t on VP and sub-VP; on VE (own tables, "<score>/ve") in σ̃ = σ/m: round 5 of sampler_family, where
    # 2–15 steps in t across VE's σ range are unstable. The learned VE tables keep the shared grid and end point and
    # take the variable measured on a VE moons network (benchmarks/learned_rule.py --named; RESULTS.md "ODE
    # integrators in σ̃"): σ̃ from 15 NFE for both, and where it won at 5 and 10 NFE.
    # Sub-VP's grid in t is not VP's: its exact tables with the final step were measured apart (round 7 on sub-VP).
    "ode_heun": {
        **_named("ode_heun",
                 _in("t", (1, _ls(0.01, True)), (8, _ls(0.03)), (13, _ls(0.03, True, denoise_order=3)),
                     (18, _ls(0.01, True, denoise_order=3))),
                 _ODE_LEARNED_IN_T),
        **_named_family("subvp", "ode_heun",
                        _in("t", (1, _ls(0.03, True, denoise_order=3)), (8, _ls(0.03)),
                            (13, _ls(0.03, True, denoise_order=2)), (25, _ls(0.01, True, denoise_order=2))),
                        _ODE_LEARNED_IN_T),
        **_named_family("ve", "ode_heun",
                        _in("sigma", (1, _end(0.05, True, "karras", denoise_order=3)), (8, _ls(0.03)),
                            (13, _end(0.03, True, "karras")), (18, _end(0.01, True, "karras")),
                            (40, _end(0.01, True, "karras", denoise_order=3))),
                        _in("t", (1, _ls(0.01))) + _in("sigma", (8, _ls(0.01)), (15, _ls(0.01, True)))),
    },
    "ode_rk4": {
        **_named("ode_rk4",
                 _in("t", (1, _end(0.05, True, "karras", denoise_order=3)), (8, _ls(0.01, True)),
                     (13, _ls(0.03, True, denoise_order=2)), (18, _ls(0.01)), (25, _ls(0.01, True, denoise_order=4)),
                     (40, _ls(0.01, True, denoise_order=3))),
                 _ODE_LEARNED_IN_T),
        **_named_family("subvp", "ode_rk4",
                        _in("t", (1, _end(0.05, True, "karras", denoise_order=3)), (8, _ls(0.01, True)),
                            (13, _ls(0.03, True, denoise_order=3)), (18, _ls(0.01, True, denoise_order=3)),
                            (25, _ls(0.01, True, denoise_order=2))),
                        _ODE_LEARNED_IN_T),
        **_named_family("ve", "ode_rk4",
                        _in("sigma", (1, _end(0.01, True, "karras")), (8, _ls(0.05, True, denoise_order=3)),
                            (13, _end(0.05, True, "karras", denoise_order=4)), (18, _end(0.003, False, "karras")),
                            (25, _end(0.01, True, "karras", denoise_order=3)), (40, _ls(0.01, True, denoise_order=3))),
                        _in("sigma", (1, _ls(0.01))) + _in("t", (8, _ls(0.01))) + _in("sigma", (15, _ls(0.01, True)))),
    },
}
TUNED_KEY = "tuned"
AUTO = "auto"


def tuned_options(tuned: str, sde: SDE, nfe: int, score: str = "exact") -> Dict[str, Any]:
    """The options :data:`NAMED_RULES` gives sampler config ``tuned`` at ``nfe`` score evaluations for ``score``:
    the table ``"<score>/<family>"`` for ``sde``'s family (:func:`sde_family`) where one was measured apart, else
    the table ``score`` shared by the families."""
    if tuned not in NAMED_RULES:
        raise ValueError(f"no measured settings for sampler {tuned!r} (tuned: …); choose one of: "
                         f"{', '.join(sorted(NAMED_RULES))}, or set its options and remove the tuned key")
    if score not in SCORE_KINDS:
        raise ValueError(f"score must be one of {SCORE_KINDS}, got {score!r}")
    rules = NAMED_RULES[tuned][tuned_table(tuned, sde, score)]
    return reach_end(sde, dict([r for r in rules if r.min_nfe <= max(int(nfe), 1)][-1].options))


def tuned_table(tuned: str, sde: SDE, score: str = "exact") -> str:
    """The key of ``NAMED_RULES[tuned]`` that serves ``sde`` and ``score``: ``"<score>/<family>"`` if that family
    has a table of its own, else ``score``."""
    own = f"{score}/{sde_family(sde)}"
    return own if own in NAMED_RULES[tuned] else score


def fill_tuned(sde: SDE, name: str, steps: int, options: Dict[str, Any], score: str = "exact", *,
               build: Any) -> Dict[str, Any]:
    """``options`` with every ``auto`` value replaced by the measured best (:func:`tuned_options`) when they name
    a ``tuned`` table; the ``tuned`` key itself removed. Options set to anything else are the user's and stay.
    ``build(name, **options)`` makes the sampler (for its evaluations per step: the table is keyed by NFE);
    :func:`~.sampler.build_sampler` in practice."""
    options = dict(options)
    tuned = options.pop(TUNED_KEY, None)
    if tuned is None:
        return options
    autos = [k for k, v in options.items() if isinstance(v, str) and v == AUTO]
    if not autos:
        return options
    probe = build(name, **{k: v for k, v in options.items() if k not in autos})
    nfe = steps * (probe.nfe_per_step or 1)
    best = tuned_options(str(tuned), sde, nfe, score)
    for key in autos:
        if key == "end_sigma" and options.get("eps") is not None:
            del options[key]  # the user's end time stands
        elif key in best:
            options[key] = best[key]
        elif key != "grid":  # grid: auto is a sampler's own choice; other keys fall back to the class default
            del options[key]
    return options


AUTO_SAMPLER = "auto"


def resolve_sampler(sde: SDE, name: Any, steps: int, options: Dict[str, Any],
                    score: str = "exact", build: Any = None) -> Tuple[str, int, Dict[str, Any], Any]:
    """``(name, steps, options, choice)``: a named sampler passes through (``choice`` None); ``None``
    or ``"auto"`` becomes :func:`default_sampler` for the budget ``steps`` (NFE) and the ``score``
    kind, with ``options`` overriding the chosen ones (e.g. ``eps=``) and ``choice`` the
    :class:`DefaultChoice`. :func:`~sde_diffusion.samplers.make_sampler` builds and checks the
    sampler from this; call that unless only the names are wanted."""
    if name is not None and name != AUTO_SAMPLER:
        if options.get(TUNED_KEY) is not None and build is None:
            raise ValueError("options name a tuned table; pass build= (make_sampler does)")
        return name, steps, (fill_tuned(sde, name, steps, options, score, build=build) if build else options), None
    choice = default_sampler(sde, steps, score)
    merged = {**choice.options, **options}
    if not merged.get("denoise", False) and "denoise_order" not in options:
        merged.pop("denoise_order", None)  # the rule's final-step order goes with its step, turned off here
    steps_ = choice.steps
    if bool(merged.get("denoise", False)) != bool(choice.options.get("denoise", False)):
        steps_ = choice.nfe - int(bool(merged.get("denoise", False)))  # keep the NFE budget
    return choice.name, max(steps_, 1), merged, choice


def rules_table(score: str = "exact") -> List[Tuple[str, str, str]]:
    """(family, NFE range, configuration) rows for documentation."""
    rows = []
    for fam in FAMILIES:
        rules = (RULES if score == "exact" else LEARNED_RULES)[fam]
        for i, r in enumerate(rules):
            hi = f"–{rules[i + 1].min_nfe - 1}" if i + 1 < len(rules) else "+"
            opts = ", ".join(f"{k}={v}" for k, v in r.options.items())
            rows.append((fam, f"{r.min_nfe}{hi}", f"{r.sampler}({opts})"))
    return rows


__all__ = ["UNREACHABLE_END", "lowest_noise_level", "reach_end", "NAMED_RULES", "tuned_options", "tuned_table", "fill_tuned", "AUTO_SAMPLER", "LEARNED_RULES", "SCORE_KINDS", "is_learned_score", "resolve_sampler", "FAMILIES", "Rule", "RULES", "DefaultChoice", "sde_family", "default_sampler", "rules_table"]
