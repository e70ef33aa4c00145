r"""Where a Gaussian start should put the first grid point: the tuning table of :data:`START_FACTORS`.

On the wider family's problems (``benchmarks.sampler_family``: start draw B, its noise seed, the whitened moment
KL) with the exact score, the default sampler at each budget runs (a) from T on the rule's grid and (b) from the
analytic step of the Gaussian with p_0's exact mean and covariance (:class:`GaussianStart`) to the level
factor × √λ_max, then on a uniform log-SNR grid from there to the rule's end (its end point and final step kept).
Each start level is reported as its geometric-mean ratio to (a) on the same problem, low-D (D ≤ 8) and high-D
apart, with the worst ratio and the problems where it is worse than (a). Starts at or above half the prior's level
are skipped (``fit_start`` makes none there).

With ``--fit`` it compares what ``sample(..., schedule="fit")`` does instead, paired on the same problems: the fit
with its Gaussian start (moments estimated from the model's samples, level by :data:`START_FACTORS`) against the
fit from T (``start=False``), both on the 64 prior draws ``sample()`` fits on; the rows then hold the ratio of the
first to the second.

Usage::

    python -m benchmarks.gaussian_start --seeds 2000-2015 --sdes vp ve
    python -m benchmarks.gaussian_start --seeds 2000-2015 --sdes vp ve --fit --nfe 5 10 20 30 50
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch

from sde_diffusion import sample
from sde_diffusion.samplers import build_sampler
from sde_diffusion.samplers.defaults import default_sampler
from sde_diffusion.samplers.fitted import fit_schedule, on_schedule, warped_log_snr_times
from sde_diffusion.samplers.gaussian_start import GaussianStart, top_level
from sde_diffusion.testing import make_sde, whitened_moment_kl

from . import sampler_family as sf
from .common import md_table
from .data_scale import seed_range

HERE = Path(__file__).resolve().parent
FACTORS = (1.0, 2.0, 4.0, 8.0)
NFES = (5, 10, 15, 20)


def exact_start(gm: Any, level: float) -> GaussianStart:
    """The Gaussian with the mixture's exact mean and covariance, starting at ``level``."""
    w, mus, covs = gm.weights.double(), gm.means.double(), gm.covs.double()
    mu = (w[:, None] * mus).sum(0)
    cov = (w[:, None, None] * (covs + mus[:, :, None] * mus[:, None, :])).sum(0) - torch.outer(mu, mu)
    lam, vec = torch.linalg.eigh(0.5 * (cov + cov.T))
    return GaussianStart(level=level, mean=mu.tolist(), eigvals=lam.clamp(min=0).tolist(), eigvecs=vec.T.tolist(),
                         residual=0.0, shape=[gm.dim])


def run_case(task: Tuple[Any, ...]) -> Dict[str, Any]:
    seed, sde_name, nfes, factors, *more = task
    fitted = bool(more and more[0])
    torch.set_num_threads(1)
    gm = sf.family_draw("wide", seed)
    n = sf.n_samples("wide", gm.dim)
    sde = make_sde(sde_name, gm.diameter())
    score = gm.score_fn(sde, compute_dtype=None)
    x_T = sf.start_draw(gm, sde, seed, n)
    std_max = exact_start(gm, 1.0).std_max
    row: Dict[str, Any] = {"seed": seed, "sde": sde_name, "dim": gm.dim, "modes": gm.num_components,
                           "std_max": std_max, "rule": {}, "start": {}}
    for nfe in nfes:
        choice = default_sampler(sde, nfe)

        def go(schedule_sampler: Any) -> float:
            gen = torch.Generator().manual_seed(sf.NOISE_SEED + 1)
            out = sample(sde, score, x_T.shape, sampler=schedule_sampler, steps=choice.steps, x_T=x_T, generator=gen)
            return whitened_moment_kl(gm, out.samples)

        smp = build_sampler(choice.name, **choice.options)
        if fitted:
            x_fit = sde.prior_sample((64, gm.dim), generator=torch.Generator().manual_seed(0))
            plain = fit_schedule(sde, score, smp, choice.steps, x_fit, start=False)
            with_start = fit_schedule(sde, score, smp, choice.steps, x_fit)
            row["rule"][str(nfe)] = go(plain.apply(smp))
            row["start"][f"fit@{nfe}"] = go(with_start.apply(smp))
            row.setdefault("levels", {})[str(nfe)] = None if with_start.start is None else with_start.start["level"]
            continue
        row["rule"][str(nfe)] = go(smp)
        for f in factors:
            level = f * std_max
            if level >= 0.5 * top_level(sde):
                continue
            start = exact_start(gm, level)
            times = warped_log_snr_times(sde, choice.steps, smp.end.end_time(sde), 1.0, start.time(sde))
            row["start"][f"{f:g}@{nfe}"] = go(on_schedule(smp, times, start=start))
    return row


def table(rows: List[Dict[str, Any]], nfes: Sequence[int], factors: Sequence[Any]) -> str:
    body = []
    for nfe in nfes:
        for f in factors:
            key = f"{f:g}@{nfe}" if not isinstance(f, str) else f"{f}@{nfe}"
            for part, keep in (("low-D", lambda r: r["dim"] <= sf.LOW_DIM), ("high-D", lambda r: r["dim"] > sf.LOW_DIM)):
                ratios = [r["start"][key] / r["rule"][str(nfe)] for r in rows if keep(r) and key in r["start"]]
                if not ratios:
                    continue
                gm = math.exp(sum(math.log(max(v, 1e-300)) for v in ratios) / len(ratios))
                body.append([str(nfe), f if isinstance(f, str) else f"{f:g}", part, f"{gm:.3f}", f"{max(ratios):.3g}",
                             f"{sum(v > 1 for v in ratios)}/{len(ratios)}"])
    return md_table(["NFE", "factor", "problems", "geo-mean ratio to the run from T", "worst", "worse than from T"],
                    body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=seed_range, default=seed_range("2000-2015"))
    ap.add_argument("--sdes", nargs="+", default=["vp", "ve"])
    ap.add_argument("--nfe", type=int, nargs="+", default=list(NFES))
    ap.add_argument("--factors", type=float, nargs="+", default=list(FACTORS))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--fit", action="store_true", help="the fit with its start against the fit from T")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gaussian_start.json")
    args = ap.parse_args()
    tasks = [(s, e, tuple(args.nfe), tuple(args.factors), args.fit) for e in args.sdes for s in args.seeds]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run_case, tasks))
    command = "python -m benchmarks.gaussian_start " + " ".join(sys.argv[1:])
    args.out.write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    for sde in args.sdes:
        print(f"\n{sde}:\n")
        print(table([r for r in rows if r["sde"] == sde], args.nfe, ["fit"] if args.fit else args.factors))


if __name__ == "__main__":
    main()
