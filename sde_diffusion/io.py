"""Atomic file writes: a reader (or a resumed job) sees the old file or the new one, never half of one.

Every output of the package goes through :func:`atomic_path`: the content is written to a hidden
temporary file in the target's directory (same file system), flushed, then renamed over the target.
A killed process leaves at most a ``.<name>.<pid>.tmp`` file, which readers ignore.

    with atomic_path("out/samples.npz") as tmp:
        np.savez(tmp, samples=x)                 # writes tmp; renamed to out/samples.npz on success
    write_json("out/run.json", {"nfe": 20})
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Union

PathLike = Union[str, Path]


def temporary_name(path: PathLike) -> Path:
    """The hidden temporary file next to ``path`` that this process writes before the rename."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on failure it is removed.

    The parent directory is created. The temporary name keeps the target's suffix last-but-one
    (``.x.npz.<pid>.tmp``), so write with functions that do not append a suffix of their own
    (``np.savez`` to an open file object, ``fig.savefig(tmp, format=...)``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: PathLike, payload: Any, indent: int = 2) -> Path:
    """``payload`` as JSON (non-JSON values through ``str``), atomically."""
    return write_text(path, json.dumps(payload, indent=indent, default=str) + "\n")


def copy_file(src: PathLike, dst: PathLike) -> Path:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


__all__ = ["atomic_path", "temporary_name", "write_text", "write_json", "copy_file", "sha256_file"]


def sha256_file(path: PathLike) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
