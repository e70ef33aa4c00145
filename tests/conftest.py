"""Shared fixtures: seeded generators and float64 helpers."""
from __future__ import annotations

from typing import Callable, Iterator

import pytest
import torch


@pytest.fixture
def single_thread() -> Iterator[None]:
    """Run the test with one intra-op thread (restored afterwards).

    Loops of many small tensor ops slow down badly when their threads compete with other
    processes for the two shared cores; one thread is both faster and steadier there.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def make_gen() -> Callable[[int], torch.Generator]:
    """``make_gen(seed)`` returns a fresh CPU generator seeded with ``seed``."""

    def make(seed: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    return make


@pytest.fixture
def gen(make_gen: Callable[[int], torch.Generator]) -> torch.Generator:
    """A CPU generator with the fixed seed 0."""
    return make_gen(0)


@pytest.fixture
def float64() -> Iterator[torch.dtype]:
    """Make float64 the default dtype for the test (restored afterwards); yields torch.float64."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch.float64
    torch.set_default_dtype(old)


@pytest.fixture(scope="session")
def ae_run(tmp_path_factory: pytest.TempPathFactory):
    """A `task=autoencoder` run on 16×16 digits, 120 steps (checkpoints at 60 and 120)."""
    from helpers import autoencoder_cfg

    from sde_diffusion.fit import fit

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("ae") / "run"
    fit(None, autoencoder_cfg(run, "trainer.max_steps=120", "callbacks.checkpoint.every_n_steps=60"), run)
    torch.set_num_threads(old)
    return run
