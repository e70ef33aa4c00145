"""Checkpoints that survive preemption: every checkpoint written atomically, ``last.ckpt`` on a
clock and every N steps, and a save before stopping on SIGTERM or SIGUSR1.

* :class:`AtomicCheckpointIO` — Lightning writes checkpoints through it: to a hidden temporary
  file, then a rename, so a job killed while saving leaves the previous ``last.ckpt`` intact.
* :class:`StopOnSignal` — on SIGTERM (a scheduler's preemption notice, ``kill``) or SIGUSR1, the
  current optimiser step finishes, ``last.ckpt`` is saved, and training stops cleanly (exit code 0,
  no ``finished.json``); ``python train.py run_dir=<run> resume=true`` continues it. On a SLURM
  cluster with auto-requeue, Lightning's own SIGUSR1 handling (save and requeue) is kept.
* :func:`last_checkpoint_callbacks` — ``last.ckpt`` every ``last_every_minutes`` of training and
  every ``last_every_n_steps`` steps, besides the numbered checkpoints.
"""
from __future__ import annotations

import datetime
import signal
from pathlib import Path
from typing import Any, List, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .io import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic: write a temporary file, then rename it over the target."""

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Optional[Any] = None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


def last_checkpoint_callbacks(dirpath: Path, every_minutes: Optional[float], every_n_steps: Optional[int]) -> List[Callback]:
    """ModelCheckpoints that write only ``last.ckpt``: one on the training clock, one every N steps."""
    out: List[Callback] = []
    common = dict(dirpath=str(dirpath), save_top_k=0, save_last=True, save_on_train_epoch_end=False,
                  enable_version_counter=False)
    if every_minutes:
        out.append(ModelCheckpoint(train_time_interval=datetime.timedelta(minutes=float(every_minutes)), **common))
    if every_n_steps:
        out.append(ModelCheckpoint(every_n_train_steps=int(every_n_steps), **common))
    return out


class Preempted(Exception):
    """Raised by :class:`StopOnSignal` after saving: ends ``trainer.fit`` at once, so that no
    end-of-fit save overwrites the mid-epoch ``last.ckpt`` (:func:`sde_diffusion.fit.fit` catches it)."""


class StopOnSignal(Callback):
    """Save ``<dirpath>/last.ckpt`` and stop after the current step when SIGTERM or SIGUSR1 arrives.

    The handlers are installed when training starts (over Lightning's own SIGTERM handler, which
    would stop the loop without saving) and restored at teardown; a signal only sets a flag, and
    the save happens at the end of the step, where a checkpoint continues exactly; then
    :class:`Preempted` ends the fit. With several
    processes the ranks agree first, so the collective save never waits on a rank that has not
    seen the signal. On a SLURM cluster with auto-requeue, Lightning's SIGUSR1 (save and requeue)
    is left alone. Put this callback last, so that it sees a signal raised by another callback.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, dirpath: Path) -> None:
        self.dirpath = Path(dirpath)
        self.received: Optional[str] = None
        self.saved_at: Optional[int] = None
        self._previous: dict = {}

    def on_train_start(self, trainer: "L.Trainer", pl_module: Any) -> None:
        for name in self.SIGNALS:
            signum = getattr(signal, name, None)
            if signum is None or (name == "SIGUSR1" and _slurm_requeue(trainer)):
                continue
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name

    def teardown(self, trainer: "L.Trainer", pl_module: Any, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        asked = self.received is not None
        if trainer.world_size > 1:
            asked = trainer.strategy.reduce_boolean_decision(asked, all=False)
        if not asked or self.saved_at is not None:
            return
        trainer.save_checkpoint(str(self.dirpath / "last.ckpt"))
        self.saved_at = trainer.global_step
        if trainer.is_global_zero:
            print(f"{self.received or 'a signal on another rank'}: saved {self.dirpath / 'last.ckpt'} at step "
                  f"{trainer.global_step}; continue with resume=true", flush=True)
        raise Preempted(self.received)


class ResumeDataPosition(Callback):
    """A run continued from a mid-epoch checkpoint trains next on the batch after the last one it
    trained on: the samplers that can skip (``ResumableRandomSampler``) leave out the batches of
    the current epoch that the checkpoint had done. Lightning restores the epoch number itself."""

    def on_train_start(self, trainer: "L.Trainer", pl_module: Any) -> None:
        loop = trainer.fit_loop
        progress = loop.epoch_loop.batch_progress
        # A checkpoint of an epoch's last batch continues with the next epoch, from its start.
        if not loop.restarted_mid_epoch or progress.is_last_batch or loop._combined_loader is None:
            return
        done = int(progress.current.processed)  # saved at train-batch end: completed lags by one
        for loader in loop._combined_loader.flattened:
            sampler = getattr(loader, "sampler", None)
            if hasattr(sampler, "skip") and getattr(loader, "batch_size", None):
                sampler.skip = done * int(loader.batch_size)


def _slurm_requeue(trainer: "L.Trainer") -> bool:
    from lightning.fabric.plugins.environments import SLURMEnvironment

    env = trainer._accelerator_connector.cluster_environment
    return isinstance(env, SLURMEnvironment) and bool(env.auto_requeue)


__all__ = ["AtomicCheckpointIO", "Preempted", "ResumeDataPosition", "StopOnSignal", "last_checkpoint_callbacks"]
