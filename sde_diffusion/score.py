r"""Parameterisations of a denoiser, in one place, and the wrapper that turns a network into s_θ.

With x_t = m x_0 + σ ε (shapes ``[B, ...]``; ``m``, ``sigma`` are ``[B]`` or scalars):

* score        s  = ∇ log p_t(x_t) ≈ −ε/σ
* noise        ε  = −σ s
* data (Tweedie) x̂_0 = (x_t + σ² s)/m = (x_t − σ ε)/m
* velocity     v  = m ε − σ x_0   (Salimans & Ho; for m² + σ² ≠ 1 the inverse below is still exact)

Usage::

    score_fn = ScoreModel(net, sde, prediction="eps")   # net(x, t, **cond) -> ε_θ
    s = score_fn(x, t)                                   # [B, ...]
    x0_hat = x0_from_score(x, s, sde.mean_coeff(t), sde.marginal_std(t))
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, Optional, Tuple

import torch
from torch import Tensor, nn

from .sdes.sde import SDE, broadcast_to_x

PREDICTIONS = ("eps", "score", "x0", "v")


def _b(c: Tensor | float, x: Tensor) -> Tensor | float:
    return broadcast_to_x(c, x) if torch.is_tensor(c) else c


def eps_to_score(eps: Tensor, sigma: Tensor | float) -> Tensor:
    """s = −ε/σ."""
    return -eps / _b(sigma, eps)


def score_to_eps(score: Tensor, sigma: Tensor | float) -> Tensor:
    """ε = −σ s."""
    return -score * _b(sigma, score)


def x0_from_eps(x: Tensor, eps: Tensor, m: Tensor | float, sigma: Tensor | float) -> Tensor:
    """x̂_0 = (x_t − σ ε)/m."""
    return (x - _b(sigma, x) * eps) / _b(m, x)


def eps_from_x0(x: Tensor, x0: Tensor, m: Tensor | float, sigma: Tensor | float) -> Tensor:
    """ε = (x_t − m x_0)/σ."""
    return (x - _b(m, x) * x0) / _b(sigma, x)


def x0_from_score(x: Tensor, score: Tensor, m: Tensor | float, sigma: Tensor | float) -> Tensor:
    """Tweedie's estimate x̂_0 = (x_t + σ² s)/m."""
    return (x + _b(sigma, x) ** 2 * score) / _b(m, x)


def score_from_x0(x: Tensor, x0: Tensor, m: Tensor | float, sigma: Tensor | float) -> Tensor:
    """s = −(x_t − m x̂_0)/σ²."""
    return -(x - _b(m, x) * x0) / _b(sigma, x) ** 2


def v_from_eps_x0(eps: Tensor, x0: Tensor, m: Tensor | float, sigma: Tensor | float) -> Tensor:
    """v = m ε − σ x_0."""
    return _b(m, eps) * eps - _b(sigma, eps) * x0


def x0_eps_from_v(x: Tensor, v: Tensor, m: Tensor | float, sigma: Tensor | float) -> tuple[Tensor, Tensor]:
    """Invert (x_t, v) = [[m, σ], [−σ, m]] (x_0, ε): x_0 = (m x − σ v)/(m²+σ²), ε = (σ x + m v)/(m²+σ²)."""
    m_, s_ = _b(m, x), _b(sigma, x)
    norm = m_**2 + s_**2
    return (m_ * x - s_ * v) / norm, (s_ * x + m_ * v) / norm


def prediction_to_score(
    pred: Tensor, x: Tensor, m: Tensor | float, sigma: Tensor | float, prediction: str = "eps"
) -> Tensor:
    """Convert a network output of kind ``prediction`` (eps, score, x0 or v) to the score."""
    if prediction == "eps":
        return eps_to_score(pred, sigma)
    if prediction == "score":
        return pred
    if prediction == "x0":
        return score_from_x0(x, pred, m, sigma)
    if prediction == "v":
        _, eps = x0_eps_from_v(x, pred, m, sigma)
        return eps_to_score(eps, sigma)
    raise ValueError(f"unknown prediction {prediction!r}; choose one of: {', '.join(PREDICTIONS)}")


def target_for(
    prediction: str, x0: Tensor, noise: Tensor, m: Tensor | float, sigma: Tensor | float
) -> Tensor:
    """The regression target of a network predicting ``prediction`` for x_t = m x0 + σ noise."""
    if prediction == "eps":
        return noise
    if prediction == "score":
        return -noise / _b(sigma, noise)
    if prediction == "x0":
        return x0
    if prediction == "v":
        return v_from_eps_x0(noise, x0, m, sigma)
    raise ValueError(f"unknown prediction {prediction!r}; choose one of: {', '.join(PREDICTIONS)}")


class ScoreModel(nn.Module):
    """Turn a network into a score function s_θ(x, t).

    ``net(x [B, ...], t [B], **cond) -> [B, ...]`` predicts ``prediction`` ∈ {eps, score, x0, v}; for
    the default ``eps`` the score is s_θ(x, t) = −ε_θ(x, t)/σ(t). Extra keyword arguments given at
    construction (e.g. class labels ``y``) are passed to the network on every call; a scalar ``t``
    is broadcast over the batch.
    """

    def __init__(self, net: nn.Module, sde: SDE, prediction: str = "eps", learn_sigma: bool = False, **cond: Any) -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of: {', '.join(PREDICTIONS)}")
        self.net = net
        self.sde = sde
        self.prediction = prediction
        self.cond = cond
        self.learn_sigma = bool(learn_sigma)
        #: v of the latest evaluation (learn_sigma only), ``[B, ...]`` like x: read by ``sampler=ddpm variance=learned``.
        self.last_frac: Optional[Tensor] = None

    def forward(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        kwargs = {**self.cond, **cond}
        pred = self.net(x, t, **kwargs)
        if self.learn_sigma:
            pred, v = split_learned_sigma(pred, x)
            self.last_frac = variance_frac(v).detach()
        m, sigma = self.sde.mean_coeff(t), self.sde.marginal_std(t)
        return prediction_to_score(pred, x, m, sigma, self.prediction)


def split_learned_sigma(out: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """A ``learn_sigma`` network's output ``[B, 2C, ...]`` → (prediction, v), each ``[B, C, ...]`` like ``x``."""
    if out.dim() < 2 or out.shape[1] != 2 * x.shape[1] or out.shape[2:] != x.shape[2:]:
        raise ValueError(f"a learn_sigma network must return [B, 2C, ...] = {(x.shape[0], 2 * x.shape[1], *x.shape[2:])}, "
                         f"got {tuple(out.shape)}")
    pred, v = out.chunk(2, dim=1)
    return pred, v


def variance_frac(v: Tensor) -> Tensor:
    """Improved DDPM's interpolation weight (v + 1)/2 of the raw output v: log Σ = w log β + (1 − w) log β̃."""
    return (v + 1) * 0.5


def learned_variance_source(score_fn: Any, depth: int = 6) -> Optional["ScoreModel"]:
    """The :class:`ScoreModel` with ``learn_sigma`` that ``score_fn`` is or wraps (through ``score_fn`` /
    ``cond_score`` / ``score`` / ``net`` attributes or a closure), or None."""
    if isinstance(score_fn, ScoreModel):
        return score_fn if score_fn.learn_sigma else None
    if depth <= 0 or score_fn is None:
        return None
    inner = [getattr(score_fn, name, None) for name in ("score_fn", "cond_score", "score", "score_model")]
    for cell in getattr(score_fn, "__closure__", None) or ():
        try:
            inner.append(cell.cell_contents)
        except ValueError:
            pass
    for f in inner:
        if f is not None and f is not score_fn and callable(f):
            found = learned_variance_source(f, depth - 1)
            if found is not None:
                return found
    return None


def counting(score_fn: Callable[[Tensor, Tensor], Tensor]) -> "CountingScore":
    """Wrap ``score_fn`` so that ``.nfe`` counts its calls (one call = one batched evaluation)."""
    return CountingScore(score_fn)


class CountingScore:
    """A score function that counts its evaluations in ``nfe`` and keeps the latest ``keep`` of them in ``recent``
    as ``(t, score)`` pairs, oldest first (for a final step that extrapolates along the path)."""

    def __init__(self, score_fn: Callable[[Tensor, Tensor], Tensor], keep: int = 0) -> None:
        self.score_fn = score_fn
        self.nfe = 0
        self.recent: Deque[Tuple[Tensor, Tensor]] = deque(maxlen=int(keep))

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.nfe += 1
        s = self.score_fn(x, t)
        self.recent.append((t, s))  # keeps none with keep = 0
        return s


class DataRangeClip:
    r"""A score whose data prediction is clamped to the data's range (static thresholding).

    .. math:: \tilde s(x, t) = \frac{m\,\mathrm{clip}(\hat x_0, lo, hi) - x}{\sigma^2},
              \qquad \hat x_0 = \frac{x + \sigma^2 s(x, t)}{m},

    so every sampler sees a denoiser that never leaves [lo, hi] (the range of the training data,
    e.g. [−1, 1] for images). Where x̂_0 is inside the range the score is unchanged (up to
    rounding). With a learned score the ODE samplers otherwise overshoot far outside the data
    range at few steps; for data that are not bounded (vectors, latents) do not use it.
    """

    def __init__(self, score_fn: Callable[[Tensor, Tensor], Tensor], sde: SDE, lo: float, hi: float) -> None:
        if not lo < hi:
            raise ValueError(f"the data range must have lo < hi, got [{lo}, {hi}]")
        self.score_fn, self.sde, self.lo, self.hi = score_fn, sde, float(lo), float(hi)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        s = self.score_fn(x, t)
        m, sigma = self.sde.mean_coeff(t), self.sde.marginal_std(t)
        x0 = x0_from_score(x, s, m, sigma)
        inside = (x0 >= self.lo) & (x0 <= self.hi)
        return torch.where(inside, s, score_from_x0(x, x0.clamp(self.lo, self.hi), m, sigma))


__all__ = [
    "PREDICTIONS",
    "DataRangeClip",
    "eps_to_score",
    "score_to_eps",
    "x0_from_eps",
    "eps_from_x0",
    "x0_from_score",
    "score_from_x0",
    "v_from_eps_x0",
    "x0_eps_from_v",
    "prediction_to_score",
    "target_for",
    "ScoreModel",
    "split_learned_sigma",
    "variance_frac",
    "learned_variance_source",
    "CountingScore",
    "counting",
]

