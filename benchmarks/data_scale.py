r"""The default's end level at other data scales: paired runs of the rule against the same rule stopping at other
noise levels σ/m, and of ``schedule=fit`` with two sets of end-level factors, on the wider family's problems with
their data multiplied by a factor (``benchmarks.sampler_family.family_draw``: means × s, covariances × s²).

The draws and the scoring are those of ``benchmarks.sampler_family`` (start draw B, its noise seed, the whitened
moment KL); each variant is reported as its geometric-mean ratio to the rule on the same problem, low-D (D ≤ 8) and
high-D apart, with the cases more than 2 % worse and better.

Usage::

    python -m benchmarks.data_scale --seeds 2000-2015 --scale 1 --nfe 20 30 40 50 --ends 0.003 0.001
    python -m benchmarks.data_scale --seeds 5000-5011 --scale 0.05 --nfe 20 30 40 50 --ends 0.003 0.001 0.0003
    python -m benchmarks.data_scale --seeds 5000-5011 --scale 20 --nfe 10 15 20 30 --ends 0.03 0.1
    python -m benchmarks.data_scale --seeds 5000-5011 --scale 0.05 --nfe 10 20 50 --fit-factors 1/3,1,2,3,5
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from fractions import Fraction
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from sde_diffusion import sample
from sde_diffusion.samplers import fitted
from sde_diffusion.samplers.defaults import default_sampler
from sde_diffusion.testing import make_sde, whitened_moment_kl

from . import sampler_family as sf


def seed_range(text: str) -> List[int]:
    a, _, b = text.partition("-")
    return list(range(int(a), int(b or a) + 1))


def run(seeds: Sequence[int], scale: float, budgets: Sequence[int], ends: Sequence[float],
        fit_factors: Optional[Sequence[float]], sdes: Sequence[str] = ("vp", "ve")) -> List[Dict[str, Any]]:
    """One row per (seed, SDE, budget): the rule's error and each variant's."""
    torch.set_num_threads(1)
    shipped = fitted.END_FACTORS
    # (label, options over the rule's, the fit's end-level factors while it runs)
    variants = [("rule", {}, shipped)] + [(f"end {e:g}", {"end_sigma": e}, shipped) for e in ends]
    if fit_factors is not None:
        variants += [("fit", {"schedule": "fit"}, shipped),
                     ("fit, factors given", {"schedule": "fit"}, tuple(fit_factors))]
    rows = []
    for seed in seeds:
        gm = sf.family_draw("wide", seed, scale)
        n = sf.n_samples("wide", gm.dim)
        for name in sdes:
            sde = make_sde(name, gm.diameter())
            score_fn = gm.score_fn(sde, compute_dtype=None)
            x_T = sf.start_draw(gm, sde, seed, n)
            for budget in budgets:
                choice = default_sampler(sde, budget)
                row: Dict[str, Any] = {"seed": seed, "sde": name, "dim": gm.dim, "budget": budget}
                for label, extra, factors in variants:
                    fitted.END_FACTORS = factors
                    try:
                        out = sample(sde, score_fn, x_T.shape, sampler=choice.name, steps=choice.steps, x_T=x_T,
                                     generator=torch.Generator().manual_seed(sf.NOISE_SEED + 1),
                                     **{**choice.options, **extra})
                    finally:
                        fitted.END_FACTORS = shipped
                    row[label] = whitened_moment_kl(gm, out.samples)
                rows.append(row)
                print(row, flush=True)
    return rows


def table(rows: List[Dict[str, Any]]) -> str:
    groups: Dict[tuple, List[float]] = defaultdict(list)
    labels = [k for k in rows[0] if k not in ("seed", "sde", "dim", "budget", "rule")]
    for r in rows:
        for k in labels:
            groups[(r["budget"], k, "low-D" if r["dim"] <= sf.LOW_DIM else "high-D")].append(r[k] / r["rule"])
    lines = ["| NFE | variant | part | geo-mean ratio to the rule | > 2 % worse | > 2 % better | cases |", "|---|---|---|---|---|---|---|"]
    for (b, k, part), v in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] != "low-D")):
        g = math.exp(sum(math.log(x) for x in v) / len(v))
        lines.append(f"| {b} | {k} | {part} | {g:.3f} | {sum(x > 1.02 for x in v)} | {sum(x < 0.98 for x in v)} | {len(v)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=seed_range, required=True, help="a seed or a range, e.g. 5000-5011")
    ap.add_argument("--scale", type=float, default=1.0, help="the data's factor")
    ap.add_argument("--nfe", type=int, nargs="+", required=True)
    ap.add_argument("--ends", type=float, nargs="*", default=[], help="levels σ/m to stop at instead of the rule's")
    ap.add_argument("--fit-factors", default=None,
                    help="comma-separated end-level factors: schedule=fit with them against the shipped END_FACTORS")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    factors = [float(Fraction(f)) for f in args.fit_factors.split(",")] if args.fit_factors else None
    rows = run(args.seeds, args.scale, args.nfe, args.ends, factors)
    if args.out:
        args.out.write_text(json.dumps(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
