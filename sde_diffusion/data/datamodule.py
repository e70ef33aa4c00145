"""The shared LightningDataModule: splits, loaders, batch transforms, reference samples.

A concrete data set supplies

* class-level or constructor-set ``data_shape``, ``num_classes``, ``is_image`` (known before
  ``setup`` so a model can be built from the config alone);
* ``_build_splits() -> (train, val)``: two map-style datasets whose items are ``(raw_x, y)``;
* ``_transform(train) -> transform``: a callable ``(raw batch, generator) -> x`` in model range,
  with ``scaler``/``inverse_scaler`` methods.

Every loader yields ``(x, y)``: x float32 ``[B, *data_shape]`` in model range, y int64 ``[B]``.
Items are stored raw (uint8 pixels, float vectors) and transformed per batch, so random
augmentation and dequantisation noise differ between epochs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .transforms import IdentityTransform, PixelTransform

Transform = Union[PixelTransform, IdentityTransform]


class RawBatch(NamedTuple):
    """A batch fetched in one indexing operation: ``x`` ``[B, ...]`` (raw), ``y`` ``[B]``."""

    x: Tensor
    y: Tensor


class TensorPairDataset(Dataset):
    """``(x[i], y[i])`` pairs of two aligned tensors, with vectorised batch fetching.

    ``__getitems__`` (used by the DataLoader when present) slices both tensors at once instead
    of stacking ``B`` single items, which matters for small 2-D batches on CPU.
    """

    def __init__(self, x: Tensor, y: Tensor) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
        self.x = x
        self.y = y.to(torch.int64)

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> Tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]

    def __getitems__(self, indices: Sequence[int]) -> RawBatch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return RawBatch(self.x[idx], self.y[idx])


class BatchCollate:
    """Stack raw items (or take a ``RawBatch`` as is) and apply the batch transform."""

    def __init__(self, transform: Transform) -> None:
        self.transform = transform

    def __call__(self, data: Union[RawBatch, List[Tuple[Tensor, Any]]]) -> Tuple[Tensor, Tensor]:
        if isinstance(data, RawBatch):
            x, y = data.x, data.y
        else:
            x = torch.stack([torch.as_tensor(item[0]) for item in data])
            y = torch.as_tensor([int(item[1]) for item in data], dtype=torch.int64)
        return self.transform(x), y.to(torch.int64)


def fetch(dataset: Dataset, indices: Sequence[int]) -> RawBatch:
    """Raw items ``indices`` of ``dataset`` as one ``RawBatch``."""
    getitems = getattr(dataset, "__getitems__", None)
    if callable(getitems):
        out = getitems(list(indices))
        if isinstance(out, RawBatch):
            return out
        items = out
    else:
        items = [dataset[i] for i in indices]
    x = torch.stack([torch.as_tensor(item[0]) for item in items])
    y = torch.as_tensor([int(item[1]) for item in items], dtype=torch.int64)
    return RawBatch(x, y)


def split_indices(n: int, val_fraction: float, seed: int) -> Tuple[Tensor, Tensor]:
    """A seeded random partition of ``range(n)`` into (train, val) index tensors.

    ``n_val = round(n · val_fraction)``, at least 1 when ``val_fraction > 0`` and ``n >= 2``, and
    never all of the data.
    """
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, n - 1) if n >= 1 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class ResumableRandomSampler(Sampler[int]):
    """A new random order of ``range(n)`` every epoch, split among processes by global batch, that a
    resumed run can re-enter mid-epoch.

    The orders are those a ``DataLoader(shuffle=True, generator=<seeded with seed>)`` gives (per
    epoch its iterator draws a base seed, then its ``RandomSampler`` two permutations, using the
    first), found from the epoch number (Lightning calls :meth:`set_epoch`), so a restarted process
    finds them again. With ``world_size`` processes, each global batch of ``batch`` consecutive
    indices of the order is cut into ``world_size`` equal parts and process ``rank`` takes part
    ``rank``, so the processes together see exactly what one process with the whole batch would;
    a last global batch too short to split is left out, as it is with ``drop_last`` (static shapes
    for compiled networks) in one process. ``skip`` leaves out the first indices of the next
    iteration only: what a resumed run has already trained on in its current epoch.
    """

    def __init__(self, n: int, seed: int, batch: Optional[int] = None, world_size: int = 1, rank: int = 0,
                 drop_last: bool = False) -> None:
        self.n, self.seed = int(n), int(seed)
        self.batch, self.world_size, self.rank = (int(batch) if batch else None), int(world_size), int(rank)
        self.drop_last = bool(drop_last) or self.world_size > 1
        if self.world_size > 1 and (self.batch is None or self.batch % self.world_size):
            raise ValueError(f"a global batch of {batch} cannot be split among {world_size} processes")
        if self.drop_last and (self.batch is None or self.n < self.batch):
            raise ValueError(f"the training set ({self.n} examples) is smaller than one global batch ({batch}), and "
                             "whole batches only are kept (several processes, or perf.static_shapes=true): lower "
                             "data.batch_size, or set perf.static_shapes=false on one process")
        self.epoch = 0
        self.skip = 0
        self._gen = torch.Generator().manual_seed(self.seed)
        self._drawn = 0  # epochs drawn from self._gen so far

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int) -> Tensor:
        """The order of epoch ``epoch`` (all processes')."""
        if epoch < self._drawn:  # a restart, or an epoch seen before: replay from the seed
            self._gen, self._drawn = torch.Generator().manual_seed(self.seed), 0
        while True:
            torch.empty((), dtype=torch.int64).random_(generator=self._gen)  # the loader iterator's base seed
            order = torch.randperm(self.n, generator=self._gen)
            torch.randperm(self.n, generator=self._gen)  # drawn by RandomSampler at the end of an epoch
            self._drawn += 1
            if self._drawn > epoch:
                return order

    def indices(self, epoch: int) -> Tensor:
        """This process's indices of epoch ``epoch``, in order."""
        order = self.order(epoch)
        if not self.drop_last:
            return order
        whole = (self.n // self.batch) * self.batch
        part = self.batch // self.world_size
        return order[:whole].view(-1, self.world_size, part)[:, self.rank].reshape(-1)

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return iter(self.indices(self.epoch)[skip:].tolist())

    def __len__(self) -> int:
        return (self.n // self.batch) * (self.batch // self.world_size) if self.drop_last else self.n


@dataclass(frozen=True)
class BatchLayout:
    """How a global batch is cut: ``world_size`` processes × ``accumulate`` micro-batches of ``micro``."""

    batch: int
    world_size: int
    micro: int
    accumulate: int

    def describe(self) -> str:
        return (f"global batch {self.batch} = {self.world_size} process(es) x {self.accumulate} accumulated "
                f"micro-batch(es) of {self.micro}")


class BaseDataModule(L.LightningDataModule):
    """Common machinery; see the module docstring for what a subclass provides.

    Args:
        batch_size: examples per optimiser step, over all processes together (the global batch;
            validation batches have this size on each process).
        batch_per_device: the most one process holds at once; a larger share is reached by
            gradient accumulation (:meth:`batch_layout`). None: no cap.
        num_workers: DataLoader worker processes (0 = load in the main process).
        seed: fixes the data itself where generated, the train/val split and the shuffling.
        val_fraction: share of the data held out for validation, where the set has no official
            split.
    """

    data_shape: Tuple[int, ...]
    num_classes: Optional[int]
    is_image: bool

    def __init__(self, batch_size: int = 128, num_workers: int = 0, seed: int = 0, val_fraction: float = 0.1,
                 batch_per_device: Optional[int] = None) -> None:
        super().__init__()
        self.batch_size = _check_positive_int("batch_size", batch_size)
        self.batch_per_device = None if batch_per_device is None else _check_positive_int("batch_per_device", batch_per_device)
        self.num_workers = _check_positive_int("num_workers", num_workers, minimum=0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        self.val_fraction = float(val_fraction)
        self._train: Optional[Dataset] = None
        self._val: Optional[Dataset] = None
        # Whole batches only (static shapes for a compiled network); set by fit() from perf.static_shapes.
        self.drop_last = False

    # ------------------------------------------------------------------ subclass hooks
    def _build_splits(self) -> Tuple[Dataset, Dataset]:
        raise NotImplementedError

    def _transform(self, train: bool) -> Transform:
        raise NotImplementedError

    # ------------------------------------------------------------------ Lightning API
    def setup(self, stage: Optional[str] = None) -> None:
        """Load (or generate) the data once; later calls are no-ops."""
        if self._train is None:
            self._train, self._val = self._build_splits()

    @property
    def train_set(self) -> Dataset:
        self.setup()
        assert self._train is not None
        return self._train

    @property
    def val_set(self) -> Dataset:
        self.setup()
        assert self._val is not None
        return self._val

    def batch_layout(self, world_size: int = 1) -> BatchLayout:
        """The global batch cut among ``world_size`` processes and, above ``batch_per_device``, into
        accumulated micro-batches; a ValueError says which sizes would divide evenly."""
        per_process, rest = divmod(self.batch_size, world_size)
        if rest:
            raise ValueError(f"data.batch_size={self.batch_size} (the global batch) must be divisible by the "
                             f"{world_size} processes; use a multiple of {world_size}")
        cap = self.batch_per_device or per_process
        accumulate = -(-per_process // cap)
        while per_process % accumulate:
            accumulate += 1
        return BatchLayout(self.batch_size, world_size, per_process // accumulate, accumulate)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        world, rank = 1, 0
        trainer = getattr(self, "trainer", None)
        if train and trainer is not None:
            world, rank = int(trainer.world_size), int(trainer.global_rank)
        layout = self.batch_layout(world) if train else None
        return DataLoader(
            dataset,
            batch_size=layout.micro if train else self.batch_size,
            sampler=ResumableRandomSampler(len(dataset), self.seed, self.batch_size, world, rank,  # type: ignore[arg-type]
                                           drop_last=self.drop_last) if train else None,
            # Static shapes: a validation set of at least one batch is cut to whole batches.
            drop_last=bool(not train and self.drop_last and len(dataset) >= self.batch_size),  # type: ignore[arg-type]
            # The iterator's worker base seed comes from here, not from the global generator.
            generator=torch.Generator().manual_seed(self.seed) if train else None,
            num_workers=self.num_workers,
            collate_fn=BatchCollate(self._transform(train)),
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches in a resumable order (:class:`ResumableRandomSampler`; a run continued
        from a mid-epoch checkpoint goes on with the next batch: :class:`~sde_diffusion.preemption.ResumeDataPosition`)."""
        return self._loader(self.train_set, train=True)

    def eval_loader(self, split: str = "train") -> DataLoader:
        """The ``train`` or ``val`` split in order, without augmentation or shuffling (for statistics)."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self._loader(self.train_set if split == "train" else self.val_set, train=False)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    # ------------------------------------------------------------------ evaluation helpers
    def _reference_pool(self) -> Dataset:
        """The real examples ``reference`` draws from (default: train and val together)."""
        return torch.utils.data.ConcatDataset([self.train_set, self.val_set])

    def reference(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``n`` distinct real examples ``[n, *data_shape]`` (float32, model range, no augmentation).

        Drawn without replacement from ``_reference_pool()``; ``generator=None`` uses one seeded
        with ``seed``, so repeated calls return the same examples.
        """
        _check_positive_int("n", n)
        pool = self._reference_pool()
        size = len(pool)  # type: ignore[arg-type]
        if n > size:
            raise ValueError(
                f"reference(n={n}) asks for more examples than the {size} available in "
                f"{type(self).__name__}; use n <= {size}"
            )
        gen = generator if generator is not None else torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(size, generator=gen)[:n].tolist()
        raw = fetch(pool, idx)
        return self._transform(train=False)(raw.x, gen)

    def scaler(self, x: Tensor) -> Tensor:
        """Raw range → model range (images: [0, 1] → [−1, 1]; vectors: identity)."""
        return self._transform(train=False).scaler(x)

    def inverse_scaler(self, x: Tensor) -> Tensor:
        """Model range → raw range (images: [−1, 1] → [0, 1], unclamped; vectors: identity)."""
        return self._transform(train=False).inverse_scaler(x)

    @property
    def dim(self) -> int:
        """Number of scalar coordinates per example, ∏ data_shape."""
        return math.prod(self.data_shape)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(data_shape={self.data_shape}, num_classes={self.num_classes}, "
            f"batch_size={self.batch_size})"
        )


class ImageDataModule(BaseDataModule):
    """Base for integer-pixel image sets; adds the pixel scaling options.

    Args:
        centered: model range [−1, 1] (True) or [0, 1] (False).
        uniform_dequantization: add U(0, 1) noise on the ``levels`` scale before scaling (train,
            val and ``reference`` alike, so all see one continuous distribution).
        random_flip: random horizontal flips of training batches.
    """

    is_image = True
    levels: int = 256

    def __init__(
        self,
        centered: bool = True,
        uniform_dequantization: bool = False,
        random_flip: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.centered = bool(centered)
        self.uniform_dequantization = bool(uniform_dequantization)
        self.random_flip = bool(random_flip)

    def _transform(self, train: bool) -> PixelTransform:
        return PixelTransform(
            self.levels,
            centered=self.centered,
            dequantize=self.uniform_dequantization,
            flip=self.random_flip and train,
        )


__all__ = [
    "BaseDataModule",
    "ImageDataModule",
    "TensorPairDataset",
    "RawBatch",
    "BatchCollate",
    "fetch",
    "split_indices",
]
