"""Pixel-space vs latent-space score models on the embedded digits at 32×32, at equal training time.

    .venv/bin/python -m benchmarks.latent --budget 240 --write     # writes "## Latent vs pixel" in RESULTS.md

Both sides get ``--budget`` seconds of training wall time on one thread (Lightning's ``max_time``):

* pixel: ``python train.py data=digits data.size=32`` (unet_small, levels 32 and 16, attention at 16);
* latent: ``task=autoencoder`` for ``--ae-share`` of the budget, then ``latent=<that run>`` for the rest
  (the same unet_small, now on 4×8×8 latents).

Then, for each: ``--n`` samples from the EMA weights with Euler–Maruyama (``--steps``), their
digits-FD (features of the 8×8 digits classifier on the area-averaged samples) against all digits,
with ``--n`` real upsampled digits as the floor; sampling seconds per sample (decoding included);
the autoencoder's L1 reconstruction error on held-out digits; and the NLL of held-out data —
bits/dim of the pixels (pixel model) or nats per latent dimension (latent model: a latent density,
not comparable to bits/dim).
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from .common import md_table, write_results_section

ROOT = Path(__file__).resolve().parents[1]

QUIET = ["logger=null", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         "callbacks.loss_by_t.every_n_steps=0", "callbacks.samples.enabled=false", "trainer.max_steps=1000000"]


def compose(overrides: List[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"00:{s // 3600:02d}:{(s % 3600) // 60:02d}:{s % 60:02d}"


def train_for(overrides: List[str], seconds: float, run_dir: Path) -> float:
    from sde_diffusion.jobs.train_tasks import run_training

    t0 = time.perf_counter()
    res = run_training(compose(QUIET + overrides + [f"+trainer.max_time={hms(seconds)}", f"run_dir={run_dir}"]), run_dir)
    print(f"  {run_dir.name}: {res.trainer.global_step} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    return float(res.trainer.global_step)


def evaluate(run_dir: Path, n: int, steps: int, n_nll: int) -> Dict[str, float]:
    from sde_diffusion import sample
    from sde_diffusion.evaluation.digits_classifier import digits_fd, get_classifier
    from sde_diffusion.jobs.checkpoint import load_model
    from sde_diffusion.jobs.likelihood_job import evaluation_examples, model_input, pixel_scale
    from sde_diffusion.likelihood import bits_per_dim, log_likelihood

    model = load_model(run_dir)
    clf = get_classifier()
    t0 = time.perf_counter()
    with torch.no_grad():
        u = sample(model.sde, model.score_model(use_ema=True), (n, *model.model_shape), sampler="euler_maruyama",
                   steps=steps, generator=torch.Generator().manual_seed(0)).samples
        x = model.module.to_data(u).clamp(-1, 1)
    per_sample = (time.perf_counter() - t0) / n
    dm = model.build_datamodule({})
    out = {"fd": digits_fd(x, classifier=clf), "sec_per_sample": per_sample}
    k = evaluation_examples(dm, n_nll, "val", 0)
    xv = model_input(k, dm, torch.Generator().manual_seed(1), torch.float32, torch.device("cpu"))
    data = model.module.to_model_space(xv)
    res = log_likelihood(model.sde, model.score_model(use_ema=True), data, solver="rk4", steps=40,
                         generator=torch.Generator().manual_seed(2))
    if model.is_latent:
        out["nll"] = float(-res.logp.mean()) / math.prod(model.model_shape)
        out["nll_unit"] = "nats/latent dim"
        with torch.no_grad():
            rec = model.module.to_data(data)
        out["rec_l1"] = float((rec - xv).abs().mean())
    else:
        out["nll"] = float(bits_per_dim(res.logp, model.data_shape, scale=pixel_scale(dm), levels=int(dm.levels)).mean())
        out["nll_unit"] = "bits/dim"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=240.0, help="training seconds per side")
    ap.add_argument("--ae-share", type=float, default=0.5, help="share of the latent side's budget for the autoencoder")
    ap.add_argument("--n", type=int, default=256, help="samples per side for digits-FD")
    ap.add_argument("--steps", type=int, default=200, help="Euler-Maruyama steps")
    ap.add_argument("--n-nll", type=int, default=32, help="held-out examples for the NLL")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_latent")
    ap.add_argument("--write", action="store_true", help="write the section into benchmarks/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    shutil.rmtree(args.out, ignore_errors=True)
    common = ["data=digits", "data.size=32", "trainer.num_threads=1"]
    print("pixel-space score model", flush=True)
    px_steps = train_for(common + ["task=score"], args.budget, args.out / "pixel")
    print("latent: autoencoder, then score model", flush=True)
    ae_steps = train_for(common + ["task=autoencoder"], args.budget * args.ae_share, args.out / "ae")
    lat_steps = train_for(common + ["task=score", f"latent={args.out / 'ae'}"], args.budget * (1 - args.ae_share),
                          args.out / "latent")
    px = evaluate(args.out / "pixel", args.n, args.steps, args.n_nll)
    lat = evaluate(args.out / "latent", args.n, args.steps, args.n_nll)

    from sde_diffusion.data.digits import DigitsDataModule
    from sde_diffusion.evaluation.digits_classifier import digits_fd, get_classifier

    dm = DigitsDataModule(size=32)
    floor = digits_fd(dm.reference(args.n, generator=torch.Generator().manual_seed(3)), classifier=get_classifier())
    rows = [
        ["pixel (1×32×32)", f"{px_steps:.0f}", f"{px['fd']:.2f}", f"{1000 * px['sec_per_sample']:.1f}", "—",
         f"{px['nll']:.2f} {px['nll_unit']}"],
        ["latent (4×8×8, f = 4)", f"AE {ae_steps:.0f} + score {lat_steps:.0f}", f"{lat['fd']:.2f}",
         f"{1000 * lat['sec_per_sample']:.1f}", f"{lat['rec_l1']:.3f}", f"{lat['nll']:.2f} {lat['nll_unit']}"],
    ]
    table = md_table(["model", "training steps", f"digits-FD (floor {floor:.2f})", "ms / sample",
                      "AE L1 (held out)", "NLL of held-out data"], rows)
    command = " ".join(["python -m benchmarks.latent", *sys.argv[1:]])
    section = (
        "## Latent vs pixel\n\n"
        f"Command: `{command}` (one thread; {args.budget:.0f} s of training per side, the latent side split "
        f"{args.ae_share:.0%} autoencoder / {1 - args.ae_share:.0%} score model; {args.n} samples, "
        f"Euler–Maruyama {args.steps} steps, EMA weights).\n\n{table}\n"
    )
    print(section)
    if args.write:
        write_results_section(ROOT / "benchmarks" / "RESULTS.md", "## Latent vs pixel", section)


if __name__ == "__main__":
    main()
