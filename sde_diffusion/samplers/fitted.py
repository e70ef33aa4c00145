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

``objective="curvature"`` places the times so that each step carries an equal share of
∫ (m ‖dD/dλ‖)^{1/2} dλ along the same teacher path, which equidistributes the local error of a first-order step
(∝ h² m ‖dD/dλ‖); it costs the teacher's M evaluations only. It is the default for a trained network: there it
gave the better samples (benchmarks/RESULTS.md, "Fitted schedules"): a learned score's probability-flow path is
itself imperfect, and matching it closely (``path``) is not the same as sampling well.

``objective="whitened"`` (the default for an exact score) measures the same local error where it matters: at the
end of the run, relative to the spread of p_0 there. An error δ made at noise level σ̃ = σ/m is carried to the end
by the linearised flow in x̃ = x/m, and then weighed by the inverse covariance of p_0 near the sample; for a
Gaussian p_0 the two together are exactly the quadratic form of H̃ = −∇²_x̃ log p̃_σ̃ at the level where the
error is made (component by component, (s² + σ̃_end²)/(s² + σ̃²) · 1/(s² + σ̃_end²) = 1/(s² + σ̃²)). So the step
density is (E ΔDᵀ H̃ ΔD)^{1/4} / Δλ^{1/2} along the teacher path, H̃ applied by one finite difference of the
score per fine step (M − 1 more evaluations), blended half and half with the uniform log-SNR density
(:data:`WHITENED_BLEND`) for robustness. Errors made at high noise are contracted away and errors in a mode's
narrow directions are not, which the Euclidean ``curvature`` ignores: on VE it put most steps above σ̃ = 1. On the
wider exact-score family it beats the rule's grid at every budget on low-dimensional problems and ties it on
high-dimensional ones (RESULTS.md, "Fit objectives on the exact-score family").

Every objective begins, by default (``start=True``), with a Gaussian start (:mod:`.gaussian_start`): the mean and
covariance of :data:`START_DRAWS` samples of the model (the default sampler at :data:`START_NFE`) define a Gaussian
p_0, whose probability-flow ODE carries the prior draw from T to the level σ̃_s = factor × √λ_max in closed form, with
no score evaluation (factor 2 below 8 NFE, 4 from there; none from 30 NFE, where it gained nothing:
:data:`~.gaussian_start.START_FACTORS`). The grid is then
fitted from σ̃_s down, and the start is stored with it. Above a few standard deviations of p_0 the noised marginal
is nearly that Gaussian, so the steps the rule spends there are saved, and a trained network's least accurate
region (σ̃ up to ≈ 150 on VP, where x̂_0 = (x − σ ε̂)/m multiplies ε̂'s error by σ̃) is skipped. On the demo's
networks at 5 NFE this takes the default from digits-FD 15.8 to 5.5 and the moons from sliced W2 0.48 to 0.052,
as good as the default at 10 NFE (benchmarks/RESULTS.md, "Gaussian start"). No start is made where the level is not
below half the prior's (a VE process whose σ_max is a few data scales) or not above :data:`START_ROOM` × the level
the sampler stops at.

For a deterministic sampler every objective ends with a check: the sampler runs from the teacher's x_T on the
rule's grid and on the fitted one(s) (``path``: the programme with error exponents 1, (p + 1)/2 and 2 for a
p-th order step), and the grid landing closest to the teacher's end state is kept, so a fit is never worse
than the rule by that measure (a few N more evaluations; whether the sampler is deterministic is seen from two
runs with different noise).

The sampler's own end point (``eps`` / ``end_sigma``) and its final denoising step are kept, and only the
interior times move, unless that step follows the probability-flow ODE to σ̃ = 0 (``denoise=True``,
``denoise_order`` > 1, an ``end_sigma``): then the level where the steps stop is one more node of the
discretisation, not where the samples end, and the fit also moves it. The teacher then runs down to the lowest
level tried and on to σ̃ = 0 by the same final step on its fine nodes; the sampler's level times each of
:data:`END_FACTORS` is tried, on the rule's grid and on the fitted one for that level, each run ending with the
sampler's final step, and the run landing closest to the teacher's samples at σ̃ = 0 is kept: the mean error in the
noised density's Hessian norm at the teacher's lowest level, over the draws that stay in the teacher's mode in
every run (:func:`_mean_within_modes`), and only where the best run follows the teacher to about 0.1 standard
deviation per coordinate (:data:`TRUSTED`; further off the sampler's own level stays). Its level is stored with the
grid as ``end_sigma``; it costs 2(N + 1) + 2 more evaluations per level.

``objective="samples"`` judges what the sampler returns, as a distribution: the sampler itself on its rule's grid of
max(50, 3N) steps, ending with a denoising step, is the teacher; the rule's grid, uniform log-SNR grids stopping at
:data:`SAMPLES_LEVELS` × the sampler's level and, at the best of those levels, grids warped towards the end
(:data:`SAMPLES_WARPS`) run from the same draws with the same noise, and the one whose samples are closest to the
teacher's in sliced W2 wins (a run with a diverged draw loses). It needs more draws (:func:`fit_batch`) and judges
stochastic samplers and the level a run stops at, which the path objectives cannot. It is not a default: on the
demo's networks it is the best objective at 5 NFE and worse than the rule's grid on the digits at 7–10 NFE, where
the higher level it picks leaves noise that a distance in pixels weighs less than a feature metric does
(benchmarks/RESULTS.md, "Fitting by samples"). Usage::

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
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from ..score import CountingScore
from ..sdes.sde import SDE, ScoreFn
from .gaussian_start import GaussianStart, noise_level, start_factor, top_level

OBJECTIVES = ("whitened", "curvature", "path", "samples")
#: The objective when none is named, by the kind of score (benchmarks/RESULTS.md, "Fitted schedules" and "Fit
#: objectives on the exact-score family"): ``whitened`` on exact scores, ``curvature`` on trained networks.
DEFAULT_OBJECTIVES = {"exact": "whitened", "learned": "curvature"}
#: ``whitened``: the weight of the uniform log-SNR grid in the step density (robustness where the probe is noisy).
WHITENED_BLEND = 0.5
#: ``samples``: the levels to stop at, as multiples of the sampler's ``end_sigma``, and the warps p of the log-SNR
#: grid (λ_i = λ(T) + (λ_end − λ(T)) (i/N)^p; p < 1 puts more steps near the end) tried in the first and second
#: round (:func:`_fit_by_samples`): 10 runs of N steps and a teacher of max(50, 3N) steps, so that on 256 draws a
#: fit up to N = 14 costs less than 1000 samples at 50 NFE. On the demo's networks the best 5-NFE grids in hindsight
#: stop 4–11× above the learned rule's level with p = 0.6–0.8 (benchmarks/RESULTS.md, "Grids in hindsight on the
#: trained networks").
SAMPLES_LEVELS = (1.0, 5.0 / 3.0, 8.0 / 3.0, 4.0, 20.0 / 3.0, 10.0)
SAMPLES_WARPS = (0.6, 0.7, 0.8)
#: ``samples``: prior draws per fit: at least :data:`SAMPLES_BATCH`, and :data:`SAMPLES_COORDS` numbers in all for
#: small data (a distribution distance needs more draws than the per-draw objectives' 64, and a grid that fails on
#: rare draws must show it: on the demo's 2-D moons, with 256 or 1024 draws a prototype picked a grid that scored
#: 1.3–1.8× worse than the rule's; with 4096 it did not).
SAMPLES_BATCH = 256
SAMPLES_COORDS = 8192
#: ``samples``: a run whose draw lies further from the teacher's mean than this × the teacher's farthest draw has
#: diverged; a grid with such draws loses to one without.
SAMPLES_OUTLIER = 3.0
#: ``samples``: the noise seed the teacher and every candidate share (common random numbers: the runs differ by grid).
SAMPLES_NOISE_SEED = 7
#: The Gaussian start (:func:`fit_start`): samples of the model its moments come from, the NFE of the default sampler
#: that draws them, and their seed; a start needs its level above this × the level the sampler stops at. 256 draws
#: at 50 NFE are 12 800 sample evaluations, so that a fit at 50 NFE stays below sampling 1000 at 50 NFE; at the start
#: level the covariance's estimation error weighs (λ/σ̃_s²)² ≤ 1/16 of its size in a start's KL (≈ 0.003 nats on the
#: 64-D digits).
START_DRAWS = 256
START_NFE = 50
START_SEED = 11
START_ROOM = 10.0
#: 2: fits begin with a Gaussian start (grids stored under format 1 start at T; they load, and a fit is made anew).
FORMAT = 2
#: Multiples of the sampler's ``end_sigma`` the fit tries as the level to stop at, when a final step of order > 1
#: follows the ODE on to σ̃ = 0 (module docstring). The best fixed level for the exact-score rule is 0.01; per
#: problem the best lay anywhere in 0.003–0.05 on the wider family's tuning seeds (RESULTS.md, "Final step to σ̃ = 0
#: (round 6)"): wide modes want the higher levels, sharp ones the lower. The level scales with the data: the same
#: problems with their data × 0.05 want 0.0003–0.001, × 20 up to 0.1 and more (RESULTS.md, "Data at another
#: scale"), so the factors span 1/30–30: on the scaled problems' tuning seeds that gave 0.23–0.70× the error of
#: the 1/3–5 span at 15 and 20 NFE (data × 0.05), and within 2 % of it at scales 1 and 20.
END_FACTORS = (1.0 / 30.0, 1.0 / 10.0, 1.0 / 3.0, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0)
#: A draw whose whitened error to the teacher at σ̃ = 0 exceeds this × the dimension (≈ 3 standard deviations of its
#: mode per coordinate) has left the teacher's mode: the end-level check leaves it out (:func:`_mean_within_modes`).
LOST = 10.0
#: The check moves the level only where the best run's error is at most this per coordinate (whitened squared, ≈ 0.1
#: standard deviation): then the N-step map follows the teacher's, and a draw's error measures the distribution's.
#: Further off, two runs can transport p_T equally well along different maps, and the per-draw error ranks the
#: maps, not the samples (wider family, tuning seed 2004 at 15 NFE: the level the check chose there, 0.03 against
#: 0.01, had 5× less error per draw and 1.4× more in the distribution); the sampler's own level stays.
TRUSTED = 0.01


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
    start: Optional[Dict[str, Any]] = None

    @property
    def gaussian_start(self) -> Optional[GaussianStart]:
        """The analytic first step from T to ``times[0]`` (:class:`~.gaussian_start.GaussianStart`), or None: the grid
        starts at T."""
        return None if self.start is None else GaussianStart.from_dict(self.start)

    @property
    def end_sigma(self) -> Optional[float]:
        """The level σ/m the fit chose to stop at (a sampler whose final step follows the ODE to 0), or None."""
        v = self.extra.get("end_sigma")
        return None if v is None else float(v)

    def apply(self, sampler: Any) -> Any:
        """A copy of ``sampler`` on this grid, stopping at the level the fit chose (:func:`on_schedule`); a level
        chosen by ``samples`` was judged where the samples are returned, so any sampler that stops at a level
        takes it."""
        return on_schedule(sampler, self.times, self.end_sigma, any_level=self.objective == "samples",
                           start=self.gaussian_start)

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
    """The name under which a fitted grid is stored: a digest of what it depends on. ``denoise_order`` counts only
    above 1, where the fit may move the end point (Tweedie's step comes after the grid, and grids stored before the
    option existed keep their key)."""
    kept = {k: options[k] for k in sorted(options)
            if k != "denoise_order" or (isinstance(options[k], int) and options[k] > 1)}
    blob = json.dumps({"sampler": sampler, "options": kept, "steps": int(steps),
                       "digest": digest, "objective": objective, "format": FORMAT}, sort_keys=True, default=str)
    return f"{sampler}-{steps}steps-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def check_times(times: Tensor, sde: SDE, steps: int, end_time: Optional[float] = None, what: str = "the grid",
                start_time: Optional[float] = None) -> Tensor:
    """``times`` as float64 ``[steps + 1]``, checked: starts at T (or at ``start_time``, a Gaussian start's), strictly
    decreasing, ends inside (0, T) (and at ``end_time`` when given)."""
    t = torch.as_tensor(times, dtype=torch.float64).flatten()
    if t.numel() != steps + 1:
        raise ValueError(f"{what} has {t.numel()} times, i.e. {t.numel() - 1} steps, but {steps} steps were asked; "
                         f"fit a grid for steps={steps} (schedule=fit) or use steps={t.numel() - 1}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} holds non-finite times")
    if start_time is not None:
        if abs(float(t[0]) - start_time) > 1e-6 * max(1.0, sde.T):
            raise ValueError(f"{what} starts at t={float(t[0]):.6g}, but its Gaussian start ends at t={start_time:.6g}: "
                             "it was fitted to another process or start; fit again (schedule=fit)")
    elif abs(float(t[0]) - sde.T) > 1e-6 * max(1.0, sde.T):
        raise ValueError(f"{what} starts at t={float(t[0]):.6g}, but the process starts at T={sde.T}: it was fitted "
                         "to another process, or it begins with a Gaussian start (give the fitted schedule or its "
                         "file, not its bare times)")
    if not (t[1:] < t[:-1]).all():
        raise ValueError(f"{what} must decrease strictly from T to the end time")
    if not 0 < float(t[-1]) < sde.T:
        raise ValueError(f"{what} ends at t={float(t[-1]):.6g}, outside (0, T={sde.T})")
    if end_time is not None and abs(float(t[-1]) - end_time) > 1e-6 * max(end_time, 1e-12) + 1e-12:
        raise ValueError(f"{what} ends at t={float(t[-1]):.6g} but the sampler ends at t={end_time:.6g} (its eps / "
                         "end_sigma differ from the fit's); fit again with these options")
    return t


def movable_end(sampler: Any) -> bool:
    """Whether the fit may move ``sampler``'s end level: it stops at an ``end_sigma`` and its final step follows the
    probability-flow ODE on to σ̃ = 0 (``denoise=True``, ``denoise_order`` > 1)."""
    end = sampler.end
    return bool(end.denoise) and int(end.denoise_order) > 1 and end.end_sigma is not None


def on_schedule(sampler: Any, times: Any, end_sigma: Optional[float] = None, any_level: bool = False,
                start: Optional[GaussianStart] = None) -> Any:
    """A copy of ``sampler`` running on ``times`` (``[steps + 1]``), ending at the level ``end_sigma`` where a fit
    moved it there (:attr:`FittedSchedule.end_sigma`). ``any_level``: the level was chosen for this sampler as it is
    (``objective="samples"`` judges the samples where they are returned), so any sampler that stops at a level
    (``end_sigma``) takes it; otherwise only one whose final step follows the ODE to σ/m = 0."""
    import copy

    smp = copy.copy(sampler)
    if end_sigma is not None and end_sigma != smp.end.end_sigma:
        if any_level and smp.end.end_sigma is None:
            raise ValueError(f"the grid stops at σ/m = {end_sigma:g}, but this sampler ends at its eps (no "
                             "end_sigma): fit again with these options (schedule=fit)")
        if not any_level and not movable_end(smp):
            raise ValueError(f"the grid stops at σ/m = {end_sigma:g}, a level its fit chose for a sampler whose final "
                             "step follows the ODE to σ/m = 0 (denoise=true, denoise_order ≥ 2, an end_sigma); this "
                             "sampler has no such step: fit again with these options (schedule=fit)")
        smp.end = _end_at(smp, float(end_sigma))
    return smp.use_times(times, start)


def _end_levels(sde: SDE, sampler: Any, top: Optional[float] = None) -> List[Optional[float]]:
    """The levels the fit tries to stop at, highest first: ``[None]`` (the sampler's own end) where it cannot move
    (:func:`movable_end`), else its ``end_sigma`` times :data:`END_FACTORS`, those the process reaches below a tenth
    of ``top`` (the level the run starts at; None: the prior's) (and, where a factor goes below that, the lowest level
    it reaches)."""
    if not movable_end(sampler):
        return [None]
    from .defaults import lowest_noise_level

    own = float(sampler.end.end_sigma)
    top = top_level(sde) if top is None else float(top)
    low = lowest_noise_level(sde)
    levels = {own} | {own * f for f in END_FACTORS if low * 1.01 <= own * f <= top / 10}
    if any(own * f < low * 1.01 for f in END_FACTORS) and low * 1.01 < own:
        levels.add(low * 1.01)  # a factor below what the process reaches: its lowest level instead
    return sorted(levels, reverse=True)


def _fine_through(sde: SDE, ends: List[float], M: int, t0: Optional[float] = None) -> tuple[Tensor, List[int]]:
    """About M fine times from ``t0`` (None: T) down through the end times ``ends`` (descending), uniform in log-SNR
    between consecutive ones, and the index of each end time in it."""
    bounds = [float(sde.T) if t0 is None else float(t0)] + list(ends)
    lam = sde.log_snr(torch.tensor(bounds, dtype=torch.float64))
    widths = (lam[1:] - lam[:-1]).tolist()
    total = sum(widths)
    parts, index = [torch.tensor([bounds[0]], dtype=torch.float64)], []
    count = 0
    for k, w in enumerate(widths):
        n = max(1, round(M * w / total))
        seg = sde.t_from_log_snr(torch.linspace(float(lam[k]), float(lam[k + 1]), n + 1, dtype=torch.float64))
        seg[0], seg[-1] = bounds[k], bounds[k + 1]
        parts.append(seg[1:])
        count += n
        index.append(count)
    return torch.cat(parts), index


def _teacher_at_zero(sde: SDE, score_fn: ScoreFn, fine: Tensor, states: List[Tensor], dens: List[Tensor],
                     order: int) -> tuple[Tensor, Tensor]:
    """The teacher's samples carried from its last fine time to σ̃ = 0 by the final step of ``order`` through its
    last fine nodes (:mod:`.final_step`), in the data's scale, and the score at its last state (the one more
    evaluation this takes)."""
    from .final_step import step_to_zero

    x = states[-1]
    t_end = torch.full((x.shape[0],), float(fine[-1]), dtype=x.dtype, device=x.device)
    m = sde.mean_coeff(fine).tolist()
    s = sde.marginal_std(fine).tolist()
    M = fine.numel() - 1
    score_end = score_fn(x, t_end)
    d_end = (x + s[M] ** 2 * score_end) / m[M]
    nodes, eps = [], []
    for j, d in zip(range(M, M - order, -1), [d_end] + dens[::-1]):
        nodes.append(s[j] / m[j])
        eps.append((states[j] / m[j] - d) / (s[j] / m[j]))
    return step_to_zero(x / m[M], nodes, eps), score_end


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


def _motion(dens: List[Tensor]) -> tuple[Tensor, float]:
    """‖D_{j+1} − D_j‖ for j = 0..M−2 (``[M − 1]``, root mean square over the batch and coordinates) and the root
    mean square of D itself."""
    D = torch.stack([d.double().reshape(d.shape[0], -1) for d in dens])  # [M, B, Dim]
    return (D[1:] - D[:-1]).pow(2).mean(dim=(1, 2)).sqrt(), float(D.pow(2).mean().sqrt())


def _curvature_rates(sde: SDE, fine: Tensor, moved: Tensor) -> Tensor:
    """(m ‖dD/dλ‖)^{1/2} per fine interval, ``[M]``, from the teacher's motion ``moved`` (:func:`_motion`)."""
    M = fine.numel() - 1
    m = sde.mean_coeff(fine)
    lam = torch.log(m / sde.marginal_std(fine))
    dD = moved / (lam[1:M] - lam[: M - 1])  # at interval mids
    rate = (m[1:M] * dD).clamp(min=0).sqrt()
    return torch.cat([rate[:1], rate, rate[-1:]])[:M]


def _hessian_quad(score_fn: ScoreFn, x: Tensor, t: float, m: float, sigma: float, score0: Tensor, e: Tensor) -> Tensor:
    r"""eᵀ H̃ e per draw, ``[B]``: H̃ = −∇²_x̃ log p̃ (x̃ = x/m) at the state x ``[B, ...]`` at time t, applied to
    e ``[B, ...]`` (in x̃) by one finite difference of the score (``score0``: its value at x). The probe moves x̃ by
    0.1 σ̃ (root mean square per coordinate) along e: small against the scale on which the noised density bends,
    large against float32 rounding. A draw with e = 0 gives 0 and is not probed."""
    B = x.shape[0]
    shape = (B,) + (1,) * (x.dim() - 1)
    rms = e.double().reshape(B, -1).pow(2).mean(1).sqrt()
    moved = rms > 0
    eps = torch.where(moved, (0.1 * sigma / m) / rms.clamp(min=1e-300), torch.ones_like(rms))
    eps_x = torch.where(moved, eps, torch.zeros_like(eps)).to(x.dtype).reshape(shape)
    tt = torch.full((B,), t, dtype=x.dtype, device=x.device)
    ds = (score_fn(x + m * eps_x * e, tt) - score0).double()
    quad = -(m / eps) * (ds * e.double()).reshape(B, -1).sum(1)
    return torch.where(moved, quad, torch.zeros_like(quad))


def _whitened_rates(sde: SDE, score_fn: ScoreFn, fine: Tensor, states: List[Tensor], dens: List[Tensor]) -> Tensor:
    r"""(E_b |ΔD_jᵀ H̃_j ΔD_j|)^{1/4} / Δλ_j^{1/2} per fine interval, ``[M]``: ΔD_j = D_{j+1} − D_j and
    H̃_j = −∇²_x̃ log p̃_j (x̃ = x/m) at the teacher's state X_j, applied to ΔD_j by one finite difference of the
    score (one evaluation per interval; the teacher's own evaluation at X_j is reused)."""
    M = fine.numel() - 1
    m = sde.mean_coeff(fine).tolist()
    s = sde.marginal_std(fine).tolist()
    lam = [math.log(a / b) for a, b in zip(m, s)]
    q: List[float] = []
    for j in range(M - 1):
        score0 = (m[j] * dens[j] - states[j]) / s[j] ** 2  # the teacher's evaluation at X_j
        quad = _hessian_quad(score_fn, states[j], float(fine[j]), m[j], s[j], score0, dens[j + 1] - dens[j])
        q.append(float(quad.abs().mean()) / (lam[j + 1] - lam[j]) ** 2)
    q.append(q[-1])
    return torch.tensor(q, dtype=torch.float64).clamp(min=0) ** 0.25


def _still(moved: Tensor, scale: float, dtype: torch.dtype) -> bool:
    """Whether the denoised estimates along the teacher path (:func:`_motion`) moved by no more than rounding noise
    of ``dtype`` in all."""
    info = torch.finfo(dtype)
    return float(moved.sum()) <= 100 * (moved.numel() + 1) * info.eps * max(scale, info.tiny)


def _equidistribute(sde: SDE, fine: Tensor, rate: Tensor, steps: int, blend: float = 0.0) -> List[int]:
    """Fine indices 0 = j_0 < … < j_N = M splitting ∫ ρ dλ into equal parts, ρ = (1 − blend)·rate +
    blend·mean(rate) (``blend`` = 1: the uniform log-SNR grid)."""
    M = fine.numel() - 1
    lam = torch.log(sde.mean_coeff(fine) / sde.marginal_std(fine))
    h = lam[1:] - lam[:-1]
    rate = torch.nan_to_num(rate, nan=0.0, posinf=0.0).clamp(min=0)
    mean = float((rate * h).sum() / h.sum())
    if not mean > 0:
        rate, mean = torch.ones_like(rate), 1.0
    rho = (1 - blend) * rate + (blend + 1e-3) * mean  # never zero
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(rho * h, 0)])
    targets = torch.linspace(0, float(cum[-1]), steps + 1, dtype=torch.float64)
    # A target that falls on a fine point up to rounding takes that point, not the next one.
    idx = torch.searchsorted(cum, targets * (1 - 1e-12)).clamp(0, M).tolist()
    idx[0], idx[-1] = 0, M
    for k in range(1, steps):  # keep strictly increasing with room for the rest
        idx[k] = min(max(idx[k], idx[k - 1] + 1), M - (steps - k))
    return idx


def fit_start(sde: SDE, score_fn: ScoreFn, sampler: Any, steps: int, x_T: Tensor, score_kind: Optional[str] = None
              ) -> tuple[Optional[GaussianStart], int]:
    """The Gaussian start of a fit (:mod:`.gaussian_start`), or None where it would not shorten the run, and the NFE
    spent: the mean and covariance of :data:`START_DRAWS` samples of the model (the default sampler at
    :data:`START_NFE`), the level :func:`~.gaussian_start.start_factor` (by the sampler's NFE) × √λ_max. None where
    that level is not below half the prior's or not above :data:`START_ROOM` × the level the sampler stops at, where
    the model's samples are not finite, and (with no evaluation spent) where the budget takes no start (from 30
    NFE)."""
    from ..registry import SAMPLERS
    from .defaults import default_sampler, is_learned_score

    budget = sampler.expected_nfe(steps) or steps
    factor = start_factor(budget)
    if factor is None:
        return None, 0
    # The samples of sample(sde, score_fn, shape, steps=START_NFE).
    choice = default_sampler(sde, START_NFE, score_kind or ("learned" if is_learned_score(score_fn) else "exact"))
    teacher = SAMPLERS.get(choice.name)(**choice.options)
    gen = torch.Generator(device=x_T.device).manual_seed(START_SEED)
    x = sde.prior_sample((START_DRAWS, *x_T.shape[1:]), generator=gen, device=x_T.device, dtype=x_T.dtype)
    x, nfe = _returned(sde, score_fn, teacher, x, choice.steps, gen)
    if not torch.isfinite(x).all():
        return None, nfe  # a model whose samples diverge has no moments to start from; fit from T
    gstart = GaussianStart.from_samples(x, factor=factor)
    end_level = noise_level(sde, sampler.end.end_time(sde))
    if not (START_ROOM * end_level < gstart.level < 0.5 * top_level(sde)):
        return None, nfe
    return gstart, nfe


def _returned(sde: SDE, score_fn: ScoreFn, smp: Any, x: Tensor, steps: int, generator: torch.Generator
              ) -> tuple[Tensor, int]:
    """What ``sample()`` returns for the step sampler ``smp`` from ``x`` (its run, then its final step, or x̃ at the
    level it stops at), and the NFE it spent (built here: the sampler module imports this one)."""
    from .final_step import evaluations_to_keep, finish_run

    counted = CountingScore(score_fn, keep=evaluations_to_keep(smp.end.denoise_order, smp.nfe_per_step))
    out, _, _ = smp.run(sde, counted, x, steps, generator)
    return finish_run(sde, smp.end, out, smp.end_time(sde), counted), counted.nfe


def default_objective(score_fn: Any = None, score_kind: Optional[str] = None) -> str:
    """:data:`DEFAULT_OBJECTIVES` for ``score_kind`` (``"exact"`` / ``"learned"``; None: detected from ``score_fn``)."""
    from .defaults import is_learned_score

    kind = score_kind or ("learned" if is_learned_score(score_fn) else "exact")
    if kind not in DEFAULT_OBJECTIVES:
        raise ValueError(f"unknown score kind {kind!r}; choose one of: {', '.join(DEFAULT_OBJECTIVES)}")
    return DEFAULT_OBJECTIVES[kind]


def fit_batch(objective: str, shape: Sequence[int]) -> int:
    """Prior draws a fit with ``objective`` takes for samples of ``shape`` (one sample's, without the batch)
    (``sample(..., schedule="fit")`` and ``sample.py``)."""
    if objective != "samples":
        return 64
    return max(SAMPLES_BATCH, SAMPLES_COORDS // max(1, math.prod(int(d) for d in shape)))


def fit_schedule(
    sde: SDE,
    score_fn: ScoreFn,
    sampler: Any,
    steps: int,
    x_T: Tensor,
    *,
    objective: Optional[str] = None,
    fine_steps: Optional[int] = None,
    sampler_name: str = "",
    options: Optional[Mapping[str, Any]] = None,
    digest: Optional[str] = None,
    score_kind: Optional[str] = None,
    move_end: bool = True,
    start: bool = True,
) -> FittedSchedule:
    """Fit the ``steps``-step grid of ``sampler`` to ``score_fn`` from the prior batch ``x_T [B, ...]``.

    Args:
        sampler: a step sampler (its end point fixes the last time).
        objective: ``whitened`` (equidistributed local error along the teacher path in the noised density's
            Hessian norm; M − 1 more evaluations), ``curvature`` (the same in the Euclidean norm, scaled by m),
            ``path`` (dynamic programming against the teacher path) or ``samples`` (the grid and level whose samples
            come closest in distribution to the sampler's own at M steps: :func:`_fit_by_samples`; for stochastic
            samplers too); None: :data:`DEFAULT_OBJECTIVES` for the score's kind. For a deterministic sampler the
            fitted grid(s) and the rule's own grid are run from the teacher's start and the one ending closest to
            the teacher's end state is kept.
        fine_steps: M, the teacher's steps (default max(100, 8·steps), capped at 400; ``samples``: max(50, 3·steps),
            capped at 200, the sampler's own steps on its rule's grid).
        sampler_name, options, digest: recorded with the grid (``digest``: the weights it was fitted to).
        score_kind: ``"exact"`` or ``"learned"`` for the default objective; None: detected from ``score_fn``.
        move_end: where the sampler's final step follows the ODE to σ̃ = 0, also choose the level it stops at
            (module docstring); False keeps the sampler's own.
        start: begin the grid at a level below T reached by the analytic step of a Gaussian fitted to the model's
            samples (:func:`fit_start`; stored with the grid); False: the grid starts at T.
    """
    if objective is None:
        objective = default_objective(score_fn, score_kind)
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown schedule objective {objective!r}; choose one of: {', '.join(OBJECTIVES)}")
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if getattr(sampler, "default_grid", None) is None:
        raise ValueError(f"{type(sampler).__name__} chooses its own times; schedule=fit needs a sampler with a time "
                         "grid (a step sampler such as dpm_solver, ddim, edm_heun, euler_maruyama)")
    M = int(fine_steps or min(400, max(100, 8 * int(steps))))
    begun = time.perf_counter()
    from .grids import time_grid

    gstart, start_nfe = None, 0
    if start:
        with torch.no_grad():
            gstart, start_nfe = fit_start(sde, score_fn, sampler, int(steps), x_T, score_kind)
    t0 = None if gstart is None else gstart.time(sde)

    def made(times: Tensor, M: int, nfe: int, extra: Dict[str, Any]) -> FittedSchedule:
        if gstart is not None:
            extra["start"] = {"level": gstart.level, "std_max": gstart.std_max, "samples": gstart.samples,
                              "nfe": start_nfe}
        return FittedSchedule(times=[float(v) for v in times], sampler=sampler_name or type(sampler).__name__,
                              options=dict(options or {}), steps=int(steps), digest=digest, objective=objective,
                              fine_steps=M, fit_nfe=nfe + start_nfe, fit_seconds=time.perf_counter() - begun,
                              sde=repr(sde), extra=extra, start=None if gstart is None else gstart.to_dict())

    if objective == "samples":
        M = int(fine_steps or min(200, max(50, 3 * int(steps))))
        with torch.no_grad():
            times, level, extra, nfe = _fit_by_samples(sde, score_fn, sampler, int(steps), x_T, M, gstart)
        if level is not None:
            extra["end_sigma"] = level
        return made(times, M, nfe, extra)

    levels = _end_levels(sde, sampler, None if gstart is None else gstart.level) if move_end else [None]
    end_of = {e: float(_end_at(sampler, e).end_time(sde)) for e in levels}
    if levels == [None] and t0 is None:
        fine = time_grid(sde, M, "logsnr", eps=end_of[None], dtype=torch.float64)
        at = {None: M}
    else:
        fine, index = _fine_through(sde, [end_of[e] for e in levels], M, t0)
        at = dict(zip(levels, index))
    M = fine.numel() - 1
    x_run = x_T if gstart is None else gstart.transport(sde, x_T)
    with torch.no_grad():
        states, dens = _teacher(sde, score_fn, x_run, fine)
        nfe = M
        moved, scale = _motion(dens)
        still = _still(moved, scale, dens[0].dtype)
        rates: Optional[Tensor] = None
        C: Optional[Tensor] = None
        if steps > 1 and objective == "path":
            C = _path_costs(sde, fine, states, dens)
        elif steps > 1 and not still:
            if objective == "whitened":
                rates = _whitened_rates(sde, score_fn, fine, states, dens)
                nfe += M - 1
            else:
                rates = _curvature_rates(sde, fine, moved)

        def grids(j: int) -> tuple[List[int], Dict[str, List[int]]]:
            # The fitted indices of an N-step grid on the fine prefix 0..j (and, for ``path``, its candidates).
            if steps == 1:
                return [0, j], {}
            if C is not None:
                # A p-th order step's local error scales as h^(p+1) where the first-order one's scales as h²: the
                # pairwise first-order costs, raised to (p + 1)/2, model the sampler's own steps; exponents 1 and 2
                # bracket that model, and the check keeps the best of the three.
                order = max(1, int(getattr(sampler, "order", 1) or 1))
                cands = {f"dp^{p:g}": _dp(C[: j + 1, : j + 1] ** p, int(steps)) for p in sorted({1.0, (order + 1) / 2, 2.0})}
                return cands[f"dp^{(order + 1) / 2:g}"], cands
            if rates is None:
                # The denoiser never moved along the teacher path (data at one point): nothing to fit, and rates
                # made of rounding noise would give a random grid. The teacher's own spacing, uniform in λ.
                return _equidistribute(sde, fine[: j + 1], torch.ones(j, dtype=torch.float64), int(steps)), {}
            blend = WHITENED_BLEND if objective == "whitened" else 0.0
            return _equidistribute(sde, fine[: j + 1], rates[:j], int(steps), blend), {}

        fitted = {e: grids(at[e]) for e in levels}
        level: Optional[float] = None
        idx: Optional[List[int]] = fitted[levels[0]][0]
        extra: Dict[str, Any] = {}
        if levels != [None]:
            target, score_end = _teacher_at_zero(sde, score_fn, fine, states, dens, int(sampler.end.denoise_order))
            m_end = float(sde.mean_coeff(fine[-1:])[0])
            s_end = float(sde.marginal_std(fine[-1:])[0])

            def judge(out: Tensor) -> Tensor:
                # The error at σ̃ = 0 in the Hessian norm of the noised density at the teacher's lowest level, per
                # draw: a sharp mode's narrow directions count as much as a wide mode's broad ones.
                return _hessian_quad(score_fn, states[-1], float(fine[-1]), m_end, s_end, score_end, out - target).abs()

            level, idx, extra, used = _select_end(sde, score_fn, sampler, int(steps), fine, x_T, judge, fitted,
                                                  end_of, gstart)
            nfe += 1 + used
            extra["end_sigma"] = level
        elif steps > 1:
            idx, cands = fitted[None]
            idx, extra, used = _select(sde, score_fn, sampler, int(steps), fine, x_T, states[-1], idx,
                                       cands or {objective: idx}, end_of[None], gstart)
            nfe += used
    if idx is not None:
        times = fine[idx]
        times[0], times[-1] = fine[0], end_of[level]
    else:
        times = _rule_times(sde, sampler, int(steps), level, end_of[level], t0)
    return made(times, M, nfe, extra)


def warped_log_snr_times(sde: SDE, steps: int, end: float, p: float, t0: Optional[float] = None) -> Tensor:
    """``[steps + 1]`` float64 times from ``t0`` (None: T) to ``end``: λ_i = λ(t0) + (λ(end) − λ(t0)) (i/N)^p (p = 1:
    uniform in λ)."""
    t0 = float(sde.T) if t0 is None else float(t0)
    lam = sde.log_snr(torch.tensor([t0, end], dtype=torch.float64))
    w = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64) ** p
    t = sde.t_from_log_snr(lam[0] + (lam[1] - lam[0]) * w)
    t[0], t[-1] = t0, end
    return t


def _fit_by_samples(sde: SDE, score_fn: ScoreFn, sampler: Any, steps: int, x_T: Tensor, M: int,
                    gstart: Optional[GaussianStart] = None) -> tuple[Tensor, Optional[float], Dict[str, Any], int]:
    """``objective="samples"``: the grid whose samples come closest in distribution to the teacher's.

    The teacher is the sampler itself on its own rule's grid of M steps, ending with a denoising step (Tweedie's)
    where the sampler has none, so that it stands for the model's clean samples. Every candidate runs from the same
    ``x_T`` with the same noise seed; the distance is the sliced W2 between its samples and the teacher's in the
    data's coordinates. Candidates with a draw further from the teacher's mean than :data:`SAMPLES_OUTLIER` × the
    teacher's farthest draw (a diverged step) lose to those without. Round 1: the rule's own grid, and uniform
    log-SNR grids stopping at each of :data:`SAMPLES_LEVELS` × the sampler's ``end_sigma`` (only its own end where
    it has none); round 2: the warps :data:`SAMPLES_WARPS` at the best level. Unlike the per-draw objectives this
    judges a stochastic sampler too, and the level its samples are returned at: their remaining noise counts in the
    distance (at second order in the level: see the module docstring). With ``gstart`` every candidate begins with
    that analytic step (the teacher starts at T). Returns (times, level or None for the sampler's own, what was
    measured, NFE spent)."""
    import copy
    from dataclasses import replace

    from ..metrics import sliced_wasserstein

    own = sampler.end.end_sigma
    levels: List[Optional[float]] = [None] if own is None else [float(own) * f for f in SAMPLES_LEVELS]
    end_of = {e: float(_end_at(sampler, e).end_time(sde)) for e in levels}
    used = [0]

    def run(smp: Any, n: int) -> Tensor:
        gen = torch.Generator(device=x_T.device).manual_seed(SAMPLES_NOISE_SEED)
        out, nfe = _returned(sde, score_fn, smp, x_T, n, gen)
        used[0] += nfe
        return out.flatten(1).double()

    # The teacher ends clean (a denoising step where the sampler has none): the samples are judged as data.
    end = sampler.end
    teacher_smp = copy.copy(sampler)
    teacher_smp.end = end if end.denoise else replace(end, denoise=True, denoise_order=1)
    teacher = run(teacher_smp, M)
    mean = teacher.mean(0)
    reach = float((teacher - mean).norm(dim=1).max())
    proj = torch.Generator()

    def judge(out: Tensor) -> tuple[bool, float]:
        if not torch.isfinite(out).all():
            return True, math.inf
        diverged = bool(((out - mean).norm(dim=1) > SAMPLES_OUTLIER * reach).any())
        return diverged, float(sliced_wasserstein(out, teacher, generator=proj.manual_seed(0)))

    scores: Dict[str, tuple[bool, float]] = {}
    grids: Dict[str, tuple[Tensor, Optional[float]]] = {}

    t0 = None if gstart is None else gstart.time(sde)

    def trial(name: str, times: Tensor, level: Optional[float]) -> None:
        grids[name] = (times, level)
        scores[name] = judge(run(on_schedule(sampler, times, level, any_level=True, start=gstart), steps))

    if gstart is None:
        trial("rule", _rule_times(sde, sampler, steps, None, end_of[levels[0]]), None)
    for e in levels:
        trial(f"level {e if e is not None else 'own'} p=1", warped_log_snr_times(sde, steps, end_of[e], 1.0, t0), e)
    e = grids[min((k for k in scores if k != "rule"), key=lambda k: scores[k])][1]
    for p in SAMPLES_WARPS:
        trial(f"level {e if e is not None else 'own'} p={p:g}", warped_log_snr_times(sde, steps, end_of[e], p, t0), e)
    best = min(scores, key=lambda k: scores[k])
    times, level = grids[best]
    if level is not None and own is not None and abs(level - float(own)) <= 1e-12 * float(own):
        level = None
    extra = {"selection": best, "sliced_w2_to_teacher": {k: v[1] for k, v in scores.items()},
             "diverged": sorted(k for k, v in scores.items() if v[0])}
    return times, level, extra, used[0]


def _end_at(sampler: Any, level: Optional[float]) -> Any:
    """``sampler``'s end point, stopping at the level σ/m = ``level`` (None: its own)."""
    from dataclasses import replace

    return sampler.end if level is None else replace(sampler.end, end_sigma=level)


def _rule_times(sde: SDE, sampler: Any, steps: int, level: Optional[float], end: float,
                t0: Optional[float] = None) -> Tensor:
    """The rule's ``[steps + 1]`` float64 grid of ``sampler`` stopping at ``level``, pinned to T and ``end``; from a
    Gaussian start's time ``t0``, uniform in the log-SNR from there (the rule's grids start at T)."""
    if t0 is not None:
        return warped_log_snr_times(sde, steps, end, 1.0, t0)
    t = _end_at(sampler, level).times(sde, steps, dtype=torch.float64)
    t[0], t[-1] = sde.T, end
    return t


def _runner(sde: SDE, score_fn: ScoreFn, sampler: Any, steps: int, x_T: Tensor, final: bool = False,
            gstart: Optional[GaussianStart] = None) -> tuple[Any, List[int]]:
    """``run(times, seed, end_sigma=None)``: ``sampler`` from ``x_T`` (at T; through ``gstart``'s analytic step where
    given) on ``times`` (ending at the level ``end_sigma``, with its final step when ``final``), and the list whose
    one entry counts the evaluations spent."""
    from .final_step import evaluations_to_keep, final_step

    used = [0]

    def run(times: Tensor, seed: int, end_sigma: Optional[float] = None) -> Tensor:
        smp = on_schedule(sampler, times, end_sigma, start=gstart)
        order = int(smp.end.denoise_order) if final else 1
        counted = CountingScore(score_fn, keep=evaluations_to_keep(order, smp.nfe_per_step) if final else 0)
        gen = torch.Generator(device=x_T.device).manual_seed(seed)
        out, _, _ = smp.run(sde, counted, x_T, steps, gen)
        if final:
            out = final_step(sde, out, float(times[-1]), counted, order)
        used[0] += counted.nfe
        return out

    return run, used


def _select(sde: SDE, score_fn: ScoreFn, sampler: Any, steps: int, fine: Tensor, x_T: Tensor, target: Tensor,
            idx: Optional[List[int]], candidates: Dict[str, List[int]], end: float,
            gstart: Optional[GaussianStart] = None) -> tuple[Optional[List[int]], Dict[str, Any], int]:
    """For a deterministic sampler: run it from the teacher's x_T (through ``gstart`` where given) on the rule's grid
    and on each candidate grid and keep the one that lands closest to the teacher's end state ``target`` (so a fit
    never does worse than the rule by that measure); a stochastic sampler keeps ``idx``. Returns (indices, or None
    for the rule's grid; what was measured; NFE spent)."""
    run, used = _runner(sde, score_fn, sampler, steps, x_T, gstart=gstart)
    rule = _rule_times(sde, sampler, steps, None, end, None if gstart is None else float(fine[0]))
    a = run(rule, 1)
    if not torch.equal(a, run(rule, 2)):
        return idx, {"selection": "stochastic sampler: no selection"}, used[0]
    options: Dict[str, Optional[List[int]]] = {"rule": None, **candidates}
    errors = {"rule": float((a - target).pow(2).mean().sqrt())}
    for name, cand in candidates.items():
        t = fine[cand].clone()
        t[0], t[-1] = fine[0], end
        errors[name] = float((run(t, 1) - target).pow(2).mean().sqrt())
    best = min(errors, key=errors.get)
    return options[best], {"selection": best, "rms_to_teacher": errors}, used[0]


def _select_end(sde: SDE, score_fn: ScoreFn, sampler: Any, steps: int, fine: Tensor, x_T: Tensor,
                judge: Callable[[Tensor], Tensor], fitted: Dict[Optional[float], tuple[List[int], Dict[str, List[int]]]],
                end_of: Dict[Any, float], gstart: Optional[GaussianStart] = None
                ) -> tuple[float, Optional[List[int]], Dict[str, Any], int]:
    """The level and grid whose run, with the sampler's final step, lands closest to the teacher's samples at σ̃ = 0
    by ``judge`` (per draw; one evaluation each), averaged by :func:`_mean_within_modes`: at each level the rule's
    grid and the fitted one(s). A stochastic sampler keeps its own level and the fitted grid there. Returns (level,
    indices or None for the rule's grid, what was measured, NFE spent)."""
    run, used = _runner(sde, score_fn, sampler, steps, x_T, final=True, gstart=gstart)
    t0 = None if gstart is None else float(fine[0])
    own = float(sampler.end.end_sigma)
    per_draw: Dict[str, Tensor] = {}
    picks: Dict[str, tuple[float, Optional[List[int]]]] = {}
    for level, (idx, cands) in fitted.items():
        rule = _rule_times(sde, sampler, steps, level, end_of[level], t0)
        if level == own and not torch.equal(run(rule, 1, level), run(rule, 2, level)):
            return own, idx, {"selection": "stochastic sampler: no selection"}, used[0]
        grids: Dict[str, Optional[List[int]]] = {"rule": None, **(cands or {"fit": idx})}
        for name, cand in grids.items():
            if cand is None:
                t = rule
            else:
                t = fine[cand].clone()
                t[0], t[-1] = fine[0], end_of[level]
            label = f"{name}@{level:g}"
            per_draw[label] = judge(run(t, 1, level))
            used[0] += 1
            picks[label] = (level, cand)
    dim = x_T[0].numel()
    errors = _mean_within_modes(per_draw, dim)
    trusted = min(errors.values()) <= TRUSTED * dim
    best = min((k for k in errors if trusted or picks[k][0] == own), key=errors.get)
    return picks[best][0], picks[best][1], {"selection": best, "whitened_error_to_teacher": errors,
                                            "levels_compared": trusted}, used[0]


def _mean_within_modes(per_draw: Dict[str, Tensor], dim: int) -> Dict[str, float]:
    """Each run's mean whitened error ``[B]`` per draw over the draws that stay near the teacher's sample in every
    run (error below :data:`LOST` × the dimension): a draw whose run ends in another mode than the teacher's (the
    basin decided by a high-noise step) is an error of the path, not of the distribution, and one such draw would
    decide the mean; a sharp mode's badly resolved draws stay in. Where fewer than a quarter of the draws stay in
    every run, each draw's error is capped there instead."""
    cap = LOST * dim
    stack = torch.stack(list(per_draw.values()))  # [runs, B]
    kept = (stack <= cap).all(dim=0)
    if int(kept.sum()) >= max(8, stack.shape[1] // 4):
        means = stack[:, kept].mean(dim=1)
    else:
        means = stack.clamp(max=cap).mean(dim=1)
    return {label: float(v) for label, v in zip(per_draw, means)}


__all__ = ["DEFAULT_OBJECTIVES", "END_FACTORS", "FittedSchedule", "OBJECTIVES", "check_times", "default_objective",
           "fit_schedule", "fit_start", "movable_end", "on_schedule", "schedule_key"]
