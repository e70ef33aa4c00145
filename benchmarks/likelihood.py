"""Cost and accuracy of probability-flow likelihoods: exact trace vs Hutchinson–Skilling.

For random Gaussian mixtures in D dimensions (exact score, so the only errors are the solver's and
the estimator's) and the VP SDE, integrates the augmented ODE with adaptive dopri5 and reports
NFE, seconds per sample and the error of log p_eps(x) against the analytic value, in nats/dim:

* "err (true prior)": prior_logp replaced by the exact marginal at T — the integration (and, for
  Hutchinson, estimator) error alone;
* "err (N(0,I) prior)": the SDE's Gaussian prior, as a model would be evaluated.

Usage::

    python -m benchmarks.likelihood                     # dims 2 16 64 256, batch 16
    python -m benchmarks.likelihood --dims 2 16 --batch 64 --rtol 1e-6
"""
from __future__ import annotations

import argparse
import time

import torch

from sde_diffusion import VPSDE
from sde_diffusion.likelihood import log_likelihood
from sde_diffusion.toy import GaussianMixture


def run(dim: int, method: str, batch: int, rtol: float, dtype: torch.dtype, seed: int = 0) -> dict:
    gm = GaussianMixture.random(dim, 4, seed=seed)
    sde = VPSDE()
    x = gm.sample(batch, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
    truth = gm.log_prob_t(x.double(), sde.eps, sde)
    kw: dict = dict(prior_logp=lambda z: gm.log_prob_t(z, sde.T, sde))
    if method != "exact":
        kw.update(divergence="hutchinson", noise=method, generator=torch.Generator().manual_seed(seed + 2))
    log_likelihood(sde, gm.score_fn(sde), x[:2], solver="euler", steps=1, **kw)  # warm-up, not timed
    start, cpu = time.perf_counter(), time.process_time()
    res = log_likelihood(sde, gm.score_fn(sde), x, rtol=rtol, atol=rtol, **kw)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    err_true = (res.logp.double() - truth) / dim
    logp_std = res.delta_logp.double() + sde.prior_logp(res.z.double())
    err_std = (logp_std - truth) / dim
    return {
        "D": dim,
        "method": method,
        "nfe": res.nfe,
        "s/sample": seconds / batch,
        "cpu s/sample": cpu_seconds / batch,
        "err_true_mae": err_true.abs().mean().item(),
        "err_true_sd": err_true.std().item(),
        "err_std_mae": err_std.abs().mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 16, 64, 256])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rtol", type=float, default=1e-5, help="rtol = atol of dopri5")
    parser.add_argument("--float64", action="store_true", help="integrate in float64 (default float32)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.float64 if args.float64 else torch.float32

    print(
        f"VP SDE, 4-component random Gaussian mixture, batch {args.batch}, dopri5 rtol=atol={args.rtol:g}, "
        f"{'float64' if args.float64 else 'float32'}, {args.threads} thread(s); errors of log p_eps in nats/dim "
        "(mean |err|; ± = sd over samples)\n"
    )
    print("| D | divergence | NFE | wall s/sample | CPU s/sample | err (true prior) | err (N(0,I) prior) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for dim in args.dims:
        for method in ("exact", "rademacher", "gaussian"):
            r = run(dim, method, args.batch, args.rtol, dtype)
            name = "exact" if method == "exact" else f"Hutchinson ({method}, 1 probe)"
            print(
                f"| {r['D']} | {name} | {r['nfe']} | {r['s/sample']:.4f} | {r['cpu s/sample']:.4f} | "
                f"{r['err_true_mae']:.2e} ± {r['err_true_sd']:.1e} | {r['err_std_mae']:.2e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
