r"""Inpainting, imputation and colourisation: sampling x given a linear observation y = A x.

Two methods, both usable with any sampler:

1. **Replacement** (Song et al. 2021, App. I) — a per-step ``hook`` for :func:`~sde_diffusion.sample`.
   In a basis where the observation is a set of coordinates (a mask, possibly after an orthogonal
   transform ``W`` such as a colour decorrelation for colourisation), the observed coordinates of
   x_t are replaced after every step by a draw of the forward kernel, m(t)·y + σ(t)·z. With
   ``fixed_noise=True`` one z is kept for the whole run, so that with an ODE sampler the observed
   coordinates follow a deterministic path (the variant that conditions through the ODE).
   Cheap (no extra score evaluations) but approximate: the unobserved coordinates are driven by
   p_t(x_u | x_o,t) rather than p_t(x_u | y), which biases them (for correlated Gaussian data the
   conditional mean is visibly shrunk).

2. **Tweedie-moment conditioning** — a conditional ``score_fn``

   .. math::
       \nabla\log p_t(x\mid y) = s(x,t) + J^\top A^\top C^{-1}(y - A\hat x_0),\quad
       C = \tfrac{\sigma^2}{m} A J A^\top + \sigma_y^2 I,\quad J = \partial\hat x_0/\partial x,

   with x̂_0 = (x + σ² s)/m (Tweedie) and Cov[x_0 | x_t] = (σ²/m) J (second-order Tweedie). It treats
   p(x_0 | x_t) as Gaussian, which is *exact* when the data are Gaussian, so every sampler (SDE or
   probability-flow ODE) then samples the exact conditional; for other data it is the moment-matched
   approximation. Cost per evaluation: one score call with a Jacobian of k rows (k = number of
   observed values), computed as k batched vector–Jacobian products.

Shapes: ``x`` is ``[B, ...]``; ``mask`` has the per-sample shape (1 = observed); ``observed`` is
``[B, ...]`` or the per-sample shape (values outside the mask are ignored).

Usage::

    hook = ReplacementInpainting(sde, observed, mask, generator=g)
    out = sample(sde, score_fn, observed.shape, sampler="pc", steps=500, hook=hook, generator=g)

    cond = TweedieConditionalScore(sde, score_fn, observed, mask)
    out = cond.project(sample(sde, cond, observed.shape, sampler="euler_maruyama", steps=500).samples)
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .sdes.sde import SDE, broadcast_to_x

ScoreFn = Callable[[Tensor, Tensor], Tensor]


def _check_mask(mask: Tensor, observed: Tensor) -> Tensor:
    mask = torch.as_tensor(mask)
    per_sample = observed.shape[1:] if observed.dim() == mask.dim() + 1 else observed.shape
    if tuple(mask.shape) != tuple(per_sample):
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must equal the per-sample data shape {tuple(per_sample)}"
        )
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must contain only 0 (unknown) and 1 (observed)")
    return mask


def colour_transform(channels: int = 3, dtype: torch.dtype = torch.float32) -> Tensor:
    """Orthogonal channel mixing W whose first row is the grey level (R+G+B)/√3.

    Colourisation observes W's first output channel; the other two rows complete an orthonormal
    basis, so replacement in W-space conditions on the grey image only.
    """
    if channels != 3:
        raise ValueError(f"colourisation needs 3 channels, got {channels}")
    w = torch.tensor(
        [[1, 1, 1], [1, -1, 0], [1, 1, -2]], dtype=torch.float64
    )
    w = w / w.norm(dim=1, keepdim=True)
    return w.to(dtype)


class ReplacementInpainting:
    """Step hook: observed coordinates ← m(t)·y + σ(t)·z after every step (see module docstring).

    Args:
        sde: the forward process.
        observed: y in the (optionally transformed) basis, ``[B, ...]`` or per-sample shape.
        mask: 1 where observed.
        transform: optional orthogonal ``[C, C]`` channel mixing applied to dimension 1
            (colourisation: :func:`colour_transform`); ``observed`` is then given in that basis.
        generator: randomness of z.
        fixed_noise: keep one z for the whole run (deterministic observed path for ODE samplers).
    """

    def __init__(
        self,
        sde: SDE,
        observed: Tensor,
        mask: Tensor,
        transform: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        fixed_noise: bool = False,
    ) -> None:
        self.mask = _check_mask(mask, observed).to(observed)
        self.sde = sde
        self.observed = observed
        self.transform = transform
        if transform is not None:
            eye = torch.eye(transform.shape[0], dtype=transform.dtype, device=transform.device)
            if not torch.allclose(transform @ transform.T, eye, atol=1e-5):
                raise ValueError("transform must be orthogonal (W Wᵀ = I)")
        self.generator = generator
        self.fixed_noise = fixed_noise
        self._z: Optional[Tensor] = None

    def _to_basis(self, x: Tensor, inverse: bool = False) -> Tensor:
        if self.transform is None:
            return x
        w = self.transform.to(x)
        w = w.T if inverse else w
        return torch.einsum("dc,bc...->bd...", w, x)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        y = self.observed.expand_as(x) if self.observed.dim() < x.dim() else self.observed
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if self.fixed_noise:
            if self._z is None or self._z.shape != x.shape:
                self._z = torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
            z = self._z
        else:
            z = torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        m = self.sde.mean_coeff(t)
        s = self.sde.marginal_std(t)
        y_t = m * y.to(x) + s * z
        u = self._to_basis(x)
        u = self.mask * y_t + (1 - self.mask) * u
        return self._to_basis(u, inverse=True)

    def start(self, x_T: Tensor) -> Tensor:
        """Apply the replacement to the prior sample at T."""
        return self(x_T, torch.tensor(self.sde.T, dtype=x_T.dtype, device=x_T.device))


class TweedieConditionalScore:
    """Conditional score ∇log p_t(x | A x_0 = y) by Tweedie moment matching (see module docstring).

    Args:
        sde: the forward process.
        score_fn: the unconditional score s(x, t); must be differentiable in x.
        observed: y, ``[B, ...]`` or the per-sample shape, in data coordinates.
        mask: 1 where observed (the observation A selects these coordinates).
        obs_std: σ_y, observation noise std (a small value regularises C near t = 0).
    """

    def __init__(self, sde: SDE, score_fn: ScoreFn, observed: Tensor, mask: Tensor, obs_std: float = 1e-3) -> None:
        if obs_std < 0:
            raise ValueError(f"obs_std must be ≥ 0, got {obs_std}")
        self.mask = _check_mask(mask, observed)
        self.idx = torch.nonzero(self.mask.reshape(-1) > 0).flatten()
        if self.idx.numel() == 0:
            raise ValueError("mask observes nothing; use plain sampling instead")
        self.sde = sde
        self.score_fn = score_fn
        self.observed = observed
        self.obs_std = float(obs_std)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        B = x.shape[0]
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(B)
        idx = self.idx.to(x.device)
        k = idx.numel()
        m = broadcast_to_x(self.sde.mean_coeff(t), x)
        sig = broadcast_to_x(self.sde.marginal_std(t), x)
        obs = self.observed.to(x)
        y = (obs.expand_as(x) if obs.dim() < x.dim() else obs).reshape(B, -1)[:, idx]
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            s = self.score_fn(xg, t)
            x0 = (xg + sig**2 * s) / m
            basis = torch.zeros(k, *x0.shape, dtype=x.dtype, device=x.device)
            flat = basis.reshape(k, B, -1)
            flat[torch.arange(k), :, idx] = 1.0
            # rows[j] = ∂x̂0[idx_j]/∂x for every sample: k batched vector–Jacobian products.
            (rows,) = torch.autograd.grad(x0, xg, grad_outputs=basis, is_grads_batched=True)
        s, x0 = s.detach(), x0.detach()
        AJ = rows.reshape(k, B, -1).permute(1, 0, 2)  # [B, k, D]
        m_b = m.reshape(B, -1)[:, :1] if m.dim() else m.expand(B, 1)
        sig_b = sig.reshape(B, -1)[:, :1] if sig.dim() else sig.expand(B, 1)
        C = (sig_b**2 / m_b)[:, :, None] * AJ[:, :, idx]
        C = 0.5 * (C + C.transpose(1, 2)) + self.obs_std**2 * torch.eye(k, dtype=x.dtype, device=x.device)
        resid = y - x0.reshape(B, -1)[:, idx]
        c = torch.linalg.solve(C, resid[..., None])[..., 0]  # [B, k]
        guide = torch.einsum("bk,bkd->bd", c, AJ).reshape(x.shape)
        return s + guide

    def project(self, x: Tensor) -> Tensor:
        """Set the observed coordinates of final samples to y exactly."""
        mask = self.mask.to(x)
        obs = self.observed.to(x)
        y = obs.expand_as(x) if obs.dim() < x.dim() else obs
        return mask * y + (1 - mask) * x


__all__ = ["ReplacementInpainting", "TweedieConditionalScore", "colour_transform"]
