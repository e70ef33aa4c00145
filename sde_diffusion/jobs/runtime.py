"""Where a job runs: one process on one device, or one process per device through Lightning Fabric.

``trainer: null`` in the config (the default) runs in the calling process on ``device``
(``auto`` = the first CUDA device if there is one, else the CPU). ``trainer=cpu|gpu|ddp`` takes
the accelerator, devices, nodes, strategy and precision from ``conf/trainer/<name>.yaml`` and
launches Fabric: under DDP every process gets a rank, works on its share of the batches and
meets the others at :meth:`Runtime.barrier` before rank 0 merges.
"""
from __future__ import annotations

import contextlib
import platform
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, Optional

import torch

from ..config import SampleConfig

FABRIC_KEYS = ("accelerator", "devices", "num_nodes", "strategy", "precision")
# The sampler's state dtype of each `dtype=` choice: bfloat16 runs the network under bf16 autocast
# (network_autocast) while the state the sampler integrates stays float32.
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.float32}
AUTOCAST = {"bfloat16": torch.bfloat16}


@dataclass
class Runtime:
    """Rank, world size and device of this process, and how to wait for the others."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    barrier: Callable[[], None] = lambda: None
    autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext
    fabric: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> Dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size, "device": str(self.device),
                "launcher": "fabric" if self.fabric is not None else "local"}


def resolve_device(name: Optional[str]) -> torch.device:
    """``auto`` → ``cuda`` if available else ``cpu``; anything else as ``torch.device(name)``."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(name))
    except RuntimeError as err:
        raise ValueError(f"device={name!r} is not a torch device ({err}); use auto, cpu, cuda or cuda:<k>") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} requested but CUDA is not available; use device=cpu or device=auto")
    return dev


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def network_autocast(name: str) -> Optional[torch.dtype]:
    """The autocast dtype the network runs in for ``dtype=name`` (None: the state's own dtype)."""
    resolve_dtype(name)
    return AUTOCAST.get(name)


def make_runtime(cfg: SampleConfig) -> Runtime:
    """The runtime ``cfg`` asks for (see the module docstring); launches Fabric when ``trainer`` is set."""
    trainer = cfg.trainer
    if not trainer:
        return Runtime(device=resolve_device(cfg.device))
    from lightning.fabric import Fabric

    kwargs = {k: trainer[k] for k in FABRIC_KEYS if trainer.get(k) is not None}
    try:
        fabric = Fabric(**kwargs)
    except (ValueError, TypeError, RuntimeError) as err:
        raise ValueError(f"cannot set up trainer={trainer.get('name')} ({kwargs}): {err}") from None
    fabric.launch()
    return Runtime(
        rank=fabric.global_rank,
        world_size=fabric.world_size,
        device=fabric.device,
        barrier=fabric.barrier,
        autocast=fabric.autocast,
        fabric=fabric,
    )


def versions() -> Dict[str, str]:
    """Versions of the interpreter and of the packages that decide the numbers."""
    import numpy

    import sde_diffusion

    out = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "numpy": numpy.__version__, "sde_diffusion": getattr(sde_diffusion, "__version__", "unknown")}
    for mod in ("lightning", "hydra", "omegaconf", "scipy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not reported
            pass
    return out


def sync(device: torch.device) -> None:
    """Wait for queued device work (so wall-clock timings are honest on GPUs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = ["Runtime", "resolve_device", "resolve_dtype", "network_autocast", "make_runtime", "versions", "sync", "DTYPES"]
