"""What every training task shares: the optimiser with its warm-up, seeded draws, the output
directory, the Trainer builder and the result of a fit (the tasks: :mod:`.score`, :mod:`.classifier`,
:mod:`.autoencoder`)."""
from __future__ import annotations

import contextlib
import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Union

import lightning as L
import torch

from ..config import to_container


# ---------------------------------------------------------------------------------- helpers
class LinearWarmup:
    """LR factor min(1, (step + 1)/warmup_steps): a linear ramp to the base rate, then constant."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_steps)


def optimizer_settings(cfg: Mapping[str, Any], default_lr: float) -> Dict[str, Any]:
    """``cfg.optim`` with defaults: lr, betas, eps, weight_decay, warmup_steps."""
    optim = cfg.get("optim") or {}
    return {
        "lr": float(optim.get("lr", default_lr)),
        "betas": tuple(optim.get("betas", (0.9, 0.999))),
        "eps": float(optim.get("eps", 1e-8)),
        "weight_decay": float(optim.get("weight_decay", 0.0)),
        "warmup_steps": int(optim.get("warmup_steps", 0)),
    }


def adamw_with_warmup(params: Any, o: Mapping[str, Any]) -> Dict[str, Any]:
    """AdamW with a per-step linear warm-up: what ``configure_optimizers`` returns, for every task."""
    opt = torch.optim.AdamW(params, lr=o["lr"], betas=o["betas"], eps=o["eps"], weight_decay=o["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LinearWarmup(o["warmup_steps"]))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


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


@dataclass
class FitResult:
    """What :func:`train` leaves behind."""

    module: Any
    trainer: "L.Trainer"
    datamodule: Any
    output_dir: Path

    @property
    def last_checkpoint(self) -> Path:
        return self.output_dir / "checkpoints" / "last.ckpt"


def output_dir_for(cfg: Any, output_dir: Optional[Union[str, Path]] = None) -> Path:
    """Where a run writes: ``output_dir`` if given, else Hydra's run directory, else ``cfg.run_dir``."""
    if output_dir is not None:
        return Path(output_dir)
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return Path(HydraConfig.get().runtime.output_dir)
    except ImportError:  # pragma: no cover
        pass
    run_dir = cfg.get("run_dir") if isinstance(cfg, Mapping) else None
    if not run_dir:
        raise ValueError("no output directory: pass output_dir=... or set run_dir in the config")
    return Path(str(run_dir))


def build_trainer(cfg: Mapping[str, Any], output_dir: Path, callbacks: List[Any], loggers: List[Any]) -> "L.Trainer":
    """A Trainer from ``cfg.trainer``: its keys are Trainer arguments, except ``name`` (dropped) and
    ``num_threads`` (torch's intra-op CPU threads, applied by :func:`train`)."""
    kwargs = dict(to_container(cfg["trainer"]))
    kwargs.pop("name", None)
    kwargs.pop("num_threads", None)
    try:
        return L.Trainer(default_root_dir=str(output_dir), callbacks=callbacks, logger=loggers or False, **kwargs)
    except TypeError as err:
        raise ValueError(f"bad trainer option: {err}") from None


# Tasks other than the score model draw no sample figures and have no DSM loss per t.
NO_SCORE_CALLBACKS = {"callbacks": {"samples": {"enabled": False}, "loss_by_t": {"every_n_steps": 0}}}


def merge_config(base: Mapping[str, Any], over: Mapping[str, Any]) -> Dict[str, Any]:
    """``base`` with ``over`` laid on top, nested mappings merged key by key (plain dicts)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_config(out.get(k) or {}, v) if isinstance(v, Mapping) else v
    return out


def with_run_dir(cfg: Any, out: Path) -> Any:
    """``cfg`` with ``run_dir`` set to the actual output directory (resolving nothing else)."""
    try:
        from omegaconf import DictConfig, open_dict

        if isinstance(cfg, DictConfig):
            cfg = copy.deepcopy(cfg)
            with open_dict(cfg):
                cfg.run_dir = str(out)
            return cfg
    except ImportError:  # pragma: no cover
        pass
    return {**dict(cfg), "run_dir": str(out)}


__all__ = [
    "LinearWarmup",
    "optimizer_settings",
    "adamw_with_warmup",
    "step_seed",
    "seeded",
    "FitResult",
    "LatentSpace",
    "output_dir_for",
    "build_trainer",
    "with_run_dir",
    "merge_config",
    "NO_SCORE_CALLBACKS",
]
