r"""A small CNN classifier on the embedded 8×8 digits, for offline image metrics.

* ``digits_fd(samples, reference)`` — "digits-FD": the Fréchet distance between Gaussian fits of
  the classifier's penultimate-layer features (64-d) of two image sets, the digits analogue of FID.
* ``classify(samples)`` — predicted labels, e.g. to check class-conditional or guided sampling.

Images are in the model range: pixels 0..16 of the data set map to x = (img/16)·2 − 1 ∈ [−1, 1];
accepted shapes are ``[B, 1, 8, 8]``, ``[B, 8, 8]`` or ``[B, 64]``.

The network is trained once (seeded, a few seconds on a CPU) on a fixed 80 % split of the 1797
images and stored with its accuracy on the held-out 20 %. When no stored file exists it is trained
on first use and written atomically to the cache (:func:`~sde_diffusion.evaluation.cache.cache_dir`,
file ``digits_classifier.pt``). To train explicitly::

    python -m sde_diffusion.evaluation.digits_classifier --out ~/.cache/sde_diffusion/digits_classifier.pt
"""
from __future__ import annotations

import argparse
import importlib.resources
import io
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .cache import PathLike, atomic_torch_save, cache_dir

FILENAME = "digits_classifier.pt"
# Bumped whenever the architecture or training recipe changes, so stale files are retrained.
FORMAT_VERSION = 1
NUM_CLASSES = 10
FEATURE_DIM = 64


# ---------------------------------------------------------------------- data
def load_digits() -> Tuple[Tensor, Tensor]:
    """The embedded digits: images ``[1797, 1, 8, 8]`` float32 in [−1, 1] and labels ``[1797]`` int64."""
    res = importlib.resources.files("sde_diffusion") / "data" / "assets" / "digits.npz"
    with np.load(io.BytesIO(res.read_bytes())) as z:
        images = torch.from_numpy(z["images"].astype(np.float32))
        labels = torch.from_numpy(z["labels"].astype(np.int64))
    return (images / 16.0 * 2.0 - 1.0).unsqueeze(1), labels


def split_indices(n: int, seed: int = 0, test_fraction: float = 0.2) -> Tuple[Tensor, Tensor]:
    """A fixed random train/held-out split of ``range(n)``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(n * test_fraction))
    return perm[n_test:], perm[:n_test]


def as_images(x: Union[Tensor, np.ndarray]) -> Tensor:
    """Reshape ``[B, 1, 8, 8]``, ``[B, 8, 8]`` or ``[B, 64]`` to ``[B, 1, 8, 8]`` float32.

    Larger square digits ``[B, 1, 8k, 8k]`` (``data=digits data.size=8k``) are area-averaged to 8×8 first.
    """
    t = torch.as_tensor(x)
    if t.dim() == 4 and t.shape[1] == 1 and t.shape[2] == t.shape[3] and t.shape[2] > 8 and t.shape[2] % 8 == 0:
        t = F.avg_pool2d(t.to(torch.float32), t.shape[2] // 8)
    if t.dim() < 2 or t[0].numel() != 64:
        raise ValueError(
            f"digits images must have shape [B, 1, 8, 8], [B, 8, 8] or [B, 64] in [-1, 1]; got {tuple(t.shape)}"
        )
    return t.reshape(t.shape[0], 1, 8, 8).to(torch.float32)


# ---------------------------------------------------------------------- the network
class DigitsNet(nn.Module):
    """conv(1→32) → conv(32→64) → max-pool → linear(1024→64) [features] → linear(64→10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer activations ``[B, 64]`` for images ``[B, 1, 8, 8]``."""
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random shifts by up to one pixel (background −1 fills in) and mild pixel noise."""
    B = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx = torch.randint(0, 3, (B,), generator=gen)
    dy = torch.randint(0, 3, (B,), generator=gen)
    rows = (dy[:, None] + torch.arange(8))[:, :, None].expand(B, 8, 8)
    cols = (dx[:, None] + torch.arange(8))[:, None, :].expand(B, 8, 8)
    out = padded[torch.arange(B)[:, None, None], 0, rows, cols].unsqueeze(1)
    return out + 0.05 * torch.randn(out.shape, generator=gen)


def train_digits_classifier(
    seed: int = 0, epochs: int = 15, batch_size: int = 64, lr: float = 2e-3
) -> Tuple[DigitsNet, float]:
    """Train on the fixed 80 % split; return the network (eval mode, CPU) and its held-out accuracy.

    Runs on one CPU thread: for a network this small, extra threads cost more in synchronisation
    than they gain (tens of times slower on a busy machine).
    """
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(seed, epochs, batch_size, lr)
    finally:
        torch.set_num_threads(n_threads)


def _train(seed: int, epochs: int, batch_size: int, lr: float) -> Tuple[DigitsNet, float]:
    images, labels = load_digits()
    train_idx, test_idx = split_indices(images.shape[0])
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsNet()
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    xtr, ytr = images[train_idx], labels[train_idx]
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(xtr.shape[0], generator=gen)
        for i in range(0, xtr.shape[0], batch_size):
            b = perm[i : i + batch_size]
            loss = F.cross_entropy(net(_augment(xtr[b], gen)), ytr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        acc = (net(images[test_idx]).argmax(1) == labels[test_idx]).double().mean().item()
    return net, float(acc)


# ---------------------------------------------------------------------- stored classifier
@dataclass
class DigitsClassifier:
    """A trained :class:`DigitsNet` with its held-out accuracy (fraction in [0, 1])."""

    net: DigitsNet
    accuracy: float
    path: Optional[Path] = None

    def _prepare(self, x: Union[Tensor, np.ndarray]) -> Tensor:
        imgs = as_images(x)
        dev = next(self.net.parameters()).device
        if imgs.device != dev:
            self.net.to(imgs.device)
        return imgs

    @torch.no_grad()
    def features(self, x: Union[Tensor, np.ndarray], batch_size: int = 2048) -> Tensor:
        """Penultimate features ``[B, 64]`` (float32) of images in [−1, 1]."""
        imgs = self._prepare(x)
        return torch.cat([self.net.features(imgs[i : i + batch_size]) for i in range(0, imgs.shape[0], batch_size)])

    @torch.no_grad()
    def logits(self, x: Union[Tensor, np.ndarray], batch_size: int = 2048) -> Tensor:
        """Class logits ``[B, 10]``."""
        imgs = self._prepare(x)
        return torch.cat([self.net(imgs[i : i + batch_size]) for i in range(0, imgs.shape[0], batch_size)])

    def classify(self, x: Union[Tensor, np.ndarray]) -> Tensor:
        """Predicted labels ``[B]`` int64."""
        return self.logits(x).argmax(1)


def default_classifier_path() -> Path:
    return cache_dir() / FILENAME


def save_classifier(net: DigitsNet, accuracy: float, path: PathLike, seed: int = 0) -> Path:
    state = {
        "format_version": FORMAT_VERSION,
        "state_dict": net.state_dict(),
        "accuracy": float(accuracy),
        "seed": int(seed),
        "torch_version": str(torch.__version__),
    }
    return atomic_torch_save(state, path)


def _load_file(path: Path) -> Optional[DigitsClassifier]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
        return None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        return None
    net = DigitsNet()
    net.load_state_dict(state["state_dict"])
    net.eval()
    return DigitsClassifier(net, float(state["accuracy"]), path)


_LOADED: Dict[str, DigitsClassifier] = {}


def get_classifier(path: Optional[PathLike] = None, *, train_if_missing: bool = True) -> DigitsClassifier:
    """The stored classifier at ``path`` (default: the cache), trained and stored first if absent.

    A file written by an older recipe (``format_version`` mismatch) or an unreadable file counts
    as absent. Loaded classifiers are kept in memory per path.
    """
    target = Path(path).expanduser() if path is not None else default_classifier_path()
    key = str(target.resolve()) if target.exists() else str(target)
    if key in _LOADED:
        return _LOADED[key]
    clf = _load_file(target) if target.exists() else None
    if clf is None:
        if not train_if_missing:
            raise FileNotFoundError(
                f"no digits classifier at {target}; train one with "
                f"`python -m sde_diffusion.evaluation.digits_classifier --out {target}`"
            )
        net, acc = train_digits_classifier()
        save_classifier(net, acc, target)
        clf = DigitsClassifier(net, acc, target)
    _LOADED[str(target.resolve())] = clf
    return clf


# ---------------------------------------------------------------------- metrics
def digits_fd(
    samples: Union[Tensor, np.ndarray],
    reference: Optional[Union[Tensor, np.ndarray]] = None,
    *,
    classifier: Optional[DigitsClassifier] = None,
) -> float:
    """digits-FD: Fréchet distance between Gaussian fits of the classifier features of two image sets.

    Args:
        samples: ``[N, 1, 8, 8]`` (or ``[N, 8, 8]``, ``[N, 64]``) images in [−1, 1], N ≥ 2.
        reference: the same for real images; default all 1797 embedded digits.
        classifier: default :func:`get_classifier` (cached, trained on first use).
    """
    from ..metrics import fid_from_features

    clf = classifier if classifier is not None else get_classifier()
    ref = load_digits()[0] if reference is None else reference
    return fid_from_features(clf.features(samples).double(), clf.features(ref).double())


def classify(samples: Union[Tensor, np.ndarray], *, classifier: Optional[DigitsClassifier] = None) -> Tensor:
    """Predicted digit labels ``[N]`` (int64) for images in [−1, 1]."""
    clf = classifier if classifier is not None else get_classifier()
    return clf.classify(samples)


__all__ = [
    "DigitsNet",
    "DigitsClassifier",
    "load_digits",
    "split_indices",
    "train_digits_classifier",
    "get_classifier",
    "save_classifier",
    "default_classifier_path",
    "digits_fd",
    "classify",
]


# ---------------------------------------------------------------------- command line
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Train the 8×8 digits feature classifier and store it.")
    parser.add_argument("--out", type=Path, default=None, help=f"output file (default {default_classifier_path()})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else default_classifier_path()
    start = time.perf_counter()
    net, acc = train_digits_classifier(seed=args.seed, epochs=args.epochs)
    save_classifier(net, acc, out, seed=args.seed)
    print(f"held-out accuracy {acc:.4f}; trained in {time.perf_counter() - start:.1f} s; saved to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

