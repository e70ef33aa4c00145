r"""``mode=metrics``: sample (resuming an identical earlier sampling run), then compare with real data.

Metrics by data kind, written to ``metrics.json`` next to ``samples.npz``:

* vectors — sliced Wasserstein-2 (``metrics.projections`` directions) and the unbiased MMD²
  (RBF, median-heuristic bandwidths; at most ``metrics.mmd_max`` points a side) against
  ``metrics.num_reference`` fresh reference draws; each with its *floor*, the same metric between
  a second reference set of the samples' size and the first, i.e. what a perfect model scores;
* the 8×8 digits — digits-FD (Fréchet distance in the features of the packaged digits
  classifier, against all 1797 digits) with its floor (a real subset of the same size), and
  the classifier's label histogram of the samples;
* other image sets — FID with the Inception weights when they are present locally; otherwise
  ``fid`` is null and ``fid_unavailable`` says which file to put where.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..config import SampleConfig
from ..io import write_json
from ..registry import MODES
from .runner import BatchHook
from .runtime import Runtime
from .sample_job import SampleJob, from_stored
from .shards import batch_seed


def vector_metrics(samples: torch.Tensor, dm: Any, num_reference: int, projections: int, mmd_max: int, seed: int) -> Dict[str, Any]:
    """SW₂ and MMD² of ``samples [n, D]`` against the data, with their floors (see the module docstring)."""
    from ..metrics import mmd, sliced_wasserstein

    n = samples.shape[0]
    ref = dm.reference(num_reference, generator=torch.Generator().manual_seed(batch_seed(seed, "metrics-ref", 0)))
    ref2 = dm.reference(n, generator=torch.Generator().manual_seed(batch_seed(seed, "metrics-ref", 1)))

    def sw(x: torch.Tensor) -> float:
        return sliced_wasserstein(x, ref, n_projections=projections, generator=torch.Generator().manual_seed(seed))

    m = min(mmd_max, n, num_reference)
    finite = torch.isfinite(samples.reshape(n, -1)).all(1)
    x = samples[finite].double()
    out: Dict[str, Any] = {"num_reference": num_reference, "nonfinite_samples": int((~finite).sum())}
    if x.shape[0] < 2:
        out.update(sliced_wasserstein=None, mmd2=None, note="fewer than 2 finite samples")
        return out
    out["sliced_wasserstein"] = sw(x)
    out["sliced_wasserstein_floor"] = sw(ref2)
    out["mmd2"] = mmd(x[:m], ref[:m]) if m >= 2 else None
    out["mmd2_floor"] = mmd(ref2[:m], ref[:m]) if m >= 2 else None
    out["mmd_points"] = m
    return out


def digits_metrics(samples: torch.Tensor, dm: Any, seed: int) -> Dict[str, Any]:
    """digits-FD against all digits, its floor, and the predicted-label histogram."""
    from ..evaluation.digits_classifier import classify, digits_fd, get_classifier

    clf = get_classifier()
    n = samples.shape[0]
    real = dm.reference(min(n, 1797), generator=torch.Generator().manual_seed(batch_seed(seed, "metrics-ref", 0)))
    labels = classify(samples, classifier=clf)
    return {
        "digits_fd": digits_fd(samples, classifier=clf),
        "digits_fd_floor": digits_fd(real, classifier=clf) if real.shape[0] >= 2 else None,
        "digits_fd_floor_note": f"{real.shape[0]} real digits vs all 1797 (the real set overlaps the reference)",
        "classifier_accuracy": clf.accuracy,
        "label_histogram": np.bincount(labels.cpu().numpy(), minlength=10).tolist(),
    }


def fid_metrics(images01: torch.Tensor, dm: Any, num_reference: int, weights: Optional[str], seed: int, device: torch.device) -> Dict[str, Any]:
    """FID between ``images01 [n, C, H, W]`` in [0, 1] and ``num_reference`` real images, if the weights are here."""
    from ..evaluation.fid import FID
    from ..evaluation.inception import InceptionWeightsMissing

    try:
        fid = FID(weights_path=weights, device=device)
    except InceptionWeightsMissing as err:
        print(f"FID skipped: {err}", file=sys.stderr)
        return {"fid": None, "fid_unavailable": str(err)}
    try:
        real = dm.reference(num_reference, generator=torch.Generator().manual_seed(batch_seed(seed, "metrics-ref", 0)))
    except FileNotFoundError as err:
        print(f"FID skipped: {err}", file=sys.stderr)
        return {"fid": None, "fid_unavailable": f"real images not available: {err}"}
    for k in range(0, real.shape[0], 256):
        fid.update(dm.inverse_scaler(real[k : k + 256]).clamp(0, 1).to(device), real=True)
    for k in range(0, images01.shape[0], 256):
        fid.update(images01[k : k + 256].to(device), real=False)
    return {"fid": fid.compute(), "fid_reference": num_reference}


@MODES.register("metrics")
def run_metrics(cfg: SampleConfig, runtime: Optional[Runtime] = None,
                on_batch_end: Optional[BatchHook] = None) -> Optional[Dict[str, Any]]:
    """Sample (or reuse the shards of an identical run), then compute the metrics; rank 0 returns the report."""
    job = SampleJob(cfg, runtime)
    sampled = job.run(on_batch_end)
    if sampled is None:
        return None
    mc, seed = cfg.metrics, cfg.seed
    with np.load(job.out_dir / "samples.npz") as data:
        stored = data["samples"]
    x = from_stored(stored, job.dm)
    n_ref = int(mc.num_reference or x.shape[0])
    report: Dict[str, Any] = {"mode": "metrics", "output_dir": str(job.out_dir), "n": int(x.shape[0]),
                              "sampler": sampled["sampler"], "checkpoint": sampled["checkpoint"]}
    if not getattr(job.dm, "is_image", False):
        report["vectors"] = vector_metrics(x, job.dm, n_ref, mc.projections, mc.mmd_max, seed)
    elif job.model.train_config.data.get("name") == "digits":
        report["digits"] = digits_metrics(x, job.dm, seed)
    else:
        images01 = torch.as_tensor(stored).permute(0, 3, 1, 2).float() / 255.0
        report["fid"] = fid_metrics(images01, job.dm, n_ref, mc.fid_weights, seed, job.runtime.device)
    report["files"] = {"metrics": str(job.out_dir / "metrics.json"), "samples": str(job.out_dir / "samples.npz")}
    write_json(job.out_dir / "metrics.json", report)
    return report


__all__ = ["vector_metrics", "digits_metrics", "fid_metrics", "run_metrics"]
