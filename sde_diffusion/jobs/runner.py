r"""The one batch loop of ``sample.py``: ``n`` items in resumable, rank-split batches of a payload.

Sampling, likelihood and metrics are *payloads*: objects that know how to produce the arrays of
one batch (:class:`Payload`). The :class:`Runner` does everything around them, the same way for all:

* batch ``b`` holds ``min(batch_size, n − b·batch_size)`` items (:func:`~.shards.batch_counts`)
  and draws all of its randomness from a generator seeded with ``f(seed, purpose, b)``
  (:func:`batch_generator`), so its content depends on nothing but the settings and ``b``;
* rank ``r`` of ``world_size`` processes draws the batches ``b ≡ r (mod world_size)``;
* every batch is written atomically as its own shard (:class:`~.shards.ShardStore`) the moment it
  is finished; a run started again with the same settings skips the finished shards, so a killed
  run resumes and ends with exactly the files of an uninterrupted one;
* once every rank is done, rank 0 merges the shards, in batch order, into one ``.npz``.

Usage (what the modes do)::

    runner = Runner(payload, out_dir / "shards", fingerprint, n=cfg.n, batch_size=cfg.batch_size,
                    seed=cfg.seed, runtime=runtime, settings=settings)
    merged = runner.run(out_dir / "samples.npz")     # rank 0: {"arrays", "nfe", "seconds", ...}; others: None
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch

from .runtime import Runtime, sync
from .shards import ShardStore, batch_counts, batch_seed, rank_batches

Arrays = Dict[str, np.ndarray]
BatchHook = Callable[[int, Mapping[str, np.ndarray]], None]
Progress = Callable[[float], None]


class Payload(Protocol):
    """What a batch job computes; the :class:`Runner` calls :meth:`draw` once per unfinished batch."""

    #: names the random stream: batch b's generator is seeded with ``batch_seed(seed, purpose, b)``
    purpose: str
    #: the progress bar's description
    desc: str

    def draw(self, batch: int, start: int, count: int, generator: torch.Generator,
             progress: Progress) -> Tuple[Arrays, int]:
        """Items ``start … start+count−1``: arrays with ``count`` rows each, and the score
        evaluations spent. ``progress(fraction)`` may report progress within the batch."""
        ...


def batch_generator(seed: int, purpose: str, batch: int, device: Any = "cpu") -> torch.Generator:
    """The generator of batch ``batch``: on ``device``, seeded with :func:`~.shards.batch_seed`."""
    return torch.Generator(device=device).manual_seed(batch_seed(seed, purpose, batch))


@dataclass
class RunResult:
    """What :meth:`Runner.run` returns on rank 0: the merged ``arrays`` (every array, concatenated
    in batch order), ``nfe`` and ``seconds`` per batch, the batches drawn by this process (None
    when only merged) and the wall-clock time of this run."""

    arrays: Arrays
    nfe: List[int]
    seconds: List[float]
    drawn: Optional[List[int]] = None
    wall_seconds: float = float("nan")


class Runner:
    """Runs ``payload`` over ``n`` items in shards under ``root`` (see the module docstring).

    Args:
        payload: what one batch computes (:class:`Payload`).
        root: the shard directory (``<out>/shards``).
        fingerprint: identifies the settings that decide a batch's content (shards of another
            fingerprint are refused, or with ``resume=False`` deleted).
        settings: recorded in ``plan.json`` (and named in the refusal when they differ).
        runtime: rank, world size, device and barrier of this process.
        progress: a progress bar on stderr (rank 0).
    """

    def __init__(self, payload: Payload, root: Path, fingerprint: str, *, n: int, batch_size: int, seed: int,
                 runtime: Runtime, settings: Optional[Mapping[str, Any]] = None, resume: bool = True,
                 progress: bool = True) -> None:
        self.payload = payload
        self.store = ShardStore(Path(root), fingerprint)
        self.counts = batch_counts(n, batch_size)
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.runtime = runtime
        self.settings = dict(settings or {})
        self.resume = resume
        self.progress = progress

    # ------------------------------------------------------------------ steps
    def prepare(self) -> None:
        """Rank 0, before any rank draws: create the shard directory and record the plan."""
        self.store.prepare({"n": self.n, "batch_size": self.batch_size, "counts": self.counts,
                            "settings": self.settings}, resume=self.resume)

    def run_batches(self, rank: Optional[int] = None, world_size: Optional[int] = None,
                    on_batch_end: Optional[BatchHook] = None) -> List[int]:
        """Draw and store the unfinished batches of ``rank`` (default: this process's); returns them.

        ``rank``/``world_size`` may be given to play one rank of a split in this process;
        ``on_batch_end(batch, arrays)`` runs after each shard is on disk (tests use it to kill a run).
        """
        rank = self.runtime.rank if rank is None else rank
        world_size = self.runtime.world_size if world_size is None else world_size
        mine = rank_batches(len(self.counts), rank, world_size)
        self.store.clean_stale(mine)
        todo = [b for b in mine if not self.store.is_done(b, self.counts[b])]
        bar = self._bar(len(mine), len(mine) - len(todo)) if self.progress and rank == 0 else None
        device = self.runtime.device
        done: List[int] = []
        try:
            for k, b in enumerate(todo):
                base = len(mine) - len(todo) + k

                def progress(fraction: float, base: int = base) -> None:
                    if bar is not None and base + fraction > bar.n:
                        bar.update(base + fraction - bar.n)

                count = self.counts[b]
                generator = batch_generator(self.seed, self.payload.purpose, b, device)
                sync(device)
                t0 = time.perf_counter()
                arrays, nfe = self.payload.draw(b, b * self.batch_size, count, generator, progress)
                sync(device)
                self.store.write(b, arrays, count, nfe, time.perf_counter() - t0)
                done.append(b)
                progress(1.0)
                if bar is not None:
                    bar.set_postfix(nfe=nfe)
                if on_batch_end is not None:
                    on_batch_end(b, arrays)
        finally:
            if bar is not None:
                bar.close()
        return done

    def merge(self, out_path: Path, extra: Optional[Mapping[str, Any]] = None, exclude: Sequence[str] = (),
              drawn: Optional[List[int]] = None, wall_seconds: float = float("nan")) -> RunResult:
        """Rank 0, after every rank: the shards in batch order, written to ``out_path`` (plus the
        ``extra`` arrays, without the ``exclude`` ones). RuntimeError if a batch is missing."""
        merged = self.store.merge(self.counts, Path(out_path), extra=extra, exclude=exclude)
        return RunResult(arrays=merged["arrays"], nfe=merged["nfe"], seconds=merged["seconds"],
                         drawn=drawn, wall_seconds=wall_seconds)

    def run(self, out_path: Path, extra: Optional[Mapping[str, Any]] = None, exclude: Sequence[str] = (),
            on_batch_end: Optional[BatchHook] = None) -> Optional[RunResult]:
        """The whole job on every rank: prepare (rank 0), draw this rank's batches, wait for all,
        merge (rank 0). Rank 0 returns the :class:`RunResult`, the other ranks None."""
        wall = time.perf_counter()
        rt = self.runtime
        if rt.is_main:
            self.prepare()
        rt.barrier()
        drawn = self.run_batches(on_batch_end=on_batch_end)
        rt.barrier()
        if not rt.is_main:
            return None
        return self.merge(out_path, extra, exclude, drawn=drawn, wall_seconds=time.perf_counter() - wall)

    def _bar(self, total: int, initial: int) -> Any:
        from tqdm.auto import tqdm

        # Fractional batches: a payload that reports progress within a batch (likelihood) moves the
        # bar, and so the ETA, long before its first (possibly many-minute) batch ends.
        return tqdm(total=total, initial=initial, desc=self.payload.desc, unit="batch", file=sys.stderr,
                    dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.2f}/{total} batches [{elapsed}<{remaining}{postfix}]")


__all__ = ["Payload", "Runner", "RunResult", "batch_generator", "BatchHook"]
