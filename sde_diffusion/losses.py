r"""Denoising score matching (DSM) for any linear SDE.

The objective (continuous time, Song et al. 2021, Eq. 7)
---------------------------------------------------------
With the kernel x_t = m(t) x_0 + σ(t) ε, ε ~ N(0, I), whose score is
∇ log p_0t(x_t | x_0) = −ε/σ(t),

.. math::
    L(θ) = \mathbb E_{t}\,\mathbb E_{x_0}\,\mathbb E_{ε}\Big[\,λ(t)\,
           \big\| s_θ(x_t, t) + ε/σ(t) \big\|^2 \Big],\qquad t \sim \mathcal U(ε_t, T).

Weightings λ(t) (``weighting=``):

* ``"sigma2"`` λ = σ(t)²: the ε-loss ‖ε_θ − ε‖² (Ho et al.'s L_simple; the default);
* ``"g2"``     λ = g(t)²: likelihood weighting (Song et al. 2021b), whose value bounds the
  negative log-likelihood;
* ``"importance"``: the same g²-weighted objective, estimated with t drawn from the proposal
  q(t) ∝ g(t)²/σ(t)² on [ε_t, T] instead of uniformly, each term multiplied by
  g(t)²/((T − ε_t) q(t)) so that its expectation equals the ``"g2"`` loss exactly. The
  proposal removes the 1/t blow-up of g²/σ² near t = 0 from the estimator's variance: the
  per-sample weight becomes Z/(T − ε_t)·σ²‖s_θ + ε/σ‖² with Z = ∫ g²/σ². q and its inverse
  CDF are tabulated numerically (see :class:`ImportanceTimeSampler`), so this works for any
  SDE, including user-defined :class:`~sde_diffusion.sdes.LinearSDE` subclasses.

* ``"p2"``     λ = σ(t)²/(k + SNR(t))^γ, SNR = m²/σ² (Choi et al. 2022's perception-prioritised
  weighting of the ε-loss; ``p2_k``, ``p2_gamma``; γ = 0 is ``"sigma2"``).

Parameterisations (``prediction=``) never change the objective: the network's output is
regressed on ``score.target_for(prediction, x0, ε, m, σ)`` and the squared error is converted
to score space exactly, ‖s_θ − s‖² = c(t)‖pred − target‖² with
c = 1/σ² (eps), 1 (score), m²/σ⁴ (x0), m²/(σ²(m² + σ²)²) (v). Hence a network trained with
any prediction type and the same λ minimises the same functional.

Per-sample loss and reduction (``reduction=``): ℓ_i = λ(t_i)‖·‖² summed over the data
dimensions (``"sum"``, the formula above) or averaged over them (``"mean"``, i.e. divided by
D = ∏ data_shape; the usual scaling of L_simple). Either way the batch is averaged, so the loss
does not depend on the batch size or the number of DDP processes.

Discrete-time DDPM loss (``discrete_steps=N``, variance-preserving processes)
---------------------------------------------------------------------------
Integer steps i ~ U{1, …, N}, ᾱ_i of the discrete chain — for VP with a linear β(t),
β_i from :meth:`VPSDE.discrete_betas(N) <sde_diffusion.sdes.VPSDE.discrete_betas>` and
ᾱ_i = ∏_{j≤i}(1 − β_j) (DDPM's schedule); for any other VP process (cosine, a VP
:class:`~sde_diffusion.sdes.LinearSDE`) ᾱ_i = m(t_i)² exactly — x_i = √ᾱ_i x_0 + √(1 − ᾱ_i) ε and the
loss λ_i/σ_i²·‖ε_θ(x_i, t_i) − ε‖² with every weighting in its discrete form:
``sigma2`` 1 (L_simple); ``g2`` (N/T)·β_i/(α_i(1 − ᾱ_i)), the weight of L_{i−1} in DDPM's bound with
σ_i² = β_i (→ g²/σ² as N → ∞); ``importance`` the same objective with i drawn ∝ β_i/(α_i(1 − ᾱ_i)) and
weight Σ_j β_j/(α_j(1 − ᾱ_j))/T; ``p2`` (k + ᾱ_i/(1 − ᾱ_i))^−γ. The network sees a continuous time
t_i ∈ [0, T]: ``time_input="i/N"`` gives t_i = i·T/N, the time at which ᾱ(t_i) ≈ ᾱ_i (so the
network can also be sampled with the continuous-time samplers); ``time_input="(i-1)/(N-1)"``
gives t_i = (i − 1)·T/(N − 1) ∈ [0, T], the reference code's mapping of step indices to times.

Learned variances (``learn_sigma=True``, Nichol & Dhariwal 2021)
----------------------------------------------------------------
The network returns ``[B, 2C, ...]`` = (ε_θ, v). The loss is L_hybrid = L_simple + λ_h·L_vlb with
L_vlb = N·L_{i−1} in bits per data element (reduction as above), λ_h = ``hybrid_lambda`` (0.001): L_{i−1} is
the KL of :mod:`sde_diffusion.vlb` at the step i of the N-step chain (``discrete_steps``, else 1000 steps,
i = ⌈tN/T⌉ for continuous t) with σ² = exp(w log β_i + (1 − w) log β̃_i), w = (v + 1)/2, and ε_θ detached,
so L_vlb trains only v (at i = 1, the Gaussian decoder's −log N(x_0; μ_θ, σ²)). ε-prediction only.

Usage::

    loss = dsm_loss(sde, net, x0)                                   # ε-loss, t ~ U(sde.eps, T)
    loss = dsm_loss(sde, net, x0, weighting="importance", stratified=True)
    terms = dsm_terms(sde, net, x0)     # per-sample ℓ [B], t [B], σ²‖s_θ − s‖² [B]
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from .score import PREDICTIONS, target_for
from .sdes.sde import SDE, broadcast_to_x

WEIGHTINGS = ("sigma2", "g2", "importance", "p2")
REDUCTIONS = ("mean", "sum")
TIME_INPUTS = ("i/N", "(i-1)/(N-1)")

Net = Callable[..., Tensor]


@dataclass
class DSMTerms:
    """Per-sample pieces of the DSM loss, all ``[B]``.

    ``loss``: the weighted terms ℓ_i whose batch mean is the loss; ``t``: the times fed to the
    network; ``eps_mse``: σ(t)²‖s_θ − ∇log p_0t‖² (= ‖ε_θ − ε‖² for ε-prediction) with the same
    reduction over data dimensions, the weighting-independent error used for per-t diagnostics.
    """

    loss: Tensor
    t: Tensor
    eps_mse: Tensor


# ---------------------------------------------------------------------------------- time draws
def uniform_draws(
    n: int,
    stratified: bool = False,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``n`` numbers in [0, 1): i.i.d. uniform, or stratified u_i = (u_0 + i/n) mod 1.

    The stratified (low-discrepancy) draw of Kingma et al. (2021) puts exactly one point in each
    interval [i/n, (i+1)/n) and leaves every u_i marginally uniform, which lowers the variance of
    the batch average over t.
    """
    if stratified:
        u0 = torch.rand((), generator=generator, device=device, dtype=torch.float64)
        u = torch.remainder(u0 + torch.arange(n, device=device, dtype=torch.float64) / n, 1.0)
        return u.to(dtype)
    return torch.rand(n, generator=generator, device=device, dtype=dtype)


class ImportanceTimeSampler:
    r"""Times t ~ q(t) ∝ h(t) = g(t)²/σ(t)² on [eps, T], tabulated on a grid, for any SDE.

    The grid is the union of ``grid_size`` geometrically spaced points (which resolve the
    1/t behaviour of h near 0) and ``grid_size`` uniform points (which resolve a stiff end near
    T, as for the cosine schedule). F_j = ∫_eps^{t_j} h is integrated by the trapezoid rule in
    float64. Times are drawn by inverting the piecewise-linear CDF, i.e. from the piecewise
    constant density q̃(t) = (F_{j+1} − F_j)/(Z (t_{j+1} − t_j)) on [t_j, t_{j+1}), Z = F_last.
    :meth:`weight` returns g²(t)/((T − eps) q̃(t)) for the *exact* sampling density q̃, so the
    importance-weighted loss is unbiased for the g²-weighted loss whatever the grid resolution.

    For linear SDEs h = −d(log-SNR)/dt, so Z = log-SNR(eps) − log-SNR(T); tests use this as an
    independent check of the table.
    """

    def __init__(self, sde: SDE, eps: float, grid_size: int = 4096) -> None:
        if not 0 < eps < sde.T:
            raise ValueError(
                f"importance weighting needs 0 < eps < T={sde.T} (g²/σ² is not integrable at t = 0), got eps={eps}"
            )
        self.T = float(sde.T)
        self.eps = float(eps)
        geo = torch.logspace(math.log10(eps), math.log10(sde.T), grid_size, dtype=torch.float64)
        lin = torch.linspace(eps, sde.T, grid_size, dtype=torch.float64)
        t = torch.unique(torch.cat([geo, lin]).clamp(eps, sde.T))  # sorted
        h = _g2_over_sigma2(sde, t)
        if not torch.isfinite(h).all() or (h <= 0).any():
            raise ValueError(f"g(t)²/σ(t)² must be finite and positive on [{eps}, {sde.T}] for importance weighting")
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(0.5 * (h[1:] + h[:-1]) * t.diff(), 0)])
        self.grid = t
        self.cdf = cdf
        self.Z = float(cdf[-1])
        self._on: Dict[Tuple[torch.device, torch.dtype], Tuple[Tensor, Tensor, Tensor]] = {}

    def _tables(self, device: torch.device) -> Tuple[Tensor, Tensor, Tensor]:
        key = (device, torch.float64 if device.type != "mps" else torch.float32)
        if key not in self._on:
            t, F = self.grid.to(device, key[1]), self.cdf.to(device, key[1])
            dens = F.diff() / (self.Z * t.diff())  # q̃ on each interval
            self._on[key] = (t, F, dens)
        return self._on[key]

    def sample(self, u: Tensor) -> Tensor:
        """Map uniforms ``u`` ∈ [0, 1) (any shape) to times by the inverse CDF; dtype of ``u``."""
        t, F, _ = self._tables(u.device)
        target = u.to(F.dtype) * self.Z
        j = (torch.searchsorted(F, target, right=True) - 1).clamp(0, F.numel() - 2)
        frac = (target - F[j]) / (F[j + 1] - F[j])
        out = t[j] + frac.clamp(0, 1) * (t[j + 1] - t[j])
        return out.clamp(self.eps, self.T).to(u.dtype)

    def density(self, times: Tensor) -> Tensor:
        """The sampling density q̃(t) (piecewise constant), shape and dtype of ``times``."""
        t, _, dens = self._tables(times.device)
        j = (torch.searchsorted(t, times.to(t.dtype), right=True) - 1).clamp(0, dens.numel() - 1)
        return dens[j].to(times.dtype)

    def weight(self, sde: SDE, times: Tensor) -> Tensor:
        """g(t)²/((T − eps) q̃(t)): the factor that makes E_q̃[weight·‖·‖²] = E_U[g²‖·‖²]."""
        return sde.diffusion(times) ** 2 / ((self.T - self.eps) * self.density(times))

    def __repr__(self) -> str:
        return f"ImportanceTimeSampler(eps={self.eps}, T={self.T}, Z={self.Z:.6g}, grid={self.grid.numel()})"


def _g2_over_sigma2(sde: SDE, t: Tensor) -> Tensor:
    return sde.diffusion(t) ** 2 / sde.marginal_std(t) ** 2


# One table per (process, eps): building it costs a few ms, a training step reuses it.
_IMPORTANCE_CACHE: "weakref.WeakKeyDictionary[SDE, Dict[float, ImportanceTimeSampler]]" = weakref.WeakKeyDictionary()


def importance_sampler(sde: SDE, eps: float) -> ImportanceTimeSampler:
    """The cached :class:`ImportanceTimeSampler` of ``sde`` on [eps, T]."""
    per_sde = _IMPORTANCE_CACHE.setdefault(sde, {})
    if eps not in per_sde:
        per_sde[eps] = ImportanceTimeSampler(sde, eps)
    return per_sde[eps]


_DDPM_CACHE: "weakref.WeakKeyDictionary[SDE, Dict[int, Tensor]]" = weakref.WeakKeyDictionary()


def ddpm_alpha_bars(sde: SDE, steps: int) -> Tensor:
    """ᾱ_i, i = 1..N, of the discrete chain the DDPM loss uses (float64, CPU, cached): ∏_{j≤i}(1 − β_j) of
    :meth:`VPSDE.discrete_betas` for VP, m(t_i)² at t_i = i·T/N for any other variance-preserving process."""
    from .sdes.discrete import DiscreteVP, check_variance_preserving
    from .sdes.vp import SubVPSDE, VPSDE

    if isinstance(sde, SubVPSDE):
        raise ValueError(
            f"the discrete-time DDPM loss (discrete_steps) needs a variance-preserving process (sde=vp or cosine_vp), "
            f"got {sde!r}; use the continuous-time loss (discrete_steps=null) for other processes"
        )
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"discrete_steps must be an integer >= 1, got {steps!r}")
    per_sde = _DDPM_CACHE.setdefault(sde, {})
    if steps not in per_sde:
        if isinstance(sde, VPSDE):
            per_sde[int(steps)] = torch.cumprod(1.0 - sde.discrete_betas(int(steps)), 0)
        else:
            check_variance_preserving(sde, "the discrete-time DDPM loss (discrete_steps)")
            per_sde[int(steps)] = DiscreteVP.from_sde(sde, int(steps)).alpha_bar
    return per_sde[int(steps)]


def _chain_step_terms(alpha_bars: Tensor, i: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(β_i, α_i, 1 − ᾱ_i, β̃_i clipped at i = 1 to β̃_2) for 1-based steps ``i`` of the chain ``alpha_bars``."""
    ab = alpha_bars.to(i.device)
    prev = torch.cat([torch.ones(1, dtype=ab.dtype, device=ab.device), ab[:-1]])
    beta = 1 - ab / prev
    oma = 1 - ab
    bt = beta * (1 - prev) / oma
    if bt.numel() > 1:
        bt = torch.cat([bt[1:2], bt[1:]])
    else:
        bt = beta.clone()
    return beta[i - 1], 1 - beta[i - 1], oma[i - 1], bt[i - 1]


def _vlb_weight(alpha_bars: Tensor) -> Tensor:
    """β_i/(α_i(1 − ᾱ_i)), i = 1..N: the weight of ‖ε̂ − ε‖² in 2·L_{i−1} with σ_i² = β_i."""
    beta, alpha, oma, _ = _chain_step_terms(alpha_bars, torch.arange(1, alpha_bars.numel() + 1))
    return beta / (alpha * oma)


def hybrid_vlb_term(eps_hat: Tensor, noise: Tensor, v: Tensor, alpha_bars: Tensor, i: Tensor, reduction: str) -> Tensor:
    """N·L_{i−1} per example ``[B]`` in bits per element (``mean``) or bits (``sum``), with ε̂ detached: the
    L_vlb of the hybrid loss (see the module docstring). ``i`` are 1-based steps ``[B]``."""
    from .score import variance_frac
    from .vlb import step_kl

    B = eps_hat.shape[0]
    shape = (B, *([1] * (eps_hat.dim() - 1)))
    beta, alpha, oma, bt = (c.to(eps_hat.dtype).reshape(shape) for c in _chain_step_terms(alpha_bars, i))
    frac = variance_frac(v)
    log_var = frac * torch.log(beta) + (1 - frac) * torch.log(bt)
    err2 = (eps_hat.detach() - noise) ** 2
    kl = step_kl(err2, log_var, beta, alpha, oma, torch.log(bt))
    # Step 1: the decoder's −log N(x_0; μ_θ, σ²), with (x_0 − μ_θ)² = β²/(α(1 − ᾱ))·(ε̂ − ε)².
    nll = 0.5 * (math.log(2 * math.pi) + log_var + beta**2 / (alpha * oma) * err2 * torch.exp(-log_var))
    first = (i == 1).reshape(shape)
    term = torch.where(first, nll, kl).reshape(B, -1)
    term = term.mean(1) if reduction == "mean" else term.sum(1)
    return alpha_bars.numel() * term / math.log(2.0)


# ---------------------------------------------------------------------------------- the loss
def _score_space_factor(prediction: str, m: Tensor, sigma: Tensor) -> Tensor:
    """k = σ²·c: σ²‖s_θ − s‖² = k‖pred − target‖² for each parameterisation (shape of m)."""
    if prediction == "eps":
        return torch.ones_like(sigma)
    if prediction == "score":
        return sigma**2
    if prediction == "x0":
        return (m / sigma) ** 2
    if prediction == "v":
        return (m / (m**2 + sigma**2)) ** 2
    raise ValueError(f"unknown prediction {prediction!r}; choose one of: {', '.join(PREDICTIONS)}")


def _check_options(weighting: str, prediction: str, reduction: str, time_input: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of: {', '.join(WEIGHTINGS)}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of: {', '.join(PREDICTIONS)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of: {', '.join(REDUCTIONS)}")
    if time_input not in TIME_INPUTS:
        raise ValueError(f"unknown time_input {time_input!r}; choose one of: {', '.join(TIME_INPUTS)}")


def dsm_terms(
    sde: SDE,
    model: Net,
    x0: Tensor,
    *,
    weighting: str = "sigma2",
    prediction: str = "eps",
    eps: Optional[float] = None,
    reduction: str = "mean",
    stratified: bool = False,
    y: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    discrete_steps: Optional[int] = None,
    time_input: str = "i/N",
    t: Optional[Tensor] = None,
    noise: Optional[Tensor] = None,
    u: Optional[Tensor] = None,
    p2_k: float = 1.0,
    p2_gamma: float = 1.0,
    learn_sigma: bool = False,
    hybrid_lambda: float = 0.001,
    hybrid_steps: int = 1000,
    cond: Optional[Mapping[str, Tensor]] = None,
) -> DSMTerms:
    """Per-sample DSM terms for a batch ``x0 [B, ...]``; see the module docstring for the formulas.

    Args:
        sde: the forward process.
        model: ``model(x_t [B, ...], t [B], y=y) -> [B, ...]`` predicting ``prediction``
            (``y`` is passed only when given).
        weighting: ``"sigma2"``, ``"g2"`` or ``"importance"``.
        prediction: ``"eps"``, ``"score"``, ``"x0"`` or ``"v"``.
        eps: smallest training time (default ``sde.eps``); must be > 0.
        reduction: ``"mean"`` or ``"sum"`` over data dimensions (the batch is always averaged).
        stratified: low-discrepancy draw of the batch's times (or DDPM steps).
        y: labels ``[B]`` for a conditional network.
        cond: further keyword inputs of the network, e.g. a text ``context`` and ``context_mask``.
        generator: source of t and ε.
        discrete_steps: N for the discrete-time DDPM loss (VP only), ``None`` for continuous t.
        time_input: network time of step i in the DDPM loss: ``"i/N"`` or ``"(i-1)/(N-1)"``.
        t, noise: fix the continuous times ``[B]`` and/or ε (tests, deterministic evaluation);
            with ``t`` given, ``"importance"`` weights it by g²/((T − eps) q̃(t)) as if drawn from q̃.
        u: the uniform numbers ``[B]`` that t (or the DDPM step) is made from, instead of drawing
            them (a process's slice of draws made for a whole global batch).
        p2_k, p2_gamma: k and γ of the ``"p2"`` weighting.
        learn_sigma: the network returns (ε_θ, v) stacked on dim 1; adds λ_h·L_vlb (the hybrid loss).
        hybrid_lambda: λ_h.
        hybrid_steps: N of the chain L_vlb is taken on with continuous t (``discrete_steps`` otherwise).
    """
    _check_options(weighting, prediction, reduction, time_input)
    if x0.dim() < 1 or x0.shape[0] == 0:
        raise ValueError(f"x0 must have shape [B, ...] with B >= 1, got {tuple(x0.shape)}")
    B, device, dtype = x0.shape[0], x0.device, x0.dtype
    eps = sde.eps if eps is None else float(eps)
    if not 0 < eps < sde.T:
        raise ValueError(
            f"eps must lie in (0, T={sde.T}) (σ(0) = 0 makes the kernel score singular), got eps={eps}"
        )
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=dtype)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} must equal x0 shape {tuple(x0.shape)}")

    if learn_sigma and prediction != "eps":
        raise ValueError(f"learn_sigma (the hybrid loss) works with prediction='eps', got prediction={prediction!r}")
    if weighting == "p2" and not (float(p2_k) > 0 and float(p2_gamma) >= 0):
        raise ValueError(f"the p2 weighting needs k > 0 and gamma >= 0, got k={p2_k}, gamma={p2_gamma}")
    i: Optional[Tensor] = None
    if discrete_steps is not None:
        if t is not None:
            raise ValueError("t cannot be given with discrete_steps (the loss draws integer steps)")
        alpha_bars = ddpm_alpha_bars(sde, discrete_steps).to(device)
        N = int(discrete_steps)
        if u is None:
            u = uniform_draws(B, stratified, generator, device, torch.float64)
        if weighting == "importance":
            w = _vlb_weight(alpha_bars)
            cdf = torch.cumsum(w, 0) / w.sum()
            i = torch.searchsorted(cdf, u.to(cdf.dtype).clamp(0, 1 - 1e-12), right=True).clamp(0, N - 1) + 1
        else:
            i = (u * N).long().clamp(0, N - 1) + 1  # i ~ U{1..N}
        ab = alpha_bars[i - 1]
        m, sigma = ab.sqrt().to(dtype), (1 - ab).clamp(min=0).sqrt().to(dtype)
        if time_input == "i/N":
            t = (i.to(torch.float64) * sde.T / N).to(dtype)
        else:
            t = ((i - 1).to(torch.float64) * sde.T / max(N - 1, 1)).to(dtype)
        if weighting == "sigma2":
            lam_over_sigma2 = torch.ones_like(sigma)
        elif weighting == "g2":
            lam_over_sigma2 = (N / sde.T * _vlb_weight(alpha_bars)[i - 1]).to(dtype)
        elif weighting == "importance":
            lam_over_sigma2 = torch.full_like(sigma, float(_vlb_weight(alpha_bars).sum()) / sde.T)
        else:
            lam_over_sigma2 = ((float(p2_k) + ab / (1 - ab)) ** -float(p2_gamma)).to(dtype)
    else:
        if t is None:
            if u is None:
                u = uniform_draws(B, stratified, generator, device, dtype)
            if weighting == "importance":
                t = importance_sampler(sde, eps).sample(u)
            else:
                t = eps + (sde.T - eps) * u
        elif t.shape != (B,):
            raise ValueError(f"t must have shape [B] = [{B}], got {tuple(t.shape)}")
        m, sigma = sde.mean_coeff(t), sde.marginal_std(t)
        if weighting == "sigma2":
            lam_over_sigma2 = torch.ones_like(sigma)
        elif weighting == "g2":
            lam_over_sigma2 = sde.diffusion(t) ** 2 / sigma**2
        elif weighting == "p2":
            lam_over_sigma2 = (float(p2_k) + (m / sigma) ** 2) ** -float(p2_gamma)
        else:
            lam_over_sigma2 = importance_sampler(sde, eps).weight(sde, t) / sigma**2

    xt = broadcast_to_x(m, x0) * x0 + broadcast_to_x(sigma, x0) * noise
    extra = dict(cond or {})  # e.g. a text context: context [B, L, d], context_mask [B, L]
    pred = model(xt, t, **extra) if y is None else model(xt, t, y=y, **extra)
    v = None
    if learn_sigma:
        from .score import split_learned_sigma

        pred, v = split_learned_sigma(pred, x0)
    if pred.shape != x0.shape:
        raise ValueError(f"the network returned shape {tuple(pred.shape)}, expected {tuple(x0.shape)}")
    target = target_for(prediction, x0, noise, m, sigma)
    # Mixed precision: the network may answer in half precision; the loss is formed in x0's dtype.
    sq = (pred.to(dtype) - target).pow(2).reshape(B, -1)
    sq = sq.mean(1) if reduction == "mean" else sq.sum(1)
    eps_mse = _score_space_factor(prediction, m, sigma) * sq
    loss = lam_over_sigma2 * eps_mse
    if v is not None:
        if discrete_steps is None:
            chain = ddpm_alpha_bars(sde, int(hybrid_steps)).to(device)
            N = chain.numel()
            i = torch.ceil(t.to(torch.float64) * N / sde.T).long().clamp(1, N)
        else:
            chain = alpha_bars
        loss = loss + float(hybrid_lambda) * hybrid_vlb_term(pred.to(dtype), noise, v.to(dtype), chain, i, reduction)
    return DSMTerms(loss=loss, t=t, eps_mse=eps_mse)


def dsm_loss(
    sde: SDE,
    model: Net,
    x0: Tensor,
    *,
    weighting: str = "sigma2",
    prediction: str = "eps",
    eps: Optional[float] = None,
    reduction: str = "mean",
    stratified: bool = False,
    y: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    **options: Any,
) -> Tensor:
    r"""The DSM loss (a scalar): the batch mean of λ(t)‖s_θ(x_t, t) + ε/σ(t)‖², reduced over data dims.

    ``L = (1/B) Σ_i λ(t_i) R_i(‖s_θ(m x0_i + σ ε_i, t_i) + ε_i/σ‖²)`` with R = sum or mean over the
    data dimensions, λ = σ² (``"sigma2"``), g² (``"g2"``), or g² with t ~ q ∝ g²/σ² and weight
    g²/((T − eps) q) (``"importance"``). ``options``: ``discrete_steps``, ``time_input``, ``t``,
    ``noise`` as in :func:`dsm_terms`.
    """
    terms = dsm_terms(
        sde,
        model,
        x0,
        weighting=weighting,
        prediction=prediction,
        eps=eps,
        reduction=reduction,
        stratified=stratified,
        y=y,
        generator=generator,
        **options,
    )
    return terms.loss.mean()


__all__ = [
    "WEIGHTINGS",
    "REDUCTIONS",
    "TIME_INPUTS",
    "DSMTerms",
    "ImportanceTimeSampler",
    "importance_sampler",
    "ddpm_alpha_bars",
    "hybrid_vlb_term",
    "uniform_draws",
    "dsm_terms",
    "dsm_loss",
]
