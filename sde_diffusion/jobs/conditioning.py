r"""The tasks of ``python sample.py task=<name>`` (:data:`~sde_diffusion.registry.SAMPLE_TASKS`):
what a batch starts from and how its samples are finished.

* ``sample`` — plain samples (class-conditional ones with ``label=`` / guidance).
* ``inpaint`` — observe the pixels of a mask (:func:`make_mask`) and sample the rest; the named
  masks give the region to *generate* (``mask=left`` fills in the left half), a ``.npy`` file gives
  the mask itself with 1 = observed.
* ``colorize`` — 3-channel images from their grey level (R+G+B)/√3. Sampling runs in the
  orthonormal colour basis u = W x of :func:`~sde_diffusion.inpainting.colour_transform`, where the
  observation is channel 0: the score there is s_u(u, t) = W s_x(Wᵀu, t) (W orthogonal, and the
  built-in SDEs act on each coordinate alike, so the forward process is the same in either basis),
  and the samples are mapped back by x = Wᵀu.

Both conditional tasks go through :mod:`sde_diffusion.inpainting` with ``inpaint.method``:
``replace`` (a step hook: observed coordinates ← m(t)·y + σ(t)·z) or ``tweedie`` (the
moment-matched conditional score). Either way the observed coordinates of the final samples are
set to y exactly. A new task is one class here::

    @SAMPLE_TASKS.register("denoise")
    class Denoise(ObservingTask):
        def basis(self, observed): ...
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..config import SampleConfig
from ..config.schema import INPAINT_METHODS
from ..inpainting import ReplacementInpainting, TweedieConditionalScore, colour_transform
from ..registry import SAMPLE_TASKS

MASKS = ("left", "right", "top", "bottom", "center", "random")
METHODS = INPAINT_METHODS

ScoreFn = Callable[[Tensor, Tensor], Tensor]
Map = Callable[[Tensor], Tensor]


# ---------------------------------------------------------------------------------- masks
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
        return _check_mask((~missing).float(), spec)
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


# ---------------------------------------------------------------------------------- tasks
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
    finish: Map
    masked: Tensor


@dataclass
class Basis:
    """Where a conditional task samples: ``u = to_basis(x)``, the observed coordinates ``mask`` (of
    u), and ``masked`` (the observation shown as an example in data coordinates)."""

    to_basis: Map
    from_basis: Map
    mask: Tensor
    masked: Tensor


class SamplingTask:
    """A task of sample.py. ``observes``: whether batches condition on real examples."""

    name: ClassVar[str] = ""
    observes: ClassVar[bool] = False

    def identity(self) -> Dict[str, Any]:
        """What, besides the sampler settings, decides a batch's content (part of the run's fingerprint)."""
        return {}

    def merged_arrays(self) -> Dict[str, np.ndarray]:
        """Arrays stored once in ``samples.npz`` besides the per-sample ones."""
        return {}


@SAMPLE_TASKS.register("sample")
class Unconditional(SamplingTask):
    """Plain (or class-conditional) samples."""

    name = "sample"

    @classmethod
    def from_config(cls, cfg: SampleConfig, data_shape: Sequence[int]) -> "Unconditional":
        return cls()


class ObservingTask(SamplingTask):
    """A task that observes part of real examples and samples the rest (see the module docstring).

    Args:
        method: ``replace`` or ``tweedie`` (``inpaint.method``).
        fixed_noise, obs_std: the methods' options (``inpaint.*``).
        mask: the observed coordinates ``[*data_shape]`` (tasks that take one).
    """

    observes = True

    def __init__(self, method: str = "replace", fixed_noise: bool = False, obs_std: float = 1e-3,
                 mask: Optional[Tensor] = None) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown inpaint.method {method!r}; choose one of: {', '.join(METHODS)}")
        self.method, self.fixed_noise, self.obs_std, self.mask = method, bool(fixed_noise), float(obs_std), mask

    @classmethod
    def from_config(cls, cfg: SampleConfig, data_shape: Sequence[int]) -> "ObservingTask":
        return cls(cfg.inpaint.method, cfg.inpaint.fixed_noise, cfg.inpaint.obs_std)

    def basis(self, observed: Tensor, fill: float = 0.0) -> Basis:
        """The basis of ``observed`` (``[B, *data_shape]``); ``fill`` is shown for unknown pixels in ``masked``."""
        raise NotImplementedError

    def identity(self) -> Dict[str, Any]:
        return {"method": self.method, "fixed_noise": self.fixed_noise, "obs_std": self.obs_std}

    def condition(self, sde: Any, score_fn: ScoreFn, observed: Tensor, generator: torch.Generator,
                  fill: float = 0.0) -> ConditionalBatch:
        """Set up one batch that observes ``observed`` (``[B, *data_shape]``, model range; only its
        observed part is used); ``generator`` draws the prior and the replacement noise, ``fill`` is
        the model-range value shown for unknown pixels in ``masked``."""
        b = self.basis(observed, fill)
        u_obs = b.to_basis(observed)

        def basis_score(u: Tensor, t: Tensor) -> Tensor:
            return b.to_basis(score_fn(b.from_basis(u), t))

        in_basis = score_fn if b.to_basis is _identity else basis_score
        x_T = sde.prior_sample(tuple(observed.shape), generator=generator, device=observed.device, dtype=observed.dtype)
        hook = None
        if self.method == "replace":
            hook = ReplacementInpainting(sde, u_obs, b.mask, generator=generator, fixed_noise=self.fixed_noise)
            x_T = hook.start(x_T)
            cond_score: ScoreFn = in_basis
        else:
            cond_score = TweedieConditionalScore(sde, in_basis, u_obs, b.mask, obs_std=self.obs_std)

        def finish(u: Tensor) -> Tensor:
            return b.from_basis(b.mask * u_obs + (1 - b.mask) * u)

        return ConditionalBatch(score_fn=cond_score, hook=hook, x_T=x_T, finish=finish, masked=b.masked)


def _identity(x: Tensor) -> Tensor:
    return x


@SAMPLE_TASKS.register("inpaint")
class Inpaint(ObservingTask):
    """Observe the coordinates of ``mask`` (1 = observed)."""

    name = "inpaint"

    @classmethod
    def from_config(cls, cfg: SampleConfig, data_shape: Sequence[int]) -> "Inpaint":
        mask = make_mask(cfg.mask, data_shape, cfg.inpaint.mask_ratio, cfg.seed)
        return cls(cfg.inpaint.method, cfg.inpaint.fixed_noise, cfg.inpaint.obs_std, mask=mask)

    def basis(self, observed: Tensor, fill: float = 0.0) -> Basis:
        if self.mask is None:
            raise ValueError("task=inpaint needs a mask")
        mask = self.mask.to(device=observed.device, dtype=observed.dtype)
        return Basis(_identity, _identity, mask, mask * observed + (1 - mask) * fill)

    def identity(self) -> Dict[str, Any]:
        from .shards import fingerprint

        return {**super().identity(), "mask": fingerprint({"mask": self.mask.flatten().tolist()})}

    def merged_arrays(self) -> Dict[str, np.ndarray]:
        m = self.mask
        return {"mask": (m.permute(1, 2, 0) if m.dim() == 3 else m).to(torch.uint8).numpy()}


@SAMPLE_TASKS.register("colorize")
class Colorize(ObservingTask):
    """Observe the grey level (R+G+B)/√3 of 3-channel images."""

    name = "colorize"

    @classmethod
    def from_config(cls, cfg: SampleConfig, data_shape: Sequence[int]) -> "Colorize":
        _check_colour(tuple(data_shape))  # before anything is drawn or written
        return cls(cfg.inpaint.method, cfg.inpaint.fixed_noise, cfg.inpaint.obs_std)

    def basis(self, observed: Tensor, fill: float = 0.0) -> Basis:
        _check_colour(tuple(observed.shape[1:]))
        w = colour_transform(3, dtype=observed.dtype).to(observed.device)
        to_basis: Map = lambda x: _apply_channels(w, x)  # noqa: E731
        from_basis: Map = lambda u: _apply_channels(w.T, u)  # noqa: E731
        mask = torch.zeros(observed.shape[1:], dtype=observed.dtype, device=observed.device)
        mask[0] = 1.0
        return Basis(to_basis, from_basis, mask, from_basis(mask * to_basis(observed)))  # the grey image


def _check_colour(shape: tuple) -> None:
    if len(shape) != 3 or shape[0] != 3:
        raise ValueError(f"task=colorize needs 3-channel images, but the data have shape {shape}")


def _apply_channels(w: Tensor, x: Tensor) -> Tensor:
    return torch.einsum("dc,bc...->bd...", w.to(x), x)


def condition_batch(task: str, method: str, sde: Any, score_fn: ScoreFn, observed: Tensor, mask: Optional[Tensor],
                    generator: torch.Generator, fill: float = 0.0, fixed_noise: bool = False,
                    obs_std: float = 1e-3) -> ConditionalBatch:
    """One batch of the conditional ``task`` (inpaint | colorize) with ``method`` (replace | tweedie).

    Args:
        observed: ``[B, *data_shape]`` examples in model range (their unobserved part is ignored).
        mask: inpainting mask ``[*data_shape]`` (1 = observed); ignored for colourisation.
        generator: the batch's generator (prior draw and replacement noise).
        fill: model-range value shown in place of unknown pixels in ``masked``.
    """
    cls = SAMPLE_TASKS.get(task)
    if not issubclass(cls, ObservingTask):
        conditional = [n for n in SAMPLE_TASKS.names() if issubclass(SAMPLE_TASKS.get(n), ObservingTask)]
        raise ValueError(f"unknown conditional task {task!r}; choose one of: {', '.join(conditional)}")
    return cls(method, fixed_noise, obs_std, mask=mask).condition(sde, score_fn, observed, generator, fill=fill)


__all__ = ["MASKS", "METHODS", "make_mask", "ConditionalBatch", "Basis", "SamplingTask", "Unconditional",
           "ObservingTask", "Inpaint", "Colorize", "condition_batch"]
