"""Resumable, rank-safe batch outputs: one ``.npz`` shard per batch index, merged at the end.

Layout of an output directory::

    shards/plan.json            what the shards belong to (fingerprint, batch size, ...)
    shards/batch_00000.npz      batch 0 (written by whichever rank owns it)
    shards/batch_00001.npz      ...

* Batch ``b`` of ``n`` items holds ``min(batch_size, n − b·batch_size)`` of them and is owned by
  rank ``b mod world_size`` (:func:`rank_batches`), so processes never write the same file.
* A shard is written to ``.batch_XXXXX.npz.<pid>.tmp`` in the same directory and renamed into
  place (:func:`atomic_savez`, through :func:`sde_diffusion.io.atomic_path`): a killed run leaves
  complete shards and at most a stray temporary file, never a truncated shard. A restarted run removes the strays of its own batches and skips
  every shard that exists intact (CRC-checked) with the same fingerprint and item count.
* Every batch draws its randomness from its own seed ``f(seed, purpose, b)`` (:func:`batch_seed`),
  so the set of shards, and their merge, do not depend on interruptions or on the number of
  processes.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from ..io import atomic_path, write_json

META_KEYS = ("fingerprint", "count", "batch", "nfe", "seconds")


def batch_counts(n: int, batch_size: int) -> List[int]:
    """Items per batch: ``[batch_size, …, batch_size, remainder]`` summing to ``n``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    full, rest = divmod(n, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def rank_batches(num_batches: int, rank: int, world_size: int) -> List[int]:
    """The batch indices rank ``rank`` of ``world_size`` owns: ``b ≡ rank (mod world_size)``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(range(rank, num_batches, world_size))


def batch_seed(seed: int, purpose: str, batch: int) -> int:
    """A 63-bit seed for batch ``batch`` of a job: the first 8 bytes (little-endian) of
    BLAKE2b(repr((seed, purpose, batch))), top bit cleared.

    Independent streams per purpose and batch, stable across processes, machines and Python runs
    (unlike ``hash``); shards on disk rely on it, so the formula must not change.
    """
    digest = hashlib.blake2b(repr((int(seed), str(purpose), int(batch))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def atomic_savez(path: Path, arrays: Mapping[str, Any], durable: bool = True) -> Path:
    """``np.savez`` to ``path`` atomically (:func:`~sde_diffusion.io.atomic_path`: never a partial file).

    With ``durable`` the data are also forced to disk (fsync) before the rename, so that an
    operating system crash cannot leave a renamed but empty file.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **{k: np.asarray(v) for k, v in arrays.items()})
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


class ShardStore:
    """The shards of one job in ``root`` (see the module docstring).

    Args:
        root: the ``shards`` directory.
        fingerprint: identifies the settings that decide a batch's content; shards with another
            fingerprint are never reused.
        prefix: file name prefix (``batch`` → ``batch_00012.npz``).
    """

    def __init__(self, root: Path, fingerprint: str, prefix: str = "batch") -> None:
        self.root = Path(root)
        self.fingerprint = str(fingerprint)
        self.prefix = prefix

    def path(self, batch: int) -> Path:
        return self.root / f"{self.prefix}_{batch:05d}.npz"

    # ------------------------------------------------------------------ plan
    def prepare(self, plan: Mapping[str, Any], resume: bool = True) -> None:
        """Create ``root`` and record ``plan``; refuse shards of a different job unless ``resume`` is off.

        With ``resume=False`` existing shards are deleted first. Call on rank 0 only, before the
        other ranks start (then :meth:`Runtime.barrier`).
        """
        plan_path = self.root / "plan.json"
        if self.root.exists() and not resume:
            for f in self.root.iterdir():
                if f.name.startswith((self.prefix + "_", "." + self.prefix + "_")) or f.name == "plan.json":
                    f.unlink()
        elif plan_path.exists():
            old = json.loads(plan_path.read_text())
            if old.get("fingerprint") != self.fingerprint:
                raise ValueError(
                    f"{self.root} holds shards of a different job (fingerprint {old.get('fingerprint')}, this job "
                    f"{self.fingerprint}: {_diff(old.get('settings', {}), plan.get('settings', {}))}). "
                    "Choose another out=, or pass resume=false to discard them."
                )
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(plan_path, {"fingerprint": self.fingerprint, **plan})

    # ------------------------------------------------------------------ shards
    def clean_stale(self, batches: Iterable[int]) -> int:
        """Remove leftover temporary files of ``batches`` (from a killed writer); returns how many."""
        removed = 0
        if not self.root.exists():
            return 0
        names = {self.path(b).name for b in batches}
        for f in self.root.glob(f".{self.prefix}_*.tmp"):
            base = f.name[1:].split(".npz.", 1)[0] + ".npz"
            if base in names:
                f.unlink(missing_ok=True)
                removed += 1
        return removed

    def meta(self, batch: int) -> Optional[Dict[str, Any]]:
        """The shard's bookkeeping entries, or None if it is missing or damaged.

        Every member's CRC is checked, so a shard whose data never reached the disk (operating
        system crash: shards are renamed into place without fsync, see :meth:`write`) counts as
        missing and is drawn again.
        """
        path = self.path(batch)
        if not path.is_file():
            return None
        try:
            with zipfile.ZipFile(path) as zf:
                if zf.testzip() is not None:
                    return None
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k].item() for k in META_KEYS if k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError):
            return None

    def is_done(self, batch: int, count: int) -> bool:
        """Whether batch ``batch`` exists with this job's fingerprint and ``count`` items."""
        m = self.meta(batch)
        return m is not None and m.get("fingerprint") == self.fingerprint and int(m.get("count", -1)) == int(count)

    def write(self, batch: int, arrays: Mapping[str, Any], count: int, nfe: int, seconds: float) -> Path:
        """Write batch ``batch`` atomically, with its bookkeeping entries.

        No fsync per shard (it costs ~10 ms a batch here, as much as a small batch's sampling):
        the rename already protects against a killed process, and :meth:`meta` catches the rare
        shard lost to an operating system crash.
        """
        meta = {"fingerprint": self.fingerprint, "count": int(count), "batch": int(batch), "nfe": int(nfe),
                "seconds": float(seconds)}
        clash = set(meta) & set(arrays)
        if clash:
            raise ValueError(f"shard arrays may not use the reserved names {sorted(clash)}")
        return atomic_savez(self.path(batch), {**arrays, **meta}, durable=False)

    def read(self, batch: int) -> Dict[str, np.ndarray]:
        with np.load(self.path(batch), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def missing(self, counts: Sequence[int]) -> List[int]:
        """Batch indices of the plan ``counts`` that are not done."""
        return [b for b, c in enumerate(counts) if not self.is_done(b, c)]

    def merge(
        self,
        counts: Sequence[int],
        out_path: Path,
        extra: Optional[Mapping[str, Any]] = None,
        exclude: Sequence[str] = (),
    ) -> Dict[str, Any]:
        """Concatenate the data arrays of batches ``0 … len(counts)−1`` in order into ``out_path``
        (atomically, plus ``extra`` arrays, without the ``exclude`` ones); returns
        ``{"nfe": [...], "seconds": [...], "arrays": {...all concatenated arrays...}}``.

        Raises RuntimeError if a shard is missing or holds the wrong number of items.
        """
        missing = self.missing(counts)
        if missing:
            raise RuntimeError(f"cannot merge: batches {missing[:10]}{'...' if len(missing) > 10 else ''} are not finished")
        parts: Dict[str, List[np.ndarray]] = {}
        nfe, seconds = [], []
        for b in range(len(counts)):
            shard = self.read(b)
            nfe.append(int(shard["nfe"]))
            seconds.append(float(shard["seconds"]))
            for k, v in shard.items():
                if k in META_KEYS:
                    continue
                if v.ndim == 0 or v.shape[0] != counts[b]:
                    raise RuntimeError(f"shard {self.path(b)} array {k!r} has shape {v.shape}, expected {counts[b]} rows")
                parts.setdefault(k, []).append(v)
        arrays = {k: np.concatenate(v) for k, v in parts.items()}
        atomic_savez(out_path, {**{k: v for k, v in arrays.items() if k not in exclude}, **(extra or {})})
        return {"nfe": nfe, "seconds": seconds, "arrays": arrays}


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(diffs[:6]) or "settings differ"


def fingerprint(settings: Mapping[str, Any]) -> str:
    """A short stable hash (16 hex digits) of the JSON form of ``settings``."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


__all__ = ["batch_counts", "rank_batches", "batch_seed", "atomic_savez", "ShardStore", "fingerprint"]
