r"""``mode=likelihood``: negative log-likelihood of real data through the probability-flow ODE.

For each of ``n`` examples x (in batches, resumable like sampling) it computes
log p_eps(x) = log p_T(z) + ∫ ∇·f̃ dt with :func:`sde_diffusion.likelihood.log_likelihood` and reports

* ``nll_nats``: −log p_eps(x) per example, in nats, in the model's coordinates;
* for images, ``bpd``: bits per dimension of the L-level pixels (L = the data module's ``levels``:
  256 for 8-bit sets, 17 for the digits) under uniform dequantisation,
  bpd = −(log p(x) + D log a − D log L)/(D ln 2) with x = a·u + b the map from u = (k + U)/L ∈ [0, 1)
  to the model range (:func:`~sde_diffusion.likelihood.bits_per_dim`); k are the stored pixels and
  U ~ U[0, 1) is drawn per batch from ``f(seed, batch)``.

A class-conditional model is evaluated with the null label, i.e. as the unconditional model it
was trained to be alongside (label dropout). Examples come from ``likelihood.split``: ``val`` (held-out split) or ``train`` — a seeded random
subset of ``n`` — or, for vector data, ``reference`` (fresh draws of the data module). Output:
``likelihood.json`` (means, standard deviations and standard errors, settings, NFE, seconds) and
``likelihood.npz`` (per example: ``logp``, ``prior_logp``, ``delta_logp``, ``bpd`` for images).
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch
from torch import Tensor

from ..config import to_container
from ..likelihood import DIVERGENCES, EXACT_MAX_DIM, NOISES, SOLVERS, bits_per_dim, dequantize, log_likelihood, resolve_divergence
from .checkpoint import load_model
from .runtime import Runtime, make_runtime, resolve_dtype, sync, versions, write_json
from .shards import ShardStore, batch_counts, batch_seed, fingerprint, rank_batches

SPLITS = ("val", "train", "reference")


def likelihood_options(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The ``likelihood`` group as keyword arguments of ``log_likelihood`` (checked)."""
    lk = dict(cfg.get("likelihood") or {})
    opts = {
        "divergence": str(lk.get("divergence", "auto")),
        "noise": str(lk.get("noise", "rademacher")),
        "n_probes": int(lk.get("n_probes", 2)),
        "solver": str(lk.get("solver", "dopri5")),
        "rtol": float(lk.get("rtol", 1e-5)),
        "atol": float(lk.get("atol", 1e-5)),
        "steps": int(lk.get("steps", 100)),
        "eps": None if lk.get("eps") is None else float(lk["eps"]),
    }
    for key, allowed in (("divergence", DIVERGENCES), ("noise", NOISES), ("solver", SOLVERS)):
        if opts[key] not in allowed:
            raise ValueError(f"unknown likelihood.{key} {opts[key]!r}; choose one of: {', '.join(allowed)}")
    return opts


def is_discrete_images(dm: Any) -> bool:
    return bool(getattr(dm, "is_image", False)) and hasattr(dm, "levels")


def pixel_scale(dm: Any) -> float:
    """a in x = a·u + b, the data module's affine map from [0, 1] to the model range."""
    lo, hi = dm.scaler(torch.tensor(0.0)), dm.scaler(torch.tensor(1.0))
    return float(hi - lo)


def evaluation_examples(dm: Any, n: int, split: str, seed: int) -> Tensor:
    """``n`` examples ``[n, *data_shape]``: stored pixel values (integers, images) or model-range
    vectors, a seeded random subset of the split (see the module docstring)."""
    from ..data.base import fetch

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


def run_likelihood(cfg: Mapping[str, Any], runtime: Optional[Runtime] = None, on_batch_end: Any = None) -> Optional[Dict[str, Any]]:
    """The whole ``mode=likelihood`` run; rank 0 returns the ``likelihood.json`` content."""
    wall = time.perf_counter()
    cfg = to_container(cfg)
    opts = likelihood_options(cfg)
    split = str((cfg.get("likelihood") or {}).get("split", "val"))
    n, bs, seed = int(cfg.get("n", 64)), int(cfg.get("batch_size", 64)), int(cfg.get("seed", 0))
    counts = batch_counts(n, bs)
    rt = runtime or make_runtime(cfg)
    dtype = resolve_dtype(str(cfg.get("dtype", "float32")))
    model = load_model(cfg.get("ckpt"), cfg, rt.device, dtype)
    ema = bool(cfg.get("ema", True))
    dm = model.build_datamodule(cfg)
    latent = model.is_latent
    images = is_discrete_images(dm) and not latent  # bits/dim are of pixels; a latent density is not one
    data = evaluation_examples(dm, n, split, seed)
    settings = {"ckpt": str(model.path.resolve()), "global_step": model.global_step, "ema": ema and model.has_ema,
                "split": split, "n": n, "batch_size": bs, "seed": seed, "dtype": str(cfg.get("dtype", "float32")),
                "device_type": rt.device.type, **opts}
    fp = fingerprint(settings)
    dims = math.prod(model.model_shape)
    used = resolve_divergence(opts["divergence"], dims)
    tag = f"{used}-{opts['solver']}-{split}-seed{seed}-{fp[:8]}"
    out = Path(str(cfg["out"])).expanduser() if cfg.get("out") else model.run_dir / "likelihood" / tag
    store = ShardStore(out / "shards", fp, prefix="batch")
    if rt.is_main:
        store.prepare({"n": n, "batch_size": bs, "counts": counts, "settings": settings}, resume=bool(cfg.get("resume", True)))
    rt.barrier()

    score_fn = model.score_model(use_ema=ema)
    scale = pixel_scale(dm) if images else None
    mine = rank_batches(len(counts), rt.rank, rt.world_size)
    store.clean_stale(mine)
    todo = [b for b in mine if not store.is_done(b, counts[b])]
    bar = None
    if bool(cfg.get("progress", True)) and rt.is_main:
        from tqdm.auto import tqdm

        # Fractional batches: within a batch the bar follows the integration from eps to T, so the
        # ETA appears long before the first (possibly many-minute) batch ends.
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"likelihood ({used} trace)", unit="batch",
                   file=sys.stderr, bar_format="{l_bar}{bar}| {n:.2f}/{total} batches [{elapsed}<{remaining}]")
    try:
        for done, b in enumerate(todo):
            base = len(mine) - len(todo) + done

            def progress(frac: float, base: int = base) -> None:
                if bar is not None and base + frac > bar.n:
                    bar.update(base + frac - bar.n)

            gen = torch.Generator(device=rt.device).manual_seed(batch_seed(seed, "likelihood", b))
            chunk = data[b * bs : b * bs + counts[b]]
            if is_discrete_images(dm):
                x = model_input(chunk, dm, gen, dtype, rt.device)
            else:
                x = chunk.to(device=rt.device, dtype=dtype)
            if latent:
                with torch.no_grad():
                    x = model.module.to_model_space(x)
            sync(rt.device)
            t0 = time.perf_counter()
            res = log_likelihood(model.sde, score_fn, x, generator=gen, progress=progress, **opts)
            sync(rt.device)
            arrays = {"logp": res.logp, "prior_logp": res.prior_logp, "delta_logp": res.delta_logp}
            if res.logp_stderr is not None:
                arrays["logp_stderr"] = res.logp_stderr
            if images:
                arrays["bpd"] = bits_per_dim(res.logp, model.data_shape, scale=scale, levels=int(dm.levels))
            if latent:
                arrays["logp_z"] = res.logp + model.module.codec.log_det_scale
            arrays = {k: v.detach().double().cpu().numpy() for k, v in arrays.items()}
            store.write(b, arrays, counts[b], res.nfe, time.perf_counter() - t0)
            progress(1.0)
            if on_batch_end is not None:
                on_batch_end(b, arrays)
    finally:
        if bar is not None:
            bar.close()
    rt.barrier()
    if not rt.is_main:
        return None

    merged = store.merge(counts, out / "likelihood.npz")
    a = merged["arrays"]
    report = {
        "mode": "likelihood",
        "command": " ".join(sys.argv),
        "output_dir": str(out),
        "files": {"likelihood": str(out / "likelihood.npz"), "report": str(out / "likelihood.json")},
        "checkpoint": {"path": str(model.path), "global_step": model.global_step, "ema": ema and model.has_ema},
        "data": {"name": (model.train_cfg.get("data") or {}).get("name"), "split": split, "n": n,
                 "shape": list(model.data_shape), "levels": int(dm.levels) if images else None,
                 "dequantization": "uniform, (k + U)/levels" if images else None, "scale": scale},
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
        "settings": opts,
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
        "nfe": {"per_batch": merged["nfe"], "total": int(sum(merged["nfe"]))},
        "seconds": {"total": float(sum(merged["seconds"])), "per_batch": merged["seconds"],
                    "wall_this_run": time.perf_counter() - wall},
        "runtime": rt.describe(),
        "fingerprint": fp,
        "versions": versions(),
        "config": cfg,
    }
    write_json(out / "likelihood.json", report)
    return report


def model_input(pixels: Tensor, dm: Any, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Stored pixels k → x = scaler((k + U)/levels) in the model range (uniform dequantisation)."""
    u = dequantize(pixels.to(device=device, dtype=dtype), levels=int(dm.levels), generator=generator)
    return dm.scaler(u)


def _stats(v: np.ndarray) -> Dict[str, float]:
    v = np.asarray(v, dtype=np.float64)
    n = v.size
    std = float(v.std(ddof=1)) if n > 1 else float("nan")
    return {"mean": float(v.mean()), "std": std, "stderr": std / math.sqrt(n) if n > 1 else float("nan"), "n": int(n)}


__all__ = ["SPLITS", "likelihood_options", "evaluation_examples", "model_input", "pixel_scale", "run_likelihood"]
