"""A callback for the preemption tests: sends this process a signal after a given optimiser step."""
import os
import signal

from lightning.pytorch.callbacks import Callback


class SignalAtStep(Callback):
    """``callbacks.extra=[signal_probe:SignalAtStep]``; the step and signal come from the environment."""

    def __init__(self) -> None:
        self.step = int(os.environ["SIGNAL_AT_STEP"])
        self.signum = getattr(signal, os.environ.get("SIGNAL_NAME", "SIGTERM"))
        self.sent = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.sent and trainer.global_step == self.step:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class BatchLog(Callback):
    """Appends ``global_step batch_idx epoch sum(x)`` of every training batch to $BATCH_LOG (debugging aid)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with open(os.environ["BATCH_LOG"], "a") as f:
            f.write(f"{trainer.global_step} {batch_idx} {trainer.current_epoch} {float(batch[0].double().sum()):.6f}\n")
