r"""Guided score functions: classifier-free and classifier guidance, as ``score_fn`` wrappers.

Each wrapper is itself a ``score_fn(x [B, ...], t [B]) -> [B, ...]``, so every sampler works with it
unchanged.

Classifier-free guidance (Ho & Salimans 2022), with ε̃ the guided noise prediction:

.. math:: \tilde\varepsilon = (1 + w)\,\varepsilon_\theta(x, t, y) - w\,\varepsilon_\theta(x, t, \varnothing)
   \iff \tilde s = (1 + w)\, s_\theta(x, t, y) - w\, s_\theta(x, t, \varnothing),

since s = −ε/σ is linear in ε. w = 0 samples the conditional model, w > 0 sharpens it. Both
terms come from one batched network call on the concatenation [x, x] with labels [y, ∅].

Classifier guidance (Dhariwal & Nichol 2021; Song et al. 2021):

.. math:: \tilde s = s_\theta(x, t) + w\,\nabla_x \log p_\phi(y \mid x, t).

With w = 1 and the exact p_t(y | x) this is the exact conditional score.

Usage::

    score_fn = ClassifierFreeGuidance(ScoreModel(net, sde), y=labels, scale=3.0, null_label=10)
    out = sample(sde, score_fn, (64, 1, 8, 8), sampler="dpm_solver", steps=20)
"""
from __future__ import annotations

from typing import Callable, Union

import torch
from torch import Tensor

ScoreFn = Callable[[Tensor, Tensor], Tensor]


def _labels(y: Union[int, Tensor], batch: int, device: torch.device) -> Tensor:
    y = torch.as_tensor(y, dtype=torch.long, device=device)
    if y.dim() == 0:
        y = y.expand(batch)
    if y.shape != (batch,):
        raise ValueError(f"labels must be an int or have shape [{batch}], got shape {tuple(y.shape)}")
    return y


class ClassifierFreeGuidance:
    """s̃ = (1 + w) s(x, t, y) − w s(x, t, ∅) from one batched call of a conditional score model.

    Args:
        cond_score: callable ``(x, t, y=labels) -> score`` — e.g. :class:`~sde_diffusion.score.ScoreModel`
            of a network trained with label dropout; label ``null_label`` means "no label".
        y: the requested class, an int or a ``[B]`` tensor.
        scale: guidance weight w ≥ 0 (w = 0: plain conditional sampling).
        null_label: the network's null label (usually ``num_classes``).
    """

    def __init__(self, cond_score: Callable[..., Tensor], y: Union[int, Tensor], scale: float, null_label: int) -> None:
        if scale < 0:
            raise ValueError(f"guidance scale must be ≥ 0, got {scale}")
        self.cond_score = cond_score
        self.y = y
        self.scale = float(scale)
        self.null_label = int(null_label)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        B = x.shape[0]
        y = _labels(self.y, B, x.device)
        if self.scale == 0:
            return self.cond_score(x, t, y=y)
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(B)
        both = self.cond_score(
            torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, torch.full_like(y, self.null_label)])
        )
        s_cond, s_uncond = both[:B], both[B:]
        return (1 + self.scale) * s_cond - self.scale * s_uncond


class ContextGuidance:
    """Classifier-free guidance on a text context: s̃ = (1 + w) s(x, t, c) − w s(x, t, c̄) from one batched call.

    Args:
        cond_score: ``(x, t, context=, context_mask=) -> score`` (a text model's ScoreModel).
        context, mask: the prompts' encodings ``[B, L, d]``, ``[B, L]`` (one per sample).
        neg_context, neg_mask: the negative prompt's (the empty prompt: the unconditional model), ``[1 or B, L, d]``.
        scale: w ≥ 0 (0: the conditional model alone).
    """

    def __init__(self, cond_score: Callable[..., Tensor], context: Tensor, mask: Tensor, neg_context: Tensor,
                 neg_mask: Tensor, scale: float) -> None:
        if scale < 0:
            raise ValueError(f"guidance scale must be ≥ 0, got {scale}")
        self.cond_score, self.scale = cond_score, float(scale)
        self.context, self.mask, self.neg_context, self.neg_mask = context, mask, neg_context, neg_mask

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        B = x.shape[0]
        if self.scale == 0:
            return self.cond_score(x, t, context=self.context, context_mask=self.mask)
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(B)
        nc, nm = self.neg_context.expand(B, -1, -1), self.neg_mask.expand(B, -1)
        if nc.shape[1] != self.context.shape[1]:
            raise ValueError("the prompt and negative prompt encodings must have the same length")
        both = self.cond_score(torch.cat([x, x]), torch.cat([t, t]), context=torch.cat([self.context, nc]),
                               context_mask=torch.cat([self.mask, nm]))
        return (1 + self.scale) * both[:B] - self.scale * both[B:]


class ClassifierGuidance:
    """s̃ = s(x, t) + w ∇_x log p_φ(y | x, t), the gradient taken by autograd.

    Args:
        score_fn: the unconditional score.
        classifier: ``(x [B, ...], t [B]) -> logits [B, C]`` of a time-dependent classifier
            (trained on perturbed data), or any callable returning log-probabilities.
        y: the requested class, an int or ``[B]`` tensor.
        scale: w ≥ 0.
    """

    def __init__(self, score_fn: ScoreFn, classifier: Callable[[Tensor, Tensor], Tensor], y: Union[int, Tensor], scale: float = 1.0) -> None:
        if scale < 0:
            raise ValueError(f"guidance scale must be ≥ 0, got {scale}")
        self.score_fn = score_fn
        self.classifier = classifier
        self.y = y
        self.scale = float(scale)

    def class_log_prob_grad(self, x: Tensor, t: Tensor) -> Tensor:
        """∇_x log p_φ(y | x, t): ``[B, ...]``."""
        y = _labels(self.y, x.shape[0], x.device)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logp = torch.log_softmax(self.classifier(xg, t), dim=-1)
            sel = logp.gather(1, y[:, None]).sum()
            (grad,) = torch.autograd.grad(sel, xg)
        return grad.to(x.dtype)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        s = self.score_fn(x, t)
        if self.scale == 0:
            return s
        return s + self.scale * self.class_log_prob_grad(x, t)


__all__ = [
    "ContextGuidance", "ClassifierFreeGuidance", "ClassifierGuidance"]
