"""Training callbacks and loggers: sample figures, loss per time bucket, checkpoints, progress.

* :class:`SampleFigures` — every N optimiser steps (and at the end of fit) draws samples with the
  EMA weights through :func:`sde_diffusion.sample` and writes, atomically,
  ``<run>/samples/step_XXXXXXX.png`` and ``<run>/samples/latest.png``: an image grid (through the
  data module's ``inverse_scaler``) for images, samples beside data for vectors (first two
  coordinates).
* :class:`LossByTime` — the ε-space error σ²‖s_θ − ∇log p_0t‖² (= ‖ε_θ − ε‖² for ε-prediction)
  averaged in ``num_buckets`` equal buckets of t ∈ [0, T], logged every N steps as
  ``loss_by_t/<lo>-<hi>`` (summed over DDP processes before averaging).
* :func:`build_callbacks` — the above plus ModelCheckpoint (every N steps and ``last.ckpt``, which
  is also written on a clock and on SIGTERM/SIGUSR1: :mod:`sde_diffusion.preemption`), the EMA,
  the learning-rate monitor and the progress bar, from ``cfg.callbacks`` / ``cfg.ema``.
* :func:`build_loggers` — CSV (default) and/or TensorBoard.
* :class:`EMA` (the weight average the samples and checkpoints use) and :func:`eval_mode`.
* ``callbacks.extra``: any user callback by import path (:func:`user_callback`).
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from . import plots
from .config import EmaConfig, TrainConfig, instantiate, to_plain
from .config.schema import LossByTimeCallbackConfig, SamplesCallbackConfig
from .io import copy_file
from .preemption import last_checkpoint_callbacks
from .registry import SDES



# ---------------------------------------------------------------------------------- figures
# ---------------------------------------------------------------------------------- EMA
class EMA(EMAWeightAveraging):
    """Lightning's EMA of the weights, w_ema ← decay·w_ema + (1 − decay)·w after every optimiser step.

    Two changes to the stock callback, both about *how*, not *what* it averages:

    * the update uses ``torch._foreach_lerp_`` over all tensors at once (``get_ema_multi_avg_fn``)
      instead of one Python call per parameter;
    * at the end of ``fit`` the module keeps its trained weights. The stock callback copies the
      average into the module in ``on_train_end``, which runs *before* ModelCheckpoint's
      end-of-fit save of ``last.ckpt``; that checkpoint would then hold the EMA as the weights
      the optimiser state belongs to, and a resumed run would not continue the interrupted one.
      The EMA stays available as ``ScoreDiffusion.ema``.

    Checkpointing is the stock behaviour: ``state_dict`` = EMA weights, ``current_model_state``
    = trained weights, ``averaging_state`` = the update count.
    """

    def __init__(self, decay: float = EmaConfig.decay, update_every_n_steps: int = EmaConfig.update_every_n_steps,
                 update_starting_at_step: Optional[int] = EmaConfig.start_step, warmup: bool = EmaConfig.warmup) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        super().__init__(
            decay=decay, update_every_n_steps=update_every_n_steps, update_starting_at_step=update_starting_at_step
        )
        # The stock callback hands AveragedModel a per-tensor avg_fn (a few kernel launches per
        # parameter tensor); the foreach form computes the same decay·w_ema + (1 − decay)·w in one.
        kwargs = getattr(self, "_kwargs", None)
        if isinstance(kwargs, dict) and "avg_fn" in kwargs:
            kwargs["avg_fn"] = None
            kwargs["multi_avg_fn"] = ema_update_fn(decay, warmup)
        self.decay = float(decay)
        self.warmup = bool(warmup)

    @property
    def averaged_module(self) -> Optional[nn.Module]:
        """The averaged copy of the LightningModule (exists from the start of ``fit``)."""
        avg = self._average_model
        return None if avg is None else avg.module

    def on_train_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        return None


def ema_decay_at(decay: float, n: int, warmup: bool) -> float:
    """The decay of the ``n``-th average (n ≥ 1 updates before it): ``decay``, or with ``warmup``
    the reference code's ramp min(decay, (1 + n)/(10 + n)), which lets the average forget the
    random initialisation within the first few hundred steps instead of ~1/(1 − decay) of them."""
    return min(float(decay), (1.0 + n) / (10.0 + n)) if warmup else float(decay)


def ema_update_fn(decay: float, warmup: bool = False) -> Any:
    """AveragedModel's ``multi_avg_fn``: w_ema ← d·w_ema + (1 − d)·w over all tensors at once, with
    d = :func:`ema_decay_at` (the average's update count comes from AveragedModel, so a resumed
    run continues the ramp)."""
    if not warmup:
        return get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def update(ema_params: List[Tensor], params: List[Tensor], num_averaged: Tensor) -> None:
        d = ema_decay_at(decay, int(num_averaged), True)
        torch._foreach_lerp_(ema_params, params, 1.0 - d)

    return update


def find_ema(trainer: Optional["L.Trainer"]) -> Optional[EMA]:
    if trainer is None:
        return None
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, EMA):
            return cb
    return None



@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Temporarily put ``module`` in eval mode (dropout off), restoring its previous mode."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)



def draw_samples(
    pl_module: Any,
    n: int,
    sampler: str,
    steps: int,
    options: Mapping[str, Any],
    seed: int,
    use_ema: bool = True,
) -> Tensor:
    """``n`` samples ``[n, *data_shape]`` in model range from the module's (EMA) score (latent
    models: sampled in latent space and decoded)."""
    from .samplers import sample

    device = next(pl_module.net.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    net = pl_module.ema if use_ema and pl_module.ema is not None else pl_module.net
    with eval_mode(net), torch.no_grad():
        score_fn = pl_module.score_fn(use_ema=use_ema and pl_module.ema is not None)
        result = sample(
            pl_module.sde, score_fn, (n, *pl_module.model_shape), sampler=sampler, steps=steps,
            generator=gen, device=device, dtype=torch.float32, **dict(options),
        )
        return pl_module.to_data(result.samples)


class SampleFigures(Callback):
    """Sample figures every ``every_n_steps`` optimiser steps and at the end of fit (rank 0 only).

    Args:
        out_dir: directory of the PNG files.
        every_n_steps: 0 writes only the final figure.
        num_samples: samples per figure (images: a square-ish grid; vectors: a scatter).
        sampler, steps, options: what ``sample(sde, score_fn, shape, sampler, steps, **options)`` gets.
        seed: fixed prior noise, so successive figures show the same samples improving.
        use_ema: sample with the EMA weights (when the run has them).
        max_seconds: time budget of one figure (None: none). One timed score evaluation at the
            figure's batch estimates the cost as ≈ steps score evaluations; over budget, the figure
            draws fewer samples (down to 4), then fewer steps (down to 10), says so in a warning
            and in its title. This keeps, e.g., the 62M-parameter CIFAR-10 network's figures
            (1000 steps, ≈ 0.2 s per image per step on a CPU) from stalling a CPU run for hours.
    """

    def __init__(
        self,
        out_dir: Path,
        every_n_steps: int = SamplesCallbackConfig.every_n_steps,
        num_samples: int = SamplesCallbackConfig.num_samples,
        sampler: str = "euler_maruyama",
        steps: int = 200,
        options: Optional[Mapping[str, Any]] = None,
        seed: int = 0,
        use_ema: bool = SamplesCallbackConfig.use_ema,
        num_reference: int = 2000,
        max_seconds: Optional[float] = None,
    ) -> None:
        if max_seconds is not None and not max_seconds > 0:
            raise ValueError(f"callbacks.samples.max_seconds must be positive or null, got {max_seconds}")
        self.max_seconds = None if max_seconds is None else float(max_seconds)
        self.out_dir = Path(out_dir)
        self.every_n_steps = int(every_n_steps)
        self.num_samples = int(num_samples)
        self.sampler, self.steps, self.options = sampler, int(steps), dict(options or {})
        self.seed = int(seed)
        self.use_ema = bool(use_ema)
        self.num_reference = int(num_reference)
        self._last_step = -1
        self.written: List[Path] = []

    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer: "L.Trainer", pl_module: Any) -> None:
        if trainer.global_step != self._last_step:
            self.write(trainer, pl_module)

    def write(self, trainer: "L.Trainer", pl_module: Any) -> Optional[Path]:
        step = trainer.global_step
        self._last_step = step
        if not trainer.is_global_zero:
            return None
        n, steps = self.within_budget(pl_module)
        x = draw_samples(pl_module, n, self.sampler, steps, self.options, self.seed, self.use_ema)
        dm = trainer.datamodule
        title = f"step {step} · {self.sampler}, {steps} steps" + (" · EMA" if self.use_ema and pl_module.ema is not None else "")
        path = self.out_dir / f"step_{step:07d}.png"
        if getattr(dm, "is_image", x.dim() == 4):
            images = dm.inverse_scaler(x.cpu()) if dm is not None else (x.cpu() + 1) / 2
            plots.save_image_grid(images, path, title=title)
            self._log_image(trainer, images, step)
        else:
            n_ref = min(self.num_reference, max(self.num_samples, 1))
            ref = dm.reference(n_ref) if dm is not None and hasattr(dm, "reference") else x
            plots.save_scatter(x, ref, path, title=title)
        copy_file(path, self.out_dir / "latest.png")
        self.written.append(path)
        return path

    def within_budget(self, pl_module: Any) -> Tuple[int, int]:
        """``(num_samples, steps)`` of the next figure, cut to fit ``max_seconds`` (see the class docstring)."""
        n, steps = self.num_samples, self.steps
        if self.max_seconds is None:
            return n, steps
        device = next(pl_module.net.parameters()).device
        x = torch.zeros((n, *pl_module.model_shape), device=device)
        t = torch.full((n,), 0.5 * pl_module.sde.T, device=device)
        net = pl_module.ema if self.use_ema and pl_module.ema is not None else pl_module.net
        with eval_mode(net), torch.no_grad():
            score_fn = pl_module.score_fn(use_ema=self.use_ema and pl_module.ema is not None)
            start = time.perf_counter()
            score_fn(x, t)
            per_sample_step = (time.perf_counter() - start) / n
        if per_sample_step * n * steps <= self.max_seconds:
            return n, steps
        n = max(min(4, n), min(n, int(self.max_seconds / (per_sample_step * steps))))
        steps = max(min(10, steps), min(steps, int(self.max_seconds / (per_sample_step * n))))
        rank_zero_warn(
            f"a sample figure of {self.num_samples} samples x {self.steps} steps would take about "
            f"{per_sample_step * self.num_samples * self.steps:.0f} s (> callbacks.samples.max_seconds="
            f"{self.max_seconds:g}); drawing {n} samples x {steps} steps instead"
        )
        return n, steps

    @staticmethod
    def _log_image(trainer: "L.Trainer", images: Tensor, step: int) -> None:
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                grid = plots.tile_images(plots.to_uint8_images(images))  # [H, W, C] uint8
                experiment.add_image("samples", grid, global_step=step, dataformats="HWC")


# ---------------------------------------------------------------------------------- loss by t
class LossByTime(Callback):
    """Average ε-space error per t-bucket, logged every ``every_n_steps`` steps.

    Reads ``outputs["t"]`` and ``outputs["eps_mse"]`` (``[B]``) returned by ``training_step``;
    sums and counts stay on the device between logs, and are summed over processes at log time.
    """

    def __init__(self, T: float, num_buckets: int = LossByTimeCallbackConfig.num_buckets,
                 every_n_steps: int = LossByTimeCallbackConfig.every_n_steps) -> None:
        if num_buckets < 1:
            raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
        self.T = float(T)
        self.num_buckets = int(num_buckets)
        self.every_n_steps = int(every_n_steps)
        self._sum: Optional[Tensor] = None
        self._count: Optional[Tensor] = None
        edges = [self.T * i / self.num_buckets for i in range(self.num_buckets + 1)]
        self.names = [f"loss_by_t/{edges[i]:.2f}-{edges[i + 1]:.2f}" for i in range(self.num_buckets)]

    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.every_n_steps <= 0 or not isinstance(outputs, Mapping) or "t" not in outputs:
            return
        t, err = outputs["t"].detach().float(), outputs["eps_mse"].detach().float()
        if self._sum is None or self._sum.device != t.device:
            self._sum = torch.zeros(self.num_buckets, device=t.device)
            self._count = torch.zeros(self.num_buckets, device=t.device)
        idx = (t / self.T * self.num_buckets).long().clamp(0, self.num_buckets - 1)
        self._sum.index_add_(0, idx, err)
        self._count.index_add_(0, idx, torch.ones_like(err))
        if trainer.global_step % self.every_n_steps == 0:
            stats = torch.stack([self._sum, self._count])
            stats = trainer.strategy.reduce(stats, reduce_op="sum")
            means = stats[0] / stats[1].clamp(min=1)
            metrics = {name: means[i] for i, name in enumerate(self.names) if stats[1, i] > 0}
            if metrics:
                pl_module.log_dict(metrics, on_step=True, on_epoch=False, sync_dist=False)
            self._sum.zero_()
            self._count.zero_()


# ---------------------------------------------------------------------------------- builders
class PeriodicMetrics(Callback):
    """Sample-quality metrics every ``every_n_steps`` optimiser steps (rank 0, EMA weights, fixed prior noise).

    Digits: digits-FD, IS and KID in the digits classifier's features; other images: FID, IS and
    KID when the Inception weights are present (otherwise one warning, then nothing); vectors:
    sliced W₂ against fresh data. Each evaluation is logged (``metrics/<name>``) and appended as a
    JSON line ``{"step", ...}`` to ``path``.
    """

    def __init__(self, path: Path, every_n_steps: int, num_samples: int, sampler: str, steps: int,
                 options: Optional[Mapping[str, Any]] = None, seed: int = 0, num_reference: Optional[int] = None,
                 fid_weights: Optional[str] = None) -> None:
        self.path, self.every_n_steps, self.num_samples = Path(path), int(every_n_steps), int(num_samples)
        self.sampler, self.steps, self.options, self.seed = sampler, int(steps), dict(options or {}), int(seed)
        self.num_reference, self.fid_weights = num_reference, fid_weights
        self._last_step, self._fid_unavailable = -1, False

    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            if trainer.is_global_zero:
                self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: "L.Trainer", pl_module: Any) -> Dict[str, Any]:
        import json

        dm = trainer.datamodule
        x = draw_samples(pl_module, self.num_samples, self.sampler, self.steps, self.options, self.seed, True).cpu()
        values: Dict[str, Any] = {}
        if getattr(dm, "is_image", False) and pl_module.cfg.data.get("name") == "digits":
            from .jobs.metrics_job import digits_metrics

            d = digits_metrics(x.float(), dm, self.seed)
            values = {k: d[k] for k in ("digits_fd", "digits_is", "digits_kid")}
        elif getattr(dm, "is_image", False):
            if not self._fid_unavailable:
                from .jobs.metrics_job import fid_metrics

                f = fid_metrics(dm.inverse_scaler(x.float()).clamp(0, 1), dm, self.num_reference, self.fid_weights,
                                self.seed, torch.device("cpu"))
                if f.get("fid") is None:
                    self._fid_unavailable = True
                    rank_zero_warn(f"callbacks.metrics: FID skipped for the rest of the run: {f.get('fid_unavailable')}")
                else:
                    values = {k: f[k] for k in ("fid", "is", "kid")}
        else:
            from .metrics import sliced_wasserstein

            ref = dm.reference(min(2000, max(self.num_samples, 2)))
            values = {"sliced_wasserstein": sliced_wasserstein(x.double(), ref.double(),
                                                               generator=torch.Generator().manual_seed(self.seed))}
        if values:
            for logger in trainer.loggers:
                logger.log_metrics({f"metrics/{k}": float(v) for k, v in values.items()}, step=trainer.global_step)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"step": int(trainer.global_step), "n": self.num_samples, **values}) + "\n")
        return values


def build_callbacks(cfg: TrainConfig, output_dir: Path, samples: bool = True) -> List[Callback]:
    """EMA, checkpoints, LR monitor, user callbacks and progress bar from the config; with
    ``samples`` (score models) also the sample figures and the loss per t."""
    output_dir = Path(output_dir)
    cbs = cfg.callbacks
    callbacks: List[Callback] = []
    if cfg.ema.enabled:
        callbacks.append(EMA(decay=float(cfg.ema.decay), update_every_n_steps=int(cfg.ema.update_every_n_steps),
                             update_starting_at_step=cfg.ema.start_step, warmup=cfg.ema.warmup))
    callbacks.append(
        ModelCheckpoint(
            dirpath=str(output_dir / "checkpoints"),
            filename="step_{step:07d}",
            auto_insert_metric_name=False,
            every_n_train_steps=cbs.checkpoint.every_n_steps or None,
            save_top_k=cbs.checkpoint.save_top_k,
            save_last=True,
            save_on_train_epoch_end=False,
            # A resumed run overwrites its own files (last.ckpt stays last.ckpt, not last-v1.ckpt).
            enable_version_counter=False,
        )
    )
    callbacks += last_checkpoint_callbacks(output_dir / "checkpoints", cbs.checkpoint.last_every_minutes,
                                           cbs.checkpoint.last_every_n_steps)
    if samples and cbs.samples.enabled:
        options = {k: v for k, v in to_plain(cfg.sampler).items() if k not in ("name", "steps")}
        if options.get("_target_") is None:
            options.pop("_target_", None)
        callbacks.append(
            SampleFigures(
                output_dir / "samples",
                every_n_steps=cbs.samples.every_n_steps,
                num_samples=cbs.samples.num_samples,
                sampler=options.pop("_target_", None) or cfg.sampler.get("name"),
                steps=cfg.figure_steps,
                options=options,
                seed=cfg.seed + 1,
                use_ema=cbs.samples.use_ema,
                max_seconds=cbs.samples.max_seconds,
            )
        )
    if samples and cbs.metrics.every_n_steps > 0:
        options = {k: v for k, v in to_plain(cfg.sampler).items() if k not in ("name", "steps", "_target_")}
        callbacks.append(PeriodicMetrics(
            output_dir / "metrics.jsonl", every_n_steps=cbs.metrics.every_n_steps, num_samples=cbs.metrics.num_samples,
            sampler=to_plain(cfg.sampler).get("_target_") or cfg.sampler.get("name"),
            steps=cbs.metrics.steps or cfg.figure_steps, options=options, seed=cfg.seed + 2,
            num_reference=cbs.metrics.num_reference, fid_weights=cbs.metrics.fid_weights))
    if samples and cbs.loss_by_t.every_n_steps > 0:
        T = instantiate(cfg.sde, SDES, key="sde").T
        callbacks.append(LossByTime(T, num_buckets=cbs.loss_by_t.num_buckets, every_n_steps=cbs.loss_by_t.every_n_steps))
    if cfg.loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    callbacks.extend(user_callback(spec, output_dir) for spec in cbs.extra)
    if cfg.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=int(cbs.progress_refresh_rate)))
    return callbacks


def user_callback(spec: str, output_dir: Path) -> Callback:
    """A Lightning callback named by ``"package.module:Class"`` (``callbacks.extra`` in the config).

    The class is built with no arguments, or with ``output_dir=`` when its constructor takes one.
    """
    import importlib
    import inspect

    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"callbacks.extra entries are 'package.module:Class', got {spec!r}")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"callbacks.extra: cannot import {spec!r} ({err}); is its module on PYTHONPATH?") from None
    kwargs = {"output_dir": Path(output_dir)} if "output_dir" in inspect.signature(cls).parameters else {}
    cb = cls(**kwargs)
    if not isinstance(cb, Callback):
        raise ValueError(f"callbacks.extra: {spec!r} is not a lightning Callback")
    return cb


def tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def build_loggers(cfg: TrainConfig, output_dir: Path) -> List[Any]:
    """CSV and/or TensorBoard loggers writing under ``<output_dir>/logs`` (one version per (re)start)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers: List[Any] = []
    for name in cfg.loggers:
        if name == "csv":
            loggers.append(CSVLogger(save_dir=str(output_dir), name="logs"))
        elif name == "tensorboard":
            if not tensorboard_available():
                raise ValueError("logger=tensorboard needs the tensorboard package: `pip install tensorboard`")
            loggers.append(TensorBoardLogger(save_dir=str(output_dir), name="tb"))
        else:
            raise ValueError(f"unknown logger {name!r}; choose any of: csv, tensorboard")
    return loggers


__all__ = [
    "SampleFigures",
    "PeriodicMetrics",
    "LossByTime",
    "build_callbacks",
    "build_loggers",
    "tensorboard_available",
    "draw_samples",
]
