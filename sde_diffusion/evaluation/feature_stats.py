r"""Feature networks for FID / IS / KID behind one interface, and the cache of real-data statistics.

An *evaluator* maps images ``[B, C, H, W]`` in [0, 1] to features ``[B, F]`` (for FID and KID) and
class probabilities ``[B, K]`` (for IS):

* :class:`InceptionEvaluator` — the TensorFlow FID Inception graph (:mod:`.inception`; pool-3
  features, 2048; softmax over 1008 classes without the output bias, as the original IS code);
* :class:`DigitsEvaluator` — the packaged 8×8 digits classifier (64 features, 10 classes).

Each has a ``digest`` of its weights. :func:`reference_statistics` computes the real data's
feature mean and covariance (plus up to ``KID_REFERENCE_MAX`` feature rows for KID) once and stores
them in ``<cache>/reference_stats/<name>-n<N>-<data digest>-<weights digest>.npz``; a later run
with the same data (by the sha256 of its 8-bit pixels) and the same feature network loads them
instead of passing the real images through the network again.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from torch import Tensor

from ..io import atomic_path, sha256_file
from .cache import PathLike, cache_dir

KID_REFERENCE_MAX = 10_000
FID_RELIABLE_N = 10_000


class InceptionEvaluator:
    """FID Inception features and IS probabilities of images in [0, 1] (see :mod:`.inception` for the file)."""

    name = "inception"

    def __init__(self, weights_path: Optional[PathLike] = None, device: Optional[torch.device] = None,
                 batch_size: int = 100) -> None:
        from .inception import InceptionFeatures

        self.net = InceptionFeatures(weights_path)
        self.device = torch.device(device or "cpu")
        self.net.to(self.device)
        self.batch_size = int(batch_size)
        self.digest = sha256_file(Path(self.net.weights_path))

    def _batches(self, images01: Tensor) -> Iterable[Tensor]:
        for k in range(0, images01.shape[0], self.batch_size):
            yield images01[k: k + self.batch_size].to(self.device)

    @torch.no_grad()
    def features(self, images01: Tensor) -> Tensor:
        return torch.cat([self.net(b).double().cpu() for b in self._batches(images01)])

    @torch.no_grad()
    def probabilities(self, images01: Tensor) -> Tensor:
        return torch.cat([self.net.probabilities(b).double().cpu() for b in self._batches(images01)])


class DigitsEvaluator:
    """The digits classifier's features and class probabilities of 8×8 digits in [0, 1]."""

    name = "digits"

    def __init__(self) -> None:
        from .digits_classifier import get_classifier

        self.clf = get_classifier()
        buf = io.BytesIO()
        torch.save({k: v.cpu() for k, v in self.clf.net.state_dict().items()}, buf)
        self.digest = hashlib.sha256(buf.getvalue()).hexdigest()

    def features(self, images01: Tensor) -> Tensor:
        return self.clf.features(images01 * 2 - 1).double()

    def probabilities(self, images01: Tensor) -> Tensor:
        return torch.softmax(self.clf.logits(images01 * 2 - 1).double(), dim=1)


@dataclass
class ReferenceStats:
    """Real-data statistics: mean ``[F]``, covariance ``[F, F]`` (float64), KID rows ``[≤ 10k, F]``."""

    mu: Tensor
    sigma: Tensor
    kid_features: Tensor
    n: int
    path: Path
    loaded: bool


def _digest_images(chunks: Iterable[Tensor], keep_uint8: bool) -> tuple:
    h = hashlib.sha256()
    kept = []
    for c in chunks:
        u8 = torch.round(c.clamp(0, 1) * 255).to(torch.uint8)
        h.update(u8.contiguous().numpy().tobytes())
        # Inception sees 8-bit pixels anyway: a quarter of the memory for 50k CIFAR-10 images.
        kept.append(u8 if keep_uint8 else c)
    return h.hexdigest(), kept


def reference_statistics(evaluator, name: str, chunks: Callable[[], Iterable[Tensor]], n: int,
                         cache: Optional[PathLike] = None) -> ReferenceStats:
    """The statistics of ``n`` real images (``chunks()`` yields them in [0, 1], ``[b, C, H, W]`` each),
    from the cache when the same data (digest of their 8-bit pixels) and feature network were seen before."""
    keep_uint8 = evaluator.name == "inception"
    data_digest, kept = _digest_images(chunks(), keep_uint8)
    root = Path(cache).expanduser() if cache is not None else cache_dir() / "reference_stats"
    path = root / f"{name}-n{n}-{data_digest[:16]}-{evaluator.name}-{evaluator.digest[:16]}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                return ReferenceStats(torch.from_numpy(z["mu"]), torch.from_numpy(z["sigma"]),
                                      torch.from_numpy(z["kid_features"]), int(z["n"]), path, True)
        except (OSError, ValueError, KeyError):
            pass  # an unreadable file is recomputed and replaced
    from ..metrics import gaussian_stats

    feats = torch.cat([evaluator.features(c.float() / 255 if keep_uint8 else c) for c in kept])
    mu, sigma = gaussian_stats(feats)
    kid = feats[:KID_REFERENCE_MAX].to(torch.float32)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, mu=mu.numpy(), sigma=sigma.numpy(), kid_features=kid.numpy(), n=np.int64(feats.shape[0]),
                 data_sha256=np.bytes_(data_digest), weights_sha256=np.bytes_(evaluator.digest))
    return ReferenceStats(mu, sigma, kid, int(feats.shape[0]), path, False)


def image_scores(evaluator, samples01: Tensor, ref: ReferenceStats, seed: int = 0, prefix: str = "") -> dict:
    """FID, IS and KID of ``samples01`` ``[n, C, H, W]`` against ``ref`` (keys prefixed by ``prefix``)."""
    from ..metrics import frechet_distance, gaussian_stats
    from .scores import inception_score, kernel_inception_distance

    feats = evaluator.features(samples01)
    mu, sigma = gaussian_stats(feats)
    is_mean, is_std = inception_score(evaluator.probabilities(samples01), splits=10)
    kid, kid_std = kernel_inception_distance(feats, ref.kid_features.double(), generator=torch.Generator().manual_seed(seed))
    return {f"{prefix}fid": frechet_distance(mu, sigma, ref.mu, ref.sigma), f"{prefix}is": is_mean,
            f"{prefix}is_std": is_std, f"{prefix}kid": kid, f"{prefix}kid_std": kid_std}


__all__ = ["InceptionEvaluator", "DigitsEvaluator", "ReferenceStats", "reference_statistics", "image_scores",
           "KID_REFERENCE_MAX", "FID_RELIABLE_N"]
