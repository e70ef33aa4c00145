"""Fitted end levels: ``schedule=fit`` with and without moving the level where the default's steps stop.

Where the exact-score default ends with a final step that follows the probability-flow ODE to σ̃ = 0 (from 13 NFE),
``fit_schedule`` also chooses that level (samplers/fitted.py). This compares, on the wider family's seeds
(``benchmarks/sampler_family.py``: the same problems, scoring draws and step noise), the default on the rule's grid,
on a grid fitted with the level kept (``move_end=False``) and on one fitted with the level moved, each as a ratio
to k-diffusion's best setting (the peer's rows of a sampler_family results file).

    python -m benchmarks.fit_end_levels --seeds tuning --peers benchmarks/results/family_wide_tuning.json.gz
    python -m benchmarks.fit_end_levels --seeds fresh
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

from sde_diffusion import sample
from sde_diffusion.samplers import build_sampler
from sde_diffusion.samplers.defaults import default_sampler
from sde_diffusion.samplers.fitted import fit_schedule
from sde_diffusion.testing import make_sde, whitened_moment_kl, wide_family

from .common import md_table
from .sampler_family import (LOW_DIM, NOISE_SEED, WIDE_HELD_OUT_SEEDS, WIDE_TUNING_SEEDS, geo_mean, load_results,
                             n_samples, start_draw)

NFES = (15, 20, 30, 50)
KINDS = ("rule", "fit, level kept", "fit, level moved")


def run_case(task: Tuple[int, str]) -> List[Dict[str, Any]]:
    seed, sde_name = task
    torch.set_num_threads(1)
    gm = wide_family(seed)
    sde = make_sde(sde_name, gm.diameter())
    score = gm.score_fn(sde, compute_dtype=None)
    x_T = start_draw(gm, sde, seed, n_samples("wide", gm.dim))
    # The fit's 64 prior draws, as sample(..., schedule="fit") takes them.
    x_fit = sde.prior_sample((64, gm.dim), generator=torch.Generator().manual_seed(0))
    rows = []
    for budget in NFES:
        choice = default_sampler(sde, budget)
        smp = build_sampler(choice.name, **choice.options)
        grids = {"rule": None}
        for kind, move in (("fit, level kept", False), ("fit, level moved", True)):
            grids[kind] = fit_schedule(sde, score, smp, choice.steps, x_fit, move_end=move)
        for kind, sched in grids.items():
            out = sample(sde, score, x_T.shape, sampler=choice.name, steps=choice.steps, x_T=x_T, schedule=sched,
                         generator=torch.Generator().manual_seed(NOISE_SEED + 1), **choice.options)
            rows.append({"seed": seed, "sde": sde_name, "dim": gm.dim, "budget": budget, "kind": kind,
                         "metric": whitened_moment_kl(gm, out.samples),
                         "level": None if sched is None else sched.end_sigma})
    return rows


#: Seeds of the wider family drawn for this comparison alone, after the held-out seeds had been looked at for it.
FRESH_SEEDS = tuple(range(4000, 4020))


def paired(rows: List[Dict[str, Any]]) -> List[List[str]]:
    """Per problem kind and budget: the moved level's error over the kept level's (geometric mean; cases better /
    worse by more than 2 %)."""
    kept = {(r["seed"], r["sde"], r["budget"]): r["metric"] for r in rows if r["kind"] == KINDS[1]}
    body = []
    for low in (True, False):
        for budget in NFES:
            v = [r["metric"] / kept[(r["seed"], r["sde"], budget)] for r in rows
                 if r["kind"] == KINDS[2] and r["budget"] == budget and (r["dim"] <= LOW_DIM) == low]
            if v:
                body.append(["low-D" if low else "high-D", str(budget), f"{geo_mean(v):.3f}",
                             f"{sum(x < 0.98 for x in v)} / {sum(x > 1.02 for x in v)} of {len(v)}"])
    return body


def table(rows: List[Dict[str, Any]], best: Dict[Tuple[int, str, int], float]) -> List[List[str]]:
    body = []
    for low in (True, False):
        for budget in NFES:
            line = ["low-D" if low else "high-D", str(budget)]
            for kind in KINDS:
                v = [r["metric"] / best[(r["seed"], r["sde"], budget)] for r in rows
                     if r["kind"] == kind and r["budget"] == budget and (r["dim"] <= LOW_DIM) == low
                     and (r["seed"], r["sde"], budget) in best]
                line.append(f"{sum(x <= 1 for x in v)}/{len(v)}, {geo_mean(v):.3f}" if v else "–")
            moved = [r for r in rows if r["kind"] == KINDS[2] and r["budget"] == budget and (r["dim"] <= LOW_DIM) == low]
            line.append(f"{sum(1 for r in moved if r['level'] is not None and r['level'] != 0.01)}/{len(moved)}")
            body.append(line)
    return body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", choices=("tuning", "held-out", "fresh"), default="tuning")
    ap.add_argument("--sdes", default="vp,ve")
    ap.add_argument("--peers", type=Path, default=None,
                    help="a sampler_family results file with the peer's rows (for the ratios to it)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    seeds = {"tuning": WIDE_TUNING_SEEDS, "held-out": WIDE_HELD_OUT_SEEDS, "fresh": FRESH_SEEDS}[args.seeds]
    tasks = [(s, d) for s in seeds for d in args.sdes.split(",") if d]
    best: Dict[Tuple[int, str, int], float] = {}
    for r in load_results(args.peers)["rows"] if args.peers else []:
        if r["kind"] == "kd" and r["nfe"] <= r["budget"]:
            k = (r["seed"], r["sde"], r["budget"])
            best[k] = min(best.get(k, math.inf), r["metric"])
    rows: List[Dict[str, Any]] = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for i, part in enumerate(pool.map(run_case, tasks)):
            rows += part
            print(f"[{i + 1}/{len(tasks)}]", file=sys.stderr, flush=True)
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(["python -m benchmarks.fit_end_levels", *sys.argv[1:]]),
                                        "rows": rows}))
    print(md_table(["problems", "NFE", "moved / kept: geo-mean", "better / worse by > 2 %"], paired(rows)))
    if best:
        print()
        print(md_table(["problems", "NFE"] + [f"{k}: wins vs peer, geo-mean ratio" for k in KINDS] + ["level moved"],
                       table(rows, best)))


if __name__ == "__main__":
    main()
