r"""The sampler contract, the shared time loop and the one entry point :func:`sample`.

A sampler sees an :class:`~sde_diffusion.sdes.SDE` and a ``score_fn(x [B, ...], t [B]) -> [B, ...]``,
nothing more. Most samplers are *step samplers*: they implement one reverse step from ``t_cur`` to
``t_next`` (``t_next < t_cur``) and inherit the loop, the time grid, the progress bar, trajectory
recording, the per-step hook and the optional final denoising step::

    @SAMPLERS.register("my_sampler")
    class MySampler(StepSampler):
        nfe_per_step = 1
        def step(self, x, t_cur, t_next, ctx):
            grid, i = ctx.step_table(t_cur, t_next)  # the run's coefficients, as floats
            s = ctx.score(x, t_cur)
            return torch.add(x, s, alpha=grid.sigma[i] ** 2 - grid.sigma[i + 1] ** 2)

plus ``conf/sampler/my_sampler.yaml``. Samplers that manage their own time (adaptive ODE
solvers, torchsde) override :meth:`Sampler.run` instead.

Usage::

    result = sample(sde, score_fn, (1000, 2), sampler="pc", steps=500,
                    generator=torch.Generator().manual_seed(0))
    result.samples, result.nfe
"""
from __future__ import annotations

import abc
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from ..registry import SAMPLERS
from ..score import CountingScore, x0_from_score
from ..sdes.base import SDE, ScoreFn, broadcast_to_x
from .coeffs import GridCoeffs
from .grids import time_grid


# hook(x, t) -> x, applied after every step at the step's new time (e.g. inpainting's projection).
StepHook = Callable[[Tensor, Tensor], Tensor]


@dataclass
class SampleResult:
    """Samples ``[B, ...]``, the exact number of batched score evaluations, optional trajectory.

    ``trajectory[k]`` is the state at ``times[k]`` (starting with the prior sample at T).
    ``choice`` is the :class:`~sde_diffusion.samplers.defaults.DefaultChoice` when no sampler was named.
    """

    samples: Tensor
    nfe: int
    trajectory: Optional[List[Tensor]] = None
    times: Optional[Tensor] = None
    choice: Optional[Any] = None


@dataclass
class SamplingContext:
    """Everything a step may need besides x: the process, the score, randomness, loop position.

    ``grid`` is the run's coefficient table (:class:`~.coeffs.GridCoeffs`, built once by
    :meth:`StepSampler.run`); steps read their coefficients from it through :meth:`step_table`.
    """

    sde: SDE
    score_fn: ScoreFn
    generator: Optional[torch.Generator]
    steps: int
    index: int = 0
    state: Dict[str, Any] = field(default_factory=dict)  # per-run memory, e.g. multistep history
    grid: Optional[GridCoeffs] = None

    def step_table(self, t_cur: Tensor, t_next: Tensor) -> tuple[GridCoeffs, int]:
        """(table, i) with the coefficients of ``t_cur`` at ``i`` and of ``t_next`` at ``i + 1``.

        Inside a run these are the run's table and ``index`` (the loop hands out the table's own
        time tensors, recognised by identity, so the lookup costs no tensor op); a step called
        with other times (directly, or from a custom loop) gets a two-point table built for them.
        """
        grid, i = self.grid, self.index
        if grid is not None and i + 1 < len(grid.times) and grid.times[i] is t_cur and grid.times[i + 1] is t_next:
            return grid, i
        return GridCoeffs.build(self.sde, (t_cur, t_next)), 0

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        """s(x, t) with a scalar ``t`` broadcast to ``[B]``."""
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        return self.score_fn(x, t)

    def noise(self, like: Tensor) -> Tensor:
        """z ~ N(0, I) of ``like``'s shape, drawn from the run's generator."""
        return torch.randn(like.shape, generator=self.generator, device=like.device, dtype=like.dtype)

    def coeffs(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(m(t), σ(t)) shaped to broadcast against ``like``."""
        return broadcast_to_x(self.sde.mean_coeff(t), like), broadcast_to_x(self.sde.marginal_std(t), like)


class Sampler(abc.ABC):
    """Base of all samplers.

    Args:
        eps: final time of the reverse process (default ``sde.sampling_eps``); must be in (0, T).
        denoise: after the last step, return Tweedie's x̂_0 = (x + σ² s(x, eps))/m (one more NFE).
        end_sigma: stop where the noise-to-signal ratio σ(t)/m(t) equals this (instead of at a
            time ``eps``): the same noise level on every process, whose times differ (VP's default
            eps = 1e-3 is σ/m ≈ 0.01; sub-VP's is ≈ 1e-4). Clipped to [sde.eps, T).
    """

    #: batched score evaluations per step (for :meth:`expected_nfe`); 0 if it varies.
    nfe_per_step: int = 1

    def __init__(self, eps: Optional[float] = None, denoise: bool = False, end_sigma: Optional[float] = None) -> None:
        if eps is not None and end_sigma is not None:
            raise ValueError("give eps (a final time) or end_sigma (a final noise level σ/m), not both")
        if end_sigma is not None and not (float(end_sigma) > 0 and math.isfinite(float(end_sigma))):
            raise ValueError(f"end_sigma must be a positive number, got {end_sigma}")
        self.eps = eps
        self.denoise = bool(denoise)
        self.end_sigma = None if end_sigma is None else float(end_sigma)

    def end_time(self, sde: SDE) -> float:
        if self.end_sigma is not None:
            lam = torch.tensor(-2.0 * math.log(self.end_sigma), dtype=torch.float64)
            t = float(sde.t_from_log_snr(lam))
            return min(max(t, float(sde.eps)), float(sde.T) * (1 - 1e-6))
        eps = sde.sampling_eps if self.eps is None else float(self.eps)
        if not 0 < eps < sde.T:
            raise ValueError(f"eps must lie in (0, T={sde.T}) for {type(self).__name__}, got eps={eps}")
        return eps

    def validate(self, sde: SDE) -> None:
        """Raise ValueError if this sampler cannot run on ``sde`` (called before sampling)."""
        self.end_time(sde)

    def refuse_hook(self, hook: Optional[StepHook], why: str, instead: str) -> None:
        """Raise if a per-step hook was given to a sampler without fixed steps to apply it after."""
        if hook is not None:
            raise ValueError(f"{type(self).__name__} {why} and cannot apply a per-step hook; "
                             f"use a fixed-step sampler (e.g. {instead}) with hooks")

    def expected_nfe(self, steps: int) -> Optional[int]:
        """Score evaluations for ``steps`` steps, or None when adaptive."""
        if not self.nfe_per_step:
            return None
        return self.nfe_per_step * steps + int(self.denoise)

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
    ) -> tuple[Tensor, Optional[List[Tensor]], Optional[Tensor]]:
        """Integrate from the prior sample ``x`` at T to eps; return (x, trajectory, times)."""

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


class StepSampler(Sampler):
    """A sampler made of one reverse step per grid interval; subclasses implement :meth:`step`.

    Args:
        grid: time grid kind (``uniform``, ``karras``, ``logsnr``, ``quadratic``, ``auto``; see grids.py).
        rho: ρ of the ``karras`` grid.
    """

    default_grid: str = "uniform"

    def __init__(self, grid: Optional[str] = None, rho: float = 7.0, eps: Optional[float] = None, denoise: bool = False,
                 end_sigma: Optional[float] = None) -> None:
        super().__init__(eps=eps, denoise=denoise, end_sigma=end_sigma)
        self.grid = grid or self.default_grid
        self.rho = float(rho)

    def time_grid(self, sde: SDE, steps: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        return time_grid(sde, steps, self.grid, eps=self.end_time(sde), rho=self.rho, device=device, dtype=dtype)

    def begin(self, x: Tensor, ts: Tensor, ctx: SamplingContext) -> Tensor:
        """Called once before the first step (e.g. to reset multistep memory)."""
        return x

    @abc.abstractmethod
    def step(self, x: Tensor, t_cur: Tensor, t_next: Tensor, ctx: SamplingContext) -> Tensor:
        """Advance x from ``t_cur`` to ``t_next < t_cur`` (0-dim tensors).

        Coefficients come from ``ctx.step_table(t_cur, t_next)``. x may be recorded in the
        trajectory, so it must not be modified in place (tensors the step allocates may be).
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
    ) -> tuple[Tensor, Optional[List[Tensor]], Optional[Tensor]]:
        ts = self.time_grid(sde, steps, x.device, x.dtype)
        # All coefficients of the run at once; the steps then only read floats.
        grid = GridCoeffs.build(sde, ts)
        ctx = SamplingContext(sde, score_fn, generator, steps, grid=grid)
        x = self.begin(x, ts, ctx)
        traj = [x] if record else None
        times = grid.times
        for i in _progress(range(steps), progress, type(self).__name__):
            ctx.index = i
            x = self.step(x, times[i], times[i + 1], ctx)
            if hook is not None:
                x = hook(x, times[i + 1])
            if traj is not None:
                traj.append(x)
        return x, traj, ts


def _progress(it: Sequence[int], enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False)


def build_sampler(name: str, **options: Any) -> Sampler:
    """Instantiate a registered sampler; unknown names or options fail with the accepted ones."""
    cls = SAMPLERS.get(name)
    try:
        return cls(**options)
    except TypeError as err:
        params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise ValueError(f"bad option for sampler {name!r}: {err}; accepted options: {', '.join(params)}") from None


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
    **options: Any,
) -> SampleResult:
    """Draw samples by integrating the reverse-time dynamics of ``sde`` from T to eps.

    Args:
        sde: the forward process.
        score_fn: s(x [B, ...], t [B]) ≈ ∇ log p_t(x).
        shape: ``[B, ...]`` of the samples.
        sampler: a registered name (see ``SAMPLERS.names()``) or a :class:`Sampler` instance;
            ``**options`` go to its constructor (e.g. ``corrector="langevin", snr=0.16``).
            ``None`` (or ``"auto"``): the configuration measured best for ``sde``'s family at a
            budget of ``steps`` score evaluations (:func:`~sde_diffusion.samplers.defaults.default_sampler`;
            ``**options`` override its options); ``result.choice`` says what was used.
        score_kind: ``"exact"`` or ``"learned"`` picks the default's table; ``None`` detects a
            trained network (an ``nn.Module``, or a wrapper or closure around one).
        steps: number of steps (≥ 1); adaptive samplers ignore it. With the default sampler: the
            NFE budget.
        generator: source of all randomness (prior and per-step noise); same seed → same samples.
        x_T: start from this prior sample instead of drawing one.
        hook: ``hook(x, t) -> x`` applied after every step (used for inpainting).

    Returns:
        :class:`SampleResult` with the samples, the exact NFE, and the trajectory if requested.
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer ≥ 1, got {steps}")
    choice = None
    if sampler is None or isinstance(sampler, str):
        from .defaults import is_learned_score, resolve_sampler

        kind = score_kind or ("learned" if is_learned_score(score_fn) else "exact")
        sampler, steps, options, choice = resolve_sampler(sde, sampler, int(steps), dict(options), kind)
        sampler = build_sampler(sampler, **options)
    elif options:
        raise ValueError(f"options {sorted(options)} given with a Sampler instance; set them on the instance")
    sampler.validate(sde)
    if device is None and generator is not None:
        device = generator.device
    if x_T is None:
        x = sde.prior_sample(shape, generator=generator, device=device, dtype=dtype)
    else:
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T has shape {tuple(x_T.shape)} but shape={tuple(shape)} was requested")
        x = x_T
    counter = CountingScore(score_fn)
    x, traj, ts = sampler.run(sde, counter, x, int(steps), generator, progress, return_trajectory, hook)
    if sampler.denoise:
        eps_t = torch.as_tensor(sampler.end_time(sde), dtype=x.dtype, device=x.device)
        tb = eps_t.expand(x.shape[0])
        x = x0_from_score(x, counter(x, tb), sde.mean_coeff(tb), sde.marginal_std(tb))
        if hook is not None:
            x = hook(x, torch.zeros((), dtype=x.dtype, device=x.device))
        if traj is not None:
            traj.append(x)
    return SampleResult(samples=x, nfe=counter.nfe, trajectory=traj, times=ts, choice=choice)


__all__ = [
    "SAMPLERS",
    "GridCoeffs",
    "SampleResult",
    "SamplingContext",
    "Sampler",
    "StepSampler",
    "StepHook",
    "build_sampler",
    "sample",
]
