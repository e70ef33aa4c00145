"""What the training tasks' LightningModules share: the optimiser with its warm-up, seeded draws,
and the frozen autoencoder of a latent model (the tasks: :mod:`.score`, :mod:`.classifier`,
:mod:`.autoencoder`; the driver that fits them: :mod:`sde_diffusion.fit`)."""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Union

import torch

from ..config import OptimConfig


# ---------------------------------------------------------------------------------- helpers
class LinearWarmup:
    """LR factor min(1, (step + 1)/warmup_steps): a linear ramp to the base rate, then constant."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_steps)


def adamw_with_warmup(params: Any, o: OptimConfig, profile: Any = None) -> Dict[str, Any]:
    """AdamW with a per-step linear warm-up: what ``configure_optimizers`` returns, for every task.

    ``profile`` (the module's :class:`~sde_diffusion.performance.Profile`, set by ``fit``) chooses
    AdamW's fused kernel (``perf.fused_adamw``); without one, torch's default implementation.
    """
    fused = {"fused": True} if profile is not None and profile.fused_adamw else {}
    opt = torch.optim.AdamW(params, lr=float(o.lr), betas=tuple(float(b) for b in o.betas), eps=float(o.eps),
                            weight_decay=float(o.weight_decay), **fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LinearWarmup(o.warmup_steps))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


class ClipFusedGradients:
    """Gradient clipping (``trainer.gradient_clip_val``) that also works with the fused AdamW.

    Lightning's mixed-precision plugin refuses to clip for an optimiser that unscales gradients
    itself, as fused AdamW announces, because under fp16 its gradients would still be multiplied by
    the GradScaler's factor at that point. Under bf16 and fp32 there is no scaler: the gradients are
    the true ones, and clipping them is what the unfused optimiser gets. (fp16 with fused AdamW and
    clipping is refused by :func:`~sde_diffusion.performance.resolve_profile`.)
    """

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:
        if gradient_clip_val and optimizer.defaults.get("fused"):
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if str(gradient_clip_algorithm or "norm") == "value":
                torch.nn.utils.clip_grad_value_(params, float(gradient_clip_val))
            else:
                torch.nn.utils.clip_grad_norm_(params, float(gradient_clip_val))
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)  # type: ignore[misc]


def step_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of values (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with the global CPU (and current CUDA device) RNG seeded; restore it afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        yield


class LatentSpace:
    """For a LightningModule that may work on autoencoder latents (``cfg.latent``): the frozen
    :class:`~sde_diffusion.latent.LatentCodec` stays outside the module tree (not in the optimiser,
    the EMA or ``state_dict``), and the checkpoint records which autoencoder (weights digest).

    Call :meth:`attach_codec` in ``__init__`` after setting ``data_shape``; afterwards
    ``model_shape`` is the latent shape (or ``data_shape``) and ``codec`` the codec (or ``None``).
    """

    def attach_codec(self, source: Optional[Union[str, Path]], recorded: Optional[Mapping[str, Any]] = None) -> None:
        from ..latent import codec_for_task

        codec = codec_for_task(source, self.data_shape, recorded)
        if codec is not None:
            self.hparams["latent"] = codec.info()
        self.__dict__["codec"] = codec
        self.model_shape = codec.latent_shape if codec is not None else self.data_shape

    @property
    def codec(self) -> Any:
        """The frozen :class:`~sde_diffusion.latent.LatentCodec`, or ``None`` on pixels."""
        return self.__dict__["codec"]

    def to_model_space(self, x: Any) -> Any:
        """Data ``[B, *data_shape]`` → the model's input space: scaled latents, or ``x`` itself."""
        return x if self.codec is None else self.codec.encode(x)

    def to_data(self, u: Any) -> Any:
        """Model-space samples → data ``[B, *data_shape]``: decoded latents, or ``u`` itself."""
        return u if self.codec is None else self.codec.decode(u)


__all__ = ["LinearWarmup", "adamw_with_warmup", "ClipFusedGradients", "step_seed", "seeded", "LatentSpace"]
