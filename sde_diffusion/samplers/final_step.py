r"""The final denoising step: from the last noise level σ̃_N = σ/m down to σ̃ = 0.

In EDM's variables x̃ = x/m and σ̃ = σ/m the probability-flow ODE is

.. math:: \frac{d\tilde x}{d\tilde\sigma} = \hat\varepsilon(\tilde x, \tilde\sigma), \qquad
          \hat\varepsilon = -\sigma(t)\, s_\theta(x, t),

so  x̃(0) = x̃_N − ∫_0^{σ̃_N} ε̂ dσ̃. Order 1 takes ε̂ constant (its value at the end point): that is Tweedie's
x̂_0 = (x + σ² s)/m, the posterior mean, whose spread is too narrow by the noise that is left. Order k takes the
polynomial in σ̃ through ε̂ at the end point and at the k − 1 latest earlier evaluations along the run (an
Adams–Bashforth step in σ̃, as k-diffusion's LMS sampler ends), which follows the ODE's flow to σ̃ = 0 instead:
on exact scores it moves a run that stops at σ̃ = 0.01 onto p_0 itself, where Tweedie's mean is off by the
remaining noise. It costs no evaluation beyond the one at the end point. A run without that step returns its state
in the data's scale (:func:`to_data_scale`).

Example::

    x0 = final_step(sde, x, t_end, counter, order=3)   # counter: CountingScore(score_fn, keep=2) used by the run
"""
from __future__ import annotations

from typing import Any, List, Sequence, Tuple

import torch
from torch import Tensor

from ..score import CountingScore
from ..sdes.sde import SDE

#: The highest order of the final step (ε̂ through four evaluations, as LMS).
MAX_FINAL_ORDER = 4


#: Noise levels closer than this (relative) count as one node of the final step.
SAME_LEVEL = 1e-3


def evaluations_to_keep(order: int, nfe_per_step: int) -> int:
    """How many of the latest evaluations a run keeps for a final step of ``order``: order − 1 noise levels above
    the end point, each step of ``nfe_per_step`` evaluations (0: adaptive, taken as up to 8) giving at least one.
    A multi-stage step evaluates at repeated levels (Heun's second stage at the end point itself, RK4's two
    midpoint stages), which the step skips; keeping a step's worth per level leaves it enough distinct ones."""
    return (int(order) - 1) * (int(nfe_per_step) if nfe_per_step else 8)


def lagrange_weights(nodes: Sequence[float], upper: float) -> List[float]:
    """w_j = ∫_0^upper L_j(σ) dσ for the Lagrange basis L_j on the distinct ``nodes``: the weights with
    ∫_0^upper p = Σ_j w_j p(σ_j) for every polynomial p of degree < len(nodes). Solved in u = σ/upper (nodes ≥
    upper give u ≥ 1, a well-conditioned Vandermonde system): Σ_j w_j u_j^i = upper/(i + 1)."""
    u = torch.tensor(list(nodes), dtype=torch.float64) / float(upper)
    powers = torch.arange(len(u), dtype=torch.float64)
    vander_t = u.unsqueeze(0) ** powers.unsqueeze(1)  # [i, j] = u_j^i
    w = torch.linalg.solve(vander_t, 1.0 / (powers + 1.0))
    return (w * float(upper)).tolist()


def final_step(sde: SDE, x: Tensor, t_end: float, counter: CountingScore, order: int = 1) -> Tensor:
    """x̂_0 ``[B, ...]`` from the state x ``[B, ...]`` at ``t_end``: one evaluation of ``counter`` there, then the
    step of ``order`` (module docstring) through it and the latest distinct noise levels in ``counter.recent``
    (fewer where the run made fewer evaluations). With one node it is Tweedie's (x + σ² s)/m."""
    if not 1 <= int(order) <= MAX_FINAL_ORDER:
        raise ValueError(f"the final step's order must be 1–{MAX_FINAL_ORDER}, got {order}")
    earlier: List[Tuple[Tensor, Tensor]] = list(counter.recent)
    t = torch.full((x.shape[0],), float(t_end), dtype=x.dtype, device=x.device)
    points = [(torch.tensor([float(t_end)], dtype=torch.float64), counter(x, t))] + earlier[::-1]
    nodes: List[float] = []  # σ̃ of each node, the end point's first
    eps: List[Tensor] = []  # ε̂ = −σ s there
    for t_j, s_j in points:
        if len(nodes) >= order:
            break
        t_j = torch.as_tensor(t_j).reshape(-1)
        if t_j.numel() > 1 and not bool((t_j == t_j[0]).all()):
            raise ValueError("a final step of order > 1 needs one time per step for the whole batch; this run "
                             "stepped each sample on its own (step_control=sample): use denoise_order=1")
        t64 = t_j[:1].to(torch.float64)
        sigma, m = float(sde.marginal_std(t64)), float(sde.mean_coeff(t64))
        st = sigma / m
        # A later stage at a level already taken (Heun's second stage at the end point, RK4's second midpoint) is
        # skipped; its time can differ from the level's by rounding, hence the relative margin.
        if not nodes or st > max(nodes) * (1.0 + SAME_LEVEL):
            nodes.append(st)
            eps.append(-sigma * s_j)
    m_end = float(sde.mean_coeff(torch.tensor(float(t_end), dtype=torch.float64)))
    return step_to_zero(x / m_end, nodes, eps)


def step_to_zero(x_tilde: Tensor, nodes: Sequence[float], eps: Sequence[Tensor]) -> Tensor:
    """x̃_0 = x̃ − ∫_0^{σ̃_0} p(σ̃) dσ̃ for the polynomial p through ε̂ ``eps[j]`` ``[B, ...]`` at the distinct noise
    levels ``nodes[j]``, the first of them x̃'s own (``x_tilde`` ``[B, ...]``, the state in the data's scale)."""
    out = x_tilde
    for w_j, e_j in zip(lagrange_weights(nodes, nodes[0]), eps):
        out = out - w_j * e_j
    return out


def to_data_scale(sde: SDE, x: Tensor, t_end: float) -> Tensor:
    """x_t ``[B, ...]`` at the end time of a run that stops at a noise level, as x̃ = x_t / m(t_end) = x_0 + σ̃ ε.

    A run that stops at σ̃ = σ/m (``end_sigma``) returns a sample of x_0 blurred by σ̃, in the data's scale. The
    state x_t itself is also shrunk by m(t_end): negligible where m stays ≈ 1 (VP, VE), but sub-VP reaches a given
    σ̃ at a 10–100× later time, where 1 − m is 1e-3–1e-2 of the data's spread and moves sharp modes off place.
    """
    m = float(sde.mean_coeff(torch.tensor(t_end, dtype=torch.float64)))
    return x if m == 1.0 else x * (1.0 / m)


def from_data_scale(sde: SDE, x: Tensor, t_end: float) -> Tensor:
    """The inverse of :func:`to_data_scale`: x̃ ``[B, ...]`` → the state m(t_end) x̃ (where an encoder starts)."""
    m = float(sde.mean_coeff(torch.tensor(t_end, dtype=torch.float64)))
    return x if m == 1.0 else x * m



def finish_run(sde: SDE, end: Any, x: Tensor, t_end: float, counter: CountingScore) -> Tensor:
    """What a run returns from its state x ``[B, ...]`` at ``t_end``, by its end point ``end`` (an ``EndPoint``): the
    final step where it has one (``denoise``), x̃ in the data's scale where it stops at a level (``end_sigma``), else
    x. ``counter`` is the run's :class:`~sde_diffusion.score.CountingScore`, keeping the evaluations the step uses."""
    if end.denoise:
        return final_step(sde, x, t_end, counter, end.denoise_order)
    if end.end_sigma is not None:
        return to_data_scale(sde, x, t_end)
    return x


__all__ = ["MAX_FINAL_ORDER", "evaluations_to_keep", "final_step", "finish_run", "from_data_scale", "lagrange_weights", "step_to_zero",
           "to_data_scale"]
