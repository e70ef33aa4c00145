r"""``mode=sample``: draw ``n`` samples from a checkpoint, in the runner's resumable, rank-split batches.

What a run writes into its output directory (default ``<run dir>/samples/<tag>``):

* ``shards/batch_XXXXX.npz`` — one per batch, written atomically (:mod:`.runner`, :mod:`.shards`);
* ``samples.npz`` — the merge: ``samples`` (images: uint8 ``[n, H, W, C]`` = round(255·clamp(
  inverse_scaler(x), 0, 1)); vectors: float ``[n, D]`` in data coordinates), ``labels`` int64
  ``[n]`` for class-conditional models and classifier guidance, ``latents`` for latent models, and
  for ``task=inpaint|colorize`` also ``observed`` and ``masked`` (same layout as ``samples``) and
  ``mask`` (inpainting, 1 = observed);
* ``samples.png`` — an image grid, or a scatter of the samples beside reference data (vectors);
  ``triptych.png`` — observed / input / completed rows for the conditional tasks;
* ``run.json`` — the resolved config, the checkpoint, sampler and options, NFE per batch and in
  total, seconds, samples/s, device and package versions.

The sampler is chosen (``sampler=auto``: the measured default for the SDE and the budget) and
built once per run; batch ``b`` draws all of its randomness (prior, sampler noise, replacement
noise) from the runner's generator for ``b`` and its labels are a function of the sample index, so
an interrupted run started again with the same command ends with exactly the arrays of an
uninterrupted one, and any number of processes produce the same set.
"""
from __future__ import annotations

import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import plots
from ..config import SampleConfig, to_plain
from ..guidance import ClassifierFreeGuidance, ClassifierGuidance, ContextGuidance
from ..io import write_json
from ..registry import MODES, SAMPLE_TASKS
from ..samplers import build_sampler, make_sampler, sample
from ..samplers.defaults import DefaultChoice, fill_tuned, tuned_table
from ..samplers.sampler import _check_steps, is_deterministic
from ..score import DataRangeClip
from .model import LoadedClassifier, LoadedModel, ModelJob, load_guidance_classifier
from .runner import BatchHook, Progress, Runner, RunResult, batch_generator
from .runtime import Runtime, versions
from .shards import batch_seed, fingerprint


# ---------------------------------------------------------------------------------- stored form
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


# ---------------------------------------------------------------------------------- the sampler
@dataclass
class SamplerChoice:
    """The sampler of a run, built once: the instance, its registry ``name`` (or import path),
    ``steps``, constructor ``options``, and the default rule's choice when none was named."""

    sampler: Any
    name: str
    steps: int
    options: Dict[str, Any]
    default_rule: Optional[DefaultChoice]
    tuned: Optional[str] = None  # the named sampler's measured-best table its `auto` options came from


def choose_sampler(sde: Any, cfg: SampleConfig) -> SamplerChoice:
    """The sampler ``cfg.sampler`` names for ``sde`` (``auto``: the measured default for a trained
    network and the budget ``steps``, its options overridden by the group's), built and checked
    (:func:`~sde_diffusion.samplers.make_sampler`; ``sampler._target_`` names a class of the user's)."""
    name, steps, options = cfg.sampler_name, cfg.sampler_steps, cfg.sampler_options
    tuned = options.get("tuned") if name != "auto" else None
    if tuned is not None:  # sampler=<name>: its `auto` options become the measured best for this budget
        options = fill_tuned(sde, name, _check_steps(steps), options, "learned", build=build_sampler)
    sampler, steps, rule = make_sampler(sde, name, steps, options, score_kind="learned")  # a trained network
    if rule is not None:  # what the rule chose, with the group's options on top (as make_sampler built it)
        name, options = rule.name, {**rule.options, **options}
    return SamplerChoice(sampler, name, steps, dict(options), rule, tuned)


# ---------------------------------------------------------------------------------- the job
class SampleJob(ModelJob):
    """The sampling run of one config: the payload the :class:`~.runner.Runner` draws batches of.

    Args:
        cfg: the parsed config.
        runtime: rank/world size/device (default: from the config, see :mod:`.runtime`).
        model: an already loaded checkpoint (default: load ``cfg.ckpt`` onto the runtime's device).
    """

    purpose = "sample"

    def __init__(self, cfg: SampleConfig, runtime: Optional[Runtime] = None, model: Optional[LoadedModel] = None) -> None:
        super().__init__(cfg, runtime, model)
        self.choice = choose_sampler(self.model.sde, cfg)
        if self.choice.default_rule is not None:
            print(f"sampler: {self.choice.default_rule.describe()}; name another with sampler=<name>", flush=True)
        self.desc = f"sampling ({self.choice.name})"
        self.clip_range = self._clip_range()
        self._check_conditioning()
        task_class = SAMPLE_TASKS.get(cfg.task)
        if self.model.is_latent and task_class.observes:
            raise ValueError(
                f"task={cfg.task} conditions on observed pixels, but this is a latent score model (its score is over "
                "autoencoder latents, where a pixel mask has no counterpart); inpaint with a pixel-space model"
            )
        self.classifier: Optional[LoadedClassifier] = (
            load_guidance_classifier(cfg.guidance.classifier, self.model, cfg.label, self.runtime.device, self.dtype)
            if cfg.guidance.classifier is not None else None
        )
        self.prompts = self._prompts()
        self.task = task_class.from_config(cfg, self.model.data_shape)
        self.schedule = self._schedule() if cfg.schedule is not None else None
        self.settings = self._identity()
        self.fingerprint = fingerprint(self.settings)
        budget = f"{self.choice.steps}steps" if self.choice.sampler.expected_nfe(1) is not None else "adaptive"  # steps is ignored
        tag = f"{cfg.task}-{self.choice.name}-{budget}-seed{cfg.seed}-{self.fingerprint[:8]}"
        self.out_dir = Path(cfg.out).expanduser() if cfg.out else self.model.run_dir / "samples" / tag
        self.total = cfg.n * (len(self.prompts) if self.prompts else 1)
        self.runner = Runner(self, self.out_dir / "shards", self.fingerprint, n=self.total, batch_size=cfg.batch_size,
                             seed=cfg.seed, runtime=self.runtime, settings=self.settings, resume=cfg.resume,
                             progress=cfg.progress)
        self._observed: Optional[Tensor] = None
        self._score = self.model.score_model(use_ema=cfg.ema)

    def _clip_range(self) -> Optional[Tuple[float, float]]:
        """The model-range bounds the data prediction is clamped to (``clip_denoised``), or None.

        ``auto``: with a deterministic default sampler (no ``sampler=`` named) on pixel-space image
        models (the data are bounded: the scaler's image of [0, 1]); not for vector data or latent
        models, whose range is not bounded, and not for a named sampler (``sampler=pc`` stays the
        paper's algorithm; ``clip_denoised=true`` adds it to any sampler).
        """
        mode = self.cfg.clip_denoised
        bounded = bool(getattr(self.dm, "is_image", False)) and not self.model.is_latent
        measured = self.choice.default_rule is not None or self.choice.tuned is not None
        deterministic_default = measured and is_deterministic(self.choice.sampler, self.model.sde)
        if mode is False or (mode == "auto" and (not bounded or not deterministic_default)):
            return None
        if not bounded:
            raise ValueError("clip_denoised=true needs image data in pixel space (a bounded range); "
                             "use clip_denoised=auto or false for vector data and latent models")
        lo, hi = (float(v) for v in self.dm.scaler(torch.tensor([0.0, 1.0])))
        return (lo, hi)

    def _schedule(self) -> Dict[str, Any]:
        """Put the sampler on a grid fitted to this model (``schedule=fit``, stored and reused) or read from a file;
        returns what run.json records about it."""
        from ..latent import weights_digest
        from ..samplers.fitted import (DEFAULT_OBJECTIVES, FittedSchedule, check_times, fit_batch, fit_schedule,
                                       schedule_key)

        cfg, c, model = self.cfg, self.choice, self.model
        score = model.score_model(use_ema=cfg.ema)
        net = getattr(score.net, "net", score.net)  # an inference wrapper holds the module
        digest = weights_digest(net.state_dict())
        if cfg.schedule == "fit":
            objective = cfg.schedule_objective or DEFAULT_OBJECTIVES["learned"]
            key = schedule_key(c.name, c.options, c.steps, digest, objective)
            path = model.run_dir / "schedules" / f"{key}.json"
            reused = path.is_file()
            if reused:
                sched = FittedSchedule.load(path)
            else:
                gen = torch.Generator(device=self.runtime.device).manual_seed(batch_seed(0, "schedule-fit", 0))
                x_fit = model.sde.prior_sample((fit_batch(objective, model.model_shape), *model.model_shape), generator=gen,
                                               device=self.runtime.device,
                                               dtype=self.dtype)
                sched = fit_schedule(model.sde, score, c.sampler, c.steps, x_fit, objective=objective,
                                     sampler_name=c.name, options=c.options, digest=digest)
                sched.save(path)
            verb = "reused" if reused else f"fitted in {sched.fit_nfe} NFE, {sched.fit_seconds:.1f} s"
            begins = "" if sched.start is None else f", from a Gaussian start at σ/m = {sched.start['level']:.3g}"
            print(f"schedule: {c.steps}-step grid for {c.name} {verb}{begins} ({path})", flush=True)
        else:
            path = Path(cfg.schedule).expanduser()
            sched = FittedSchedule.load(path)
            reused = True
            if sched.digest is not None and sched.digest != digest:
                raise ValueError(f"the grid in {path} was fitted to other weights (digest {sched.digest[:12]}…, this "
                                 f"model's is {digest[:12]}…); fit one for this model with schedule=fit")
        c.sampler = sched.apply(c.sampler)
        start = c.sampler.start
        if start is not None:
            start.check(model.sde, model.model_shape)
        check_times(torch.tensor(sched.times), model.sde, c.steps, c.sampler.end.end_time(model.sde),
                    f"the grid in {path}", None if start is None else start.time(model.sde))
        return {"source": str(path), "reused": reused, "objective": sched.objective, "fit_nfe": sched.fit_nfe,
                "fit_seconds": sched.fit_seconds, "fine_steps": sched.fine_steps, "times": sched.times,
                "end_sigma": sched.end_sigma, "start_level": None if start is None else start.level, "digest": digest}

    # ------------------------------------------------------------------ checks and identity
    @property
    def conditional(self) -> bool:
        return self.model.num_classes is not None

    @property
    def text(self) -> bool:
        return bool(getattr(self.model.module, "has_text", False))

    def _prompts(self) -> Optional[List[str]]:
        """The prompts of the run (``prompt=`` or the lines of ``prompts=<file>``), checked; None without text."""
        cfg = self.cfg
        if cfg.prompts is not None:
            path = Path(cfg.prompts).expanduser()
            if not path.is_file():
                raise ValueError(f"prompts={cfg.prompts}: no such file; give a text file with one prompt a line")
            lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            if not lines:
                raise ValueError(f"prompts={cfg.prompts} holds no prompt (the file is empty or blank); write one prompt a line")
            prompts: Optional[List[str]] = lines
        else:
            prompts = None if cfg.prompt is None else [str(cfg.prompt)]
        if prompts is not None and not self.text:
            raise ValueError(f"prompt{'s' if cfg.prompts else ''}= given, but {self.model.path} was trained without text "
                             "(conditioning.text.encoder=null); drop it, or train a text model "
                             "(python train.py data=digit_pairs conditioning.text.encoder=tiny)")
        if self.text:
            module = self.model.module
            tok = getattr(getattr(module.ema or module.net, "text_encoder", None), "tokenizer", None)
            if tok is not None:  # unknown words and over-long prompts surface here, before any sampling
                tok.encode((prompts or [""]) + [cfg.negative_prompt])
        return prompts

    def prompt_of(self, start: int, count: int) -> List[str]:
        """The prompt of samples ``start … start+count−1`` ("" without one: the unconditional model)."""
        if not self.prompts:
            return [""] * count
        return [self.prompts[i // self.cfg.n] for i in range(start, start + count)]

    def _check_conditioning(self) -> None:
        g, label, k = self.cfg.guidance, self.cfg.label, self.model.num_classes
        if self.text:
            if label is not None:
                raise ValueError(f"label={label}: {self.model.path} is a text model; say what to draw with prompt=<text>")
            if g.scale > 0 and float(self.model.train_config.conditioning.text.dropout) <= 0:
                warnings.warn("guidance.scale > 0 but the model was trained with conditioning.text.dropout=0: its "
                              "empty-prompt score was never trained, so classifier-free guidance is unreliable", stacklevel=2)
            return
        if k is None:
            # An unconditional model takes a label only to steer a classifier towards it.
            if g.scale > 0 or (label is not None and g.classifier is None):
                what = f"guidance.scale={g.scale}" if g.scale > 0 else f"label={label}"
                raise ValueError(
                    f"{what} needs a class-conditional model, but {self.model.path} was trained without labels "
                    "(conditioning.class_labels=false); drop the option, train with conditioning.class_labels=true, "
                    "or guide it with a classifier (guidance.classifier=<run> label=<class>)"
                )
            return
        if label is not None and label >= k:
            raise ValueError(f"label={label} is out of range: the model has {k} classes (0..{k - 1})")
        if g.scale > 0 and float(self.model.train_config.conditioning.label_dropout) <= 0:
            warnings.warn(
                "guidance.scale > 0 but the model was trained with conditioning.label_dropout=0: its null-label "
                "score was never trained, so classifier-free guidance is unreliable",
                stacklevel=2,
            )

    def _identity(self) -> Dict[str, Any]:
        """The settings that decide every batch's content (the shards' fingerprint)."""
        cfg, c = self.cfg, self.choice
        out: Dict[str, Any] = {
            "ckpt": str(self.model.path.resolve()), "global_step": self.model.global_step,
            "ema": cfg.ema and self.model.has_ema, "sampler": c.name, "options": c.options, "steps": c.steps,
            "seed": cfg.seed, "batch_size": cfg.batch_size, "dtype": cfg.dtype, "device_type": self.runtime.device.type,
            "task": cfg.task, "label": cfg.label, "guidance_scale": cfg.guidance.scale if self.conditional else None,
        }
        if self.clip_range is not None:
            out["clip_denoised"] = list(self.clip_range)
        if self.schedule is not None:
            # Only present with a fixed grid, so that the identity of every other run stays as it was.
            out["schedule"] = self.schedule["times"]
        if cfg.compile:
            # Only present when on, so that the identity of every other run stays as it was.
            out["compile"] = True
        if self.text:
            # Only present for text models, so that the identity of every other run stays as it was.
            out.update(prompts=self.prompts, negative_prompt=cfg.negative_prompt, guidance_scale=cfg.guidance.scale,
                       n=cfg.n)
        if self.classifier is not None:
            # Only present with a classifier, so that the identity of every other run stays as it was.
            out["classifier"] = {"path": str(self.classifier.path.resolve()), "global_step": self.classifier.global_step,
                                 "scale": cfg.guidance.classifier_scale}
        if self.task.observes:
            # Observed examples are drawn for all n at once, so n decides every batch's input.
            out.update(n=cfg.n, **self.task.identity())
        return out

    # ------------------------------------------------------------------ one batch
    def labels_for(self, start: int, count: int) -> Optional[Tensor]:
        """Labels of the samples ``start … start+count−1``: ``label`` for all, else the global
        index mod K (balanced); None for an unconditional model without a classifier."""
        if self.text:
            return torch.arange(start, start + count, dtype=torch.long)  # sample indices: their prompts
        if not self.conditional and self.classifier is None:
            return None
        if self.cfg.label is not None:
            return torch.full((count,), self.cfg.label, dtype=torch.long)
        return torch.arange(start, start + count, dtype=torch.long) % int(self.model.num_classes)

    def score_for(self, labels: Optional[Tensor]) -> Any:
        """The score the sampler sees for ``labels``.

        s_θ(x, t) for an unconditional model; for a class-conditional one classifier-free guidance
        (1 + w) s_θ(x, t, y) − w s_θ(x, t, ∅) with w = ``guidance.scale``; and with a classifier,
        w_c ∇_x log p_φ(y | x, t) (w_c = ``guidance.classifier_scale``) added to either.
        """
        if labels is None:
            return self._score
        if self.text:
            return self._text_score(labels)
        y = labels.to(self.runtime.device)
        score = self._score
        if self.conditional:
            score = ClassifierFreeGuidance(score, y=y, scale=self.cfg.guidance.scale, null_label=int(self.model.num_classes))
        if self.classifier is not None:
            score = ClassifierGuidance(score, self.classifier.module, y=y, scale=self.cfg.guidance.classifier_scale)
        return score

    def _text_score(self, index: Tensor) -> Any:
        """Classifier-free guidance on the prompts of samples ``index`` against the negative prompt."""
        module, use_ema = self.model.module, self.cfg.ema and self.model.has_ema
        prompts = self.prompt_of(int(index[0]), len(index))
        with torch.no_grad():
            c = module.encode_prompts(prompts, use_ema=use_ema)
            if getattr(self, "_negative", None) is None:  # the same for every batch: encoded once
                self._negative = module.encode_prompts([self.cfg.negative_prompt], use_ema=use_ema)
            neg = self._negative
        return ContextGuidance(self._score, c["context"].to(self.dtype), c["context_mask"], neg["context"].to(self.dtype),
                               neg["context_mask"], self.cfg.guidance.scale)

    def observed(self, start: int, count: int) -> Tensor:
        """The real examples samples ``start … start+count−1`` condition on (model range), from the data's reference set."""
        if self._observed is None:
            gen = torch.Generator().manual_seed(batch_seed(self.cfg.seed, "observed", 0))
            self._observed = self.dm.reference(self.total, generator=gen)
        return self._observed[start : start + count]

    def draw(self, batch: int, start: int, count: int, generator: torch.Generator,
             progress: Optional[Progress] = None) -> Tuple[Dict[str, np.ndarray], int]:
        """Samples ``start … start+count−1`` (batch ``batch``) as stored arrays, and the NFE."""
        dev, sde = self.runtime.device, self.model.sde
        labels = self.labels_for(start, count)
        score_fn = self.score_for(labels)
        arrays: Dict[str, np.ndarray] = {}
        x_T, hook, finish = None, None, None
        if self.task.observes:
            x_obs = self.observed(start, count).to(device=dev, dtype=self.dtype)
            fill = float(self.dm.scaler(torch.tensor(0.5))) if getattr(self.dm, "is_image", False) else 0.0
            cond = self.task.condition(sde, score_fn, x_obs, generator, fill=fill)
            score_fn, hook, x_T, finish = cond.score_fn, cond.hook, cond.x_T, cond.finish
            arrays["observed"] = to_stored(x_obs, self.dm)
            arrays["masked"] = to_stored(cond.masked, self.dm)
        if self.clip_range is not None:
            score_fn = DataRangeClip(score_fn, sde, *self.clip_range)
        with torch.no_grad(), self.runtime.autocast():
            result = sample(sde, score_fn, (count, *self.model.model_shape), sampler=self.choice.sampler,
                            steps=self.choice.steps, generator=generator, x_T=x_T, device=dev, dtype=self.dtype, hook=hook)
        x = result.samples if finish is None else finish(result.samples)
        if self.model.is_latent:
            arrays["latents"] = x.float().cpu().numpy()
            with torch.no_grad():
                x = self.model.module.to_data(x)
        arrays["samples"] = to_stored(x, self.dm)
        if labels is not None and self.text:
            arrays["prompt_index"] = (labels // self.cfg.n).numpy() if self.prompts else np.zeros(count, dtype=np.int64)
        elif labels is not None:
            arrays["labels"] = labels.numpy()
        arrays["nonfinite"] = (~torch.isfinite(x.reshape(count, -1)).all(1)).cpu().numpy()
        return arrays, int(result.nfe)

    def draw_batch(self, batch: int) -> Dict[str, np.ndarray]:
        """Batch ``batch`` exactly as the runner draws it (not stored)."""
        count = self.runner.counts[batch]
        gen = batch_generator(self.cfg.seed, self.purpose, batch, self.runtime.device)
        return self.draw(batch, batch * self.cfg.batch_size, count, gen)[0]

    # ------------------------------------------------------------------ the run
    def run(self, on_batch_end: Optional[BatchHook] = None) -> Optional[Dict[str, Any]]:
        """Every rank draws its batches; rank 0 merges and reports (returns the ``run.json`` content, others None)."""
        result = self.runner.run(self.out_dir / "samples.npz", extra=self.task.merged_arrays(), exclude=("nonfinite",),
                                 on_batch_end=on_batch_end)
        return None if result is None else self.report(result)

    def finalize(self) -> Dict[str, Any]:
        """Merge the shards (all must be there) and report, in this process."""
        return self.report(self.runner.merge(self.out_dir / "samples.npz", extra=self.task.merged_arrays(),
                                             exclude=("nonfinite",)))

    def report(self, result: RunResult) -> Dict[str, Any]:
        """Draw the figures and write ``run.json`` for the merged ``result``; returns its content."""
        cfg, c = self.cfg, self.choice
        arrays = dict(result.arrays)
        nonfinite = int(arrays.pop("nonfinite").sum())
        files = {"samples": str(self.out_dir / "samples.npz")}
        if cfg.figures:
            files.update(self._figures(arrays))
        if not cfg.keep_shards:
            shutil.rmtree(self.runner.store.root, ignore_errors=True)
        seconds = float(sum(result.seconds))
        report = {
            "mode": "sample",
            "command": " ".join(sys.argv),
            "output_dir": str(self.out_dir),
            "files": files,
            "checkpoint": {"path": str(self.model.path), "global_step": self.model.global_step,
                           "ema": cfg.ema and self.model.has_ema},
            "training": self.model.training_record("sde", "model", "data", "loss", "conditioning"),
            "sampler": {"name": c.name, "steps": c.steps, "options": c.options,
                        "expected_nfe_per_batch": c.sampler.expected_nfe(c.steps),
                        "default_rule": c.default_rule.as_dict() if c.default_rule is not None else None,
                        # the measured-best table the named sampler's `auto` options came from
                        "tuned": (f"sde_diffusion.samplers.defaults.NAMED_RULES[{c.tuned!r}]"
                                  f"[{tuned_table(c.tuned, self.model.sde, 'learned')!r}]"
                                  if c.tuned is not None else None),
                        "clip_denoised": list(self.clip_range) if self.clip_range is not None else None,
                        "schedule": self.schedule},
            "task": cfg.task,
            "guidance": self._guidance_report(),
            "n": self.total,
            "batch_size": cfg.batch_size,
            "batches": len(self.runner.counts),
            "batches_drawn_this_run": len(result.drawn) if result.drawn is not None else None,
            "nfe": {"per_batch": result.nfe, "total": int(sum(result.nfe))},
            "seconds": {"sampling": seconds, "per_batch": result.seconds, "wall_this_run": result.wall_seconds},
            "samples_per_second": self.total / seconds if seconds > 0 else None,
            "nonfinite_samples": nonfinite,
            "shape": list(arrays["samples"].shape),
            "dtype": str(arrays["samples"].dtype),
            "runtime": self.runtime.describe(),
            "fingerprint": self.fingerprint,
            "versions": versions(),
            "config": to_plain(cfg),
        }
        write_json(self.out_dir / "run.json", report)
        return report

    def _guidance_report(self) -> Dict[str, Any]:
        g, clf = self.cfg.guidance, self.classifier
        if self.text:
            return {"prompts": self.prompts, "samples_per_prompt": self.cfg.n, "negative_prompt": self.cfg.negative_prompt,
                    "scale": g.scale, "text_encoder": {k: v for k, v in (self.model.module.text_record() or {}).items()
                                                        if k != "tokenizer"}}
        return {
            "label": self.cfg.label,
            "scale": g.scale if self.conditional else None,
            "classifier": None if clf is None else {"path": str(clf.path), "global_step": clf.global_step,
                                                    "num_classes": clf.num_classes, "scale": g.classifier_scale},
        }

    def _figures(self, arrays: Mapping[str, np.ndarray]) -> Dict[str, str]:
        cfg, out = self.cfg, {}
        x = arrays["samples"]
        title = f"{self.choice.name}, {self.choice.steps} steps, step {self.model.global_step}"
        if x.dtype == np.uint8 and self.text and self.prompts:
            # One grid per prompt, titled with it.
            for p, prompt in enumerate(self.prompts):
                part = x[p * cfg.n:(p + 1) * cfg.n][:64]
                name = "samples.png" if len(self.prompts) == 1 else f"samples_{p:03d}.png"
                out["grid" if p == 0 else f"grid_{p:03d}"] = str(plots.save_image_grid(
                    part, self.out_dir / name, nrow=min(8, len(part)),
                    title=f'"{prompt}" · guidance {cfg.guidance.scale:g} · {title}'))
        elif x.dtype == np.uint8:
            k = min(64, x.shape[0])
            out["grid"] = str(plots.save_image_grid(x[:k], self.out_dir / "samples.png", nrow=min(8, k), title=title))
        else:
            gen = torch.Generator().manual_seed(batch_seed(cfg.seed, "figure", 0))
            ref = self.dm.reference(min(x.shape[0], 5000), generator=gen)
            out["scatter"] = str(plots.save_scatter(x, self.dm.inverse_scaler(ref), self.out_dir / "samples.png", title=title))
        if self.task.observes and x.dtype == np.uint8:
            out["triptych"] = str(plots.save_triptych(arrays["observed"], arrays["masked"], x, self.out_dir / "triptych.png",
                                                      title=f"{cfg.task} ({cfg.inpaint.method})"))
        return out


@MODES.register("sample")
def run_sample(cfg: SampleConfig, runtime: Optional[Runtime] = None,
               on_batch_end: Optional[BatchHook] = None) -> Optional[Dict[str, Any]]:
    """The whole ``mode=sample`` run on every rank; rank 0 returns the ``run.json`` content, others None."""
    return SampleJob(cfg, runtime).run(on_batch_end)


__all__ = ["to_stored", "from_stored", "SamplerChoice", "choose_sampler", "SampleJob", "run_sample"]
