"""Any folder of PNG/JPEG images (searched recursively), decoded with Pillow.

Each image is converted to grayscale (``channels=1``) or RGB (``channels=3``), center-cropped to
a square of side min(W, H) and resized to ``image_size``² with bicubic (antialiased) filtering,
giving uint8 ``[C, image_size, image_size]``; batches are then scaled like every 8-bit image set
(x₀₁ = v/255, model range 2x₀₁ − 1). Images are decoded lazily, one per item, so the folder may
be larger than memory and DataLoader workers share the decoding. Labels are all 0.

Captions (text to image): a ``metadata.jsonl`` in ``root`` with one JSON object a line,
``{"file_name": "<path relative to root>", "text": "<caption>"}`` (Hugging Face imagefolder's
convention), makes the data set the listed files with their captions; the label of an image is then
its row in the file, and ``captions(labels)`` gives the texts. A row naming a missing file is an error
that names it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from .datamodule import ImageDataModule, split_indices
from ..registry import DATASETS

IMAGE_EXTENSIONS: Tuple[str, ...] = (".png", ".jpg", ".jpeg")

PathLike = Union[str, "os.PathLike[str]"]


def list_images(root: PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> List[Path]:
    """All files below ``root`` whose suffix is in ``extensions`` (case-insensitive), sorted.

    Raises:
        FileNotFoundError: ``root`` is not a directory, or it holds no such file.
    """
    root = Path(root).expanduser()
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    accepted = ", ".join(exts)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root.resolve()} does not exist (expected images with extensions {accepted})")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
    if not files:
        raise FileNotFoundError(f"no images with extensions {accepted} found in {root.resolve()} (searched recursively)")
    return files


def load_image(path: PathLike, image_size: int, channels: int) -> Tensor:
    """Decode, center-crop to a square and resize one image → uint8 ``[channels, size, size]``."""
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            w, h = img.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            img = img.crop((left, top, left + side, top + side))
            if side != image_size:
                img = img.resize((image_size, image_size), resample=Image.Resampling.BICUBIC)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot decode image {path}: {err}") from err
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


class ImageFileDataset(Dataset):
    """Items ``(uint8 [C, S, S], label)`` decoded from ``files`` on access (labels: all 0, or ``labels``)."""

    def __init__(self, files: Sequence[Path], image_size: int, channels: int, labels: Optional[Sequence[int]] = None) -> None:
        self.files = list(files)
        self.image_size = image_size
        self.channels = channels
        self.labels = list(labels) if labels is not None else None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tuple[Tensor, int]:
        return load_image(self.files[i], self.image_size, self.channels), (0 if self.labels is None else self.labels[i])


METADATA = "metadata.jsonl"


def read_metadata(root: PathLike) -> Optional[Tuple[List[Path], List[str]]]:
    """(files, captions) of ``<root>/metadata.jsonl``, or None when there is none; errors name the bad line."""
    import json

    root = Path(root).expanduser()
    path = root / METADATA
    if not path.is_file():
        return None
    files, texts = [], []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, text = row["file_name"], row["text"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}, line {n}: expected {{\"file_name\": ..., \"text\": ...}} ({err})") from None
        f = root / str(name)
        if not f.is_file():
            raise ValueError(f"{path}, line {n}: file_name {name!r} does not exist ({f}); fix the row or add the image")
        files.append(f)
        texts.append(str(text))
    if not files:
        raise ValueError(f"{path} lists no images; write one {{\"file_name\", \"text\"}} object a line")
    return files, texts


@DATASETS.register("folder")
class FolderDataModule(ImageDataModule):
    """Images from a folder tree as ``[channels, image_size, image_size]`` in model range.

    Args:
        root: the folder (searched recursively for ``extensions``).
        image_size: side of the square output (center crop, then bicubic resize).
        channels: 1 (grayscale) or 3 (RGB).
        val_fraction: seeded random share of the files held out for validation.
        random_flip: random horizontal flips of training batches.
        centered, uniform_dequantization: see ``ImageDataModule``.
        batch_size, batch_per_device, num_workers, seed: see ``BaseDataModule``.
    """

    num_classes = None
    levels = 256

    def __init__(
        self,
        root: PathLike,
        image_size: int = 32,
        channels: int = 3,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        batch_size: int = 64,
        batch_per_device: Optional[int] = None,
        num_workers: int = 2,
        seed: int = 0,
        val_fraction: float = 0.05,
        random_flip: bool = False,
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
            val_fraction=val_fraction,
        )
        if root is None or str(root) in ("", "???"):
            raise ValueError("folder data needs root=<directory of images> (e.g. data.root=/path/to/images)")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
        self.root = Path(root).expanduser()
        self.image_size = image_size
        self.channels = channels
        self.extensions = tuple(extensions)
        self.data_shape = (channels, image_size, image_size)

    @property
    def has_captions(self) -> bool:
        """Whether ``root`` holds a ``metadata.jsonl`` (captions for text to image)."""
        return (self.root / METADATA).is_file()

    def _metadata(self) -> Tuple[List[Path], List[str]]:
        if getattr(self, "_meta", None) is None:
            meta = read_metadata(self.root)
            if meta is None:
                raise ValueError(f"{self.root} has no {METADATA}: captions need one JSON object a line, "
                                 '{"file_name": "<image path relative to the folder>", "text": "<caption>"}')
            self._meta = meta
        return self._meta

    def captions(self, labels: Tensor, generator: Optional[torch.Generator] = None) -> List[str]:
        """The stored caption of each image (its label is its row in metadata.jsonl)."""
        texts = self._metadata()[1]
        return [texts[int(i)] for i in labels.tolist()]

    def caption_corpus(self) -> List[str]:
        return list(self._metadata()[1])

    def _build_splits(self) -> Tuple[Dataset, Dataset]:
        labels: Optional[List[int]] = None
        if self.has_captions:
            files = self._metadata()[0]
            labels = list(range(len(files)))
        else:
            files = list_images(self.root, self.extensions)
        tr, va = split_indices(len(files), self.val_fraction, self.seed)

        def subset(idx: Tensor) -> ImageFileDataset:
            ids = idx.tolist()
            return ImageFileDataset([files[i] for i in ids], self.image_size, self.channels,
                                    None if labels is None else [labels[i] for i in ids])

        return subset(tr), subset(va)


__all__ = ["FolderDataModule", "ImageFileDataset", "list_images", "load_image", "read_metadata", "METADATA",
           "IMAGE_EXTENSIONS"]
