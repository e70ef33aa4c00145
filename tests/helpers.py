"""Shared constants of the training tests (imported as ``helpers``: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from sde_diffusion.data import cifar10 as cifar

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


# Fake CIFAR-10 archives in the real format: the value of image n, channel c, row h, column w is pixel(n, c, h, w).
N_PER_BATCH = 4


def pixel(n: int, c: int, h: int, w: int) -> int:
    """The value the fake archive stores for image n, channel c, row h, column w."""
    return (7 * n + 80 * c + 3 * h + 5 * w) % 256


def _fake_batch(offset: int, n_per_batch: int = N_PER_BATCH) -> bytes:
    n = np.arange(offset, offset + n_per_batch)[:, None]
    k = np.arange(3072)[None, :]
    c, h, w = k // 1024, (k % 1024) // 32, k % 32  # the documented row layout: R plane, G, B
    data = pixel(n, c, h, w).astype(np.uint8)
    labels = [int(i % 10) for i in range(offset, offset + n_per_batch)]
    raw = pickle.dumps({b"batch_label": b"fake", b"labels": labels, b"data": data, b"filenames": [b"x"] * n_per_batch}, protocol=2)
    # The real files were written under numpy 1, which names numpy.core.multiarray.
    return raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def fake_cifar_members(n_per_batch: int = N_PER_BATCH) -> dict:
    """The files of CIFAR-10's python archive (five data batches, test batch, meta), ``n_per_batch`` images each."""
    names = list(cifar.TRAIN_BATCHES) + list(cifar.TEST_BATCHES)
    members = {name: _fake_batch(i * n_per_batch, n_per_batch) for i, name in enumerate(names)}
    members["batches.meta"] = pickle.dumps({b"label_names": [c.encode() for c in cifar.CLASSES]}, protocol=2)
    return members


def write_cifar_archive(path: Path, n_per_batch: int = N_PER_BATCH) -> bytes:
    """A ``cifar-10-python.tar.gz`` in the exact format of the real one (dicts of uint8 ``[N, 3072]`` rows)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in fake_cifar_members(n_per_batch).items():
            info = tarfile.TarInfo(f"{cifar.EXTRACTED_DIR}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()




def autoencoder_cfg(run_dir: Path, *extra: str):
    """A tiny ``task=autoencoder`` config on 16×16 digits (f = 2, c = 2), composed from conf/."""
    from hydra import compose, initialize_config_dir

    over = QUIET_TRAINING + [
        "task=autoencoder", "data=digits", "data.size=16", "data.batch_size=64", "autoencoder.ch=8",
        "autoencoder.ch_mult=[1,2]", "autoencoder.latent_channels=2", "autoencoder.figures_every_n_steps=0",
        "optim.warmup_steps=0", "optim.lr=3e-3", f"run_dir={run_dir}", *extra,
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=over)
