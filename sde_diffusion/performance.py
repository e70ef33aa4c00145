"""The speed switches of a run (the GPU profile), resolved once, and the wrappers that apply them.

Training: :func:`resolve_profile` turns ``cfg.perf``, ``cfg.compile``, ``trainer.precision`` and
``trainer.num_threads`` into a :class:`Profile`. Every switch left at null (auto) is on when the run
trains on CUDA and off on the CPU, so a CPU run computes what it always did::

    profile = resolve_profile(cfg)          # once, in fit()
    profile.precision, profile.compile      # 'bf16-mixed', True on a GPU; '32-true', False on a CPU
    apply_backend_flags(profile)            # TF32 on the process's CUDA backends

Sampling: :class:`InferenceNet` wraps a trained network ``net(x [B, ...], t [B], **cond)`` for
``sample.py dtype=bfloat16 compile=true``: the network runs under bfloat16 autocast and answers in
the caller's dtype (the sampler's state stays float32), and a compiled network sees one batch
shape (short batches are padded), so it compiles once.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

#: the most DataLoader workers the auto setting gives one device
MAX_AUTO_WORKERS = 8


def machine_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def trains_on_cuda(trainer: Mapping[str, Any]) -> bool:
    """Whether a Trainer built from ``trainer`` (the ``trainer`` group) runs on CUDA devices."""
    accelerator = str(trainer.get("accelerator") or "auto").lower()
    if accelerator in ("gpu", "cuda"):
        return True
    return accelerator == "auto" and torch.cuda.is_available()


def _devices_per_node(trainer: Mapping[str, Any]) -> int:
    devices = trainer.get("devices", 1)
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, (list, tuple)):
        return max(1, len(devices))
    if devices in ("auto", -1, "-1") and torch.cuda.is_available():
        return max(1, torch.cuda.device_count())
    return 1


@dataclass(frozen=True)
class Profile:
    """What a training run switches on (every field resolved; see the module docstring).

    ``num_threads``: torch's intra-op threads to set (None: leave torch's default);
    ``loader_workers``: DataLoader workers to use (None: the data group's own ``num_workers``).
    """

    cuda: bool
    precision: str
    tf32: bool
    channels_last: bool
    fused_adamw: bool
    cudnn_benchmark: bool
    compile: bool
    static_shapes: bool
    num_threads: Optional[int]
    loader_workers: Optional[int]

    def describe(self) -> str:
        on = [k for k in ("tf32", "channels_last", "fused_adamw", "cudnn_benchmark", "compile", "static_shapes")
              if getattr(self, k)]
        threads = "torch default" if self.num_threads is None else self.num_threads
        workers = "data group's" if self.loader_workers is None else self.loader_workers
        return (f"{'CUDA' if self.cuda else 'CPU'} profile: precision {self.precision}, on: {', '.join(on) or 'none'}; "
                f"threads {threads}, loader workers {workers}")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def auto_precision(cuda: bool) -> str:
    """bf16-mixed on a GPU that has bfloat16 (Ampere and later), 32-true on an older one
    and on the CPU. Without a visible GPU (``cuda=True`` asked on a CPU machine, as tests do) the
    answer is that of a current GPU, bf16-mixed."""
    if not cuda:
        return "32-true"
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return "32-true"
    return "bf16-mixed"


def resolve_profile(cfg: Any, cuda: Optional[bool] = None) -> Profile:
    """The :class:`Profile` of the :class:`~sde_diffusion.config.TrainConfig` ``cfg``.

    ``cuda``: whether the run trains on CUDA (None: from ``cfg.trainer`` and the machine); tests
    pass True to see what a GPU machine would get.
    """
    trainer = cfg.trainer
    cuda = trains_on_cuda(trainer) if cuda is None else bool(cuda)
    perf = cfg.perf

    def auto(value: Optional[bool], default: bool) -> bool:
        return default if value is None else bool(value)

    compile_ = auto(cfg.compile, cuda)
    per_device = max(1, machine_cores() // _devices_per_node(trainer))
    threads = cfg.num_threads
    if threads == "auto":
        # One thread per process is the robust choice on a shared CPU: with more threads than free
        # cores, OpenMP's spinning makes small convolutions many times slower. A GPU's process only
        # feeds the device, and gets its share of the cores.
        threads = per_device if cuda else 1
    workers = perf.loader_workers
    if workers is None and cuda:
        workers = min(MAX_AUTO_WORKERS, per_device)
    precision = trainer.get("precision")
    precision = str(precision) if precision is not None else auto_precision(cuda)
    fp16 = precision.startswith("16")
    fused = auto(perf.fused_adamw, cuda and not fp16)
    if fused and fp16 and trainer.get("gradient_clip_val"):
        # fp16's GradScaler leaves the gradients scaled until a fused optimiser's own step, so
        # they cannot be clipped before it (bf16 needs no scaler and has no such limit).
        raise ValueError(f"perf.fused_adamw=true cannot clip gradients under trainer.precision={precision}: "
                         "use trainer.precision=bf16-mixed, perf.fused_adamw=false or trainer.gradient_clip_val=null")
    return Profile(
        cuda=cuda,
        precision=precision,
        tf32=auto(perf.tf32, cuda),
        channels_last=auto(perf.channels_last, cuda),
        fused_adamw=fused,
        cudnn_benchmark=auto(perf.cudnn_benchmark, cuda),
        compile=compile_,
        static_shapes=auto(perf.static_shapes, compile_),
        num_threads=threads,
        loader_workers=workers,
    )


def apply_backend_flags(profile: Profile) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions, when the profile asks for it (process-wide)."""
    if profile.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")


def channels_last(module: nn.Module) -> nn.Module:
    """``module`` with its 4-D weights in NHWC (channels-last) memory format, in place; values unchanged."""
    return module.to(memory_format=torch.channels_last)


def channels_last_input(x: Tensor) -> Tensor:
    """An image batch ``[B, C, H, W]`` in NHWC memory format (other shapes unchanged)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


class InferenceNet(nn.Module):
    """``net(x, t, **cond)`` for sampling, optionally under bfloat16 autocast and compiled.

    Args:
        net: the trained network ``(x [B, ...], t [B], **cond) -> [B, ...]``.
        autocast_dtype: run the network under ``torch.autocast`` in this dtype (None: as is); the
            output is cast back to ``x``'s dtype, so the sampler integrates in float32.
        compile: ``torch.compile`` the network. Each call's batch is padded (by repeating its last
            row) up to the smallest batch size seen before that holds it, so a run whose last batch
            is short still reuses the first graph; the padding rows are dropped from the output.
        backend: ``torch.compile``'s backend (tests use a counting one).

    Parameters are shared with ``net`` (nothing is copied).
    """

    def __init__(self, net: nn.Module, autocast_dtype: Optional[torch.dtype] = None, compile: bool = False,
                 backend: Any = "inductor") -> None:
        super().__init__()
        self.net = net
        self.autocast_dtype = autocast_dtype
        self.compiled = torch.compile(net, backend=backend) if compile else None
        self.sizes: List[int] = []

    def _padded_size(self, b: int) -> int:
        fits = [s for s in self.sizes if s >= b]
        if fits:
            return min(fits)
        self.sizes.append(b)
        return b

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        b = x.shape[0]
        run = self.compiled if self.compiled is not None else self.net
        size = self._padded_size(b) if self.compiled is not None else b
        if size > b:
            x, t = _pad(x, size), _pad(t, size)
            cond = {k: _pad(v, size) if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == b else v
                    for k, v in cond.items()}
        if self.autocast_dtype is not None:
            with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype):
                out = run(x, t, **cond)
        else:
            out = run(x, t, **cond)
        return out[:b].to(x.dtype)


def _pad(v: Tensor, size: int) -> Tensor:
    """``v`` with its last row repeated up to ``size`` rows."""
    extra = v[-1:].expand(size - v.shape[0], *v.shape[1:])
    return torch.cat([v, extra], dim=0)


__all__ = ["Profile", "resolve_profile", "apply_backend_flags", "trains_on_cuda", "auto_precision", "machine_cores",
           "channels_last", "channels_last_input", "InferenceNet", "MAX_AUTO_WORKERS"]
