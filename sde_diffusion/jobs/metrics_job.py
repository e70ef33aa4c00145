r"""``mode=metrics``: sample (resuming an identical earlier sampling run), then compare with real data.

Metrics by data kind, written to ``metrics.json`` next to ``samples.npz``:

* vectors — sliced Wasserstein-2 (``metrics.projections`` directions) and the unbiased MMD²
  (RBF, median-heuristic bandwidths; at most ``metrics.mmd_max`` points a side) against
  ``metrics.num_reference`` fresh reference draws; each with its *floor*, the same metric between
  a second reference set of the samples' size and the first, i.e. what a perfect model scores;
* the 8×8 digits — digits-FD (Fréchet distance in the features of the packaged digits
  classifier, against all 1797 digits) with its floor (a real subset of the same size), the
  classifier's IS (and the real digits' IS) and KID, and its label histogram of the samples;
* other image sets — FID, IS and KID with the Inception weights when they are present locally,
  against the whole training set by default (the paper's protocol; ``metrics.num_reference``
  for fewer), with the real statistics cached per data digest and weights digest
  (:mod:`sde_diffusion.evaluation.feature_stats`); a warning below n = 10k, where FID is biased
  upward. Without the weights ``fid`` is null and ``fid_unavailable`` says which file to put where.

``checkpoints=all`` evaluates every saved checkpoint of the run (``<run>/metrics_sweep/<settings>/``,
one JSON per step written as it finishes, so a rerun resumes) and reports the best, as the paper
chose its checkpoints.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch

from ..config import SampleConfig
from ..io import write_json
from ..registry import MODES
from .runner import BatchHook
from .runtime import Runtime
from .sample_job import SampleJob, from_stored
from .shards import batch_seed, fingerprint


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
    """digits-FD against all digits, its floor, the classifier's IS and KID, and the predicted-label histogram."""
    from ..evaluation.digits_classifier import classify, digits_fd, get_classifier, load_digits
    from ..evaluation.feature_stats import DigitsEvaluator
    from ..evaluation.scores import inception_score, kernel_inception_distance

    clf = get_classifier()
    n = samples.shape[0]
    real = dm.reference(min(n, 1797), generator=torch.Generator().manual_seed(batch_seed(seed, "metrics-ref", 0)))
    labels = classify(samples, classifier=clf)
    ev = DigitsEvaluator()
    s01, all01 = (samples.float() + 1) / 2, (load_digits()[0] + 1) / 2
    is_mean, is_std = inception_score(ev.probabilities(s01), splits=10)
    real_is, _ = inception_score(ev.probabilities(all01), splits=10)
    kid, kid_std = kernel_inception_distance(ev.features(s01), ev.features(all01),
                                             generator=torch.Generator().manual_seed(seed))
    return {
        "digits_fd": digits_fd(samples, classifier=clf),
        "digits_fd_floor": digits_fd(real, classifier=clf) if real.shape[0] >= 2 else None,
        "digits_fd_floor_note": f"{real.shape[0]} real digits vs all 1797 (the real set overlaps the reference)",
        "digits_is": is_mean, "digits_is_std": is_std, "digits_is_real": real_is,
        "digits_kid": kid, "digits_kid_std": kid_std,
        "classifier_accuracy": clf.accuracy,
        "label_histogram": np.bincount(labels.cpu().numpy(), minlength=10).tolist(),
    }


def reference_size(dm: Any) -> int:
    """How many real examples the data module's reference pool holds (the training set for images)."""
    if hasattr(dm, "_reference_pool"):
        return len(dm._reference_pool())
    raise ValueError(f"{type(dm).__name__} has no finite reference set; give metrics.num_reference")


def reference_chunks(dm: Any, n: int, seed: int, chunk: int = 1000) -> Iterator[torch.Tensor]:
    """``n`` distinct real images in [0, 1], ``chunk`` at a time (the order ``dm.reference`` draws them in)."""
    from ..data.datamodule import fetch

    pool = dm._reference_pool()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(pool), generator=gen)[:n].tolist()
    transform = dm._transform(train=False)
    for k in range(0, n, chunk):
        raw = fetch(pool, idx[k: k + chunk])
        yield dm.inverse_scaler(transform(raw.x, gen)).clamp(0, 1)


def fid_metrics(images01: torch.Tensor, dm: Any, num_reference: Optional[int], weights: Optional[str], seed: int,
                device: torch.device, stats_cache: Optional[str] = None) -> Dict[str, Any]:
    """FID, IS and KID of ``images01 [n, C, H, W]`` in [0, 1] against the real images, if the Inception weights are
    here. The real statistics come from the cache when this data set and these weights were seen before."""
    from ..evaluation.feature_stats import FID_RELIABLE_N, InceptionEvaluator, image_scores, reference_statistics
    from ..evaluation.inception import InceptionWeightsMissing

    try:
        evaluator = InceptionEvaluator(weights, device=device)
    except InceptionWeightsMissing as err:
        print(f"FID skipped: {err}", file=sys.stderr)
        return {"fid": None, "fid_unavailable": str(err)}
    try:
        n_ref = int(num_reference) if num_reference else reference_size(dm)
        ref_seed = batch_seed(seed, "metrics-ref", 0)
        name = str(getattr(dm, "name", type(dm).__name__))
        ref = reference_statistics(evaluator, name, lambda: reference_chunks(dm, n_ref, ref_seed), n_ref, cache=stats_cache)
    except (FileNotFoundError, ValueError) as err:
        print(f"FID skipped: {err}", file=sys.stderr)
        return {"fid": None, "fid_unavailable": f"real images not available: {err}"}
    out: Dict[str, Any] = image_scores(evaluator, images01, ref, seed=seed)
    out.update({"fid_reference": ref.n, "reference_stats": str(ref.path), "reference_stats_cached": ref.loaded,
                "inception_sha256": evaluator.digest})
    if images01.shape[0] < FID_RELIABLE_N:
        note = (f"n={images01.shape[0]} < {FID_RELIABLE_N}: FID is biased upward at small n (the paper's protocol uses "
                "50k samples); compare FIDs only at equal n, or use KID, which is unbiased")
        print(f"warning: {note}", file=sys.stderr)
        out["warning"] = note
    return out


def evaluate_checkpoint(cfg: SampleConfig, runtime: Optional[Runtime] = None,
                        on_batch_end: Optional[BatchHook] = None) -> Optional[Dict[str, Any]]:
    """Sample from ``cfg.ckpt`` (or reuse the shards of an identical run), then compute the metrics."""
    job = SampleJob(cfg, runtime)
    sampled = job.run(on_batch_end)
    if sampled is None:
        return None
    mc, seed = cfg.metrics, cfg.seed
    with np.load(job.out_dir / "samples.npz") as data:
        stored = data["samples"]
    x = from_stored(stored, job.dm)
    report: Dict[str, Any] = {"mode": "metrics", "output_dir": str(job.out_dir), "n": int(x.shape[0]),
                              "sampler": sampled["sampler"], "checkpoint": sampled["checkpoint"],
                              "global_step": int(job.model.global_step)}
    if not getattr(job.dm, "is_image", False):
        n_ref = int(mc.num_reference or x.shape[0])
        report["vectors"] = vector_metrics(x, job.dm, n_ref, mc.projections, mc.mmd_max, seed)
    elif job.model.train_config.data.get("name") == "digits":
        report["digits"] = digits_metrics(x, job.dm, seed)
    else:
        images01 = torch.as_tensor(stored).permute(0, 3, 1, 2).float() / 255.0
        report["fid"] = fid_metrics(images01, job.dm, mc.num_reference, mc.fid_weights, seed, job.runtime.device,
                                    mc.stats_cache)
    report["files"] = {"metrics": str(job.out_dir / "metrics.json"), "samples": str(job.out_dir / "samples.npz")}
    write_json(job.out_dir / "metrics.json", report)
    return report


#: the number each kind of report is ranked by in a sweep (lower is better)
PRIMARY = (("fid", "fid"), ("digits", "digits_fd"), ("vectors", "sliced_wasserstein"))


def primary_metric(report: Mapping[str, Any]) -> Tuple[str, Optional[float]]:
    """(name, value) of the number a sweep ranks ``report`` by: FID, digits-FD or sliced W₂."""
    for section, key in PRIMARY:
        if isinstance(report.get(section), Mapping):
            value = report[section].get(key)
            return key, None if value is None else float(value)
    return "none", None


def sweep_checkpoints(run_dir: Path) -> List[Tuple[int, Path]]:
    """(step, file) of every saved checkpoint of a run, by step; ``last.ckpt`` only when its step has no file of its own."""
    from .. import checkpoints

    found: Dict[int, Path] = {}
    for f in sorted((run_dir / "checkpoints").glob("step_*.ckpt")):
        found[checkpoints.read(f, kind="score").global_step] = f
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        step = checkpoints.read(last, kind="score").global_step
        found.setdefault(step, last)
    if not found:
        raise ValueError(f"no checkpoints in {run_dir / 'checkpoints'}; checkpoints=all sweeps a training run's saved "
                         "checkpoints (train with callbacks.checkpoint.every_n_steps=N to keep one every N steps)")
    return sorted(found.items())


def run_sweep(cfg: SampleConfig, runtime: Optional[Runtime] = None,
              on_batch_end: Optional[BatchHook] = None) -> Optional[Dict[str, Any]]:
    """``checkpoints=all``: the metrics of every saved checkpoint of the run, each stored as it finishes (a rerun
    skips the finished ones and resumes the interrupted one's batches), and the best by the primary metric."""
    from ..checkpoints import resolve_checkpoint_path, run_dir_of

    run_dir = run_dir_of(resolve_checkpoint_path(cfg.ckpt))
    files = sweep_checkpoints(run_dir)
    settings = {"sampler": cfg.sampler, "steps": cfg.sampler_steps, "n": cfg.n, "seed": cfg.seed, "ema": cfg.ema,
                "schedule": cfg.schedule, "clip": cfg.clip_denoised, "metrics": dataclasses.asdict(cfg.metrics),
                "guidance": dataclasses.asdict(cfg.guidance), "label": cfg.label, "dtype": cfg.dtype}
    name = str(cfg.sampler.get("name") or "custom")
    sweep_dir = Path(cfg.out).expanduser() if cfg.out else (
        run_dir / "metrics_sweep" / f"{name}-{cfg.sampler_steps}steps-n{cfg.n}-seed{cfg.seed}-{fingerprint(settings)[:8]}")
    print(f"sweep: {len(files)} checkpoints of {run_dir} (steps {', '.join(str(s) for s, _ in files)}) -> {sweep_dir}",
          flush=True)
    rows: List[Dict[str, Any]] = []
    for step, file in files:
        result = sweep_dir / f"step_{step:07d}.json"
        if result.is_file():
            report = json.loads(result.read_text())
            print(f"step {step}: done before ({result})", flush=True)
        else:
            report = evaluate_checkpoint(dataclasses.replace(cfg, ckpt=str(file), checkpoints=None,
                                                             out=str(sweep_dir / f"step_{step:07d}")), runtime, on_batch_end)
            if report is None:  # not rank 0
                continue
            write_json(result, report)
        key, value = primary_metric(report)
        rows.append({"step": step, "checkpoint": str(file), key: value, "report": str(result)})
        print(f"step {step}: {key} = {value}", flush=True)
    if not rows:
        return None
    key = primary_metric(json.loads(Path(rows[0]["report"]).read_text()))[0]
    scored = [r for r in rows if r.get(key) is not None]
    best = min(scored, key=lambda r: r[key]) if scored else None
    summary = {"mode": "metrics", "checkpoints": "all", "output_dir": str(sweep_dir), "run_dir": str(run_dir),
               "metric": key, "rows": rows,
               "best": best, "settings": settings}
    write_json(sweep_dir / "sweep.json", summary)
    if best is not None:
        print(f"best: step {best['step']} with {key} = {best[key]:.6g} ({best['checkpoint']})", flush=True)
    return summary


@MODES.register("metrics")
def run_metrics(cfg: SampleConfig, runtime: Optional[Runtime] = None,
                on_batch_end: Optional[BatchHook] = None) -> Optional[Dict[str, Any]]:
    """Sample (or reuse the shards of an identical run), then compute the metrics; rank 0 returns the report.
    With ``checkpoints=all``, every saved checkpoint of the run (:func:`run_sweep`)."""
    if cfg.checkpoints == "all":
        return run_sweep(cfg, runtime, on_batch_end)
    return evaluate_checkpoint(cfg, runtime, on_batch_end)


__all__ = ["vector_metrics", "digits_metrics", "fid_metrics", "evaluate_checkpoint", "run_sweep", "sweep_checkpoints",
           "primary_metric", "reference_size", "reference_chunks", "run_metrics"]
