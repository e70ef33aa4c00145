r"""``mode=plots``: every figure of a training run, written to ``<run dir>/plots`` (or ``out``).

* ``samples.png`` — an image grid, or samples beside data (vectors), from the configured sampler;
* ``trajectories.png`` — vector data: the reverse SDE (Euler–Maruyama) and the probability-flow
  ODE (Heun) from the *same* prior points, one line per particle over time;
* ``denoising.png`` — images: one sample along the configured sampler's path, x_t and Tweedie's
  x̂_0 = (x_t + σ(t)² s_θ(x_t, t))/m(t) at ``plots.strip`` times; vectors: the whole batch x_t at
  those times;
* ``loss_by_t.png`` — the ε-space training error per t-bucket from the CSV logs
  (``<run dir>/logs/version_*/metrics.csv``), one line per logged step;
* ``plots.json`` — the list of files and notes on figures that could not be drawn.

All randomness comes from generators seeded by ``seed``, so the figures are reproducible.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .. import plots
from ..config import SampleConfig, to_plain
from ..io import write_json
from ..registry import MODES
from ..samplers import sample
from ..score import x0_from_score
from .model import load_model
from .runtime import Runtime, resolve_device, resolve_dtype, versions
from .sample_job import SampleJob, to_stored
from .shards import batch_seed


def _gen(job: SampleJob, purpose: str) -> torch.Generator:
    return torch.Generator(device=job.runtime.device).manual_seed(batch_seed(job.cfg.seed, purpose, 0))


def paired_paths(job: SampleJob, k: int, steps: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Reverse-SDE and PF-ODE paths ``[S+1, k, ...]`` from the same k prior points, and the times ``[S+1]``."""
    sde, dev, dtype = job.model.sde, job.runtime.device, job.dtype
    shape = (k, *job.model.data_shape)
    x_T = sde.prior_sample(shape, generator=_gen(job, "plots-prior"), device=dev, dtype=dtype)
    score = job.score_for(job.labels_for(0, k))
    with torch.no_grad():
        rev = sample(sde, score, shape, sampler="euler_maruyama", steps=steps, generator=_gen(job, "plots-sde"),
                     x_T=x_T, device=dev, dtype=dtype, return_trajectory=True)
        ode = sample(sde, score, shape, sampler="ode_heun", steps=steps, x_T=x_T, device=dev, dtype=dtype,
                     return_trajectory=True)
    return torch.stack(rev.trajectory), torch.stack(ode.trajectory), rev.times


def denoising_path(job: SampleJob, k: int, points: int) -> Tuple[Tensor, Tensor, Tensor]:
    """k samples along the run's sampler path at ``points`` times: (x_t ``[P, k, ...]``, x̂_0
    ``[P, k, ...]``, times ``[P]``). Falls back to Euler–Maruyama for samplers without a time grid."""
    sde, dev, dtype, steps = job.model.sde, job.runtime.device, job.dtype, job.choice.steps
    shape = (k, *job.model.data_shape)
    score = job.score_for(job.labels_for(0, k))
    with torch.no_grad():
        res = sample(sde, score, shape, sampler=job.choice.sampler, steps=steps, generator=_gen(job, "plots-strip"),
                     device=dev, dtype=dtype, return_trajectory=True)
        if res.times is None or res.trajectory is None or len(res.trajectory) < len(res.times):
            res = sample(sde, score, shape, sampler="euler_maruyama", steps=steps, generator=_gen(job, "plots-strip"),
                         device=dev, dtype=dtype, return_trajectory=True)
        times = res.times
        traj = res.trajectory[: len(times)]
        idx = torch.linspace(0, len(times) - 1, min(points, len(times))).round().long().unique()
        xs, x0s = [], []
        for i in idx.tolist():
            x, t = traj[i], times[i].expand(k)
            xs.append(x)
            x0s.append(x0_from_score(x, score(x, t), sde.mean_coeff(t), sde.marginal_std(t)))
    return torch.stack(xs), torch.stack(x0s), times[idx]


@MODES.register("plots")
def run_plots(cfg: SampleConfig, runtime: Optional[Runtime] = None, on_batch_end: Any = None) -> Dict[str, Any]:
    """Write all figures of the run (see the module docstring); returns the ``plots.json`` content."""
    pc = cfg.plots
    rt = runtime or Runtime(device=resolve_device(cfg.device))
    model = load_model(cfg.ckpt, rt.device, resolve_dtype(cfg.dtype), latent=cfg.latent, sde=cfg.sde, model=cfg.model,
                       data=cfg.data)
    is_image = len(model.data_shape) == 3
    n_s = pc.num_samples if is_image else max(2000, pc.num_samples)
    job = SampleJob(replace(cfg, n=n_s, batch_size=n_s, task="sample"), runtime=rt, model=model)
    out = Path(cfg.out).expanduser() if cfg.out else model.run_dir / "plots"
    files: Dict[str, str] = {}
    notes: List[str] = []
    tag = f"{job.choice.name}, {job.choice.steps} steps, step {model.global_step}"

    ref = None
    if is_image:
        x = job.draw_batch(0)["samples"]
        files["samples"] = str(plots.save_image_grid(x[:64], out / "samples.png", nrow=min(8, len(x)), title=tag))
    else:
        # One run gives both the sample scatter (its last state) and the marginal strip.
        xs, _, ts = denoising_path(job, n_s, pc.strip)
        ref = job.dm.inverse_scaler(job.dm.reference(n_s, generator=torch.Generator().manual_seed(cfg.seed)))
        files["samples"] = str(plots.save_scatter(job.dm.inverse_scaler(xs[-1]), ref, out / "samples.png", title=tag))
        files["denoising"] = str(plots.save_marginal_strip(job.dm.inverse_scaler(xs), ts, out / "denoising.png",
                                                           reference=ref[:2000], title=tag))

    if not is_image and model.data_shape[0] >= 2:
        rev, ode, times = paired_paths(job, pc.trajectories, pc.steps)
        files["trajectories"] = str(plots.save_trajectories(
            job.dm.inverse_scaler(rev), job.dm.inverse_scaler(ode), out / "trajectories.png", times=times,
            reference=ref[:2000] if ref is not None else None,
            title=f"same {pc.trajectories} prior points, {pc.steps} steps"))
    else:
        notes.append("trajectories: drawn for vector data only")

    if is_image:
        xs, x0s, ts = denoising_path(job, 1, pc.strip)
        files["denoising"] = str(plots.save_denoising_strip(
            to_stored(xs[:, 0], job.dm), to_stored(x0s[:, 0], job.dm), ts, out / "denoising.png", title=tag))

    try:
        table = plots.read_loss_by_t(model.run_dir / "logs")
        files["loss_by_t"] = str(plots.save_loss_by_t(table, out / "loss_by_t.png", title=f"training error by t ({model.run_dir.name})"))
    except FileNotFoundError as err:
        notes.append(f"loss_by_t: {err}")

    report = {"mode": "plots", "output_dir": str(out), "files": files, "notes": notes,
              "checkpoint": {"path": str(model.path), "global_step": model.global_step},
              "sampler": {"name": job.choice.name, "steps": job.choice.steps, "options": job.choice.options},
              "versions": versions(), "config": to_plain(cfg)}
    write_json(out / "plots.json", report)
    return report


__all__ = ["paired_paths", "denoising_path", "run_plots"]
