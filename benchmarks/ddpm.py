r"""DDPM's discrete machinery on trained digits models: the variational bound per variance choice next to the
exact probability-flow NLL, and the sample quality of Algorithm 2 (full and respaced) against the reverse SDE
and the default sampler at the same NFE.

Two runs of ``python train.py`` (8×8 digits, U-Net, VP, 1000 steps) are compared: the plain ε-model (fixed
variances β and β̃) and one trained with ``model.learn_sigma=true`` (learned Σ, hybrid loss). The bound is
the exact sum over all N = 1000 steps (one noise draw per step and example) with the discretised Gaussian
decoder on the 17 pixel levels, on held-out digits; the ODE NLL uses dopri5 with the Hutchinson trace
(2 Rademacher probes) and uniform dequantisation, as ``mode=likelihood``. Sample quality is digits-FD
(Fréchet distance of the digits classifier's features against all 1797 digits; the floor is a real subset
of the same size) over several seeds.

Usage::

    python train.py run_dir=outputs/ddpm/digits
    python train.py model.learn_sigma=true run_dir=outputs/ddpm/digits_learned
    python -m benchmarks.ddpm --run outputs/ddpm/digits --learned-run outputs/ddpm/digits_learned --write
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from sde_diffusion import sample
from sde_diffusion.jobs.likelihood_job import evaluation_examples, model_input
from sde_diffusion.jobs.model import load_model
from sde_diffusion.likelihood import bits_per_dim, log_likelihood
from sde_diffusion.sdes.discrete import DiscreteVP
from sde_diffusion.vlb import vlb

from .common import md_table, write_results_section

HERE = Path(__file__).resolve().parent


def _digits(model: Any, n: int) -> Tuple[torch.Tensor, Any]:
    dm = model.build_datamodule({})
    return evaluation_examples(dm, n, "val", 0), dm


def bound_rows(run: Path, label: str, variances: List[str], n: int, batch: int) -> List[Dict[str, Any]]:
    """VLB bits/dim per variance choice and the ODE bits/dim of the same held-out digits."""
    model = load_model(run, device="cpu")
    score = model.score_model(use_ema=True)
    k, dm = _digits(model, n)
    lo, hi = float(dm.scaler(torch.tensor(0.0))), float(dm.scaler(torch.tensor(1.0)))
    proc = DiscreteVP.from_sde(model.sde, 1000)
    rows = []
    for variance in variances:
        start, totals, nfe = time.perf_counter(), [], 0
        for b in range(0, n, batch):
            x0 = dm.scaler(k[b : b + batch].float() / (int(dm.levels) - 1))
            with torch.no_grad():
                res = vlb(model.sde, score, x0, proc, variance=variance, decoder="discretized", levels=int(dm.levels),
                          data_range=(lo, hi), generator=torch.Generator().manual_seed(b))
            totals.append(res.total / (64 * math.log(2)))
            nfe += res.nfe
        t = torch.cat(totals).double()
        rows.append({"run": label, "what": f"bound, σ² = {variance}", "bpd": float(t.mean()),
                     "se": float(t.std() / math.sqrt(t.numel())), "nfe": nfe, "seconds": time.perf_counter() - start})
    start, vals, nfe = time.perf_counter(), [], 0
    for b in range(0, n, batch):
        gen = torch.Generator().manual_seed(1000 + b)
        x = model_input(k[b : b + batch], dm, gen, torch.float32, torch.device("cpu"))
        res = log_likelihood(model.sde, score, x, divergence="hutchinson", n_probes=2, generator=gen)
        vals.append(bits_per_dim(res.logp, (1, 8, 8), scale=hi - lo, levels=int(dm.levels)))
        nfe += res.nfe
    t = torch.cat(vals).double()
    rows.append({"run": label, "what": "probability-flow ODE", "bpd": float(t.mean()),
                 "se": float(t.std() / math.sqrt(t.numel())), "nfe": nfe, "seconds": time.perf_counter() - start})
    return rows


def quality(run: Path, sampler: Optional[str], steps: int, n: int, seeds: List[int], **options: Any) -> Dict[str, Any]:
    from sde_diffusion.evaluation.digits_classifier import digits_fd, get_classifier

    model = load_model(run, device="cpu")
    score = model.score_model(use_ema=True)
    clf = get_classifier()
    fds, nfe, seconds = [], 0, 0.0
    for seed in seeds:
        start = time.perf_counter()
        res = sample(model.sde, score, (n, 1, 8, 8), sampler=sampler, steps=steps,
                     generator=torch.Generator().manual_seed(seed), score_kind="learned", **options)
        seconds += time.perf_counter() - start
        nfe = res.nfe
        fds.append(digits_fd(res.samples.clamp(-1, 1), classifier=clf))
    return {"fd": statistics.mean(fds), "spread": (max(fds) - min(fds)) / 2, "nfe": nfe, "seconds": seconds / len(seeds)}


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=Path("outputs/ddpm/digits"))
    ap.add_argument("--learned-run", type=Path, default=Path("outputs/ddpm/digits_learned"))
    ap.add_argument("--n-bound", type=int, default=90, help="held-out digits in the bound (the val split has 180)")
    ap.add_argument("--n-samples", type=int, default=256, help="samples per digits-FD")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="write the section of benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    seeds = list(range(args.seeds))

    rows = bound_rows(args.run, "ε-model", ["beta", "beta_tilde"], args.n_bound, 90)
    rows += bound_rows(args.learned_run, "learn_sigma", ["learned", "beta", "beta_tilde"], args.n_bound, 90)
    bound_table = md_table(["model", "what", "bits/dim", "± SE", "NFE", "seconds"],
                           [[r["run"], r["what"], f"{r['bpd']:.3f}", f"{r['se']:.3f}", r["nfe"], f"{r['seconds']:.0f}"]
                            for r in rows])
    print(bound_table)

    cases: List[Tuple[str, Path, Optional[str], int, Dict[str, Any]]] = [
        ("ddpm 1000 (Algorithm 2), σ² = β̃", args.run, "ddpm", 1000, {"variance": "beta_tilde"}),
        ("reverse SDE (euler_maruyama 1000)", args.run, "euler_maruyama", 1000, {}),
    ]
    for k in (100, 50):
        cases += [
            (f"ddpm respaced to {k}, σ² = β", args.run, "ddpm", k, {"variance": "beta"}),
            (f"ddpm respaced to {k}, σ² = β̃", args.run, "ddpm", k, {"variance": "beta_tilde"}),
            (f"ddpm respaced to {k}, learned Σ", args.learned_run, "ddpm", k, {"variance": "learned"}),
            (f"default sampler, {k} NFE", args.run, None, k, {}),
        ]
    qrows = []
    for label, run, sampler, steps, opts in cases:
        q = quality(run, sampler, steps, args.n_samples, seeds, **opts)
        qrows.append([label, "learn_sigma" if run == args.learned_run else "ε-model", q["nfe"], f"{q['fd']:.2f} ± {q['spread']:.2f}", f"{q['seconds']:.1f}"])
        print(qrows[-1], flush=True)
    from sde_diffusion.evaluation.digits_classifier import digits_fd, get_classifier

    model = load_model(args.run, device="cpu")
    dm = model.build_datamodule({})
    floor = digits_fd(dm.reference(args.n_samples, generator=torch.Generator().manual_seed(0)), classifier=get_classifier())
    q_table = md_table(["sampler", "model", "NFE", f"digits-FD (mean ± half-range, {len(seeds)} seeds)", "s/run"], qrows)
    print(q_table)
    print(f"floor: {floor:.2f}")
    if args.write:
        section = (
            "## DDPM: the variational bound and Algorithm 2\n\n"
            "Command: `python train.py run_dir=outputs/ddpm/digits`, `python train.py model.learn_sigma=true "
            "run_dir=outputs/ddpm/digits_learned`, then `python -m benchmarks.ddpm --write` "
            f"(bound on {args.n_bound} held-out digits, N = 1000 steps, exact sum; {args.n_samples} samples per "
            f"digits-FD, seeds {seeds}). 2 CPU cores.\n\n"
            "Bits per dimension of the 17-level digits: the bound with each reverse variance, and the exact "
            "probability-flow NLL (Hutchinson, dopri5, uniform dequantisation) of the same examples.\n\n"
            f"{bound_table}\n\n"
            f"Sample quality (digits-FD, lower is better; floor of {args.n_samples} real digits: {floor:.2f}):\n\n"
            f"{q_table}\n"
        )
        write_results_section(HERE / "RESULTS.md", "## DDPM: the variational bound and Algorithm 2", section)


if __name__ == "__main__":
    main()
