r"""The abstract forward process every noise process in the toolkit subclasses.

Mathematics
-----------
A forward SDE on :math:`t \in [0, T]`

.. math:: dx = f(t)\,x\,dt + g(t)\,dw

with a drift that is *linear* in ``x``. Its perturbation kernel is Gaussian,

.. math::
    p_{0t}(x_t \mid x_0) = \mathcal N\big(m(t)\,x_0,\ \sigma(t)^2 I\big),\qquad
    m(t) = e^{\int_0^t f},\qquad
    \sigma(t)^2 = \int_0^t \frac{m(t)^2}{m(s)^2}\, g(s)^2\, ds,

so every process gives, from a score :math:`s(x, t) \approx \nabla_x \log p_t(x)`,

* the reverse-time SDE (Anderson 1982), integrated from ``T`` down to ``eps``:
  :math:`dx = [f(t)x - g(t)^2 s(x, t)]\,dt + g(t)\,d\bar w`;
* the probability-flow ODE with the same marginals:
  :math:`dx/dt = f(t)x - \tfrac12 g(t)^2 s(x, t)`.

Shapes: ``x`` is ``[B, ...]`` (any trailing shape); ``t`` is ``[B]`` or a 0-dim tensor / Python
float that is broadcast over the batch. Coefficients such as ``mean_coeff(t)`` return the shape of
``t``. Everything follows the device and dtype of its inputs (float32 and float64).

Usage::

    sde = VPSDE()
    t = torch.rand(64) * sde.T
    noise = torch.randn(64, 2)
    xt = sde.perturb(x0, t, noise)                 # m(t) x0 + sigma(t) noise
    rev = sde.reverse(score_fn)                    # rev.drift(x, t), rev.diffusion(t)
    ode_drift = sde.probability_flow(score_fn)     # callable (x, t) -> dx/dt
    z = sde.prior_sample((64, 2))

Subclassing: implement the hooks ``f(t)``, ``g(t)``, ``m(t)`` and ``sigma(t)`` (they receive a
validated tensor); the public, validating methods ``drift_coeff``, ``diffusion``, ``mean_coeff`` and
``marginal_std`` call them. Or subclass :class:`~sde_diffusion.sdes.LinearSDE`, which needs only
``f`` and ``g`` and computes m and sigma numerically.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

ScoreFn = Callable[[Tensor, Tensor], Tensor]
TimeLike = Union[Tensor, float]


def broadcast_to_x(coeff: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample coefficient ``[B]`` (or 0-dim) so it broadcasts against ``x [B, ...]``."""
    if coeff.dim() == 0:
        return coeff
    return coeff.reshape(coeff.shape[0], *([1] * (x.dim() - 1)))


class SDE(abc.ABC):
    """Abstract linear forward SDE ``dx = f(t) x dt + g(t) dw`` on ``[0, T]``.

    Args:
        T: end time of the forward process.
        eps: smallest time used for training and likelihoods (the score is singular at 0).
        sampling_eps: default end time of samplers (None: max(``default_sampling_eps``, eps)).
            Ending the reverse process a little above 0 removes noise that no step count can
            resolve; Song et al. use 1e-3 for VP-type processes and 1e-5 for VE.
    """

    default_sampling_eps: float = 1e-5

    def __init__(self, T: float = 1.0, eps: float = 1e-5, sampling_eps: Optional[float] = None) -> None:
        if not T > 0:
            raise ValueError(f"T must be positive, got T={T}")
        if not 0 <= eps < T:
            raise ValueError(f"eps must lie in [0, T={T}), got eps={eps}")
        if sampling_eps is None:
            # Never end sampling below the smallest trained time.
            sampling_eps = min(max(self.default_sampling_eps, eps), T / 2)
        if not 0 < sampling_eps < T:
            raise ValueError(f"sampling_eps must lie in (0, T={T}), got sampling_eps={sampling_eps}")
        self.T = float(T)
        self.eps = float(eps)
        self.sampling_eps = float(sampling_eps)

    # ------------------------------------------------------------------ what a subclass provides
    # These four hooks receive a validated floating tensor ``t`` and return its shape.
    @abc.abstractmethod
    def f(self, t: Tensor) -> Tensor:
        """f(t): the drift is f(t)·x."""

    @abc.abstractmethod
    def g(self, t: Tensor) -> Tensor:
        """g(t): the diffusion coefficient."""

    @abc.abstractmethod
    def m(self, t: Tensor) -> Tensor:
        """m(t) = exp(∫_0^t f): the kernel mean coefficient."""

    @abc.abstractmethod
    def sigma(self, t: Tensor) -> Tensor:
        """sigma(t): the kernel standard deviation."""

    @property
    def prior_std(self) -> float:
        """Standard deviation of the Gaussian prior N(0, prior_std² I) at time T.

        Default: sqrt(m(T)² + sigma(T)²), the exact marginal std at T for data of unit variance.
        """
        t = torch.tensor(self.T, dtype=torch.float64)
        return float(torch.sqrt(self.m(t) ** 2 + self.sigma(t) ** 2))

    # ------------------------------------------------------------------ validation
    def _check_t(self, t: TimeLike, like: Optional[Tensor] = None) -> Tensor:
        if not torch.is_tensor(t):
            dtype = like.dtype if like is not None and like.is_floating_point() else torch.get_default_dtype()
            device = like.device if like is not None else None
            t = torch.tensor(float(t), dtype=dtype, device=device)
        elif not t.is_floating_point():
            t = t.to(torch.get_default_dtype())
        if t.dim() > 1:
            raise ValueError(f"t must be a scalar or a 1-D tensor of shape [B], got shape {tuple(t.shape)}")
        # One fused reduction keeps this check to a single host sync.
        bad = torch.logical_or(t < 0, t > self.T * (1 + 1e-6)).any() | torch.isnan(t).any()
        if bool(bad):
            lo, hi = float(t.min()), float(t.max())
            raise ValueError(
                f"t must lie in [0, T={self.T}] for {type(self).__name__}, got values in [{lo:g}, {hi:g}]"
            )
        return t

    @staticmethod
    def _check_batch(x: Tensor, t: Tensor, name: str = "x") -> None:
        if t.dim() == 1 and (x.dim() == 0 or x.shape[0] != t.shape[0]):
            raise ValueError(
                f"batch mismatch: {name} has shape {tuple(x.shape)} but t has shape {tuple(t.shape)}; "
                f"t must be a scalar or have shape [{name}.shape[0]]"
            )

    # ------------------------------------------------------------------ the kernel
    def drift_coeff(self, t: TimeLike) -> Tensor:
        """f(t): the drift is f(t)·x."""
        return self.f(self._check_t(t))

    def diffusion(self, t: TimeLike) -> Tensor:
        """g(t)."""
        return self.g(self._check_t(t))

    def mean_coeff(self, t: TimeLike) -> Tensor:
        """m(t) = exp(∫_0^t f): the kernel mean is m(t)·x0."""
        return self.m(self._check_t(t))

    def marginal_std(self, t: TimeLike) -> Tensor:
        """sigma(t): the kernel standard deviation."""
        return self.sigma(self._check_t(t))

    def drift(self, x: Tensor, t: TimeLike) -> Tensor:
        """f(x, t) = f(t)·x, shape of ``x``."""
        t = self._check_t(t, x)
        self._check_batch(x, t)
        return broadcast_to_x(self.f(t), x) * x

    def perturb(self, x0: Tensor, t: TimeLike, noise: Tensor) -> Tensor:
        """Sample of the kernel: x_t = m(t)·x0 + sigma(t)·noise, with noise ~ N(0, I) of x0's shape."""
        t = self._check_t(t, x0)
        self._check_batch(x0, t, "x0")
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal x0 shape {tuple(x0.shape)}")
        m = broadcast_to_x(self.m(t), x0)
        s = broadcast_to_x(self.sigma(t), x0)
        return m * x0 + s * noise

    def kernel_score(self, xt: Tensor, x0: Tensor, t: TimeLike) -> Tensor:
        """∇_{x_t} log p_0t(x_t | x_0) = −(x_t − m x0)/sigma²."""
        t = self._check_t(t, xt)
        self._check_batch(xt, t, "xt")
        m = broadcast_to_x(self.m(t), xt)
        s = broadcast_to_x(self.sigma(t), xt)
        return -(xt - m * x0) / s**2

    # ------------------------------------------------------------------ the prior
    def prior_sample(
        self,
        shape: Sequence[int],
        generator: Optional[torch.Generator] = None,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> Tensor:
        """Draw z ~ N(0, prior_std² I) of the given shape ``[B, ...]``."""
        if device is None and generator is not None:
            device = generator.device
        z = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
        return z * self.prior_std

    def prior_logp(self, z: Tensor) -> Tensor:
        """log N(z; 0, prior_std² I) summed over all but the batch dimension → ``[B]``."""
        d = z[0].numel()
        s = self.prior_std
        sq = z.reshape(z.shape[0], -1).pow(2).sum(1)
        return -0.5 * d * math.log(2 * math.pi * s * s) - 0.5 * sq / (s * s)

    # ------------------------------------------------------------------ signal-to-noise ratio
    def log_snr(self, t: TimeLike) -> Tensor:
        """lambda(t) = log(m(t)² / sigma(t)²), strictly decreasing in t."""
        t = self._check_t(t)
        return 2 * (torch.log(self.m(t)) - torch.log(self.sigma(t)))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        """Inverse of :meth:`log_snr` (vectorised bisection; subclasses override with closed forms).

        Values of ``lam`` outside [lambda(T), lambda(eps_floor)] are clipped to that time range.
        """
        lam = torch.as_tensor(lam)
        dtype = lam.dtype if lam.is_floating_point() else torch.get_default_dtype()
        work = torch.float64
        target = lam.to(work)
        lo = torch.zeros_like(target)
        hi = torch.full_like(target, self.T)
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            m, s = self.m(mid), self.sigma(mid)
            val = 2 * (torch.log(m) - torch.log(s))
            go_right = val > target  # lambda decreases in t: still too high → later time
            lo = torch.where(go_right, mid, lo)
            hi = torch.where(go_right, hi, mid)
        return (0.5 * (lo + hi)).to(dtype=dtype, device=lam.device)

    def kernel_at_log_snr(self, lam: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(t, m(t), sigma(t)) at the times whose log-SNR is ``lam`` (any shape), in float64.

        For solvers that step in log-SNR with a time per sample; subclasses with closed forms
        override it to skip the round trip through t.
        """
        t = self.t_from_log_snr(torch.as_tensor(lam).to(torch.float64)).to(torch.float64)
        return t, self.m(t), self.sigma(t)

    # ------------------------------------------------------------------ derived processes
    def reverse(self, score_fn: ScoreFn) -> "ReverseSDE":
        """The reverse-time SDE dx = [f(t)x − g(t)² s(x, t)] dt + g(t) dw̄ (time runs T → eps)."""
        return ReverseSDE(self, score_fn)

    def probability_flow(self, score_fn: ScoreFn) -> Callable[[Tensor, Tensor], Tensor]:
        """The probability-flow ODE drift (x, t) ↦ f(t)x − ½ g(t)² s(x, t)."""

        def ode_drift(x: Tensor, t: Tensor) -> Tensor:
            t = self._check_t(t, x)
            self._check_batch(x, t)
            f = broadcast_to_x(self.f(t), x)
            g2 = broadcast_to_x(self.g(t) ** 2, x)
            return f * x - 0.5 * g2 * score_fn(x, t)

        return ode_drift

    def transition_coeffs(self, t_from: TimeLike, t_to: TimeLike) -> Tuple[Tensor, Tensor]:
        """Exact one-step kernel between two forward times s = t_from < t = t_to.

        Returns (a, b) with x_t | x_s ~ N(a·x_s, b² I): a = m(t)/m(s), b² = sigma(t)² − a² sigma(s)².
        ``t_from`` must not exceed ``t_to``; equal times give (1, 0).
        """
        s = self._check_t(t_from)
        t = self._check_t(t_to)
        if bool((s > t).any()):
            raise ValueError(
                "transition_coeffs(t_from, t_to) needs t_from <= t_to (the forward direction); "
                "swap the arguments"
            )
        out_dtype = torch.promote_types(s.dtype, t.dtype)
        # float64 and the log-SNR form b² = sigma_t²·(1 − exp(lambda_t − lambda_s)) avoid the
        # cancellation of sigma_t² − a² sigma_s² for small steps.
        s64, t64 = s.to(torch.float64), t.to(torch.float64)
        m_s, m_t = self.m(s64), self.m(t64)
        sig_s, sig_t = self.sigma(s64), self.sigma(t64)
        a = m_t / m_s
        log_ratio = 2 * (torch.log(m_t) - torch.log(m_s) + torch.log(sig_s) - torch.log(sig_t))
        b2 = sig_t**2 * -torch.expm1(torch.clamp(log_ratio, max=0.0))
        # A zero-length step has no noise; at s = t = 0 the log-SNR form is 0·(log 0 − log 0) = NaN.
        b2 = torch.where(t64 > s64, b2, torch.zeros_like(b2))
        return a.to(out_dtype), torch.sqrt(b2).to(out_dtype)

    def discretize(self, x: Tensor, t: TimeLike, dt: TimeLike) -> Tuple[Tensor, Tensor]:
        """One-step discrete form x_t = x_{t−dt} + f_i + G_i z of the forward process.

        Uses the exact kernel from t − dt to t rather than f·dt, g·√dt (which for VP with
        large steps gives √(1 − β/N) of a negative number): f_i = (a − 1)·x, G_i = b with
        (a, b) from :meth:`transition_coeffs`. ``G_i`` has the shape of ``t``.
        """
        t = self._check_t(t, x)
        self._check_batch(x, t)
        dt_t = torch.as_tensor(dt, dtype=t.dtype, device=t.device)
        s = torch.clamp(t - dt_t, min=0.0)
        a, b = self.transition_coeffs(s, t)
        return (broadcast_to_x(a, x) - 1) * x, b

    def __repr__(self) -> str:
        return f"{type(self).__name__}(T={self.T}, eps={self.eps})"


@dataclass
class ReverseSDE:
    """Reverse-time SDE of ``sde`` under ``score_fn``; time runs from T down to eps.

    ``drift(x, t)`` = f(t)x − g(t)² s(x, t) is the drift in *forward* time: a step of size
    dt > 0 backwards is x ← x − drift·dt + g·√dt·z.
    """

    sde: SDE
    score_fn: ScoreFn

    def drift(self, x: Tensor, t: TimeLike) -> Tensor:
        t = self.sde._check_t(t, x)
        self.sde._check_batch(x, t)
        f = broadcast_to_x(self.sde.f(t), x)
        g2 = broadcast_to_x(self.sde.g(t) ** 2, x)
        return f * x - g2 * self.score_fn(x, t)

    def diffusion(self, t: TimeLike) -> Tensor:
        return self.sde.g(self.sde._check_t(t))
