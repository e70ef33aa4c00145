r"""``schedule=fit`` on trained networks: the sampler's own grid rule against grids fitted to the model, per objective.

For the two networks of ``make demo`` (8×8 digits, U-Net; 2-D moons, MLP; both VP) and budgets of 5, 10 and 20
NFE, each sampler runs on (a) its own grid rule, (b) the grid fitted with ``objective=whitened`` (the default: the
local error of a DPM-Solver++(2M) teacher path in the norm of the noised density's Hessian) and (c)
``objective=curvature`` (the same error in the Euclidean norm, scaled by m). The fit uses one batch of 64 prior draws (seed fixed, separate from the scoring seeds). Scores:
digits-FD against all 1797 digits (n = 500 samples per seed) and sliced W2 (256 projections) against 20000 fresh
moons draws (n = 2000); mean ± standard error over the scoring seeds, and the verdict of fitted vs rule at 2 SE.

Usage::

    python -m sde_diffusion.demo --quiet                                     # trains outputs/demo/{digits,toy}_run
    python -m benchmarks.fitted_schedules --seeds 4 --write                  # → RESULTS.md, "Fitted schedules"
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from sde_diffusion import sample
from sde_diffusion.jobs.model import load_model
from sde_diffusion.samplers import make_sampler
from sde_diffusion.samplers.fitted import OBJECTIVES as ALL_OBJECTIVES, fit_batch, fit_schedule

from .common import md_table, write_results_section

HERE = Path(__file__).resolve().parent
SAMPLERS: List[Tuple[str, Optional[str], Dict[str, Any]]] = [
    ("default", None, {}),
    ("dpm_solver", "dpm_solver", {}),
    ("unipc", "dpm_solver", {"corrector": True}),
    ("ddim", "ddim", {}),
]
OBJECTIVES = ("whitened", "curvature")


def _stats(v: List[float]) -> Tuple[float, float]:
    return statistics.mean(v), (statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else float("nan"))


def evaluate(model: Any, shape: Tuple[int, ...], metrics: Dict[str, Callable[[torch.Tensor], float]], nfes: List[int],
             seeds: List[int], n: int, objectives: Tuple[str, ...] = OBJECTIVES,
             samplers: Optional[List[str]] = None) -> Dict[str, List[Dict[str, Any]]]:
    """Rows per metric (the same samples scored by each of ``metrics``)."""
    score, sde = model.score_model(), model.sde
    out: Dict[str, List[Dict[str, Any]]] = {name: [] for name in metrics}
    for nfe in nfes:
        for label, name, opts in SAMPLERS:
            if samplers and label not in samplers:
                continue
            smp, steps, _ = make_sampler(sde, name, nfe, opts, "learned")
            rows = {m: {"nfe": nfe, "sampler": label} for m in metrics}
            for obj in (None, *objectives):
                sched, fit_s = None, 0.0
                if obj is not None:
                    # As sample.py fits: fit_batch(obj) prior draws of seed 12345 (64, or more for ``samples``).
                    x_fit = sde.prior_sample((fit_batch(obj, shape), *shape), generator=torch.Generator().manual_seed(12345))
                    start = time.perf_counter()
                    sched = fit_schedule(sde, score, smp, steps, x_fit, objective=obj)
                    fit_s = time.perf_counter() - start
                vals: Dict[str, List[float]] = {m: [] for m in metrics}
                for seed in seeds:
                    res = sample(sde, score, (n, *shape), sampler=smp, steps=steps, schedule=sched,
                                 generator=torch.Generator().manual_seed(seed))
                    for m, fn in metrics.items():
                        vals[m].append(fn(res.samples))
                for m in metrics:
                    rows[m][obj or "rule"] = _stats(vals[m])
                    if sched is not None:
                        rows[m][f"{obj}_fit"] = (sched.fit_nfe, fit_s)
            for m in metrics:
                out[m].append(rows[m])
            print(rows, flush=True)
    return out


def _verdict(a: Tuple[float, float], b: Tuple[float, float]) -> str:
    """fitted (b) against the rule (a), lower is better, at 2 standard errors of the difference."""
    se = math.sqrt(a[1] ** 2 + b[1] ** 2)
    if b[0] < a[0] - 2 * se:
        return "better"
    if b[0] > a[0] + 2 * se:
        return "worse"
    return "tie"


def table(rows: List[Dict[str, Any]], objectives: Tuple[str, ...] = OBJECTIVES) -> str:
    out = []
    for r in rows:
        cells = [r["nfe"], r["sampler"]]
        for key in ("rule", *objectives):
            m, se = r[key]
            cells.append(f"{m:.3g} ± {se:.2g}")
        cells += [_verdict(r["rule"], r[obj]) for obj in objectives]
        cells += [f"{r[f'{obj}_fit'][0]} / {r[f'{obj}_fit'][1]:.1f}" for obj in objectives]
        out.append(cells)
    return md_table(["NFE", "sampler", "rule's grid", *(f"fit: {o}" for o in objectives),
                     *(f"{o} vs rule" for o in objectives), *(f"fit NFE / s ({o})" for o in objectives)], out)


def figure(run: Path, path: Path, nfe: int = 5) -> Path:
    """Side by side, the same prior draws and noise: 64 digits at ``nfe`` NFE with the default sampler on its
    rule's grid (left) and on the grid fitted to the model (right)."""
    import numpy as np

    from sde_diffusion.plots import _write_pixels, tile_images, to_uint8_images

    model = load_model(run)
    score, sde = model.score_model(), model.sde
    dm = model.build_datamodule({})
    x_T = sde.prior_sample((64, 1, 8, 8), generator=torch.Generator().manual_seed(7))
    grids = []
    for schedule in (None, "fit"):
        res = sample(sde, score, (64, 1, 8, 8), steps=nfe, x_T=x_T, schedule=schedule, score_kind="learned",
                     generator=torch.Generator().manual_seed(8))
        grids.append(tile_images(to_uint8_images(dm.inverse_scaler(res.samples).clamp(0, 1)), nrow=8))
    gap = np.full((grids[0].shape[0], 4, *grids[0].shape[2:]), 255, dtype=grids[0].dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_pixels(np.concatenate([grids[0], gap, grids[1]], axis=1), path, 4,
                         f"digits at {nfe} NFE: the default sampler on its own grid (left) and on a fitted grid (right)")


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--digits-run", type=Path, default=Path("outputs/demo/digits_run"))
    ap.add_argument("--toy-run", type=Path, default=Path("outputs/demo/toy_run"))
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--objectives", nargs="+", choices=ALL_OBJECTIVES, default=list(OBJECTIVES))
    ap.add_argument("--samplers", nargs="+", choices=[label for label, *_ in SAMPLERS], default=None,
                    help="only these samplers (default: all)")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--figure", type=Path, default=None, help="write the 5-NFE before/after figure here and stop")
    args = ap.parse_args(argv)
    if args.figure is not None:
        print(figure(args.digits_run, args.figure))
        return
    torch.set_num_threads(1)
    objs = tuple(args.objectives)
    seeds = [101 + k for k in range(args.seeds)]  # scoring seeds; the fit batch uses seed 12345
    from sde_diffusion.evaluation.digits_classifier import digits_fd, get_classifier
    from sde_diffusion.metrics import sliced_wasserstein

    sections = []
    if args.digits_run.exists():
        clf = get_classifier()
        digits = load_model(args.digits_run)
        # Scored as they come (as benchmarks.trained_samplers and learned_rule do) and clamped to [−1, 1] (as images
        # are shown): the two can rank grids that end at different noise levels differently.
        rows = evaluate(digits, (1, 8, 8), {"raw": lambda x: digits_fd(x, classifier=clf),
                                            "clamped": lambda x: digits_fd(x.clamp(-1, 1), classifier=clf)},
                        args.nfe, seeds, 500, objs, args.samplers)
        for m, what in (("raw", "as they come"), ("clamped", "clamped to [−1, 1]")):
            sections.append(f"Digits ({args.digits_run}), digits-FD of 500 samples {what} (lower is better):\n\n"
                            f"{table(rows[m], objs)}")
    if args.toy_run.exists():
        toy = load_model(args.toy_run)
        truth = toy.build_datamodule({}).reference(20000, torch.Generator().manual_seed(123))
        w2 = {"w2": lambda x: sliced_wasserstein(x, truth, generator=torch.Generator().manual_seed(0))}
        rows = evaluate(toy, (2,), w2, args.nfe, seeds, 2000, objs, args.samplers)
        sections.append(f"Moons ({args.toy_run}), sliced W2 of 2000 samples (lower is better):\n\n{table(rows['w2'], objs)}")
    text = "\n\n".join(sections)
    print(text)
    if args.write:
        section = ("## Fitted schedules\n\n"
                   f"Command: `python -m benchmarks.fitted_schedules --seeds {args.seeds} --write` (scoring seeds "
                   f"{seeds}; the fit's 64 prior draws use seed 12345). 2 CPU cores, one thread.\n\n{text}\n")
        write_results_section(HERE / "RESULTS.md", "## Fitted schedules", section)


if __name__ == "__main__":
    main()
