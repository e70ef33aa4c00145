r"""The sampler contract, the shared time loop and the entry points :func:`sample` and :func:`make_sampler`.

A sampler sees an :class:`~sde_diffusion.sdes.SDE` and a ``score_fn(x [B, ...], t [B]) -> [B, ...]``,
nothing more. Most samplers are *step samplers*: they implement one reverse step over interval
``i`` of the run's coefficient table ``grid`` (:class:`~.coeffs.GridCoeffs`), from
``grid.times[i]`` down to ``grid.times[i + 1]``, and inherit the loop, the time grid, the progress
bar, trajectory recording, the per-step hook and the optional final denoising step. Euler's method
on the probability-flow ODE dx = [f(t) x − ½ g(t)² s(x, t)] dt is::

    @SAMPLERS.register("pf_euler")
    class PFEuler(StepSampler):
        def step(self, x, i, grid, ctx):
            dt = grid.t[i + 1] - grid.t[i]  # < 0: reverse time
            s = ctx.score(x, grid.times[i])
            return x + (grid.f[i] * x - 0.5 * grid.g2[i] * s) * dt

plus ``conf/sampler/pf_euler.yaml``. It takes the end-point options every sampler shares
(``grid``, ``rho``, ``eps``, ``end_sigma``, ``denoise``: :class:`~.grids.EndPoint`) from the base
class; a sampler with options of its own declares only those and passes the rest through::

    def __init__(self, churn: float = 0.0, **end):
        super().__init__(**end)
        self.churn = churn

Samplers that manage their own time (adaptive ODE solvers, torchsde) override :meth:`Sampler.run`
instead.

Usage::

    result = sample(sde, score_fn, (1000, 2), sampler="pc", steps=500,
                    generator=torch.Generator().manual_seed(0))
    result.samples, result.nfe
"""
from __future__ import annotations

import abc
import inspect
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..registry import SAMPLERS
from ..score import CountingScore
from ..sdes.sde import SDE, ScoreFn
from .coeffs import GridCoeffs
from .defaults import DefaultChoice, is_learned_score, resolve_sampler
from .final_step import evaluations_to_keep, finish_run
from .grids import EndPoint


# hook(x, t) -> x, applied after every step at the step's new time (e.g. inpainting's projection).
StepHook = Callable[[Tensor, Tensor], Tensor]


@dataclass
class SampleResult:
    """Samples ``[B, ...]``, the exact number of batched score evaluations, optional trajectory.

    ``trajectory[k]`` is the state at ``times[k]`` (starting with the prior sample at T, or, on a fitted grid with a
    Gaussian start, with that sample carried to the start's level).
    ``choice`` is the :class:`~sde_diffusion.samplers.defaults.DefaultChoice` when no sampler was named.
    """

    samples: Tensor
    nfe: int
    trajectory: Optional[List[Tensor]] = None
    times: Optional[Tensor] = None
    choice: Optional[DefaultChoice] = None
    schedule: Optional[Any] = None


@dataclass
class SamplingContext:
    """What a step needs besides x and its coefficients: the process, the score, randomness, memory.

    ``state`` is per-run memory (e.g. a multistep history), filled by :meth:`StepSampler.begin`.
    """

    sde: SDE
    score_fn: ScoreFn
    generator: Optional[torch.Generator] = None
    state: Dict[str, Any] = field(default_factory=dict)

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        """s(x, t) with a scalar ``t`` broadcast to ``[B]``."""
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        return self.score_fn(x, t)

    def noise(self, like: Tensor) -> Tensor:
        """z ~ N(0, I) of ``like``'s shape, drawn from the run's generator."""
        return torch.randn(like.shape, generator=self.generator, device=like.device, dtype=like.dtype)


_END_KEYS = tuple(f.name for f in fields(EndPoint))
_GRID_KEYS = ("grid", "rho")


class Sampler(abc.ABC):
    """Base of all samplers; it owns the end point ``self.end`` (:class:`~.grids.EndPoint`).

    Args:
        end: the end-point options as one object, or else
        grid, rho, eps, end_sigma, denoise, denoise_order: its fields as flat keys (None: the field's default;
            ``grid`` None: the class's :attr:`default_grid`). A sampler without a grid
            (``default_grid = None``) takes no ``grid`` or ``rho``.
    """

    #: batched score evaluations per step (for :meth:`expected_nfe`); 0 if it varies.
    nfe_per_step: int = 1
    #: the grid kind when none is given; None for a sampler that chooses its own times.
    default_grid: Optional[str] = None
    #: order of accuracy of one step (a fitted grid, ``schedule=fit``, models the step's error as h^(order+1)).
    order: int = 1

    def __init__(
        self,
        end: Optional[EndPoint] = None,
        *,
        grid: Optional[str] = None,
        rho: Optional[float] = None,
        eps: Optional[float] = None,
        end_sigma: Optional[float] = None,
        denoise: Optional[bool] = None,
        denoise_order: Optional[int] = None,
    ) -> None:
        given = {k: v for k, v in zip(_END_KEYS, (grid, rho, eps, end_sigma, denoise, denoise_order)) if v is not None}
        if end is not None and given:
            raise ValueError(f"give end=EndPoint(...) or the keys {', '.join(given)}, not both")
        end = EndPoint(**given) if end is None else end
        if self.default_grid is None:
            if end.grid is not None or "rho" in given:
                raise ValueError(f"{type(self).__name__} chooses its own times; it takes no grid or rho")
        elif end.grid is None:
            end = replace(end, grid=self.default_grid)
        self.end = end

    @classmethod
    def _end_keys(cls) -> Tuple[str, ...]:
        """The end-point keys the class takes: all, or all but grid and rho without a grid."""
        return _END_KEYS if cls.default_grid is not None else tuple(k for k in _END_KEYS if k not in _GRID_KEYS)

    @classmethod
    def option_defaults(cls) -> Dict[str, Any]:
        """Every option the constructor takes, with its default: the class's own options (following
        ``**end`` up the class hierarchy), then the end-point keys it accepts."""
        out: Dict[str, Any] = {}
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            if klass is Sampler:
                defaults = {f.name: f.default for f in fields(EndPoint)}
                out.update({k: cls.default_grid if k == "grid" else defaults[k] for k in cls._end_keys()})
                break
            params = list(inspect.signature(init).parameters.values())[1:]
            out.update({p.name: p.default for p in params
                        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in out})
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                break  # the end-point keys are not passed on
        return out

    def use_times(self, times: Union[Tensor, Sequence[float]], start: Any = None) -> "Sampler":
        """Run on these ``[steps + 1]`` times (from T down to the end time) instead of the grid rule, e.g. a grid
        fitted to the model (:mod:`.fitted`); checked against the process and the step count at run time. With a
        ``start`` (:class:`~.gaussian_start.GaussianStart`) the times run from its level down, and a run first carries
        the prior draw there by the analytic step (no score evaluation)."""
        if self.default_grid is None:
            raise ValueError(f"{type(self).__name__} chooses its own times and takes no fixed grid; use a sampler "
                             "with a time grid (e.g. dpm_solver, ddim, edm_heun, euler_maruyama)")
        self._fixed_times = torch.as_tensor(times, dtype=torch.float64).flatten().clone()
        self._start = start
        return self

    @property
    def fixed_times(self) -> Optional[Tensor]:
        """The grid set by :meth:`use_times`, or None."""
        return getattr(self, "_fixed_times", None)

    @property
    def start(self) -> Any:
        """The :class:`~.gaussian_start.GaussianStart` of the fixed grid, or None (the run starts at T)."""
        return getattr(self, "_start", None)

    def times(self, sde: SDE, steps: int, device: Any = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """The run's ``[steps + 1]`` times: the fixed grid (checked) or ``self.end.times(...)``."""
        fixed = self.fixed_times
        if fixed is None:
            return self.end.times(sde, steps, device, dtype)
        from .fitted import check_times

        start = None if self.start is None else self.start.time(sde)
        return check_times(fixed, sde, steps, self.end.end_time(sde), "the fixed grid", start).to(device=device,
                                                                                                  dtype=dtype)

    def end_time(self, sde: SDE) -> float:
        """Where the run stops: the fixed grid's last time, or the end point's."""
        fixed = self.fixed_times
        return float(fixed[-1]) if fixed is not None else self.end.end_time(sde)

    @property
    def denoise(self) -> bool:
        """Whether a final Tweedie step x̂_0 follows the last step (``self.end.denoise``)."""
        return self.end.denoise

    def validate(self, sde: SDE) -> None:
        """Raise ValueError if this sampler cannot run on ``sde`` (called before sampling)."""
        self.end.end_time(sde)

    def refuse_hook(self, hook: Optional[StepHook], why: str, instead: str) -> None:
        """Raise if a per-step hook was given to a sampler without fixed steps to apply it after."""
        if hook is not None:
            raise ValueError(f"{type(self).__name__} {why} and cannot apply a per-step hook; "
                             f"use a fixed-step sampler (e.g. {instead}) with hooks")

    def expected_nfe(self, steps: int) -> Optional[int]:
        """Score evaluations for ``steps`` steps, or None when adaptive."""
        if not self.nfe_per_step:
            return None
        return self.nfe_per_step * steps + int(self.end.denoise)

    @abc.abstractmethod
    def run(
        self,
        sde: SDE,
        score_fn: ScoreFn,
        x: Tensor,
        steps: int,
        generator: Optional[torch.Generator] = None,
        progress: bool = False,
        record: bool = False,
        hook: Optional[StepHook] = None,
    ) -> Tuple[Tensor, Optional[List[Tensor]], Optional[Tensor]]:
        """Integrate from the prior sample ``x`` ``[B, ...]`` at T to the end time; return
        (x ``[B, ...]``, trajectory or None, times ``[K]`` of the trajectory or None)."""

    def end_repr(self) -> str:
        """The end-point keys this sampler takes, as ``key=value, ...`` (for ``repr``)."""
        return ", ".join(f"{k}={getattr(self.end, k)!r}" for k in self._end_keys())

    def __repr__(self) -> str:
        own = [f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "end"]
        if self.fixed_times is not None:
            own.append(f"times=<{self.fixed_times.numel()} fixed>")
        return f"{type(self).__name__}({', '.join([*own, self.end_repr()])})"


class StepSampler(Sampler):
    """A sampler made of one reverse step per grid interval; subclasses implement :meth:`step`.

    The run builds the grid ``self.end.times(...)`` (kind ``grid``, default :attr:`default_grid`:
    ``uniform``, ``karras``, ``logsnr``, ``quadratic``, ``auto`` or a kind registered in
    :data:`~.grids.GRIDS`) and its coefficient table once, calls :meth:`begin` and then
    ``step(x, i, grid, ctx)`` for i = 0 … steps − 1.
    """

    default_grid: Optional[str] = "uniform"

    def begin(self, x: Tensor, grid: GridCoeffs, ctx: SamplingContext) -> Tensor:
        """Called once per table before its first step (e.g. to reset multistep memory or tabulate
        extra times in ``ctx.state``); a step called outside :meth:`run` needs it first."""
        return x

    @abc.abstractmethod
    def step(self, x: Tensor, i: int, grid: GridCoeffs, ctx: SamplingContext) -> Tensor:
        """Advance x ``[B, ...]`` from ``grid.times[i]`` to ``grid.times[i + 1]`` (earlier); return ``[B, ...]``.

        ``grid`` holds every coefficient of the run as floats (``m``, ``sigma``, ``lam``, ``f``,
        ``g2`` per time, ``a``, ``b`` per interval, ``levels``); ``i == grid.steps - 1`` is the
        last step. Outside a run, the table of two times is ``GridCoeffs.build(sde, (t_cur,
        t_next))`` with ``i = 0``. x may be recorded in the trajectory, so it must not be modified
        in place (tensors the step allocates may be).
        """

    def run(
        self,
        sde: SDE,
        score_fn: ScoreFn,
        x: Tensor,
        steps: int,
        generator: Optional[torch.Generator] = None,
        progress: bool = False,
        record: bool = False,
        hook: Optional[StepHook] = None,
    ) -> Tuple[Tensor, Optional[List[Tensor]], Optional[Tensor]]:
        ts = self.times(sde, steps, x.device, x.dtype)
        if self.start is not None:
            x = self.start.transport(sde, x)  # the analytic step from T to ts[0]
        # All coefficients of the run at once; the steps then only read floats.
        grid = GridCoeffs.build(sde, ts)
        ctx = SamplingContext(sde, score_fn, generator)
        x = self.begin(x, grid, ctx)
        traj = [x] if record else None
        for i in _progress(range(steps), progress, type(self).__name__):
            x = self.step(x, i, grid, ctx)
            if hook is not None:
                x = hook(x, grid.times[i + 1])
            if traj is not None:
                traj.append(x)
        return x, traj, ts


def _progress(it: Sequence[int], enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False)


def is_deterministic(sampler: "Sampler", sde: SDE) -> bool:
    """Whether ``sampler`` maps a start to one result: two 2-step runs on a toy score with different step noise agree."""
    import copy

    smp = copy.copy(sampler)
    if smp.fixed_times is not None:
        smp._fixed_times, smp._start = None, None  # the grid does not decide it; two steps on the rule's grid do
    x = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64).reshape(2, 4)
    score = lambda x, t: -x  # noqa: E731 - any score will do
    runs = []
    for seed in (1, 2):
        gen = torch.Generator().manual_seed(seed)
        out, _, _ = smp.run(sde, score, x.clone(), 2, gen)
        runs.append(out)
    return bool(torch.equal(runs[0], runs[1]))


def _check_steps(steps: Any) -> int:
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer ≥ 1, got {steps}")
    return int(steps)


def build_sampler(name: str, **options: Any) -> Sampler:
    """Instantiate a registered sampler, or the class at an import path (``my_pkg.module.MySampler``:
    options it does not take are dropped with a warning); unknown names or options fail with the
    accepted ones."""
    if name not in SAMPLERS and ("." in name or ":" in name):
        from ..config import instantiate

        return instantiate({"_target_": name, **options}, SAMPLERS, key="sampler")
    cls = SAMPLERS.get(name)
    try:
        return cls(**options)
    except TypeError as err:
        raise ValueError(
            f"bad option for sampler {name!r}: {err}; accepted options: {', '.join(cls.option_defaults())}"
        ) from None


def make_sampler(
    sde: SDE,
    name: Optional[str],
    steps: int,
    options: Optional[Mapping[str, Any]] = None,
    score_kind: str = "exact",
) -> Tuple[Sampler, int, Optional[DefaultChoice]]:
    """The sampler a run on ``sde`` uses, built and checked: the one place a name becomes a sampler.

    Args:
        sde: the forward process (the default depends on its family; the sampler is validated on it).
        name: a registered sampler or an import path to a sampler class, or None / ``"auto"`` for the measured default
            (:func:`~.defaults.default_sampler`) at a budget of ``steps`` score evaluations.
        steps: the step count (≥ 1) of a named sampler; the NFE budget of the default.
        options: constructor options (flat end-point keys included); with the default they
            override the rule's options (e.g. ``eps=1e-3``).
        score_kind: ``"exact"`` or ``"learned"``: which table the default comes from.

    Returns:
        ``(sampler, steps, choice)``: ``steps`` to run (the default's step count for the budget,
        one less when it adds a denoising step), ``choice`` the
        :class:`~.defaults.DefaultChoice` or None for a named sampler.

    Raises:
        ValueError: bad ``steps``, an unknown name (listing the registered ones) or option
        (listing the accepted ones), or a sampler that cannot run on ``sde``.
    """
    name, steps, opts, choice = resolve_sampler(sde, name, _check_steps(steps), dict(options or {}), score_kind,
                                                build=build_sampler)
    sampler = build_sampler(name, **opts)
    sampler.validate(sde)
    return sampler, steps, choice


def sample(
    sde: SDE,
    score_fn: ScoreFn,
    shape: Sequence[int],
    sampler: Union[str, Sampler, None] = None,
    steps: int = 50,
    generator: Optional[torch.Generator] = None,
    x_T: Optional[Tensor] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: torch.dtype = torch.float32,
    return_trajectory: bool = False,
    progress: bool = False,
    hook: Optional[StepHook] = None,
    score_kind: Optional[str] = None,
    schedule: Any = None,
    schedule_objective: Optional[str] = None,
    **options: Any,
) -> SampleResult:
    """Draw samples by integrating the reverse-time dynamics of ``sde`` from T to eps.

    Args:
        sde: the forward process.
        score_fn: s(x [B, ...], t [B]) ≈ ∇ log p_t(x).
        shape: ``[B, ...]`` of the samples.
        sampler: a registered name (see ``SAMPLERS.names()``) or a :class:`Sampler` instance;
            ``**options`` go to its constructor (e.g. ``corrector="langevin", snr=0.16``, or the
            end point ``eps=1e-3``, ``end_sigma=0.01``, ``grid="logsnr"``, ``denoise=True``).
            ``None`` (or ``"auto"``): the configuration measured best for ``sde``'s family at a
            budget of ``steps`` score evaluations (:func:`make_sampler`; ``**options`` override
            its options); ``result.choice`` says what was used.
        score_kind: ``"exact"`` or ``"learned"`` picks the default's table; ``None`` detects a
            trained network (an ``nn.Module``, or a wrapper or closure around one).
        steps: number of steps (≥ 1); adaptive samplers ignore it. With the default sampler: the
            NFE budget.
        generator: source of all randomness (prior and per-step noise); same seed → same samples.
        x_T: start from this prior sample instead of drawing one.
        hook: ``hook(x, t) -> x`` applied after every step (used for inpainting).
        schedule: the time grid instead of the sampler's rule: ``"fit"`` (fit it to ``score_fn`` now, on a batch
            of 64 prior draws from seed 0: :func:`~.fitted.fit_schedule`; returned as ``result.schedule`` for
            reuse), a :class:`~.fitted.FittedSchedule`, the path of a stored one, or ``[steps + 1]`` times. Where
            the sampler's final step follows the ODE to σ̃ = 0 (``denoise=True``, ``denoise_order`` ≥ 2, an
            ``end_sigma``), a fit may also move the level its steps stop at (``result.schedule.end_sigma``). A fit
            begins with a Gaussian start (:mod:`~.gaussian_start`): the prior draw is carried analytically to a level
            below T, where the grid begins (``result.schedule.start``; the trajectory then starts there).
        schedule_objective: with ``schedule="fit"``, the fit's objective (``whitened``, ``curvature``, ``path``,
            ``samples``); None: the default for the kind of score (:data:`~.fitted.DEFAULT_OBJECTIVES`).

    Returns:
        :class:`SampleResult` with the samples, the exact NFE, and the trajectory if requested. The samples are
        the state at the end time, or x̂_0 with ``denoise``; a run that stops at a noise level (``end_sigma``)
        returns them in the data's scale, x/m = x_0 + σ̃ ε (:func:`~.final_step.to_data_scale`; the trajectory keeps the states).
    """
    steps = _check_steps(steps)
    choice = None
    kind = score_kind or ("learned" if is_learned_score(score_fn) else "exact")
    if sampler is None or isinstance(sampler, str):
        sampler, steps, choice = make_sampler(sde, sampler, steps, options, kind)
    elif options:
        raise ValueError(f"options {sorted(options)} given with a Sampler instance; set them on the instance")
    else:
        sampler.validate(sde)
    if device is None and generator is not None:
        device = generator.device
    fitted = None
    if schedule_objective is not None and not (isinstance(schedule, str) and schedule == "fit"):
        raise ValueError(f"schedule_objective={schedule_objective!r} is given without schedule='fit'; it chooses how a "
                         "grid is fitted, so fit one (schedule='fit') or leave it out")
    if schedule is not None:
        sampler, fitted = _with_schedule(sde, score_fn, sampler, steps, shape, schedule, device, dtype, kind,
                                         schedule_objective)
    if x_T is None:
        x = sde.prior_sample(shape, generator=generator, device=device, dtype=dtype)
    else:
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T has shape {tuple(x_T.shape)} but shape={tuple(shape)} was requested")
        x = x_T
    counter = CountingScore(score_fn, keep=evaluations_to_keep(sampler.end.denoise_order, sampler.nfe_per_step))
    x, traj, ts = sampler.run(sde, counter, x, steps, generator, progress, return_trajectory, hook)
    x = finish_run(sde, sampler.end, x, sampler.end_time(sde), counter)
    if sampler.end.denoise:
        if hook is not None:
            x = hook(x, torch.zeros((), dtype=x.dtype, device=x.device))
        if traj is not None:
            traj.append(x)
    return SampleResult(samples=x, nfe=counter.nfe, trajectory=traj, times=ts, choice=choice, schedule=fitted)


def _with_schedule(sde: SDE, score_fn: ScoreFn, sampler: Sampler, steps: int, shape: Sequence[int], schedule: Any,
                   device: Any, dtype: torch.dtype, score_kind: str, objective: Optional[str] = None
                   ) -> Tuple[Sampler, Any]:
    """A copy of ``sampler`` on the requested grid (and at the level a fit chose to stop at), and the
    :class:`~.fitted.FittedSchedule` (None for raw times)."""
    from .fitted import FittedSchedule, default_objective, fit_batch, fit_schedule, on_schedule

    fitted = None
    if isinstance(schedule, str) and schedule == "fit":
        gen = torch.Generator(device=device or "cpu").manual_seed(0)
        objective = objective or default_objective(score_fn, score_kind)
        n_fit = fit_batch(objective, shape[1:])
        if objective != "samples":
            n_fit = min(n_fit, int(shape[0]))  # a per-draw objective: no more draws than the batch asked for
        x_fit = sde.prior_sample((n_fit, *shape[1:]), generator=gen, device=device, dtype=dtype)
        fitted = fit_schedule(sde, score_fn, sampler, steps, x_fit, sampler_name=type(sampler).__name__,
                              score_kind=score_kind, objective=objective)
        times: Any = fitted.times
    elif isinstance(schedule, FittedSchedule):
        fitted, times = schedule, schedule.times
    elif isinstance(schedule, (str, bytes)) or hasattr(schedule, "__fspath__"):
        fitted = FittedSchedule.load(schedule)
        times = fitted.times
    else:
        times = schedule
    if fitted is None:
        return on_schedule(sampler, times), None
    return fitted.apply(sampler), fitted


__all__ = [
    "SAMPLERS",
    "EndPoint",
    "GridCoeffs",
    "SampleResult",
    "SamplingContext",
    "Sampler",
    "StepSampler",
    "StepHook",
    "build_sampler",
    "is_deterministic",
    "make_sampler",
    "sample",
]
