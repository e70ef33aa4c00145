"""CIFAR-10 from the standard local archive (no torchvision): 3×32×32, 10 classes.

Looked up under ``root`` (default ``$SDE_DATA/cifar10``, ``SDE_DATA`` defaulting to ``data``):

* ``cifar-10-batches-py/`` (the extracted archive), preferred because it is faster to read, or
* ``cifar-10-python.tar.gz``, read in place without extracting.

Each batch file (``data_batch_1`` … ``data_batch_5`` = train, ``test_batch`` = validation) is a
pickled dict with ``b'data'``: uint8 ``[N, 3072]`` and ``b'labels'``: N ints in 0..9. A row is
three row-major 32×32 planes, red then green then blue, so ``row.reshape(3, 32, 32)`` is the CHW
image. The pickles are read with an unpickler that only admits the numpy array constructors.

With ``download=True`` a missing archive is fetched from ``CIFAR10_URL`` into a temporary file in
``root``, checked against ``CIFAR10_MD5`` and only then renamed into place.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import IO, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .datamodule import ImageDataModule, TensorPairDataset
from ..registry import DATASETS

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
EXTRACTED_DIR = "cifar-10-batches-py"
TRAIN_BATCHES: Tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES: Tuple[str, ...] = ("test_batch",)
CLASSES: Tuple[str, ...] = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

PathLike = Union[str, "os.PathLike[str]"]


class ChecksumError(RuntimeError):
    """A downloaded file does not have the expected MD5 digest."""


def default_root() -> Path:
    """``$SDE_DATA/cifar10`` (``SDE_DATA`` defaults to ``data``, relative to the working directory)."""
    return Path(os.environ.get("SDE_DATA", "data")) / "cifar10"


# ---------------------------------------------------------------------- decoding
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only; any other global is refused."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        # Files written under numpy 1 name numpy.core; numpy 2 keeps it only as a deprecated alias.
        if module.startswith("numpy.core."):
            module = "numpy._core." + module[len("numpy.core.") :]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a CIFAR-10 batch file")
        return super().find_class(module, name)


def decode_batch(fileobj: IO[bytes], source: str = "<batch>") -> Tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR batch → images uint8 ``[N, 3, 32, 32]`` (CHW), labels int64 ``[N]``."""
    try:
        obj = _ArrayUnpickler(fileobj, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ValueError(f"{source} is not a valid CIFAR-10 batch file: {err}") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: expected a pickled dict, got {type(obj).__name__}")
    data = obj.get(b"data", obj.get("data"))
    labels = obj.get(b"labels", obj.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{source}: missing b'data' or b'labels' (keys: {sorted(map(repr, obj))})")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{source}: b'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{source}: {labels.shape[0]} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{source}: labels must lie in 0..9, got range {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels


def find_cifar10(root: PathLike) -> Optional[Path]:
    """The extracted folder under ``root`` if present, else the archive, else ``None``."""
    root = Path(root).expanduser()
    folder = root / EXTRACTED_DIR
    if folder.is_dir():
        return folder
    archive = root / ARCHIVE_NAME
    return archive if archive.is_file() else None


def _concat(parts: List[Tuple[np.ndarray, np.ndarray]]) -> Tuple[Tensor, Tensor]:
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(x), torch.from_numpy(y)


def read_batches(source: PathLike, names: Sequence[str]) -> Tuple[Tensor, Tensor]:
    """Batches ``names`` (in that order) from an extracted folder or the ``.tar.gz``.

    Returns images uint8 ``[N, 3, 32, 32]`` and labels int64 ``[N]``.
    """
    source = Path(source)
    if source.is_dir():
        parts = []
        for name in names:
            path = source / name
            if not path.is_file():
                raise FileNotFoundError(f"CIFAR-10 folder {source} is incomplete: {name} is missing")
            with open(path, "rb") as f:
                parts.append(decode_batch(f, str(path)))
        return _concat(parts)
    found: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
    try:
        # One forward pass over the gzip stream; members are matched by file name.
        with tarfile.open(source, "r:gz") as tar:
            for member in tar:
                base = os.path.basename(member.name)
                if member.isfile() and base in names and base not in found:
                    f = tar.extractfile(member)
                    assert f is not None
                    found[base] = decode_batch(f, f"{source}:{member.name}")
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ValueError(f"cannot read {source} as a gzipped tar archive ({err}); delete it and download again") from err
    missing = [n for n in names if n not in found]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 archive {source} lacks {', '.join(missing)}")
    return _concat([found[n] for n in names])


# ---------------------------------------------------------------------- download
def file_md5(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex MD5 digest of a file (integrity only, not security)."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()


def _stream_url(url: str, out: IO[bytes], timeout: float = 60.0) -> None:
    """Copy the body of ``url`` into ``out`` (the only function that touches the network)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        shutil.copyfileobj(response, out, 1 << 20)


def download_cifar10(root: PathLike, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5) -> Path:
    """Fetch the archive into ``root/cifar-10-python.tar.gz`` atomically and return its path.

    The body goes to a temporary file in ``root``; it is renamed into place only if its MD5 equals
    ``md5``, so an interrupted or corrupt download never looks like a valid archive.

    Raises:
        ChecksumError: the digest differs (the temporary file is removed).
    """
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    dest = root / ARCHIVE_NAME
    fd, tmp_name = tempfile.mkstemp(prefix=ARCHIVE_NAME + ".", suffix=".part", dir=root)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            _stream_url(url, f)
        got = file_md5(tmp)
        if got != md5.lower():
            raise ChecksumError(
                f"MD5 of the file downloaded from {url} is {got}, expected {md5}; it was discarded. "
                f"Retry, or place {ARCHIVE_NAME} in {root.resolve()} yourself."
            )
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def missing_archive_message(root: PathLike) -> str:
    root = Path(root).expanduser().resolve()
    return (
        f"CIFAR-10 not found: place {ARCHIVE_NAME} (from {CIFAR10_URL}) or its extracted folder "
        f"{EXTRACTED_DIR}/ in the directory {root}, or enable the download with download=true "
        f"(e.g. `python train.py data=cifar10 data.download=true`), or point root (data.root=...) "
        f"or the SDE_DATA environment variable at the directory that holds it."
    )


# ---------------------------------------------------------------------- data module
@DATASETS.register("cifar10")
class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 as 3×32×32 images in model range; train = 50 000 images, val = the 10 000 test images.

    Args:
        root: directory holding ``cifar-10-python.tar.gz`` or ``cifar-10-batches-py/``
            (default ``default_root()``).
        download: fetch the archive (MD5-checked) when it is missing.
        random_flip: random horizontal flips of training batches (default on).
        centered, uniform_dequantization: see ``ImageDataModule``.
        batch_size, batch_per_device, num_workers, seed: see ``BaseDataModule``.

    ``reference(n)`` draws from the training images (the usual convention for FID statistics).
    """

    data_shape = (3, 32, 32)
    num_classes = 10
    levels = 256

    def __init__(
        self,
        root: Optional[PathLike] = None,
        download: bool = False,
        batch_size: int = 128,
        batch_per_device: Optional[int] = None,
        num_workers: int = 2,
        seed: int = 0,
        random_flip: bool = True,
        centered: bool = True,
        uniform_dequantization: bool = False,
    ) -> None:
        super().__init__(
            centered=centered,
            uniform_dequantization=uniform_dequantization,
            random_flip=random_flip,
            batch_size=batch_size,
            batch_per_device=batch_per_device,
            num_workers=num_workers,
            seed=seed,
            val_fraction=0.0,
        )
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.download = bool(download)

    def locate(self) -> Path:
        """The folder or archive to read, downloading first if allowed.

        Raises:
            FileNotFoundError: nothing under ``root`` and ``download`` is false.
        """
        source = find_cifar10(self.root)
        if source is None and self.download:
            source = download_cifar10(self.root)
        if source is None:
            raise FileNotFoundError(missing_archive_message(self.root))
        return source

    def prepare_data(self) -> None:
        # Lightning calls this once per node before setup, so a download happens only once.
        self.locate()

    def _build_splits(self) -> Tuple[Dataset, Dataset]:
        source = self.locate()
        xs = read_batches(source, TRAIN_BATCHES)
        vs = read_batches(source, TEST_BATCHES)
        return TensorPairDataset(*xs), TensorPairDataset(*vs)

    def _reference_pool(self) -> Dataset:
        return self.train_set


__all__ = [
    "CIFAR10DataModule",
    "CIFAR10_URL",
    "CIFAR10_MD5",
    "ARCHIVE_NAME",
    "EXTRACTED_DIR",
    "CLASSES",
    "ChecksumError",
    "decode_batch",
    "read_batches",
    "find_cifar10",
    "download_cifar10",
    "file_md5",
    "default_root",
]
