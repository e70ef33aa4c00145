r"""The learned-score rule per budget: candidate configurations on the demo's trained networks.

``LEARNED_RULES`` (sde_diffusion/samplers/defaults.py) maps the NFE budget to a configuration for a trained
network. This script scores the candidates it is chosen from on the two networks of ``make demo`` (8×8 digits,
U-Net; 2-D moons, MLP; both VP), as ``python sample.py sampler=… steps=N`` runs them: for image data a
deterministic sampler gets the data-range clamp of ``clip_denoised=auto`` (a stochastic one does not), for the
moons nothing is clamped.

Scores: digits-FD of 500 samples against the 1797 digits; sliced W2 of 2000 samples against 20000 fresh moons
draws. Seeds 101, 102, 103 (the selection seeds of this rule; ``benchmarks.trained_samplers --peer`` scores on
seeds 1–8).

Usage::

    python -m sde_diffusion.demo --quiet
    python -m benchmarks.learned_rule --nfe 5 10 --write        # → RESULTS.md, "Learned-score rule per budget"
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

from sde_diffusion import sample
from sde_diffusion.jobs.model import load_model
from sde_diffusion.samplers import make_sampler
from sde_diffusion.score import DataRangeClip

from .common import md_table, write_results_section

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SEEDS = (101, 102, 103)

# (label, sampler, options); sampler None = today's learned default at the budget.
CANDIDATES: List[Tuple[str, Any, Dict[str, Any]]] = [("default", None, {})]
for _s in (None, 0.01, 0.03, 0.1):
    _e = {} if _s is None else {"end_sigma": _s}
    _tag = "eps" if _s is None else f"s{_s:g}"
    CANDIDATES += [
        (f"2m-sde-{_tag}", "dpm_solver", {"stochastic": True, **_e}),
        (f"2m-sde-{_tag}-d", "dpm_solver", {"stochastic": True, "denoise": True, **_e}),
        (f"unipc-{_tag}", "dpm_solver", {"corrector": True, "grid": "logsnr", **_e}),
        (f"2m-{_tag}", "dpm_solver", {"grid": "logsnr", **_e}),
    ]


def named_candidates() -> List[Tuple[str, Any, Dict[str, Any]]]:
    """Round 4 on trained networks: each named sampler as shipped and on the log-SNR grid ending at σ/m = 0.01 or 0.03."""
    from .sampler_family import NAMED_SAMPLERS

    out: List[Tuple[str, Any, Dict[str, Any]]] = []
    for n, (cls, o) in NAMED_SAMPLERS.items():
        out.append((f"{n}-shipped", cls, dict(o)))
        for e in (0.01, 0.03):
            out.append((f"{n}-logsnr-s{e:g}", cls, {**o, "grid": "logsnr", "end_sigma": e}))
            if cls in ("ode_heun", "ode_rk4"):  # round 5: steps in σ̃ (the VE tables)
                out.append((f"{n}-sigma-logsnr-s{e:g}", cls, {**o, "variable": "sigma", "grid": "logsnr", "end_sigma": e}))
    return out


def draw(model: Any, name: Any, options: Dict[str, Any], nfe: int, seed: int, n: int, batch: int,
         clip: Any) -> torch.Tensor:
    sde, score = model.sde, model.score_model(use_ema=True)
    if name is not None:  # a named sampler spends the budget: steps = NFE / evaluations per step
        from sde_diffusion.samplers import build_sampler

        probe = build_sampler(name, **options)
        nfe = max([n for n in range(1, nfe + 1) if probe.expected_nfe(n) <= nfe] or [1])
    smp, steps, choice = make_sampler(sde, name, nfe, options, "learned")
    opts = choice.options if choice is not None else options
    if clip is not None and not opts.get("stochastic", False):
        score = DataRangeClip(score, sde, *clip)  # what clip_denoised=auto does for a deterministic default
    out = []
    for b, lo in enumerate(range(0, n, batch)):
        k = min(batch, n - lo)
        gen = torch.Generator().manual_seed(1000 * seed + b)
        with torch.no_grad():
            res = sample(sde, score, (k, *model.model_shape), sampler=smp, steps=steps, generator=gen)
        out.append(model.module.to_data(res.samples))
    return torch.cat(out)


def report(paths: List[Path], named: bool, write: bool, note: str = "") -> str:
    """Tables (mean ± standard error over the seeds) of one or more result files of this script."""
    rows: List[Dict[str, Any]] = []
    commands = []
    for p in paths:
        from .sampler_family import load_results

        data = load_results(Path(p))  # .json or .json.gz
        rows += data["rows"]
        if data.get("command"):
            commands.append(data["command"])
    parts = ["Commands: " + "; ".join(f"`{c}`" for c in commands) + f". Seeds {list(SEEDS)}; mean ± standard error. "
             "A deterministic sampler has the digits' data-range clamp (what clip_denoised=auto gives it)." + note]
    for label in ("digits", "moons"):
        nfes = sorted({r["nfe"] for r in rows if r["model"] == label})
        tags = list(dict.fromkeys(r["setting"] for r in rows if r["model"] == label))
        if not tags:
            continue
        body = []
        for tag in tags:
            line = [tag]
            for nfe in nfes:
                v = [r["metric"] for r in rows if r["model"] == label and r["setting"] == tag and r["nfe"] == nfe]
                line.append("–" if not v else (f"{statistics.mean(v):.4g} ± {statistics.stdev(v) / math.sqrt(len(v)):.2g}"
                                               if len(v) > 1 else f"{v[0]:.4g}"))
            body.append(line)
        metric = "digits-FD of 500 samples" if label == "digits" else "sliced W2 of 2000 samples"
        parts += ["", f"{label} ({metric}; lower is better):", "", md_table(["setting"] + [f"NFE {n}" for n in nfes], body)]
    text = "\n".join(parts)
    print(text)
    if write:
        heading = "## Named samplers on trained networks" if named else "## Learned-score rule per budget"
        write_results_section(HERE / "RESULTS.md", heading, f"{heading}\n\n{text}\n")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--digits-run", type=Path, default=ROOT / "outputs" / "demo" / "digits_run")
    ap.add_argument("--toy-run", type=Path, default=ROOT / "outputs" / "demo" / "toy_run")
    ap.add_argument("--nfe", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "learned_rule.json")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--models", default="digits,moons", help="which demo models")
    ap.add_argument("--only", nargs="*", default=None, metavar="LABEL", help="only these candidates")
    ap.add_argument("--named", action="store_true", help="the named samplers' settings (round 4) instead of the rule's")
    ap.add_argument("--report", type=Path, nargs="+", default=None, help="print (and --write) the tables of result files")
    args = ap.parse_args()
    if args.report:
        report(args.report, args.named, args.write)
        return
    from sde_diffusion.evaluation.digits_classifier import digits_fd, get_classifier
    from sde_diffusion.metrics import sliced_wasserstein

    t0 = time.time()
    clf = get_classifier()
    digits, toy = load_model(args.digits_run), load_model(args.toy_run)
    truth = toy.build_datamodule({}).reference(20000, torch.Generator().manual_seed(123))
    dm = digits.build_datamodule({})
    clip = tuple(float(v) for v in dm.scaler(torch.tensor([0.0, 1.0])))
    models = [("digits", digits, lambda x: digits_fd(x, classifier=clf), 500, 250, clip),
              ("moons", toy, lambda x: sliced_wasserstein(x, truth, generator=torch.Generator().manual_seed(0)), 2000, 2000, None)]
    models = [m for m in models if m[0] in args.models.split(",")]
    rows: List[Dict[str, Any]] = []
    candidates = named_candidates() if args.named else CANDIDATES
    if args.only:
        candidates = [c for c in candidates if c[0] in args.only]
    for label, model, metric, n, batch, c in models:
        for nfe in args.nfe:
            for tag, name, opts in candidates:
                for seed in SEEDS:
                    m = metric(draw(model, name, opts, nfe, seed, n, batch, c))
                    rows.append({"model": label, "nfe": nfe, "setting": tag, "seed": seed, "metric": m})
                    print(f"{label} NFE {nfe} {tag} seed {seed}: {m:.4f}", file=sys.stderr, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"command": "python -m benchmarks.learned_rule " + " ".join(sys.argv[1:]), "rows": rows}))
    os.replace(tmp, args.out)
    parts = [f"Command: `python -m benchmarks.learned_rule {' '.join(sys.argv[1:])}`; seeds {list(SEEDS)}, "
             f"{time.time() - t0:.0f} s. Mean ± standard error; a deterministic sampler has the digits' clamp."]
    for label, *_ in models:
        body = []
        for tag, _, _ in candidates:
            line = [tag]
            for nfe in args.nfe:
                v = [r["metric"] for r in rows if r["model"] == label and r["setting"] == tag and r["nfe"] == nfe]
                line.append(f"{statistics.mean(v):.3f} ± {statistics.stdev(v) / math.sqrt(len(v)):.3f}")
            body.append(line)
        parts += ["", f"{label}:", "", md_table(["setting"] + [f"NFE {n}" for n in args.nfe], body)]
    text = "\n".join(parts)
    print(text)
    if args.write:
        heading = "## Named samplers on trained networks" if args.named else "## Learned-score rule per budget"
        write_results_section(HERE / "RESULTS.md", heading, f"{heading}\n\n{text}\n")


if __name__ == "__main__":
    main()
