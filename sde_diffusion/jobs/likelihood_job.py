r"""``mode=likelihood``: negative log-likelihood of real data through the probability-flow ODE.

For each of ``n`` examples x (in the runner's resumable, rank-split batches, :mod:`.runner`) it computes
log p_eps(x) = log p_T(z) + ∫ ∇·f̃ dt with :func:`sde_diffusion.likelihood.log_likelihood` and reports

* ``nll_nats``: −log p_eps(x) per example, in nats, in the model's coordinates;
* for images, ``bpd``: bits per dimension of the L-level pixels (L = the data module's ``levels``:
  256 for 8-bit sets, 17 for the digits) under uniform dequantisation,
  bpd = −(log p(x) + D log a − D log L)/(D ln 2) with x = a·u + b the map from u = (k + U)/L ∈ [0, 1)
  to the model range (:func:`~sde_diffusion.likelihood.bits_per_dim`); k are the stored pixels and
  U ~ U[0, 1) is drawn from batch b's generator ``f(seed, b)``.

A class-conditional model is evaluated with the null label, i.e. as the unconditional model it
was trained to be alongside (label dropout). Examples come from ``likelihood.split``: ``val`` (held-out split) or ``train`` — a seeded random
subset of ``n`` — or, for vector data, ``reference`` (fresh draws of the data module). Output:
``likelihood.json`` (means, standard deviations and standard errors, settings, NFE, seconds) and
``likelihood.npz`` (per example: ``logp``, ``prior_logp``, ``delta_logp``, ``bpd`` for images).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ..config import SampleConfig, to_plain
from ..config.schema import LIKELIHOOD_SPLITS
from ..io import write_json
from ..likelihood import EXACT_MAX_DIM, bits_per_dim, dequantize, log_likelihood, resolve_divergence
from ..sdes.discrete import DiscreteVP, check_variance_preserving
from ..vlb import vlb
from ..registry import MODES
from .model import LoadedModel, ModelJob
from .runner import BatchHook, Progress, Runner, RunResult
from .runtime import Runtime, versions
from .shards import batch_seed, fingerprint

SPLITS = LIKELIHOOD_SPLITS


def is_discrete_images(dm: Any) -> bool:
    return bool(getattr(dm, "is_image", False)) and hasattr(dm, "levels")


def pixel_scale(dm: Any) -> float:
    """a in x = a·u + b, the data module's affine map from [0, 1] to the model range."""
    lo, hi = dm.scaler(torch.tensor(0.0)), dm.scaler(torch.tensor(1.0))
    return float(hi - lo)


def evaluation_examples(dm: Any, n: int, split: str, seed: int) -> Tensor:
    """``n`` examples ``[n, *data_shape]``: stored pixel values (integers, images) or model-range
    vectors, a seeded random subset of the split (see the module docstring)."""
    from ..data.datamodule import fetch

    if split not in SPLITS:
        raise ValueError(f"unknown likelihood.split {split!r}; choose one of: {', '.join(SPLITS)}")
    gen = torch.Generator().manual_seed(batch_seed(seed, "likelihood-data", 0))
    if split == "reference":
        if is_discrete_images(dm):
            raise ValueError("likelihood.split=reference is for vector data; for images use split=val or split=train")
        return dm.reference(n, generator=gen)
    dm.setup("fit")
    dataset = dm.val_set if split == "val" else dm.train_set
    size = len(dataset)
    if n > size:
        raise ValueError(f"n={n} but the {split} split has only {size} examples; use n <= {size}" +
                         (" or likelihood.split=train" if split == "val" else ""))
    idx = torch.randperm(size, generator=gen)[:n].tolist()
    raw = fetch(dataset, idx).x
    if tuple(raw.shape[1:]) != tuple(dm.data_shape):
        raise ValueError(f"stored examples have shape {tuple(raw.shape[1:])}, expected {tuple(dm.data_shape)}")
    return raw if is_discrete_images(dm) else raw.to(torch.float32)


def model_input(pixels: Tensor, dm: Any, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Stored pixels k → x = scaler((k + U)/levels) in the model range (uniform dequantisation)."""
    u = dequantize(pixels.to(device=device, dtype=dtype), levels=int(dm.levels), generator=generator)
    return dm.scaler(u)


class LikelihoodJob(ModelJob):
    """The likelihood run of one config: the payload the :class:`~.runner.Runner` draws batches of."""

    purpose = "likelihood"

    def __init__(self, cfg: SampleConfig, runtime: Optional[Runtime] = None, model: Optional[LoadedModel] = None) -> None:
        if cfg.dtype == "bfloat16":
            raise ValueError("dtype=bfloat16 is for sampling: a likelihood integrates the probability-flow ODE and "
                             "its divergence to high accuracy; use dtype=float32 (or float64)")
        super().__init__(cfg, runtime, model)
        self.options = cfg.likelihood.options()
        self.latent = self.model.is_latent
        self.images = is_discrete_images(self.dm) and not self.latent  # bits/dim are of pixels; a latent density is not one
        self.method = cfg.likelihood.method
        self.with_ode = self.method == "ode" or bool(cfg.likelihood.with_ode)
        self.bound = self._bound_settings(cfg) if self.method == "vlb" else None
        self.data = evaluation_examples(self.dm, cfg.n, cfg.likelihood.split, cfg.seed)
        self.settings = {"ckpt": str(self.model.path.resolve()), "global_step": self.model.global_step,
                         "ema": cfg.ema and self.model.has_ema, "split": cfg.likelihood.split, "n": cfg.n,
                         "batch_size": cfg.batch_size, "seed": cfg.seed, "dtype": cfg.dtype,
                         "device_type": self.runtime.device.type, **self.options}
        if self.bound is not None:
            self.settings.update(method="vlb", vlb=self.bound_record())
        self.fingerprint = fingerprint(self.settings)
        self.dims = math.prod(self.model.model_shape)
        self.divergence = resolve_divergence(self.options["divergence"], self.dims)
        self.desc = f"likelihood ({self.divergence} trace)" if self.bound is None else "likelihood (variational bound)"
        tag = f"{self.divergence}-{self.options['solver']}-{cfg.likelihood.split}-seed{cfg.seed}-{self.fingerprint[:8]}"
        if self.bound is not None:
            tag = f"vlb-{self.bound['variance']}-{self.bound['proc'].N}steps-{cfg.likelihood.split}-seed{cfg.seed}-{self.fingerprint[:8]}"
        self.out_dir = Path(cfg.out).expanduser() if cfg.out else self.model.run_dir / "likelihood" / tag
        self.scale = pixel_scale(self.dm) if self.images else None
        self.runner = Runner(self, self.out_dir / "shards", self.fingerprint, n=cfg.n, batch_size=cfg.batch_size,
                             seed=cfg.seed, runtime=self.runtime, settings=self.settings, resume=cfg.resume,
                             progress=cfg.progress)
        self._score = self.model.score_model(use_ema=cfg.ema)

    def _bound_settings(self, cfg: SampleConfig) -> Dict[str, Any]:
        """The discrete chain, variance, decoder and estimator of ``likelihood.method=vlb``, checked."""
        opts, model = cfg.likelihood, self.model
        if self.latent:
            raise ValueError("likelihood.method=vlb bounds -log p of pixels through a pixel decoder; a latent model has "
                             "none. Use likelihood.method=ode (the latent density)")
        check_variance_preserving(model.sde, "likelihood.method=vlb")
        if opts.variance == "learned" and not getattr(model.module, "learn_sigma", False):
            raise ValueError("likelihood.variance=learned needs a network trained with model.learn_sigma=true; this run "
                             "has no learned variance: use likelihood.variance=beta or beta_tilde")
        decoder = opts.decoder
        if decoder == "auto":
            if not self.images:
                raise ValueError("the variational bound needs a decoder p(x_0 | x_1): this data set is not discrete "
                                 "images, so give likelihood.decoder=gaussian (a continuous Gaussian decoder; the bound is "
                                 "then on -log p(x_0) in nats)")
            decoder = "discretized"
        if decoder == "discretized" and not self.images:
            raise ValueError("likelihood.decoder=discretized is for discrete images (levels of a pixel scale); use "
                             "likelihood.decoder=gaussian for this data set")
        trained_n = getattr(getattr(model.train_config, "loss", None), "discrete_steps", None)
        schedule = opts.beta_schedule
        if schedule == "auto":
            schedule = "ddpm" if trained_n else "sde"
        N = int(opts.train_steps or trained_n or 1000)
        proc = DiscreteVP.build(schedule, model.sde, N)
        if opts.vlb_steps is not None:
            proc = proc.respace(int(opts.vlb_steps))
        lo = hi = levels = None
        if decoder == "discretized":
            lo, hi = float(self.dm.scaler(torch.tensor(0.0))), float(self.dm.scaler(torch.tensor(1.0)))
            levels = int(self.dm.levels)
        return {"proc": proc, "beta_schedule": schedule, "variance": opts.variance, "decoder": decoder, "terms": opts.terms,
                "levels": levels, "data_range": None if lo is None else (lo, hi)}

    def bound_record(self) -> Dict[str, Any]:
        b = self.bound
        assert b is not None
        return {"beta_schedule": b["beta_schedule"], "process": repr(b["proc"]), "steps": b["proc"].N, "variance": b["variance"],
                "decoder": b["decoder"], "terms": b["terms"], "levels": b["levels"],
                "data_range": list(b["data_range"]) if b["data_range"] else None, "with_ode": self.with_ode}

    def draw(self, batch: int, start: int, count: int, generator: torch.Generator,
             progress: Optional[Progress] = None) -> Tuple[Dict[str, np.ndarray], int]:
        """log p of examples ``start … start+count−1`` (and its parts, bits/dim for images), and the NFE."""
        arrays: Dict[str, np.ndarray] = {}
        nfe = 0
        if self.bound is not None:
            arrays, nfe = self._draw_bound(start, count, generator, progress)
        if self.with_ode:
            ode, ode_nfe = self._draw_ode(start, count, generator, progress)
            arrays.update(ode)
            nfe += ode_nfe
        return arrays, nfe

    def _draw_bound(self, start: int, count: int, generator: torch.Generator,
                    progress: Optional[Progress] = None) -> Tuple[Dict[str, np.ndarray], int]:
        b, dev = self.bound, self.runtime.device
        assert b is not None
        chunk = self.data[start : start + count]
        if b["decoder"] == "discretized":
            # The bound is of the stored values themselves: x_0 = scaler(k / (levels − 1)), as the model was trained.
            x0 = self.dm.scaler(chunk.to(device=dev, dtype=self.dtype) / (int(self.dm.levels) - 1))
        else:
            x0 = chunk.to(device=dev, dtype=self.dtype)
        with torch.no_grad():
            res = vlb(self.model.sde, self._score, x0, b["proc"], variance=b["variance"], decoder=b["decoder"],
                      levels=b["levels"], data_range=b["data_range"], terms=b["terms"], generator=generator)
        to_bits = 1.0 / (self.dims * math.log(2.0))
        arrays = {"vlb_nats": res.total, "vlb_prior": res.prior, "vlb_decoder": res.decoder, "vlb_middle": res.middle,
                  "vlb_stderr": res.stderr}
        if b["decoder"] == "discretized":
            arrays["vlb_bpd"] = res.total * to_bits
            arrays["vlb_bpd_stderr"] = res.stderr * to_bits
        if res.per_step is not None:
            arrays["vlb_terms"] = res.per_step
        return {k: v.detach().double().cpu().numpy() for k, v in arrays.items()}, int(res.nfe)

    def _draw_ode(self, start: int, count: int, generator: torch.Generator,
                  progress: Optional[Progress] = None) -> Tuple[Dict[str, np.ndarray], int]:
        dev, model = self.runtime.device, self.model
        chunk = self.data[start : start + count]
        if is_discrete_images(self.dm):
            x = model_input(chunk, self.dm, generator, self.dtype, dev)
        else:
            x = chunk.to(device=dev, dtype=self.dtype)
        if self.latent:
            with torch.no_grad():
                x = model.module.to_model_space(x)
        res = log_likelihood(model.sde, self._score, x, generator=generator, progress=progress, **self.options)
        arrays = {"logp": res.logp, "prior_logp": res.prior_logp, "delta_logp": res.delta_logp}
        if res.logp_stderr is not None:
            arrays["logp_stderr"] = res.logp_stderr
        if self.images:
            arrays["bpd"] = bits_per_dim(res.logp, model.data_shape, scale=self.scale, levels=int(self.dm.levels))
        if self.latent:
            arrays["logp_z"] = res.logp + model.module.codec.log_det_scale
        return {k: v.detach().double().cpu().numpy() for k, v in arrays.items()}, int(res.nfe)

    def run(self, on_batch_end: Optional[BatchHook] = None) -> Optional[Dict[str, Any]]:
        """Every rank computes its batches; rank 0 merges and reports (returns the ``likelihood.json`` content)."""
        result = self.runner.run(self.out_dir / "likelihood.npz", on_batch_end=on_batch_end)
        if result is None:
            return None
        report = self.report(result)
        if self.bound is not None:
            print(format_bound(report))
        return report

    def report(self, result: RunResult) -> Dict[str, Any]:
        """Write ``likelihood.json`` for the merged ``result``; returns its content."""
        cfg, model, a, out = self.cfg, self.model, result.arrays, self.out_dir
        images, latent, used, dims = self.images, self.latent, self.divergence, self.dims
        report: Dict[str, Any] = {
            "mode": "likelihood",
            "method": self.method,
            "command": " ".join(sys.argv),
            "output_dir": str(out),
            "files": {"likelihood": str(out / "likelihood.npz"), "report": str(out / "likelihood.json")},
            "checkpoint": {"path": str(model.path), "global_step": model.global_step, "ema": cfg.ema and model.has_ema},
            "data": {"name": model.train_config.data.get("name"), "split": cfg.likelihood.split, "n": cfg.n,
                     "shape": list(model.data_shape), "levels": int(self.dm.levels) if images else None,
                     "dequantization": "uniform, (k + U)/levels" if images else None, "scale": self.scale},
        }
        if self.bound is not None:
            report["vlb"] = self.bound_report(a, out)
        if self.with_ode:
            report.update(self.ode_report(a))
        report.update({
            "nfe": {"per_batch": result.nfe, "total": int(sum(result.nfe))},
            "seconds": {"total": float(sum(result.seconds)), "per_batch": result.seconds,
                        "wall_this_run": result.wall_seconds},
            "runtime": self.runtime.describe(),
            "fingerprint": self.fingerprint,
            "versions": versions(),
            "config": to_plain(cfg),
        })
        write_json(out / "likelihood.json", report)
        return report

    def bound_report(self, a: Dict[str, np.ndarray], out: Path) -> Dict[str, Any]:
        """The bound's totals, its terms grouped into a table over steps, and the plot of L_t against t."""
        b = self.bound
        assert b is not None
        proc = b["proc"]
        rec: Dict[str, Any] = {
            "what": ("DDPM's variational bound L_T + sum L_{t-1} + L_0 on -log p(x_0), in nats per example"
                     + ("; bpd of the discrete pixels (discretised Gaussian decoder)" if b["decoder"] == "discretized" else "")),
            **self.bound_record(),
            "nats": _stats(a["vlb_nats"]),
            "bpd": _stats(a["vlb_bpd"]) if "vlb_bpd" in a else None,
            "prior_L_T": _stats(a["vlb_prior"]),
            "decoder_L_0": _stats(a["vlb_decoder"]),
            "sum_L_t_minus_1": _stats(a["vlb_middle"]),
            "estimator": ("exact sum over every step (one noise draw per step and example)" if b["terms"] is None else
                          f"{b['terms']} importance-sampled steps per example (proposal: the expected term of the optimal "
                          "model on Gaussian data with the batch's second moment, 10 % uniform)"),
            "estimator_stderr_of_mean": float(np.sqrt(np.sum(a["vlb_stderr"] ** 2)) / a["vlb_stderr"].size),
        }
        if "vlb_terms" in a:
            terms = a["vlb_terms"].mean(0)
            t = proc.network_times(self.model.sde).numpy()
            edges = np.unique(np.round(np.linspace(0, proc.N, min(10, proc.N) + 1)).astype(int))
            rows = []
            for lo, hi in zip(edges[:-1], edges[1:]):
                rows.append({"steps": f"{int(proc.steps[lo])}..{int(proc.steps[hi - 1])}",
                             "t": [float(t[lo]), float(t[hi - 1])], "nats": float(terms[lo:hi].sum()),
                             "share": float(terms[lo:hi].sum() / max(a["vlb_nats"].mean(), 1e-300))})
            rec["table"] = [{"steps": "L_T (prior)", "t": [float(self.model.sde.T)] * 2,
                             "nats": float(a["vlb_prior"].mean()),
                             "share": float(a["vlb_prior"].mean() / max(a["vlb_nats"].mean(), 1e-300))}] + rows[::-1]
            from ..plots import save_vlb_terms

            rec["plot"] = str(save_vlb_terms(t, terms, out / "vlb_terms.png", prior=float(a["vlb_prior"].mean()),
                                             title=f"variational bound terms ({b['variance']}, {proc.N} steps)"))
        if "vlb_bpd" in a and "bpd" in a:
            rec["bound_minus_ode_bpd"] = _stats(a["vlb_bpd"] - a["bpd"])
        elif "logp" in a and "vlb_bpd" not in a:
            rec["bound_minus_ode_nll_nats"] = _stats(a["vlb_nats"] + a["logp"])
        return rec

    def ode_report(self, a: Dict[str, np.ndarray]) -> Dict[str, Any]:
        """The probability-flow NLL part of the report."""
        model, images, latent, used, dims = self.model, self.images, self.latent, self.divergence, self.dims
        return {
            "what": ("latent NLL = -log p_eps(u) of the scaled latents u = c * mean(q(z | x)) through the probability-flow "
                     "ODE, in nats per example (a latent density, not bits/dim of the images; -log p(z) of the unscaled "
                     "latents is in nll_unscaled_latent_nats)") if latent else
                    ("NLL = -log p_eps(x) through the probability-flow ODE, in nats per example in model coordinates"
                     + ("; bpd per pixel of the discrete images under uniform dequantisation" if images else "")),
            "latent": model.module.codec.info() if latent else None,
            "nll_unscaled_latent_nats": _stats(-a["logp_z"]) if latent else None,
            "nll_nats": _stats(-a["logp"]),
            "nll_nats_per_dim": _stats(-a["logp"] / dims),
            "bpd": _stats(a["bpd"]) if images else None,
            "prior_logp": _stats(a["prior_logp"]),
            "finite": bool(np.isfinite(a["logp"]).all()),
            "settings": self.options,
            "divergence": {
                "used": used,
                "rule": f"likelihood.divergence=auto: the exact trace (D vector-Jacobian products per evaluation) for "
                        f"D <= {EXACT_MAX_DIM}, else Hutchinson's estimate with likelihood.n_probes probes "
                        f"(likelihood.noise); here D = {dims}",
                "stochastic": used == "hutchinson",
                # The spread over probes of each example's estimate, averaged and as the mean's error:
                # the estimator's own share of nll_nats.stderr (which also holds the spread over examples).
                "estimator_stderr_per_example": float(np.mean(a["logp_stderr"])) if "logp_stderr" in a else (0.0 if used == "exact" else None),
                "estimator_stderr_of_mean": (float(np.sqrt(np.sum(a["logp_stderr"] ** 2)) / a["logp_stderr"].size)
                                             if "logp_stderr" in a else (0.0 if used == "exact" else None)),
            },
        }


@MODES.register("likelihood")
def run_likelihood(cfg: SampleConfig, runtime: Optional[Runtime] = None,
                   on_batch_end: Optional[BatchHook] = None) -> Optional[Dict[str, Any]]:
    """The whole ``mode=likelihood`` run on every rank; rank 0 returns the ``likelihood.json`` content."""
    return LikelihoodJob(cfg, runtime).run(on_batch_end)


def format_bound(report: Dict[str, Any]) -> str:
    """The bound's summary as printed: total, its parts by steps, and the ODE NLL beside it."""
    v = report["vlb"]
    unit, total = ("bits/dim", v["bpd"]) if v.get("bpd") else ("nats", v["nats"])
    lines = [f"variational bound ({v['variance']} variance, {v['steps']} steps, {v['decoder']} decoder): "
             f"{total['mean']:.4f} ± {total['stderr']:.4f} {unit} over {total['n']} examples"]
    for row in v.get("table", []):
        lines.append(f"  {row['steps']:>18}  t in [{row['t'][0]:.4f}, {row['t'][1]:.4f}]  {row['nats']:12.4f} nats  "
                     f"{100 * row['share']:6.2f} %")
    if report.get("bpd"):
        lines.append(f"probability-flow ODE: {report['bpd']['mean']:.4f} ± {report['bpd']['stderr']:.4f} bits/dim")
    elif report.get("nll_nats"):
        lines.append(f"probability-flow ODE: {report['nll_nats']['mean']:.4f} ± {report['nll_nats']['stderr']:.4f} nats")
    return "\n".join(lines)


def _stats(v: np.ndarray) -> Dict[str, float]:
    v = np.asarray(v, dtype=np.float64)
    n = v.size
    std = float(v.std(ddof=1)) if n > 1 else float("nan")
    return {"mean": float(v.mean()), "std": std, "stderr": std / math.sqrt(n) if n > 1 else float("nan"), "n": int(n)}


__all__ = ["SPLITS", "evaluation_examples", "model_input", "pixel_scale", "is_discrete_images", "LikelihoodJob",
           "run_likelihood"]
