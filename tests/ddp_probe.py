"""A Lightning callback that records what each process saw, for the multi-process training test.

Used through ``train.py callbacks.extra=[ddp_probe:DDPProbe]`` with tests/ on PYTHONPATH; writes
``<run>/probe/rank<r>_from<step>.json`` at the end of fit.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def state_vector(state: dict) -> torch.Tensor:
    """All floating tensors of a state dict, flattened in its key order."""
    return torch.cat([v.detach().flatten().cpu().double() for v in state.values() if v.is_floating_point()])


class DDPProbe(Callback):
    def __init__(self, output_dir: Path) -> None:
        self.out = Path(output_dir) / "probe"
        self.start_step = -1
        self.rows: list = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_step = int(trainer.global_step)
        self.start_sha = _digest(state_vector(pl_module.state_dict()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        self.rows.append([_digest(r) for r in x])  # one digest per example

    def on_train_end(self, trainer, pl_module) -> None:
        params = state_vector(pl_module.state_dict())
        self.out.mkdir(parents=True, exist_ok=True)
        payload = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "start_step": self.start_step,
            "end_step": int(trainer.global_step),
            "batches": self.rows,
            "params_sha": _digest(params),
            "start_sha": self.start_sha,
        }
        name = f"rank{trainer.global_rank}_from{self.start_step}.json"
        (self.out / name).write_text(json.dumps(payload))
