r"""Samplers on trained networks: the default rule against the alternatives a user could pick.

Exact scores judge the integrator; a trained score is imperfect, and there the ranking can change.
This benchmark samples the two models ``make demo`` trains (``python -m sde_diffusion.demo``:
8×8 digits, U-Net, 800 steps; 2-D moons, MLP, 1500 steps; both VP) at 10, 20 and 50 NFE with

* ``default`` — what ``python sample.py steps=N`` runs: ``LEARNED_RULES`` of samplers/defaults.py
  (with ``clip_denoised=auto``: no clamp, the rule is stochastic);
* ``exact-score rule + clip`` — ``RULES`` (the exact-score table) with the denoiser clamped to the
  data range for image data (not for the 2-D toy);
* ``dpm_solver`` — DPM-Solver++(2M) at its config defaults;
* ``unipc`` — the same with the UniC corrector (conf/sampler/unipc.yaml);
* ``dpm_solver_sde`` — DPM-Solver++(2M) SDE (conf/sampler/dpm_solver_sde.yaml);
* ``dpm_solver + clip`` — DPM-Solver++(2M) with ``clip_denoised=true`` (images only; on the toy it is
  plain dpm_solver);
* ``euler_maruyama 200`` — the stochastic reference at 200 NFE (the demo's sampler);

over several seeds, and scores them against held-out data: digits-FD (Fréchet distance of the
digits classifier's features, against all 1797 digits) for the digits, sliced W2 (256 projections)
against fresh draws of the data distribution for the moons. The seed-to-seed spread is the noise
against which "the default must not lose" is judged.

Usage::

    python -m sde_diffusion.demo --quiet                       # once: trains outputs/demo/{digits,toy}_run
    python -m benchmarks.trained_samplers --seeds 3 --write    # → RESULTS.md, "Trained models"
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from sde_diffusion import sample
from sde_diffusion.config import parse_sample
from sde_diffusion.jobs.model import load_model
from sde_diffusion.samplers.defaults import default_sampler
from sde_diffusion.score import DataRangeClip

from .common import md_table, write_results_section

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

NFES = (10, 20, 50)


def sampler_cfg(name: str) -> Dict[str, Any]:
    """The options of conf/sampler/<name>.yaml (what `sample.py sampler=<name>` uses)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sample", overrides=[f"sampler={name}"])
    return dict(parse_sample(cfg).sampler_options)


def settings() -> List[Tuple[str, Optional[str], Dict[str, Any], Optional[int]]]:
    """(label, sampler or None for the default, options, fixed NFE or None for the NFE grid)."""
    return [
        ("default", None, {}, None),
        ("exact-score rule + clip", "exact-rule", {}, None),
        ("dpm_solver", "dpm_solver", sampler_cfg("dpm_solver"), None),
        ("unipc", "dpm_solver", sampler_cfg("unipc"), None),
        ("dpm_solver_sde", "dpm_solver", sampler_cfg("dpm_solver_sde"), None),
        ("dpm_solver + clip", "dpm_solver", sampler_cfg("dpm_solver"), None),
        ("euler_maruyama 200", "euler_maruyama", sampler_cfg("euler_maruyama"), 200),
    ]


def draw(model: Any, n: int, name: Optional[str], options: Dict[str, Any], nfe: int, seed: int, batch: int,
         clip: Optional[Tuple[float, float]] = None) -> torch.Tensor:
    score = model.score_model(use_ema=True)
    steps = nfe
    if name in (None, "exact-rule"):
        # What sample.py runs with no sampler= (the learned-score rule), or the exact-score rule.
        choice = default_sampler(model.sde, nfe, "learned" if name is None else "exact")
        name, steps, options = choice.name, choice.steps, {**choice.options, **options}
        if options.get("stochastic"):
            clip = None  # clip_denoised=auto clamps deterministic defaults only
    if clip is not None:
        score = DataRangeClip(score, model.sde, *clip)
    out = []
    for b, lo in enumerate(range(0, n, batch)):
        k = min(batch, n - lo)
        gen = torch.Generator().manual_seed(1000 * seed + b)
        with torch.no_grad():
            res = sample(model.sde, score, (k, *model.model_shape), sampler=name, steps=steps, generator=gen, **options)
        out.append(model.module.to_data(res.samples))
    return torch.cat(out)


def evaluate(label: str, model: Any, metric: Callable[[torch.Tensor], float], n: int, seeds: int, batch: int,
             rows: List[Dict[str, Any]]) -> None:
    dm = model.build_datamodule({})
    # As sample.py does (clip_denoised=auto): the default clamps x̂0 to the range of image data.
    bounded = getattr(dm, "is_image", False) and not model.is_latent
    clip = tuple(float(v) for v in dm.scaler(torch.tensor([0.0, 1.0]))) if bounded else None
    for tag, name, options, fixed in settings():
        for nfe in ([fixed] if fixed else NFES):
            for seed in range(seeds):
                t0 = time.perf_counter()
                x = draw(model, n, name, options, nfe, seed, batch, clip if (name in (None, "exact-rule") or "clip" in tag) else None)
                rows.append({"model": label, "setting": tag, "nfe": nfe, "seed": seed, "metric": metric(x),
                             "seconds": time.perf_counter() - t0})
                print(f"{label} {tag} NFE {nfe} seed {seed}: {rows[-1]['metric']:.4f}", file=sys.stderr, flush=True)


def table(rows: List[Dict[str, Any]], label: str) -> str:
    tags = [t for t, *_ in settings()]
    header = ["setting"] + [f"NFE {n}" for n in NFES] + ["EM 200"]
    body = []
    for tag in tags:
        line = [tag]
        for nfe in list(NFES) + [200]:
            v = [r["metric"] for r in rows if r["model"] == label and r["setting"] == tag and r["nfe"] == nfe]
            line.append(f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0:.3f}" if v else "–")
        body.append(line)
    return md_table(header, body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--digits-run", type=Path, default=ROOT / "outputs" / "demo" / "digits_run")
    ap.add_argument("--toy-run", type=Path, default=ROOT / "outputs" / "demo" / "toy_run")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n-digits", type=int, default=500)
    ap.add_argument("--n-toy", type=int, default=2000)
    ap.add_argument("--held-out", nargs="*", default=[], metavar="LABEL=RUN",
                    help="more 2-D networks, trained after the rule was chosen (sliced W2 tables)")
    ap.add_argument("--only-held-out", action="store_true", help="skip the two demo networks")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    held_out = [(spec.split("=", 1)[0], Path(spec.split("=", 1)[1])) for spec in args.held_out]
    runs = [] if args.only_held_out else [args.digits_run, args.toy_run]
    for run in runs + [r for _, r in held_out]:
        if not (run / "checkpoints" / "last.ckpt").is_file():
            sys.exit(f"{run} has no checkpoints/last.ckpt: train the demo models first (python -m sde_diffusion.demo --quiet)")
    t0 = time.time()
    rows: List[Dict[str, Any]] = []
    from sde_diffusion.metrics import sliced_wasserstein

    def vector_table(label: str, run: Path) -> str:
        net = load_model(run)
        data = net.build_datamodule({}).reference(20000, torch.Generator().manual_seed(123))
        evaluate(label, net, lambda x: sliced_wasserstein(x, data, generator=torch.Generator().manual_seed(0)),
                 args.n_toy, args.seeds, 2000, rows)
        sde = (net.training_record("sde")["sde"] or {}).get("name")
        return (f"{label} ({sde}), sliced W2 of {args.n_toy} samples against {len(data)} data points:\n\n"
                + table(rows, label))

    if args.only_held_out:
        parts = [vector_table(label, run) for label, run in held_out]
        text = "\n\n".join([f"Command: `python -m benchmarks.trained_samplers {' '.join(sys.argv[1:])}`; {args.seeds} seeds, {time.time() - t0:.0f} s."] + parts)
        print(text)
        return

    from sde_diffusion.evaluation.digits_classifier import digits_fd, get_classifier

    clf = get_classifier()
    digits = load_model(args.digits_run)
    evaluate("digits", digits, lambda x: digits_fd(x, classifier=clf), args.n_digits, args.seeds, 250, rows)

    toy = load_model(args.toy_run)
    dm = toy.build_datamodule({})
    truth = dm.reference(20000, torch.Generator().manual_seed(123))  # fresh draws, not training points
    evaluate("moons", toy, lambda x: sliced_wasserstein(x, truth, generator=torch.Generator().manual_seed(0)),
             args.n_toy, args.seeds, 2000, rows)

    text = "\n".join([
        f"Command: `python -m benchmarks.trained_samplers {' '.join(sys.argv[1:])}`; {args.seeds} seeds (mean ± std across seeds), "
        f"{time.time() - t0:.0f} s. Models: `python -m sde_diffusion.demo --quiet` (digits 800 steps, moons 1500 steps, VP).",
        "", f"Digits, digits-FD of {args.n_digits} samples against the 1797 digits (lower is better):", "",
        table(rows, "digits"), "",
        f"Moons, sliced W2 of {args.n_toy} samples against {len(truth)} data points (lower is better):", "",
        table(rows, "moons"),
    ])
    print(text)
    if args.write:
        heading = "## Trained models: the default sampler"
        write_results_section(HERE / "RESULTS.md", heading, f"{heading}\n\n{text}\n")


if __name__ == "__main__":
    main()
