r"""DDPM's variational bound on −log p(x_0), term by term, exact or importance-sampled over steps.

Mathematics (Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021)
-----------------------------------------------------------
For the discrete chain of :class:`~sde_diffusion.sdes.discrete.DiscreteVP` and a model
p_θ(x_{i−1} | x_i) = N(μ_θ(x_i, i), σ_i² I),

.. math::
    -\log p_\theta(x_0) \le L_T + \sum_{i=2}^{N} L_{i-1} + L_0,\qquad
    L_T = \mathrm{KL}(q(x_N\mid x_0)\,\|\,\mathcal N(0, I)),\quad
    L_{i-1} = \mathbb E_{q(x_i\mid x_0)}\,\mathrm{KL}(q(x_{i-1}\mid x_i, x_0)\,\|\,p_\theta(x_{i-1}\mid x_i)),\quad
    L_0 = -\mathbb E_{q(x_1\mid x_0)}\log p_\theta(x_0\mid x_1).

With ε̂ the network's noise prediction, μ_θ = (x_i − β_i/√(1 − ᾱ_i) ε̂)/√α_i and the posterior mean
is the same expression at the true ε, so per example (D elements, r = β̃_i/σ_i²)

.. math::
    \mathrm{KL}_i = \tfrac12\Big[D\,(r - 1 - \log r)
        + \frac{\beta_i^2}{\alpha_i(1-\bar\alpha_i)\,\sigma_i^2}\,\|\hat\varepsilon - \varepsilon\|^2\Big],\qquad
    L_T = \tfrac12\big[\bar\alpha_N\|x_0\|^2 - D(\bar\alpha_N + \log(1-\bar\alpha_N))\big].

Each KL_i is one draw x_i ~ q(x_i | x_0) (an unbiased estimate of L_{i−1}). The decoder L_0 is
DDPM's *discretised Gaussian* for data on L levels (bins of width Δ = (hi − lo)/(L − 1) around
each value, the outer bins reaching ±∞), giving a probability, hence bits/dim
= (L_T + Σ L_{i−1} + L_0)/(D ln 2) directly; or a continuous Gaussian density for vector data
(``decoder="gaussian"``, nats).

Estimators: ``terms=None`` evaluates all N − 1 middle terms (N NFE per batch); ``terms=K`` draws K
steps per example from a proposal q(i) and returns Σ_i L_{i−1} ≈ (1/K) Σ_j KL_{i_j}/q(i_j), unbiased,
with its standard error from the spread of the K draws (K + 1 NFE). The proposal is the expected
term of the best model on Gaussian data with the batch's second moment (a closed form, no NFE),
mixed 1:9 with the uniform so that no step has a vanishing probability.

Usage::

    proc = DiscreteVP.from_sde(sde, 1000)
    res = vlb(sde, score_fn, x0, proc, variance="beta", decoder="discretized", levels=256, data_range=(-1, 1))
    res.total / (D * math.log(2))        # bits/dim per example [B]
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .score import learned_variance_source
from .sdes.discrete import DiscreteVP
from .sdes.sde import SDE, ScoreFn

DECODERS = ("discretized", "gaussian")
PROPOSAL_FLOOR = 0.1  # share of the uniform in the importance proposal


@dataclass
class VLBResult:
    """The bound of a batch, in nats per example.

    Attributes:
        total: ``[B]`` L_T + Σ L_{i−1} + L_0 (estimated when ``terms`` was given).
        prior: ``[B]`` L_T.
        decoder: ``[B]`` L_0.
        middle: ``[B]`` Σ_{i=2}^N L_{i−1} (exact sum or estimate).
        stderr: ``[B]`` the estimator's standard error of ``total`` (0 for the exact sum).
        per_step: ``[B, N]`` KL_i of every step (column 0 = L_0) for the exact sum, else None.
        nfe: batched network evaluations.
    """

    total: Tensor
    prior: Tensor
    decoder: Tensor
    middle: Tensor
    stderr: Tensor
    per_step: Optional[Tensor]
    nfe: int


def prior_kl(x0: Tensor, proc: DiscreteVP) -> Tensor:
    """L_T = KL(N(√ᾱ_N x_0, (1 − ᾱ_N) I) ‖ N(0, I)) per example ``[B]`` (≥ 0 under rounding)."""
    ab = float(proc.alpha_bar[-1])
    D = x0[0].numel()
    # −ᾱ − log(1 − ᾱ) ≥ 0 as one expression (log1p), then the data part.
    per_dim = -ab - math.log1p(-ab)
    return 0.5 * (ab * x0.reshape(x0.shape[0], -1).pow(2).sum(1) + D * max(per_dim, 0.0))


def step_kl(err2: Tensor, log_var: Tensor, beta: Tensor, alpha: Tensor, one_minus_alpha_bar: Tensor,
            log_beta_tilde: Tensor) -> Tensor:
    """KL_i per element: ½[(r − 1 − log r) + β²/(α(1 − ᾱ)σ²)·(ε̂ − ε)²], r = β̃/σ², all arguments broadcast."""
    log_r = log_beta_tilde - log_var
    # r − 1 − log r = expm1(log r) − log r ≥ 0 (clamped against rounding).
    var_part = (torch.expm1(log_r) - log_r).clamp(min=0)
    return 0.5 * (var_part + beta**2 / (alpha * one_minus_alpha_bar) * torch.exp(-log_var) * err2)


def gaussian_kl_terms(err2: Tensor, log_var: Tensor, k: Tensor, proc: DiscreteVP) -> Tensor:
    """KL_i per example ``[B]`` from (ε̂ − ε)² ``[B, D]``, log σ_i² ``[B, D]`` and the 0-based steps ``k [B]`` (k ≥ 1)."""
    col = lambda v: v.to(err2)[k][:, None]  # noqa: E731
    return step_kl(err2, log_var, col(proc.beta), col(torch.exp(proc.log_alpha)), col(proc.one_minus_alpha_bar),
                   col(torch.log(proc.beta_tilde))).sum(1)


def discretized_gaussian_log_prob(x0: Tensor, mean: Tensor, log_var: Tensor, lo: float, hi: float, levels: int) -> Tensor:
    """log P(x_0) per element for data on ``levels`` values in [lo, hi] under N(mean, σ²) integrated over each
    value's bin (width Δ = (hi − lo)/(levels − 1), the outer bins extended to ±∞)."""
    half = 0.5 * (hi - lo) / (levels - 1)
    inv_std = torch.exp(-0.5 * log_var)
    upper = (x0 + half - mean) * inv_std
    lower = (x0 - half - mean) * inv_std
    top = x0 >= hi - half
    bottom = x0 <= lo + half
    upper = torch.where(top, torch.full_like(upper, math.inf), upper)
    lower = torch.where(bottom, torch.full_like(lower, -math.inf), lower)
    # log(Φ(b) − Φ(a)) computed on the side of 0 where the tail is small (mirror when a > 0).
    flip = lower > 0
    a = torch.where(flip, -upper, lower)
    b = torch.where(flip, -lower, upper)
    log_b, log_a = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    diff = (log_a - log_b).clamp(max=0)
    return log_b + _log1mexp(diff)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − e^x) for x ≤ 0, accurate at both ends (Mächler 2012); −inf at x = 0."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _decoder_nll(x0: Tensor, mean: Tensor, log_var: Tensor, decoder: str, levels: Optional[int],
                 data_range: Optional[Tuple[float, float]]) -> Tensor:
    B = x0.shape[0]
    if decoder == "discretized":
        lo, hi = data_range  # type: ignore[misc]
        lp = discretized_gaussian_log_prob(x0, mean, log_var, lo, hi, int(levels))  # type: ignore[arg-type]
        return -lp.reshape(B, -1).sum(1)
    nll = 0.5 * (math.log(2 * math.pi) + log_var + (x0 - mean) ** 2 * torch.exp(-log_var))
    return nll.reshape(B, -1).sum(1)


class _EpsModel:
    """ε̂ and the learned v at 0-based steps ``k [B]`` of ``proc`` from a score function (ε̂ = −σ(t_k) s(x, t_k))."""

    def __init__(self, sde: SDE, score_fn: ScoreFn, proc: DiscreteVP, variance: str) -> None:
        self.score_fn, self.proc, self.variance = score_fn, proc, variance
        self.t = proc.network_times(sde)
        self.sigma = sde.marginal_std(self.t)
        self.source = learned_variance_source(score_fn)
        if variance == "learned" and self.source is None:
            raise ValueError("variance='learned' needs a network trained with model.learn_sigma=true; "
                             "use variance=beta or beta_tilde with this model")
        self.nfe = 0

    def __call__(self, x: Tensor, k: Tensor) -> Tuple[Tensor, Tensor]:
        t = self.t.to(x)[k]
        s = self.score_fn(x, t)
        self.nfe += 1
        eps = -self.sigma.to(x)[k].reshape(-1, *([1] * (x.dim() - 1))) * s
        if self.variance == "learned":
            frac = self.source.last_frac.to(x)  # type: ignore[union-attr]
            log_beta = torch.log(self.proc.beta.to(x))[k]
            bt = self.proc.beta_tilde.clone()
            bt[0] = bt[1] if self.proc.N > 1 else self.proc.beta[0]
            log_bt = torch.log(bt.to(x))[k]
            shape = (-1, *([1] * (x.dim() - 1)))
            log_var = frac * log_beta.reshape(shape) + (1 - frac) * log_bt.reshape(shape)
        else:
            _, lv = self.proc.variance(self.variance)
            log_var = lv.to(x)[k].reshape(-1, *([1] * (x.dim() - 1))).expand_as(x)
        return eps, log_var


def _noisy(x0: Tensor, k: Tensor, proc: DiscreteVP, generator: Optional[torch.Generator]) -> Tuple[Tensor, Tensor]:
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    shape = (-1, *([1] * (x0.dim() - 1)))
    m = torch.exp(0.5 * proc.log_alpha_bar.to(x0)[k]).reshape(shape)
    s = torch.sqrt(proc.one_minus_alpha_bar.to(x0)[k]).reshape(shape)
    return m * x0 + s * noise, noise


def _step_kl(model: _EpsModel, x0: Tensor, k: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """One draw of KL_i at 0-based steps ``k [B]`` (k ≥ 1) per example ``[B]``."""
    xt, noise = _noisy(x0, k, model.proc, generator)
    eps, log_var = model(xt, k)
    err2 = (eps - noise).pow(2).reshape(x0.shape[0], -1)
    return gaussian_kl_terms(err2, log_var.reshape(x0.shape[0], -1), k, model.proc)


def _decoder_term(model: _EpsModel, x0: Tensor, decoder: str, levels: Optional[int],
                  data_range: Optional[Tuple[float, float]], generator: Optional[torch.Generator]) -> Tensor:
    k = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)
    x1, _ = _noisy(x0, k, model.proc, generator)
    eps, log_var = model(x1, k)
    proc = model.proc
    mean = (x1 - float(proc.beta[0] / proc.one_minus_alpha_bar[0].sqrt()) * eps) / math.sqrt(1 - float(proc.beta[0]))
    return _decoder_nll(x0, mean, log_var, decoder, levels, data_range)


def proposal(proc: DiscreteVP, second_moment: float, variance: str) -> Tensor:
    """q over 0-based steps (``[N]``, q[0] = 0): ∝ the expected KL_i of the optimal model on Gaussian data
    with this per-element second moment s², where E(ε̂ − ε)² = Var(ε | x_i) = ᾱ_i s²/(ᾱ_i s² + 1 − ᾱ_i),
    mixed with the uniform (:data:`PROPOSAL_FLOOR`)."""
    N = proc.N
    if N < 2:
        return torch.zeros(1, dtype=torch.float64)
    s2 = max(float(second_moment), 1e-8)
    _, log_var = proc.variance("beta" if variance == "learned" else variance)
    resid = proc.alpha_bar * s2 / (proc.alpha_bar * s2 + proc.one_minus_alpha_bar)
    expected = step_kl(resid, log_var, proc.beta, torch.exp(proc.log_alpha), proc.one_minus_alpha_bar,
                       torch.log(proc.beta_tilde.clamp(min=1e-300)))
    expected[0] = 0.0
    w = expected.clamp(min=0)
    w = w / w.sum() if float(w.sum()) > 0 else torch.ones_like(w)
    uniform = torch.ones(N, dtype=torch.float64)
    uniform[0] = 0.0
    q = (1 - PROPOSAL_FLOOR) * w / w.sum() + PROPOSAL_FLOOR * uniform / (N - 1)
    q[0] = 0.0
    return q / q.sum()


def vlb(
    sde: SDE,
    score_fn: ScoreFn,
    x0: Tensor,
    proc: DiscreteVP,
    *,
    variance: str = "beta",
    decoder: str = "discretized",
    levels: Optional[int] = None,
    data_range: Optional[Tuple[float, float]] = None,
    terms: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> VLBResult:
    """The variational bound of ``x0 [B, ...]`` (model range, exactly on the data's levels for ``discretized``).

    Args:
        sde: the process the network was trained on (gives the network times and σ(t) of ε̂ = −σ s).
        score_fn: s(x [B, ...], t [B]).
        proc: the discrete chain (its β_i define the bound).
        variance: ``beta`` | ``beta_tilde`` | ``learned`` (σ_i² of p_θ).
        decoder: ``discretized`` (needs ``levels`` and ``data_range``) or ``gaussian``.
        terms: None for the exact sum over all steps, or K importance-sampled steps per example.
        generator: source of the noise draws (and of the sampled steps).
        progress: called with the NFE done so far after every evaluation.
    """
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose one of: {', '.join(DECODERS)}")
    if decoder == "discretized" and (levels is None or data_range is None):
        raise ValueError("the discretized decoder needs the data's levels and range (images); for vector data use "
                         "decoder='gaussian'")
    if terms is not None and (int(terms) != terms or terms < 1):
        raise ValueError(f"terms must be None (every step) or an integer >= 1, got {terms!r}")
    B, D, dev = x0.shape[0], x0[0].numel(), x0.device
    model = _EpsModel(sde, score_fn, proc, variance)
    tick = (lambda: progress(model.nfe)) if progress is not None else (lambda: None)
    prior = prior_kl(x0, proc)
    dec = _decoder_term(model, x0, decoder, levels, data_range, generator)
    tick()
    N = proc.N
    per_step = None
    if terms is None:
        per_step = torch.zeros(B, N, dtype=x0.dtype, device=dev)
        per_step[:, 0] = dec
        for k in range(1, N):
            kk = torch.full((B,), k, dtype=torch.long, device=dev)
            per_step[:, k] = _step_kl(model, x0, kk, generator)
            tick()
        middle = per_step[:, 1:].sum(1)
        stderr = torch.zeros(B, dtype=x0.dtype, device=dev)
    elif N < 2:
        middle = torch.zeros(B, dtype=x0.dtype, device=dev)
        stderr = torch.zeros_like(middle)
    else:
        second = float(x0.double().pow(2).mean())
        q = proposal(proc, second, variance)
        K = int(terms)
        draws = torch.multinomial(q.float(), B * K, replacement=True, generator=generator).reshape(K, B).to(dev)
        vals = torch.empty(K, B, dtype=x0.dtype, device=dev)
        q_dev = q.to(dev, x0.dtype)
        for j in range(K):
            vals[j] = _step_kl(model, x0, draws[j], generator) / q_dev[draws[j]]
            tick()
        middle = vals.mean(0)
        stderr = vals.std(0, unbiased=True) / math.sqrt(K) if K > 1 else torch.full_like(middle, float("nan"))
    total = prior + middle + dec
    return VLBResult(total=total, prior=prior, decoder=dec, middle=middle, stderr=stderr, per_step=per_step,
                     nfe=model.nfe)


__all__ = ["DECODERS", "VLBResult", "vlb", "prior_kl", "step_kl", "gaussian_kl_terms", "discretized_gaussian_log_prob",
           "proposal"]
