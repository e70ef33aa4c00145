r"""``data=digit_pairs``: two embedded digits side by side, with captions that say which is where.

Each image is a ``1 × s × 2s`` canvas (``s = data.size``, 8 by default): digit *a* in the left half,
digit *b* in the right half, both drawn from the embedded 8×8 digits of the split (train digits for
training canvases, held-out digits for validation ones). The label is the ordered pair's index
``10·a + b`` (0..99); captions are drawn from a small grammar at training time, so a model must read
the words to know which digit goes where.

Caption grammar (every caption names a first/left digit *a* and a second/right digit *b*)::

    caption  := "{a} left of {b}" | "{a} to the left of {b}" | "{b} right of {a}" | "{b} to the right of {a}"
              | "{a} then {b}" | "{a} followed by {b}" | "{a} and then {b}"
    {d}      := "3" | "three" | "a three"            (the digit, its word, or the word with an article:
                                                       "an eight")

e.g. "3 left of 8", "an eight to the right of a three", "3 then 8".

Held out of training: the ordered pairs of :data:`HELD_OUT_PAIRS`, one per digit on each side,
(0, 7) (1, 4) (2, 9) (3, 5) (4, 0) (5, 2) (6, 8) (7, 3) (8, 1) (9, 6). No training canvas shows
them (every digit still appears left and right in training), so a model that draws them composes
words it has only seen in other pairs. Validation canvases cover all 100 pairs.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..registry import DATASETS
from .datamodule import ImageDataModule, TensorPairDataset, split_indices
from .digits import DIGITS_LEVELS, load_digits, upsample_digits

HELD_OUT_PAIRS: Tuple[Tuple[int, int], ...] = ((0, 7), (1, 4), (2, 9), (3, 5), (4, 0), (5, 2), (6, 8), (7, 3), (8, 1), (9, 6))
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("{a} left of {b}", "{a} to the left of {b}", "{b} right of {a}", "{b} to the right of {a}",
             "{a} then {b}", "{a} followed by {b}", "{a} and then {b}")


def digit_forms(d: int) -> Tuple[str, str, str]:
    """The three ways a caption names digit ``d``: ``"3"``, ``"three"``, ``"a three"`` (``"an eight"``)."""
    word = NUMBER_WORDS[d]
    return str(d), word, ("an " if word == "eight" else "a ") + word


def paraphrases(a: int, b: int) -> List[str]:
    """Every caption of the grammar for the pair (left a, right b), in a fixed order."""
    out = []
    for template in TEMPLATES:
        for fa in digit_forms(a):
            for fb in digit_forms(b):
                out.append(template.format(a=fa, b=fb))
    return out


def caption(a: int, b: int, generator: Optional[torch.Generator] = None) -> str:
    """One caption of the pair drawn uniformly from :func:`paraphrases`."""
    options = paraphrases(a, b)
    return options[int(torch.randint(len(options), (1,), generator=generator))]


def all_captions(pairs: Optional[Iterable[Tuple[int, int]]] = None) -> List[str]:
    """Every caption of ``pairs`` (default all 100): what a word tokenizer's vocabulary is built from."""
    pairs = [(a, b) for a in range(10) for b in range(10)] if pairs is None else list(pairs)
    return [c for a, b in pairs for c in paraphrases(a, b)]


def training_pairs() -> List[Tuple[int, int]]:
    """The 90 ordered pairs training canvases show."""
    held = set(HELD_OUT_PAIRS)
    return [(a, b) for a in range(10) for b in range(10) if (a, b) not in held]


def compose(left: Tensor, right: Tensor) -> Tensor:
    """Two ``[N, s, s]`` digit images → ``[N, 1, s, 2s]`` canvases."""
    return torch.cat([left, right], dim=-1)[:, None]


@DATASETS.register("digit_pairs")
class DigitPairsDataModule(ImageDataModule):
    """Captioned 1×size×2size canvases of two digits; labels 10·a + b; see the module docstring.

    Args:
        size: the side of one digit (8, or a multiple of 8: the digits are upsampled once, 17 levels kept).
        n_train, n_val: canvases per split (fixed random pairings, seeded).
        centered, uniform_dequantization, batch_size, batch_per_device, num_workers, seed, val_fraction:
            as ``data=digits`` (``val_fraction`` splits the *digit images* between the splits).
    """

    num_classes = 100
    levels = DIGITS_LEVELS
    has_captions = True

    def __init__(self, size: int = 8, n_train: int = 20000, n_val: int = 1000, batch_size: int = 128,
                 batch_per_device: Optional[int] = None, num_workers: int = 0, seed: int = 0, val_fraction: float = 0.1,
                 centered: bool = True, uniform_dequantization: bool = False) -> None:
        super().__init__(centered=centered, uniform_dequantization=uniform_dequantization, random_flip=False,
                         batch_size=batch_size, batch_per_device=batch_per_device, num_workers=num_workers, seed=seed,
                         val_fraction=val_fraction)
        if int(size) != size or size < 8 or size % 8:
            raise ValueError(f"data.size must be a multiple of 8 (the side of one digit), got {size}")
        for name, v in (("data.n_train", n_train), ("data.n_val", n_val)):
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v}")
        self.size, self.n_train, self.n_val = int(size), int(n_train), int(n_val)
        self.data_shape = (1, self.size, 2 * self.size)

    @staticmethod
    def _canvases(images: Tensor, labels: Tensor, pairs: Sequence[Tuple[int, int]], n: int,
                  gen: torch.Generator) -> Tuple[Tensor, Tensor]:
        by_class = [torch.nonzero(labels == d).flatten() for d in range(10)]
        choice = torch.randint(len(pairs), (n,), generator=gen)
        pair = torch.tensor(pairs, dtype=torch.long)[choice]                         # [n, 2]
        counts = torch.tensor([len(c) for c in by_class])
        table = torch.zeros(10, int(counts.max()), dtype=torch.long)
        for d in range(10):
            table[d, : counts[d]] = by_class[d]
        idx = []
        for side in range(2):
            k = (torch.rand(n, generator=gen) * counts[pair[:, side]]).long()
            idx.append(table[pair[:, side], k])
        return compose(images[idx[0]], images[idx[1]]), pair[:, 0] * 10 + pair[:, 1]

    def _build_splits(self) -> Tuple[Dataset, Dataset]:
        images, labels = load_digits()
        images = upsample_digits(images, self.size)
        tr, va = split_indices(images.shape[0], self.val_fraction, self.seed)
        gen = torch.Generator().manual_seed(self.seed + 1)
        x_tr, y_tr = self._canvases(images[tr], labels[tr], training_pairs(), self.n_train, gen)
        everything = [(a, b) for a in range(10) for b in range(10)]
        x_va, y_va = self._canvases(images[va], labels[va], everything, self.n_val, gen)
        return TensorPairDataset(x_tr, y_tr), TensorPairDataset(x_va, y_va)

    # ------------------------------------------------------------------ captions
    def captions(self, labels: Tensor, generator: Optional[torch.Generator] = None) -> List[str]:
        """A caption per pair label ``10·a + b``, each drawn from the grammar."""
        return [caption(int(y) // 10, int(y) % 10, generator) for y in labels.tolist()]

    def caption_corpus(self) -> List[str]:
        """Every caption training can draw (the vocabulary's source): the grammar over the training pairs."""
        return all_captions(training_pairs())


def halves(images: Tensor) -> Tuple[Tensor, Tensor]:
    """``[N, 1, s, 2s]`` canvases → the left and right ``[N, 1, s, s]`` digits (area-averaged to 8×8)."""
    s = images.shape[-2]
    left, right = images[..., :s], images[..., s:]
    if s != 8:
        left, right = F.avg_pool2d(left, s // 8), F.avg_pool2d(right, s // 8)
    return left, right


__all__ = ["HELD_OUT_PAIRS", "TEMPLATES", "NUMBER_WORDS", "digit_forms", "paraphrases", "caption", "all_captions",
           "training_pairs", "compose", "halves", "DigitPairsDataModule"]
