r"""Conditional sampling tasks of the sampling command: inpainting and colourisation.

Both observe a linear function of an example and sample the rest, through
:mod:`sde_diffusion.inpainting`:

* ``inpaint`` — a mask of observed coordinates (:func:`make_mask`); the named masks give the
  region to *generate* (``mask=left`` fills in the left half), a ``.npy`` file gives the mask
  itself with 1 = observed.
* ``colorize`` — 3-channel images; the observation is the grey level (R+G+B)/√3. Sampling runs in
  the orthonormal colour basis u = W x of :func:`~sde_diffusion.inpainting.colour_transform`,
  where the observation is channel 0: the score there is s_u(u, t) = W s_x(Wᵀu, t) (W orthogonal,
  and the built-in SDEs act on each coordinate alike, so the forward process is the same in
  either basis), and the samples are mapped back by x = Wᵀu.

Methods: ``replace`` (a step hook: observed coordinates ← m(t)·y + σ(t)·z) or ``tweedie`` (the
moment-matched conditional score). Either way the observed coordinates of the final samples are
set to y exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..inpainting import ReplacementInpainting, TweedieConditionalScore, colour_transform

TASKS = ("sample", "inpaint", "colorize")
MASKS = ("left", "right", "top", "bottom", "center", "random")
METHODS = ("replace", "tweedie")

ScoreFn = Callable[[Tensor, Tensor], Tensor]


def make_mask(spec: str, data_shape: Sequence[int], ratio: float = 0.5, seed: int = 0) -> Tensor:
    """The observation mask ``[*data_shape]`` (float32, 1 = observed) for ``spec``.

    Named masks are the region to generate. Images ``(C, H, W)`` (all channels alike):
    ``left``/``right`` = that half of the columns, ``top``/``bottom`` = that half of the rows,
    ``center`` = the central (H/2)×(W/2) square, ``random`` = each pixel with probability
    ``ratio`` (seeded by ``seed``). Vectors ``(D,)``: ``left``/``right`` = the first/last
    ⌊D/2⌋ coordinates (at least one), ``random`` as for images. A path to a ``.npy`` file is
    read as the mask itself (shape ``data_shape``, or ``(H, W)`` for images; values 0/1).
    """
    shape = tuple(int(s) for s in data_shape)
    spec = str(spec)
    if spec not in MASKS:
        return _mask_from_file(spec, shape)
    if spec == "random":
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"inpaint.mask_ratio must lie in (0, 1), got {ratio}")
        spatial = shape[1:] if len(shape) == 3 else shape
        gen = torch.Generator().manual_seed(int(seed))
        missing = torch.rand(spatial, generator=gen) < ratio
        if len(shape) == 3:
            missing = missing.expand(shape)
        mask = (~missing).float()
        return _check_mask(mask, spec)
    if len(shape) == 1:
        d = shape[0]
        k = max(1, d // 2)
        mask = torch.ones(d)
        if spec == "left":
            mask[:k] = 0
        elif spec == "right":
            mask[d - k :] = 0
        else:
            raise ValueError(f"mask={spec} is for images; for vectors use left, right, random or a .npy file")
        return _check_mask(mask, spec)
    if len(shape) != 3:
        raise ValueError(f"masks are defined for vectors (D,) and images (C, H, W), not data_shape {shape}")
    c, h, w = shape
    mask = torch.ones(shape)
    if spec == "left":
        mask[:, :, : w // 2] = 0
    elif spec == "right":
        mask[:, :, w - w // 2 :] = 0
    elif spec == "top":
        mask[:, : h // 2, :] = 0
    elif spec == "bottom":
        mask[:, h - h // 2 :, :] = 0
    else:  # center
        mask[:, h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2] = 0
    return _check_mask(mask, spec)


def _mask_from_file(spec: str, shape: tuple) -> Tensor:
    path = Path(spec).expanduser()
    if path.suffix != ".npy" or not path.is_file():
        raise ValueError(f"mask={spec!r}: not one of {', '.join(MASKS)} and not an existing .npy file")
    arr = np.load(path, allow_pickle=False)
    if arr.shape == shape:
        mask = torch.as_tensor(arr, dtype=torch.float32)
    elif len(shape) == 3 and arr.shape == shape[1:]:
        mask = torch.as_tensor(arr, dtype=torch.float32).expand(shape).clone()
    else:
        raise ValueError(f"mask file {path} has shape {arr.shape}; expected {shape}" + (f" or {shape[1:]}" if len(shape) == 3 else ""))
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"mask file {path} must hold only 0 (generate) and 1 (observed)")
    return _check_mask(mask, str(path))


def _check_mask(mask: Tensor, name: str) -> Tensor:
    if float(mask.sum()) == 0:
        raise ValueError(f"mask {name} observes nothing; use task=sample for unconditional samples")
    if float(mask.sum()) == mask.numel():
        raise ValueError(f"mask {name} observes everything; there is nothing to generate")
    return mask


# ---------------------------------------------------------------------------------- conditioning
def _apply_channels(w: Tensor, x: Tensor) -> Tensor:
    return torch.einsum("dc,bc...->bd...", w.to(x), x)


@dataclass
class ConditionalBatch:
    """What one conditional batch hands to :func:`~sde_diffusion.sample`.

    Sampling runs in the task's basis (identity for inpainting): ``score_fn`` and ``hook`` act
    there, ``x_T`` is the prior draw (with the replacement applied), ``finish`` maps final samples
    to data coordinates with the observed part set to y, and ``masked`` is the observed input as
    an example in data coordinates (unknown part at ``fill``) for display.
    """

    score_fn: ScoreFn
    hook: Optional[Callable[[Tensor, Tensor], Tensor]]
    x_T: Tensor
    finish: Callable[[Tensor], Tensor]
    masked: Tensor


def condition_batch(
    task: str,
    method: str,
    sde: Any,
    score_fn: ScoreFn,
    observed: Tensor,
    mask: Optional[Tensor],
    generator: torch.Generator,
    fill: float = 0.0,
    fixed_noise: bool = False,
    obs_std: float = 1e-3,
) -> ConditionalBatch:
    """Set up ``task`` ∈ {inpaint, colorize} with ``method`` ∈ {replace, tweedie} for one batch.

    Args:
        observed: ``[B, *data_shape]`` examples in model range (their unobserved part is ignored).
        mask: inpainting mask ``[*data_shape]`` (1 = observed); ignored for colourisation.
        generator: the batch's generator (prior draw and replacement noise).
        fill: model-range value shown in place of unknown pixels in ``masked``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown inpaint.method {method!r}; choose one of: {', '.join(METHODS)}")
    x_obs = observed
    if task == "colorize":
        if x_obs.dim() != 4 or x_obs.shape[1] != 3:
            raise ValueError(f"task=colorize needs 3-channel images, but the data have shape {tuple(x_obs.shape[1:])}")
        w = colour_transform(3, dtype=x_obs.dtype).to(x_obs.device)
        to_basis: Callable[[Tensor], Tensor] = lambda x: _apply_channels(w, x)  # noqa: E731
        from_basis: Callable[[Tensor], Tensor] = lambda u: _apply_channels(w.T, u)  # noqa: E731
        basis_mask = torch.zeros(x_obs.shape[1:], dtype=x_obs.dtype, device=x_obs.device)
        basis_mask[0] = 1.0

        def basis_score(u: Tensor, t: Tensor) -> Tensor:
            return to_basis(score_fn(from_basis(u), t))

        u_obs = to_basis(x_obs)
        masked = from_basis(basis_mask * u_obs)  # the grey image
    elif task == "inpaint":
        if mask is None:
            raise ValueError("task=inpaint needs a mask")
        basis_mask = mask.to(device=x_obs.device, dtype=x_obs.dtype)
        to_basis = from_basis = lambda x: x  # noqa: E731
        basis_score = score_fn
        u_obs = x_obs
        masked = basis_mask * x_obs + (1 - basis_mask) * fill
    else:
        raise ValueError(f"unknown conditional task {task!r}; choose one of: inpaint, colorize")

    x_T = sde.prior_sample(tuple(x_obs.shape), generator=generator, device=x_obs.device, dtype=x_obs.dtype)
    hook = None
    if method == "replace":
        hook = ReplacementInpainting(sde, u_obs, basis_mask, generator=generator, fixed_noise=fixed_noise)
        x_T = hook.start(x_T)
        cond_score = basis_score
    else:
        cond_score = TweedieConditionalScore(sde, basis_score, u_obs, basis_mask, obs_std=obs_std)

    def finish(u: Tensor) -> Tensor:
        return from_basis(basis_mask * u_obs + (1 - basis_mask) * u)

    return ConditionalBatch(score_fn=cond_score, hook=hook, x_T=x_T, finish=finish, masked=masked)


__all__ = ["TASKS", "MASKS", "METHODS", "make_mask", "ConditionalBatch", "condition_batch"]
