r"""Exact log-likelihoods through the probability-flow ODE, and bits per dimension.

Mathematics
-----------
The probability-flow ODE of a linear SDE, dx/dt = f̃(x, t) = f(t)x − ½g(t)² s(x, t), carries
p_eps to p_T. Along one of its trajectories the instantaneous change of variables gives
d/dt log p_t(x(t)) = −∇·f̃(x(t), t), hence, integrating the augmented system
(x, δ) from t = eps to t = T with x(eps) = x, δ(eps) = 0 and dδ/dt = ∇·f̃:

.. math:: \log p_{\epsilon}(x) = \log p_T(z) + \int_{\epsilon}^{T} \nabla\!\cdot\!\tilde f(x(t), t)\,dt,
          \qquad z = x(T).

Because f is linear, ∇·f̃ = D·f(t) − ½g(t)²·∇·s(x, t) with D = number of elements per sample; only
the score's divergence is computed numerically:

* ``divergence="exact"``: ∇·s = Σ_i ∂s_i/∂x_i from D vector-Jacobian products with the unit vectors
  (batched through ``is_grads_batched`` when the score function supports ``vmap``, else one at a
  time). Cost ∝ D; fine for small D.
* ``divergence="auto"`` (default): ``"exact"`` for D ≤ ``EXACT_MAX_DIM`` (16), otherwise
  ``"hutchinson"`` (:func:`resolve_divergence`); with Rademacher probes (the default ``noise``).
* ``divergence="hutchinson"``: the Hutchinson–Skilling estimate vᵀ(∂s/∂x)v with E[vvᵀ] = I,
  v Gaussian or Rademacher, averaged over ``n_probes``. The probes are drawn *once* and held fixed
  over the whole integration, so the estimate is vᵀMv with M = ∫(∂f̃/∂x)dt along the trajectory:
  unbiased for ∫∇·f̃, with variance 2‖M_sym‖_F²/n_probes (Gaussian) or
  2(‖M_sym‖_F² − Σ_i M_ii²)/n_probes (Rademacher), M_sym = (M + Mᵀ)/2. Each probe's integral is
  carried separately, so with ``n_probes ≥ 2`` the result also holds the estimator's standard
  error per example (the spread over probes / √n_probes).

What is returned is log p_eps(x), the density of the model's marginal at the start time ``eps``
(``sde.eps`` by default), *not* of p_0: the score is singular at t = 0. ``x`` must be given in the
model's data range (e.g. [-1, 1] for images); see :func:`bits_per_dim` for the conversion of a
density in that range to bits per dimension of discrete data.

Usage::

    res = log_likelihood(sde, score_fn, x)                       # auto trace (exact for D <= 16), dopri5
    res.logp                                                     # [B] nats
    res = log_likelihood(sde, score_fn, x, divergence="hutchinson", n_probes=2,
                         generator=torch.Generator().manual_seed(0))
    res.logp_stderr                                              # [B] the estimator's standard error
    bpd = bits_per_dim(res.logp, x.shape[1:], scale=2.0)         # 8-bit images in [-1, 1]
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .ode import odeint_dopri5, odeint_fixed, odeint_scipy
from .sdes.sde import SDE, ScoreFn, broadcast_to_x

DIVERGENCES = ("auto", "exact", "hutchinson")
# divergence="auto": the exact trace costs D vector-Jacobian products per evaluation, Hutchinson's
# estimate n_probes; up to this many dimensions the exact trace is the better buy.
EXACT_MAX_DIM = 16
NOISES = ("gaussian", "rademacher")
FIXED_SOLVERS = ("euler", "heun", "rk4")
SOLVERS = ("dopri5", "scipy") + FIXED_SOLVERS


@dataclass
class LikelihoodResult:
    """Outcome of :func:`log_likelihood`.

    Attributes:
        logp: ``[B]`` log p_eps(x) in nats (= prior_logp + delta_logp).
        prior_logp: ``[B]`` log p_T(z) under the prior.
        delta_logp: ``[B]`` ∫_eps^T ∇·f̃ dt along the trajectory (exact or estimated).
        z: ``[B, ...]`` the end point x(T) of the probability-flow ODE.
        nfe: number of batched evaluations of the augmented ODE right-hand side; each is one score
            evaluation with autograd plus D (exact) or ``n_probes`` (Hutchinson) vector-Jacobian
            products.
        divergence: the divergence actually used (``"exact"`` or ``"hutchinson"``; ``"auto"`` resolved).
        delta_logp_probes: ``[B, n_probes]`` each probe's estimate of ``delta_logp`` (Hutchinson), else None.
        logp_stderr: ``[B]`` the estimator's standard error of ``logp`` (Hutchinson with n_probes ≥ 2:
            std over probes / √n_probes); 0 for the exact trace; None when it cannot be estimated.
    """

    logp: Tensor
    prior_logp: Tensor
    delta_logp: Tensor
    z: Tensor
    nfe: int
    divergence: str = "exact"
    delta_logp_probes: Optional[Tensor] = None
    logp_stderr: Optional[Tensor] = None


def resolve_divergence(divergence: str, dim: int) -> str:
    """``"auto"`` → ``"exact"`` when ``dim`` ≤ :data:`EXACT_MAX_DIM`, else ``"hutchinson"``; others unchanged."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of: {', '.join(DIVERGENCES)}")
    if divergence != "auto":
        return divergence
    return "exact" if dim <= EXACT_MAX_DIM else "hutchinson"


# ---------------------------------------------------------------------- divergence of the score
def _exact_divergence_batched(s: Tensor, x: Tensor, chunk: int) -> Tensor:
    """Σ_i ∂s_i/∂x_i with the unit vectors pushed through one vmapped backward pass per chunk."""
    B, D = x.shape[0], x[0].numel()
    div = torch.zeros(B, dtype=x.dtype, device=x.device)
    for start in range(0, D, chunk):
        idx = torch.arange(start, min(start + chunk, D), device=x.device)
        basis = torch.zeros(idx.numel(), B, D, dtype=s.dtype, device=s.device)
        basis[torch.arange(idx.numel(), device=x.device), :, idx] = 1.0
        (jac_rows,) = torch.autograd.grad(
            s, x, basis.reshape(idx.numel(), *s.shape), retain_graph=True, is_grads_batched=True, allow_unused=True
        )
        if jac_rows is None:  # the score does not depend on x
            return div
        # jac_rows[k, b] = e_{idx_k}ᵀ ∂s/∂x at sample b: keep its diagonal entry.
        rows = jac_rows.reshape(idx.numel(), B, D)
        div = div + rows[torch.arange(idx.numel(), device=x.device), :, idx].sum(0)
    return div


def _exact_divergence_loop(s: Tensor, x: Tensor) -> Tensor:
    """Σ_i ∂s_i/∂x_i with one backward pass per dimension (works for any differentiable score)."""
    B, D = x.shape[0], x[0].numel()
    s_flat = s.reshape(B, D)
    div = torch.zeros(B, dtype=x.dtype, device=x.device)
    for i in range(D):
        (g,) = torch.autograd.grad(s_flat[:, i].sum(), x, retain_graph=True, allow_unused=True)
        if g is not None:
            div = div + g.reshape(B, D)[:, i]
    return div


def _hutchinson_divergence(s: Tensor, x: Tensor, probes: Tensor) -> Tensor:
    """v_kᵀ(∂s/∂x)v_k for probes ``[K, B, ...]``, one column per probe: ``[B, K]``."""
    est = torch.zeros(x.shape[0], probes.shape[0], dtype=x.dtype, device=x.device)
    for k, v in enumerate(probes):
        (vjp,) = torch.autograd.grad(s, x, v, retain_graph=True, allow_unused=True)
        if vjp is not None:
            est[:, k] = (vjp * v).reshape(x.shape[0], -1).sum(1)
    return est


def _draw_probes(
    n: int, shape: Sequence[int], noise: str, like: Tensor, generator: Optional[torch.Generator]
) -> Tensor:
    dev = generator.device if generator is not None else like.device
    if noise == "gaussian":
        v = torch.randn((n, *shape), generator=generator, device=dev, dtype=like.dtype)
    else:
        v = torch.randint(0, 2, (n, *shape), generator=generator, device=dev).to(like.dtype) * 2 - 1
    return v.to(like.device)


# ---------------------------------------------------------------------- the likelihood
def log_likelihood(
    sde: SDE,
    score_fn: ScoreFn,
    x: Tensor,
    *,
    eps: Optional[float] = None,
    divergence: str = "auto",
    noise: str = "rademacher",
    n_probes: int = 1,
    solver: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int = 100,
    scipy_method: str = "RK45",
    prior_logp: Optional[Callable[[Tensor], Tensor]] = None,
    exact_chunk: int = 64,
    generator: Optional[torch.Generator] = None,
    progress: Optional[Callable[[float], None]] = None,
) -> LikelihoodResult:
    """log p_eps(x) through the probability-flow ODE (see the module docstring for the formula).

    Args:
        sde: the forward process; integration runs from ``eps`` to ``sde.T``.
        score_fn: s(x [B, ...], t [B]) -> [B, ...]. It is called with autograd enabled even when
            this function runs under ``torch.no_grad()``; it must be differentiable in x.
        x: ``[B, ...]`` data in the model's range.
        eps: start time (default ``sde.eps``); the result is the density of p_eps.
        divergence: ``"auto"`` (exact for D ≤ 16, else Hutchinson), ``"exact"`` (D vector-Jacobian
            products per evaluation) or ``"hutchinson"``.
        noise: Hutchinson probe distribution, ``"rademacher"`` (lower variance) or ``"gaussian"``.
        n_probes: Hutchinson probes per sample, averaged; drawn once from ``generator``.
        solver: ``"dopri5"`` (adaptive, per-sample steps), ``"scipy"`` (``solve_ivp`` with
            ``scipy_method``), or a fixed-step method ``"euler"``, ``"heun"``, ``"rk4"`` on a uniform
            grid of ``steps`` steps.
        rtol, atol: tolerances of the adaptive solvers (the log-density is part of the state).
        prior_logp: z ↦ log p_T(z) ``[B]``; default ``sde.prior_logp`` (the SDE's Gaussian prior).
            Pass the true marginal at T to separate the integration error from the prior mismatch.
        exact_chunk: unit vectors per vmapped backward pass for the exact divergence.
        generator: source of the Hutchinson probes.
        progress: called at every evaluation with the fraction of [eps, T] that the slowest sample
            has integrated (for progress bars and ETAs).

    Returns:
        :class:`LikelihoodResult` with ``logp``, ``prior_logp``, ``delta_logp`` (all ``[B]``, nats,
        in x's dtype), ``z`` ``[B, ...]`` and ``nfe``.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of: {', '.join(DIVERGENCES)}")
    if noise not in NOISES:
        raise ValueError(f"unknown noise {noise!r}; choose one of: {', '.join(NOISES)}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of: {', '.join(SOLVERS)}")
    if n_probes < 1:
        raise ValueError(f"n_probes must be at least 1, got {n_probes}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if exact_chunk < 1:
        raise ValueError(f"exact_chunk must be at least 1, got {exact_chunk}")
    if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(
            "x must be a floating tensor of shape [B, ...] with a batch dimension; "
            f"got {type(x).__name__} of shape {tuple(getattr(x, 'shape', ()))}"
        )
    t0 = sde.eps if eps is None else float(eps)
    if not 0 <= t0 < sde.T:
        raise ValueError(f"eps must lie in [0, T={sde.T}), got eps={t0}")

    shape = x.shape
    B, D = shape[0], x[0].numel()
    divergence = resolve_divergence(divergence, D)
    probes = _draw_probes(n_probes, shape, noise, x, generator) if divergence == "hutchinson" else None
    K = 1 if probes is None else n_probes  # one log-density column per probe
    use_vmap = True

    def score_divergence(xx: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        nonlocal use_vmap
        with torch.enable_grad():
            xg = xx.detach().requires_grad_(True)
            s = score_fn(xg, t)
            if s.shape != xg.shape:
                raise ValueError(f"score_fn returned shape {tuple(s.shape)} for input shape {tuple(xg.shape)}")
            if not s.requires_grad:
                raise ValueError(
                    "score_fn output does not depend differentiably on x (it was computed without autograd, "
                    "e.g. under torch.no_grad() or after .detach()); the divergence needs autograd through "
                    "the score"
                )
            if probes is not None:
                div = _hutchinson_divergence(s, xg, probes)
            else:
                div = None
                if use_vmap:
                    try:
                        div = _exact_divergence_batched(s, xg, exact_chunk)
                    except (RuntimeError, NotImplementedError):
                        # Some score functions (data-dependent control flow, in-place ops) cannot be
                        # vmapped; the per-dimension loop gives the same numbers more slowly.
                        use_vmap = False
                if div is None:
                    div = _exact_divergence_loop(s, xg)
                div = div[:, None]
        return s.detach(), div.detach()

    span = sde.T - t0

    def augmented(y: Tensor, t: Tensor) -> Tensor:
        if progress is not None:
            progress(min(1.0, max(0.0, (float(torch.as_tensor(t).min()) - t0) / span)))
        xx = y[:, :D].reshape(shape)
        s, div_s = score_divergence(xx, t)
        f = sde.drift_coeff(t).to(y.dtype)
        g2 = sde.diffusion(t).to(y.dtype) ** 2
        dx = broadcast_to_x(f, xx) * xx - 0.5 * broadcast_to_x(g2, xx) * s
        col = (lambda c: c.reshape(-1, 1)) if f.dim() else (lambda c: c)
        ddelta = D * col(f) - 0.5 * col(g2) * div_s  # [B, K]
        return torch.cat([dx.reshape(B, D), ddelta.expand(B, K)], dim=1)

    y0 = torch.cat([x.detach().reshape(B, D), torch.zeros(B, K, dtype=x.dtype, device=x.device)], dim=1)
    if solver == "dopri5":
        res = odeint_dopri5(augmented, y0, t0, sde.T, rtol=rtol, atol=atol)
    elif solver == "scipy":
        res = odeint_scipy(augmented, y0, t0, sde.T, rtol=rtol, atol=atol, method=scipy_method)
    else:
        ts = torch.linspace(t0, sde.T, steps + 1, dtype=x.dtype, device=x.device)
        res = odeint_fixed(augmented, y0, ts, method=solver)

    z = res.y[:, :D].reshape(shape)
    columns = res.y[:, D:]
    delta = columns.mean(1)
    prior = (sde.prior_logp if prior_logp is None else prior_logp)(z).to(x.dtype)
    if prior.shape != (B,):
        raise ValueError(f"prior_logp must return shape [{B}], got {tuple(prior.shape)}")
    if probes is None:
        per_probe, stderr = None, torch.zeros_like(delta)
    else:
        per_probe = columns
        stderr = columns.std(1) / math.sqrt(K) if K > 1 else None
    if progress is not None:
        progress(1.0)
    return LikelihoodResult(logp=prior + delta, prior_logp=prior, delta_logp=delta, z=z, nfe=res.nfe,
                            divergence=divergence, delta_logp_probes=per_probe, logp_stderr=stderr)


# ---------------------------------------------------------------------- discrete data
def dequantize(x_uint: Tensor, levels: int = 256, generator: Optional[torch.Generator] = None) -> Tensor:
    """Uniform dequantisation u = (k + U)/levels ∈ [0, 1), U ~ U[0, 1) i.i.d., for integer data k.

    Args:
        x_uint: integer-valued tensor (any integer or floating dtype) with values in
            {0, …, levels − 1}.
        levels: number of discrete values (256 for 8-bit images, 17 for the 8×8 digits).
        generator: source of U.

    Returns:
        Float tensor of ``x_uint``'s shape (float32, or x's dtype if it is floating). Map it to the
        model range with x = a·u + b and pass ``scale=a`` to :func:`bits_per_dim`.
    """
    if levels < 2:
        raise ValueError(f"levels must be at least 2, got {levels}")
    k = torch.as_tensor(x_uint)
    dtype = k.dtype if k.is_floating_point() else torch.float32
    kf = k.to(dtype)
    if (kf != torch.round(kf)).any() or (kf < 0).any() or (kf > levels - 1).any():
        raise ValueError(
            f"x_uint must hold integers in [0, {levels - 1}] (levels={levels}); "
            f"got values in [{float(kf.min()):g}, {float(kf.max()):g}]"
        )
    dev = generator.device if generator is not None else k.device
    u = torch.rand(k.shape, generator=generator, device=dev, dtype=dtype).to(k.device)
    return (kf + u) / levels


def bits_per_dim(
    logp_model_range: Tensor, data_shape: Sequence[int], *, scale: float, levels: int = 256
) -> Tensor:
    r"""Negative log-likelihood of discrete data in bits per dimension, from a continuous density.

    Setting: discrete data k ∈ {0, …, L−1}^D (L = ``levels``) are dequantised to
    u = (k + U)/L ∈ [0, 1)^D (:func:`dequantize`) and mapped to the model range by x = a·u + b
    (a = ``scale``; a = 2, b = −1 for [−1, 1]). A density p_x in the model range gives the density
    p_u(u) = a^D p_x(a·u + b) on [0, 1)^D, and the discrete model P(k) = ∫_{cell(k)} p_u du, cell
    volume L^{−D}. By Jensen's inequality over U,

    .. math:: -\log_2 P(k) \le -\,\mathbb E_U\big[\log p_x(x) + D\log a - D\log L\big]/\ln 2.

    What is returned, per sample, is the quantity under the expectation divided by D:

    .. math:: \text{bpd} = -\big(\log p_x(x) + D\log a - D\log L\big) / (D \ln 2),

    i.e. the negative log-likelihood of the discrete L-level data under the uniformly dequantised
    continuous model, in bits per dimension, including the Jacobian of the scaling to the model
    range. Averaged over data and dequantisation noise it upper-bounds the discrete NLL in bits/dim
    (the usual reported number; for 8-bit images in [−1, 1] it is −log p_x/(D ln 2) + 7).

    Args:
        logp_model_range: ``[B]`` log p_x(x) in nats (e.g. :attr:`LikelihoodResult.logp`).
        data_shape: shape of one sample (D = its number of elements).
        scale: a, the factor from [0, 1) to the model range.
        levels: L, the number of discrete values per dimension (256 for 8-bit data).

    Returns:
        ``[B]`` bits per dimension.
    """
    if not scale > 0:
        raise ValueError(f"scale must be positive (x = scale·u + shift), got scale={scale}")
    if levels < 2:
        raise ValueError(f"levels must be at least 2, got {levels}")
    D = int(math.prod(int(d) for d in data_shape))
    if D < 1:
        raise ValueError(f"data_shape must describe at least one element, got {tuple(data_shape)}")
    logp = torch.as_tensor(logp_model_range)
    return -(logp + D * math.log(scale) - D * math.log(levels)) / (D * math.log(2.0))


__all__ = [
    "LikelihoodResult", "log_likelihood", "resolve_divergence", "bits_per_dim", "dequantize",
    "DIVERGENCES", "EXACT_MAX_DIM", "NOISES", "SOLVERS",
]
