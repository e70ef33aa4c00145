r"""Time grids fitted to one model: ``schedule=fit``.

A fixed grid rule cannot know where a given network's reverse trajectories bend. This module fits the
N + 1 times of a sampler's grid to the model itself, once, from its own score evaluations, and stores
the result for reuse (the grid is then a tensor: no cost per sampling step).

Method (dynamic programming against a teacher path, as in Chen et al. 2024, "GITS")
-----------------------------------------------------------------------------------
1. Draw a batch x_T from the prior and integrate the probability-flow ODE with DPM-Solver++(2M) on a fine
   grid of M steps, uniform in the log-SNR λ = log(m/σ) between T and the sampler's end time. This
   *teacher* path gives states X_j and denoised estimates D_j = x̂_0(X_j, t_j) (M score evaluations).
2. The cost of one coarse step from fine time a to fine time b > a is the mean squared distance between
   the first-order exponential-integrator (DDIM) step from the teacher's state and the teacher's state at b:

   .. math:: C_{ab} = \big\|\tfrac{\sigma_b}{\sigma_a} X_a - m_b\,(e^{-(\lambda_b-\lambda_a)} - 1)\,D_a - X_b\big\|^2 ,

   computed for every pair without further score evaluations.
3. The N-step grid from j = 0 (T) to j = M (the end time) with the least total cost is found exactly by
   dynamic programming, O(N M²).

``objective="curvature"`` (the default) places the times so that each step carries an equal share of
∫ (m ‖dD/dλ‖)^{1/2} dλ along the same teacher path, which equidistributes the local error of a first-order step
(∝ h² m ‖dD/dλ‖); it costs the teacher's M evaluations only. On trained networks it gave the better samples of
the two (benchmarks/RESULTS.md, "Fitted schedules"): a learned score's probability-flow path is itself
imperfect, and matching it closely (``path``) is not the same as sampling well.

For a deterministic sampler either objective ends with a check: the sampler runs from the teacher's x_T on the
rule's grid and on the fitted one(s) (``path``: the programme with error exponents 1, (p + 1)/2 and 2 for a
p-th order step), and the grid landing closest to the teacher's end state is kept, so a fit is never worse
than the rule by that measure (a few N more evaluations; whether the sampler is deterministic is seen from two
runs with different noise).

The sampler's own end point (``eps`` / ``end_sigma``) and its final denoising step are kept; only the
interior times move. Usage::

    sched = fit_schedule(sde, score_fn, sampler, steps=10, x_T=sde.prior_sample((64, 2)))
    sample(sde, score_fn, (1000, 2), sampler=sampler, steps=10, schedule=sched)
    sched.save("grid.json"); FittedSchedule.load("grid.json")
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from ..score import CountingScore
from ..sdes.sde import SDE, ScoreFn

OBJECTIVES = ("path", "curvature")
FORMAT = 1


@dataclass
class FittedSchedule:
    """A grid fitted to one model: ``times`` (N + 1 floats from T down to the end time) and how it was made."""

    times: List[float]
    sampler: str
    options: Dict[str, Any]
    steps: int
    digest: Optional[str] = None
    objective: str = "curvature"
    fine_steps: int = 0
    fit_nfe: int = 0
    fit_seconds: float = 0.0
    sde: str = ""
    format: int = FORMAT
    extra: Dict[str, Any] = field(default_factory=dict)

    def tensor(self, device: Any = None, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.tensor(self.times, dtype=torch.float64).to(device=device, dtype=dtype)

    def save(self, path: Union[str, Path]) -> Path:
        from ..io import write_json

        return write_json(Path(path), asdict(self))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "FittedSchedule":
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"schedule file {p} does not exist; give schedule=fit to fit one, or the path of a "
                                    "stored grid (a JSON file written by schedule=fit, with a list 'times')")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"schedule file {p} is not JSON ({err})") from None
        if isinstance(data, list):  # a bare list of times
            data = {"times": data, "sampler": "", "options": {}, "steps": len(data) - 1}
        if not isinstance(data, dict) or "times" not in data:
            raise ValueError(f"schedule file {p} holds no 'times' list")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known.setdefault("sampler", "")
        known.setdefault("options", {})
        known.setdefault("steps", len(known["times"]) - 1)
        return cls(**known)


def schedule_key(sampler: str, options: Mapping[str, Any], steps: int, digest: Optional[str], objective: str) -> str:
    """The name under which a fitted grid is stored: a digest of what it depends on."""
    blob = json.dumps({"sampler": sampler, "options": {k: options[k] for k in sorted(options)}, "steps": int(steps),
                       "digest": digest, "objective": objective, "format": FORMAT}, sort_keys=True, default=str)
    return f"{sampler}-{steps}steps-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def check_times(times: Tensor, sde: SDE, steps: int, end_time: Optional[float] = None, what: str = "the grid") -> Tensor:
    """``times`` as float64 ``[steps + 1]``, checked: starts at T, strictly decreasing, ends inside (0, T) (and at
    ``end_time`` when given)."""
    t = torch.as_tensor(times, dtype=torch.float64).flatten()
    if t.numel() != steps + 1:
        raise ValueError(f"{what} has {t.numel()} times, i.e. {t.numel() - 1} steps, but {steps} steps were asked; "
                         f"fit a grid for steps={steps} (schedule=fit) or use steps={t.numel() - 1}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} holds non-finite times")
    if abs(float(t[0]) - sde.T) > 1e-6 * max(1.0, sde.T):
        raise ValueError(f"{what} starts at t={float(t[0]):.6g}, but the process starts at T={sde.T}: it was fitted "
                         "to another process")
    if not (t[1:] < t[:-1]).all():
        raise ValueError(f"{what} must decrease strictly from T to the end time")
    if not 0 < float(t[-1]) < sde.T:
        raise ValueError(f"{what} ends at t={float(t[-1]):.6g}, outside (0, T={sde.T})")
    if end_time is not None and abs(float(t[-1]) - end_time) > 1e-6 * max(end_time, 1e-12) + 1e-12:
        raise ValueError(f"{what} ends at t={float(t[-1]):.6g} but the sampler ends at t={end_time:.6g} (its eps / "
                         "end_sigma differ from the fit's); fit again with these options")
    return t


def _teacher(sde: SDE, score_fn: ScoreFn, x: Tensor, fine: Tensor) -> tuple[List[Tensor], List[Tensor]]:
    """DPM-Solver++(2M) states X_j (j = 0..M) and denoised estimates D_j (j = 0..M−1) on the fine grid."""
    m = sde.mean_coeff(fine).tolist()
    s = sde.marginal_std(fine).tolist()
    lam = [math.log(a / b) for a, b in zip(m, s)]
    states, dens = [x], []
    d_prev, h_prev = None, None
    B = x.shape[0]
    for j in range(fine.numel() - 1):
        t = torch.full((B,), float(fine[j]), dtype=x.dtype, device=x.device)
        score = score_fn(x, t)
        d = (x + s[j] ** 2 * score) / m[j]
        dens.append(d)
        h = lam[j + 1] - lam[j]
        if d_prev is None:
            dp = d
        else:
            r = h_prev / h
            dp = (1 + 0.5 / r) * d - (0.5 / r) * d_prev
        x = (s[j + 1] / s[j]) * x - m[j + 1] * math.expm1(-h) * dp
        states.append(x)
        d_prev, h_prev = d, h
    return states, dens


def _path_costs(sde: SDE, fine: Tensor, states: List[Tensor], dens: List[Tensor]) -> Tensor:
    """C[a, b] (a < b) of the module docstring, ``[M + 1, M + 1]`` float64 (inf where a ≥ b)."""
    M = fine.numel() - 1
    m = sde.mean_coeff(fine)
    s = sde.marginal_std(fine)
    lam = torch.log(m / s)
    X = torch.stack([x.double().reshape(x.shape[0], -1) for x in states])  # [M+1, B, D]
    C = torch.full((M + 1, M + 1), math.inf, dtype=torch.float64)
    for a in range(M):
        b = torch.arange(a + 1, M + 1)
        ca = (s[b] / s[a]).reshape(-1, 1, 1)
        cd = (-m[b] * torch.expm1(-(lam[b] - lam[a]))).reshape(-1, 1, 1)
        pred = ca * X[a].unsqueeze(0) + cd * dens[a].double().reshape(1, X.shape[1], -1)
        C[a, b] = (pred - X[b]).pow(2).mean(dim=(1, 2))
    return C


def _dp(C: Tensor, steps: int) -> List[int]:
    """Indices 0 = j_0 < j_1 < … < j_N = M minimising Σ C[j_k, j_{k+1}] (exact dynamic programming)."""
    M = C.shape[0] - 1
    if steps > M:
        raise ValueError(f"the fine grid has {M} steps, fewer than the {steps} asked")
    best = torch.full((steps + 1, M + 1), math.inf, dtype=torch.float64)
    arg = torch.zeros((steps + 1, M + 1), dtype=torch.long)
    best[0, 0] = 0.0
    for k in range(1, steps + 1):
        # best[k, b] = min_a best[k−1, a] + C[a, b]
        total = best[k - 1].unsqueeze(1) + C  # [a, b]
        val, idx = total.min(dim=0)
        best[k], arg[k] = val, idx
    path = [M]
    for k in range(steps, 0, -1):
        path.append(int(arg[k, path[-1]]))
    path.reverse()
    if path[0] != 0 or len(set(path)) != steps + 1:
        raise RuntimeError("no valid grid found")
    return path


def _curvature_indices(sde: SDE, fine: Tensor, dens: List[Tensor], steps: int) -> List[int]:
    """Times equidistributing ∫ (m‖dD/dλ‖)^{1/2} dλ, rounded to fine indices (distinct)."""
    M = fine.numel() - 1
    m = sde.mean_coeff(fine)
    lam = torch.log(m / sde.marginal_std(fine))
    D = torch.stack([d.double().reshape(d.shape[0], -1) for d in dens])  # [M, B, Dim]
    dD = (D[1:] - D[:-1]).pow(2).mean(dim=(1, 2)).sqrt() / (lam[1:M] - lam[: M - 1])  # at interval mids
    dens_rate = (m[1:M] * dD).clamp(min=0).sqrt()
    rate = torch.cat([dens_rate[:1], dens_rate, dens_rate[-1:]])  # per fine interval (M of them)
    rate = rate[:M] + 1e-3 * rate.mean()  # never zero
    w = rate * (lam[1:] - lam[:-1])
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(w, 0)])
    targets = torch.linspace(0, float(cum[-1]), steps + 1, dtype=torch.float64)
    idx = torch.searchsorted(cum, targets).clamp(0, M).tolist()
    idx[0], idx[-1] = 0, M
    for k in range(1, steps):  # keep strictly increasing with room for the rest
        idx[k] = min(max(idx[k], idx[k - 1] + 1), M - (steps - k))
    return idx


def fit_schedule(
    sde: SDE,
    score_fn: ScoreFn,
    sampler: Any,
    steps: int,
    x_T: Tensor,
    *,
    objective: str = "curvature",
    fine_steps: Optional[int] = None,
    sampler_name: str = "",
    options: Optional[Mapping[str, Any]] = None,
    digest: Optional[str] = None,
) -> FittedSchedule:
    """Fit the ``steps``-step grid of ``sampler`` to ``score_fn`` from the prior batch ``x_T [B, ...]``.

    Args:
        sampler: a step sampler (its end point fixes the last time).
        objective: ``curvature`` (the default: equidistributed local error along the teacher path) or ``path``
            (dynamic programming against the teacher path; for a deterministic sampler the best of its candidates
            and the rule's own grid, judged by the distance to the teacher's end state).
        fine_steps: M, the teacher's steps (default max(100, 8·steps), capped at 400): M score evaluations.
        sampler_name, options, digest: recorded with the grid (``digest``: the weights it was fitted to).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown schedule objective {objective!r}; choose one of: {', '.join(OBJECTIVES)}")
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if getattr(sampler, "default_grid", None) is None:
        raise ValueError(f"{type(sampler).__name__} chooses its own times; schedule=fit needs a sampler with a time "
                         "grid (a step sampler such as dpm_solver, ddim, edm_heun, euler_maruyama)")
    M = int(fine_steps or min(400, max(100, 8 * int(steps))))
    start = time.perf_counter()
    end = float(sampler.end.end_time(sde))
    from .grids import time_grid

    fine = time_grid(sde, M, "logsnr", eps=end, dtype=torch.float64)
    with torch.no_grad():
        states, dens = _teacher(sde, score_fn, x_T, fine)
        idx: Optional[List[int]]
        if steps == 1:
            idx = [0, M]
        elif objective == "path":
            # A p-th order step's local error scales as h^(p+1) where the first-order one's scales as h²: the
            # pairwise first-order costs, raised to (p + 1)/2, model the sampler's own steps.
            order = max(1, int(getattr(sampler, "order", 1) or 1))
            idx = _dp(_path_costs(sde, fine, states, dens) ** ((order + 1) / 2), int(steps))
        else:
            idx = _curvature_indices(sde, fine, dens, int(steps))
        extra: Dict[str, Any] = {}
        nfe = M
        if steps > 1:
            if objective == "path":
                C = _path_costs(sde, fine, states, dens)
                order = max(1, int(getattr(sampler, "order", 1) or 1))
                candidates = {f"dp^{p:g}": _dp(C**p, int(steps)) for p in sorted({1.0, (order + 1) / 2, 2.0})}
            else:
                candidates = {"curvature": idx}
            idx, extra, used = _select(sde, score_fn, sampler, int(steps), fine, states, idx, candidates, end)
            nfe += used
    times = fine[idx] if idx is not None else sampler.end.times(sde, int(steps), dtype=torch.float64)
    times[0], times[-1] = sde.T, end
    return FittedSchedule(times=[float(v) for v in times], sampler=sampler_name or type(sampler).__name__,
                          options=dict(options or {}), steps=int(steps), digest=digest, objective=objective,
                          fine_steps=M, fit_nfe=nfe, fit_seconds=time.perf_counter() - start, sde=repr(sde), extra=extra)


def _select(sde: SDE, score_fn: ScoreFn, sampler: Any, steps: int, fine: Tensor, states: List[Tensor],
            idx: Optional[List[int]], candidates: Dict[str, List[int]], end: float
            ) -> tuple[Optional[List[int]], Dict[str, Any], int]:
    """For a deterministic sampler: run it from the teacher's x_T on the rule's grid and on each candidate grid
    and keep the one that lands closest to the teacher's end state (so a fit never does worse than the rule by
    that measure); a stochastic sampler keeps ``idx``. Returns (indices, or None for the rule's grid; what was
    measured; NFE spent)."""
    x_T, target = states[0], states[-1]
    used = 0

    def run(times: Tensor, seed: int) -> Tensor:
        nonlocal used
        import copy

        smp = copy.copy(sampler).use_times(times)
        counted = CountingScore(score_fn)
        gen = torch.Generator(device=x_T.device).manual_seed(seed)
        out, _, _ = smp.run(sde, counted, x_T, steps, gen)
        used += counted.nfe
        return out

    rule = sampler.end.times(sde, steps, dtype=torch.float64)
    rule[0], rule[-1] = sde.T, end
    a, b = run(rule, 1), run(rule, 2)
    if not torch.equal(a, b):
        return idx, {"selection": "stochastic sampler: no selection"}, used
    options: Dict[str, Optional[List[int]]] = {"rule": None, **candidates}
    errors = {"rule": float((a - target).pow(2).mean().sqrt())}
    for name, cand in candidates.items():
        t = fine[cand].clone()
        t[0], t[-1] = sde.T, end
        errors[name] = float((run(t, 1) - target).pow(2).mean().sqrt())
    best = min(errors, key=errors.get)
    return options[best], {"selection": best, "rms_to_teacher": errors}, used


__all__ = ["FittedSchedule", "OBJECTIVES", "fit_schedule", "schedule_key", "check_times"]
