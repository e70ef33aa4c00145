"""Shared constants of the training tests (imported as ``helpers``: pytest puts tests/ on sys.path)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Overrides for short training runs in tests: no logger, progress bar, summary or figures.
QUIET_TRAINING = [
    "logger=null",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.samples.enabled=false",
    "callbacks.loss_by_t.every_n_steps=0",
]
