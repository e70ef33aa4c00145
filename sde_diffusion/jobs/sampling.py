r"""``mode=sample``: draw ``n`` samples from a checkpoint in resumable, rank-safe batches.

What a run writes into its output directory (default ``<run dir>/samples/<tag>``, see
:func:`output_dir`):

* ``shards/batch_XXXXX.npz`` — one per batch, written atomically (:mod:`.shards`);
* ``samples.npz`` — the merge: ``samples`` (images: uint8 ``[n, H, W, C]`` = round(255·clamp(
  inverse_scaler(x), 0, 1)); vectors: float ``[n, D]`` in data coordinates), ``labels`` int64
  ``[n]`` for class-conditional models and classifier guidance, and for ``task=inpaint|colorize`` also ``observed`` and
  ``masked`` (same layout as ``samples``) and ``mask`` (inpainting, 1 = observed);
* ``samples.png`` — an image grid, or a scatter of the samples beside reference data (vectors);
  ``triptych.png`` — observed / input / completed rows for the conditional tasks;
* ``run.json`` — the resolved config, the checkpoint, sampler and options, NFE per batch and in
  total, seconds, samples/s, device and package versions.

Batch ``b`` draws all of its randomness (prior, sampler noise, replacement noise) from a
generator seeded with ``f(seed, b)`` and its labels are a function of the sample index, so an interrupted run that is started again with the same
command skips the finished batches and ends with exactly the arrays of an uninterrupted run, and
any number of processes produce the same set.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import numpy as np
import torch
from torch import Tensor

from ..config import sampler_settings, to_container
from ..guidance import ClassifierFreeGuidance, ClassifierGuidance
from ..samplers import build_sampler, sample
from ..samplers.defaults import AUTO_SAMPLER, resolve_sampler
from ..score import DataRangeClip
from .checkpoint import LoadedModel, load_guidance_classifier, load_model
from .runtime import Runtime, make_runtime, resolve_dtype, sync, versions, write_json
from .shards import ShardStore, batch_counts, batch_seed, fingerprint, rank_batches
from .tasks import METHODS, TASKS, condition_batch, make_mask

BatchHook = Callable[[int, Mapping[str, np.ndarray]], None]


def _int(cfg: Mapping[str, Any], key: str, minimum: int = 1) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {v!r}")
    return v


@dataclass
class SampleSettings:
    """The validated sampling options of a config (``conf/sample.yaml``)."""

    n: int
    batch_size: int
    seed: int
    sampler: str
    steps: int
    options: Dict[str, Any]
    ema: bool
    dtype: str
    task: str
    mask: str
    method: str
    fixed_noise: bool
    obs_std: float
    mask_ratio: float
    guidance_scale: float
    label: Optional[int]
    classifier: Optional[str]
    classifier_scale: float
    clip_denoised: Any
    progress: bool
    resume: bool
    figures: bool
    keep_shards: bool


def parse_settings(cfg: Mapping[str, Any]) -> SampleSettings:
    """Read and check the sampling keys of ``cfg``; every problem is a ValueError naming the key."""
    if not isinstance(cfg.get("sampler"), Mapping):
        raise ValueError("no sampler: choose one with sampler=<name> (conf/sampler/)")
    name, steps, options = sampler_settings(cfg, cfg.get("steps"))
    if name == AUTO_SAMPLER:
        # Resolved once the model's SDE is known; its options override the rule's choice.
        build_sampler("dpm_solver", **options)
    else:
        build_sampler(name, **options)  # unknown names and options fail here, listing the choices
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    task = cfg.get("task", "sample")
    task = str(task.get("name") if isinstance(task, Mapping) else task)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    inpaint = cfg.get("inpaint") or {}
    method = str(inpaint.get("method", "replace"))
    if method not in METHODS:
        raise ValueError(f"unknown inpaint.method {method!r}; choose one of: {', '.join(METHODS)}")
    guidance = cfg.get("guidance") or {}
    scale = float(guidance.get("scale", 0.0) or 0.0)
    if scale < 0 or not math.isfinite(scale):
        raise ValueError(f"guidance.scale must be a finite number >= 0, got {guidance.get('scale')}")
    classifier = guidance.get("classifier")
    classifier = None if classifier is None or str(classifier).strip() in ("", "None") else str(classifier)
    raw_cscale = guidance.get("classifier_scale", 1.0)
    try:
        classifier_scale = float(1.0 if raw_cscale is None else raw_cscale)
    except (TypeError, ValueError):
        classifier_scale = float("nan")
    if classifier_scale < 0 or not math.isfinite(classifier_scale):
        raise ValueError(f"guidance.classifier_scale must be a finite number >= 0, got {raw_cscale!r}")
    if classifier is None and classifier_scale != 1.0:
        raise ValueError(
            f"guidance.classifier_scale={raw_cscale} has no effect without guidance.classifier=<classifier run or .ckpt> "
            "(for classifier-free guidance use guidance.scale)"
        )
    label = cfg.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int) or label < 0):
        raise ValueError(f"label must be a class index >= 0 or null, got {label!r}")
    resolve_dtype(str(cfg.get("dtype", "float32")))
    clip_denoised = cfg.get("clip_denoised", "auto")
    if clip_denoised not in ("auto", True, False):
        raise ValueError(f"clip_denoised must be auto, true or false, got {clip_denoised!r}")
    seed = cfg.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return SampleSettings(
        n=_int(cfg, "n"),
        batch_size=_int(cfg, "batch_size"),
        seed=seed,
        sampler=name,
        steps=steps,
        options=dict(options),
        ema=bool(cfg.get("ema", True)),
        dtype=str(cfg.get("dtype", "float32")),
        task=task,
        mask=str(cfg.get("mask", "center")),
        method=method,
        fixed_noise=bool(inpaint.get("fixed_noise", False)),
        obs_std=float(inpaint.get("obs_std", 1e-3)),
        mask_ratio=float(inpaint.get("mask_ratio", 0.5)),
        guidance_scale=scale,
        label=label,
        classifier=classifier,
        classifier_scale=classifier_scale,
        clip_denoised=clip_denoised,
        progress=bool(cfg.get("progress", True)),
        resume=bool(cfg.get("resume", True)),
        figures=bool(cfg.get("figures", True)),
        keep_shards=bool(cfg.get("keep_shards", True)),
    )


def output_dir(cfg: Mapping[str, Any], run_dir: Path, tag: str) -> Path:
    """``out`` if given, else ``<run dir>/samples/<tag>``."""
    out = cfg.get("out")
    return Path(str(out)).expanduser() if out else Path(run_dir) / "samples" / tag


def to_stored(x: Tensor, dm: Any) -> np.ndarray:
    """Model-range samples → what ``samples.npz`` holds (see the module docstring)."""
    if getattr(dm, "is_image", x.dim() == 4):
        x01 = torch.nan_to_num(dm.inverse_scaler(x.detach().float().cpu()), nan=0.0).clamp(0, 1)
        return torch.round(x01 * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return dm.inverse_scaler(x.detach().cpu()).numpy()


def from_stored(a: np.ndarray, dm: Any, dtype: torch.dtype = torch.float32) -> Tensor:
    """``samples.npz`` arrays → model range (images: uint8 NHWC → NCHW floats through ``scaler``)."""
    t = torch.as_tensor(a)
    if t.dtype == torch.uint8:
        return dm.scaler(t.permute(0, 3, 1, 2).to(dtype) / 255.0)
    return dm.scaler(t.to(dtype))


class SamplingJob:
    """The sampling run of one config (see the module docstring).

    Args:
        cfg: the composed ``conf/sample.yaml`` (DictConfig or dict).
        runtime: rank/world size/device (default: from the config, see :mod:`.runtime`).
        model: an already loaded checkpoint (default: load ``cfg.ckpt`` onto the runtime's device).
    """

    def __init__(self, cfg: Mapping[str, Any], runtime: Optional[Runtime] = None, model: Optional[LoadedModel] = None) -> None:
        self.cfg = to_container(cfg)
        self.settings = s = parse_settings(self.cfg)
        self.runtime = runtime or make_runtime(self.cfg)
        self.dtype = resolve_dtype(s.dtype)
        self.model = model or load_model(self.cfg.get("ckpt"), self.cfg, self.runtime.device, self.dtype)
        self.dm = self.model.build_datamodule(self.cfg)
        self.default_choice = None
        if s.sampler == AUTO_SAMPLER:
            s.sampler, s.steps, s.options, self.default_choice = resolve_sampler(
                self.model.sde, s.sampler, s.steps, s.options, score="learned")  # always a trained network
            print(f"sampler: {self.default_choice.describe()}; name another with sampler=<name>", flush=True)
        self.sampler_obj = build_sampler(s.sampler, **s.options)
        self.sampler_obj.validate(self.model.sde)
        self.clip_range = self._clip_range()
        self._check_conditioning()
        if self.model.is_latent and s.task != "sample":
            raise ValueError(
                f"task={s.task} conditions on observed pixels, but this is a latent score model (its score is over "
                "autoencoder latents, where a pixel mask has no counterpart); inpaint with a pixel-space model"
            )
        self.classifier = (
            load_guidance_classifier(s.classifier, self.model, s.label, self.runtime.device, self.dtype)
            if s.classifier is not None else None
        )
        self.counts = batch_counts(s.n, s.batch_size)
        self.mask = make_mask(s.mask, self.model.data_shape, s.mask_ratio, s.seed) if s.task == "inpaint" else None
        self.fingerprint_settings = self._fingerprint_settings()
        self.fingerprint = fingerprint(self.fingerprint_settings)
        budget = f"{s.steps}steps" if self.sampler_obj.expected_nfe(1) is not None else "adaptive"  # steps is ignored
        tag = f"{s.task}-{s.sampler}-{budget}-seed{s.seed}-{self.fingerprint[:8]}"
        self.out_dir = output_dir(self.cfg, self.model.run_dir, tag)
        self.store = ShardStore(self.out_dir / "shards", self.fingerprint)
        self._observed: Optional[Tensor] = None
        self._score = self.model.score_model(use_ema=s.ema)

    def _clip_range(self) -> Optional[tuple]:
        """The model-range bounds the data prediction is clamped to (``clip_denoised``), or None.

        ``auto``: with a deterministic default sampler (no ``sampler=`` named) on pixel-space image
        models (the data are bounded: the scaler's image of [0, 1]); not for vector data or latent
        models, whose range is not bounded, and not for a named sampler (``sampler=pc`` stays the
        paper's algorithm; ``clip_denoised=true`` adds it to any sampler).
        """
        mode = self.settings.clip_denoised
        bounded = bool(getattr(self.dm, "is_image", False)) and not self.model.is_latent
        deterministic_default = self.default_choice is not None and not self.settings.options.get("stochastic", False)
        if mode is False or (mode == "auto" and (not bounded or not deterministic_default)):
            return None
        if not bounded:
            raise ValueError("clip_denoised=true needs image data in pixel space (a bounded range); "
                             "use clip_denoised=auto or false for vector data and latent models")
        lo, hi = (float(v) for v in self.dm.scaler(torch.tensor([0.0, 1.0])))
        return (lo, hi)

    # ------------------------------------------------------------------ checks and identity
    @property
    def conditional(self) -> bool:
        return self.model.num_classes is not None

    def _check_conditioning(self) -> None:
        s, k = self.settings, self.model.num_classes
        if k is None:
            # An unconditional model takes a label only to steer a classifier towards it.
            if s.guidance_scale > 0 or (s.label is not None and s.classifier is None):
                what = f"guidance.scale={s.guidance_scale}" if s.guidance_scale > 0 else f"label={s.label}"
                raise ValueError(
                    f"{what} needs a class-conditional model, but {self.model.path} was trained without labels "
                    "(conditioning.class_labels=false); drop the option, train with conditioning.class_labels=true, "
                    "or guide it with a classifier (guidance.classifier=<run> label=<class>)"
                )
            return
        if s.label is not None and s.label >= k:
            raise ValueError(f"label={s.label} is out of range: the model has {k} classes (0..{k - 1})")
        dropout = float((self.model.train_cfg.get("conditioning") or {}).get("label_dropout", 0.0))
        if s.guidance_scale > 0 and dropout <= 0:
            import warnings

            warnings.warn(
                "guidance.scale > 0 but the model was trained with conditioning.label_dropout=0: its null-label "
                "score was never trained, so classifier-free guidance is unreliable",
                stacklevel=2,
            )

    def _fingerprint_settings(self) -> Dict[str, Any]:
        s = self.settings
        out: Dict[str, Any] = {
            "ckpt": str(self.model.path.resolve()), "global_step": self.model.global_step,
            "ema": s.ema and self.model.has_ema, "sampler": s.sampler, "options": s.options, "steps": s.steps,
            "seed": s.seed, "batch_size": s.batch_size, "dtype": s.dtype, "device_type": self.runtime.device.type,
            "task": s.task, "label": s.label, "guidance_scale": s.guidance_scale if self.conditional else None,
        }
        if self.clip_range is not None:
            out["clip_denoised"] = list(self.clip_range)
        if self.classifier is not None:
            # Only present with a classifier, so that the identity of every other run stays as it was.
            out["classifier"] = {"path": str(self.classifier.path.resolve()), "global_step": self.classifier.global_step,
                                 "scale": s.classifier_scale}
        if s.task != "sample":
            # Observed examples are drawn for all n at once, so n decides every batch's input.
            out.update(n=s.n, method=s.method, fixed_noise=s.fixed_noise, obs_std=s.obs_std)
            if self.mask is not None:
                out["mask"] = fingerprint({"mask": self.mask.flatten().tolist()})
        return out

    # ------------------------------------------------------------------ one batch
    def labels(self, batch: int) -> Optional[Tensor]:
        """Class labels of batch ``batch``: ``label`` for all, else the global index mod K (balanced)."""
        return self.labels_for(batch * self.settings.batch_size, self.counts[batch])

    def labels_for(self, start: int, count: int) -> Optional[Tensor]:
        """Labels of the samples ``start … start+count−1`` (None for an unconditional model without a classifier)."""
        if not self.conditional and self.classifier is None:
            return None
        if self.settings.label is not None:
            return torch.full((count,), self.settings.label, dtype=torch.long)
        return torch.arange(start, start + count, dtype=torch.long) % int(self.model.num_classes)

    def score_for(self, labels: Optional[Tensor]) -> Any:
        """The score the sampler sees for ``labels``.

        s_θ(x, t) for an unconditional model; for a class-conditional one classifier-free guidance
        (1 + w) s_θ(x, t, y) − w s_θ(x, t, ∅) with w = ``guidance.scale``; and with a classifier,
        w_c ∇_x log p_φ(y | x, t) (w_c = ``guidance.classifier_scale``) added to either.
        """
        if labels is None:
            return self._score
        y = labels.to(self.runtime.device)
        score = self._score
        if self.conditional:
            score = ClassifierFreeGuidance(score, y=y, scale=self.settings.guidance_scale,
                                           null_label=int(self.model.num_classes))
        if self.classifier is not None:
            score = ClassifierGuidance(score, self.classifier.module, y=y, scale=self.settings.classifier_scale)
        return score

    def observed(self, batch: int) -> Tensor:
        """The real examples batch ``batch`` conditions on (model range), from the data's reference set."""
        if self._observed is None:
            gen = torch.Generator().manual_seed(batch_seed(self.settings.seed, "observed", 0))
            self._observed = self.dm.reference(self.settings.n, generator=gen)
        start = batch * self.settings.batch_size
        return self._observed[start : start + self.counts[batch]]

    def sample_batch(self, batch: int) -> Dict[str, Any]:
        """Draw batch ``batch``: ``{"arrays": {...stored arrays...}, "nfe": int, "seconds": float}``."""
        s, dev = self.settings, self.runtime.device
        count = self.counts[batch]
        gen = torch.Generator(device=dev).manual_seed(batch_seed(s.seed, "sample", batch))
        shape = (count, *self.model.model_shape)
        labels = self.labels(batch)
        score_fn = self.score_for(labels)
        arrays: Dict[str, Any] = {}
        x_T, hook, finish = None, None, None
        if s.task != "sample":
            x_obs = self.observed(batch).to(device=dev, dtype=self.dtype)
            fill = float(self.dm.scaler(torch.tensor(0.5))) if getattr(self.dm, "is_image", False) else 0.0
            cond = condition_batch(s.task, s.method, self.model.sde, score_fn, x_obs, self.mask, gen,
                                   fill=fill, fixed_noise=s.fixed_noise, obs_std=s.obs_std)
            score_fn, hook, x_T, finish = cond.score_fn, cond.hook, cond.x_T, cond.finish
            arrays["observed"] = to_stored(x_obs, self.dm)
            arrays["masked"] = to_stored(cond.masked, self.dm)
        if self.clip_range is not None:
            score_fn = DataRangeClip(score_fn, self.model.sde, *self.clip_range)
        sync(dev)
        t0 = time.perf_counter()
        with torch.no_grad(), self.runtime.autocast():
            result = sample(
                self.model.sde, score_fn, shape, sampler=build_sampler(s.sampler, **s.options), steps=s.steps,
                generator=gen, x_T=x_T, device=dev, dtype=self.dtype, hook=hook,
            )
        x = result.samples if finish is None else finish(result.samples)
        if self.model.is_latent:
            arrays["latents"] = x.float().cpu().numpy()
            with torch.no_grad():
                x = self.model.module.to_data(x)
        sync(dev)
        seconds = time.perf_counter() - t0
        arrays["samples"] = to_stored(x, self.dm)
        if labels is not None:
            arrays["labels"] = labels.numpy()
        arrays["nonfinite"] = (~torch.isfinite(x.reshape(count, -1)).all(1)).cpu().numpy()
        return {"arrays": arrays, "nfe": int(result.nfe), "seconds": seconds}

    # ------------------------------------------------------------------ the loop
    def prepare(self) -> None:
        """Rank 0: create the shard directory and record the plan (call before :meth:`run_batches`)."""
        s = self.settings
        self.store.prepare(
            {"n": s.n, "batch_size": s.batch_size, "counts": self.counts, "settings": self.fingerprint_settings},
            resume=s.resume,
        )

    def run_batches(
        self, rank: Optional[int] = None, world_size: Optional[int] = None, on_batch_end: Optional[BatchHook] = None
    ) -> List[int]:
        """Draw and store this rank's unfinished batches; returns the indices drawn now.

        ``rank``/``world_size`` default to the runtime's (pass them to simulate a split).
        ``on_batch_end(batch, arrays)`` runs after each shard is on disk.
        """
        rank = self.runtime.rank if rank is None else rank
        world_size = self.runtime.world_size if world_size is None else world_size
        mine = rank_batches(len(self.counts), rank, world_size)
        self.store.clean_stale(mine)
        todo = [b for b in mine if not self.store.is_done(b, self.counts[b])]
        bar = None
        if self.settings.progress and rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"sampling ({self.settings.sampler})",
                       unit="batch", file=sys.stderr, dynamic_ncols=True)
        done: List[int] = []
        start, drawn = time.perf_counter(), 0
        try:
            for b in todo:
                out = self.sample_batch(b)
                self.store.write(b, out["arrays"], self.counts[b], out["nfe"], out["seconds"])
                done.append(b)
                drawn += self.counts[b]
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(samples_per_s=f"{drawn / max(time.perf_counter() - start, 1e-9):.3g}", nfe=out["nfe"])
                if on_batch_end is not None:
                    on_batch_end(b, out["arrays"])
        finally:
            if bar is not None:
                bar.close()
        return done

    # ------------------------------------------------------------------ merge and report
    def finalize(self, wall_seconds: float = float("nan"), drawn: Optional[List[int]] = None) -> Dict[str, Any]:
        """Merge the shards into ``samples.npz``, draw the figures, write ``run.json``; returns its content."""
        s = self.settings
        extra: Dict[str, Any] = {}
        if self.mask is not None:
            m = self.mask
            extra["mask"] = (m.permute(1, 2, 0) if m.dim() == 3 else m).to(torch.uint8).numpy()
        merged = self.store.merge(self.counts, self.out_dir / "samples.npz", extra=extra, exclude=("nonfinite",))
        arrays = merged["arrays"]
        nonfinite = int(arrays.pop("nonfinite").sum())
        files = {"samples": str(self.out_dir / "samples.npz")}
        if s.figures:
            files.update(self._figures(arrays))
        if not s.keep_shards:
            import shutil

            shutil.rmtree(self.store.root, ignore_errors=True)
        seconds = float(sum(merged["seconds"]))
        report = {
            "mode": "sample",
            "command": " ".join(sys.argv),
            "output_dir": str(self.out_dir),
            "files": files,
            "checkpoint": {"path": str(self.model.path), "global_step": self.model.global_step,
                           "ema": s.ema and self.model.has_ema},
            "training": {k: self.model.train_cfg.get(k) for k in ("sde", "model", "data", "loss", "conditioning")},
            "sampler": {"name": s.sampler, "steps": s.steps, "options": s.options,
                        "expected_nfe_per_batch": self.sampler_obj.expected_nfe(s.steps),
                        "default_rule": self.default_choice.as_dict() if self.default_choice is not None else None,
                        "clip_denoised": list(self.clip_range) if self.clip_range is not None else None},
            "task": s.task,
            "guidance": self._guidance_report(),
            "n": s.n,
            "batch_size": s.batch_size,
            "batches": len(self.counts),
            "batches_drawn_this_run": len(drawn) if drawn is not None else None,
            "nfe": {"per_batch": merged["nfe"], "total": int(sum(merged["nfe"]))},
            "seconds": {"sampling": seconds, "per_batch": merged["seconds"], "wall_this_run": wall_seconds},
            "samples_per_second": s.n / seconds if seconds > 0 else None,
            "nonfinite_samples": nonfinite,
            "shape": list(arrays["samples"].shape),
            "dtype": str(arrays["samples"].dtype),
            "runtime": self.runtime.describe(),
            "fingerprint": self.fingerprint,
            "versions": versions(),
            "config": self.cfg,
        }
        write_json(self.out_dir / "run.json", report)
        return report

    def _guidance_report(self) -> Dict[str, Any]:
        s, clf = self.settings, self.classifier
        return {
            "label": s.label,
            "scale": s.guidance_scale if self.conditional else None,
            "classifier": None if clf is None else {"path": str(clf.path), "global_step": clf.global_step,
                                                    "num_classes": clf.num_classes, "scale": s.classifier_scale},
        }

    def _figures(self, arrays: Mapping[str, np.ndarray]) -> Dict[str, str]:
        from .. import plots

        s, out = self.settings, {}
        x = arrays["samples"]
        title = f"{s.sampler}, {s.steps} steps, step {self.model.global_step}"
        if x.dtype == np.uint8:
            k = min(64, x.shape[0])
            out["grid"] = str(plots.save_image_grid(x[:k], self.out_dir / "samples.png", nrow=min(8, k), title=title))
        else:
            ref = self.dm.reference(min(x.shape[0], 5000), generator=torch.Generator().manual_seed(batch_seed(s.seed, "figure", 0)))
            out["scatter"] = str(plots.save_scatter(x, self.dm.inverse_scaler(ref), self.out_dir / "samples.png", title=title))
        if s.task != "sample" and x.dtype == np.uint8:
            out["triptych"] = str(plots.save_triptych(arrays["observed"], arrays["masked"], x, self.out_dir / "triptych.png",
                                                      title=f"{s.task} ({s.method})"))
        return out


def execute(job: SamplingJob, on_batch_end: Optional[BatchHook] = None) -> Optional[Dict[str, Any]]:
    """Prepare, draw this rank's batches, wait for all ranks, merge on rank 0 (returns its report)."""
    wall = time.perf_counter()
    rt = job.runtime
    if rt.is_main:
        job.prepare()
    rt.barrier()
    drawn = job.run_batches(on_batch_end=on_batch_end)
    rt.barrier()
    if not rt.is_main:
        return None
    return job.finalize(wall_seconds=time.perf_counter() - wall, drawn=drawn)


def run_sample(
    cfg: Mapping[str, Any], runtime: Optional[Runtime] = None, on_batch_end: Optional[BatchHook] = None
) -> Optional[Dict[str, Any]]:
    """The whole ``mode=sample`` run on every rank; rank 0 returns the ``run.json`` content, others None."""
    return execute(SamplingJob(cfg, runtime), on_batch_end)


__all__ = ["SampleSettings", "parse_settings", "output_dir", "to_stored", "from_stored", "SamplingJob", "execute", "run_sample"]
