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

With ``--peer`` it runs the comparison against k-diffusion (``make peers``, see
:func:`benchmarks.common.load_kdiffusion_sampling`) instead, at 5, 10, 20 and 50 NFE:

* ``default`` — ``python sample.py steps=N`` (the learned-score rule);
* ``schedule=fit`` — the same sampler on the grid fitted to the model (``python sample.py steps=N schedule=fit``;
  fitted once per model and budget on 64 prior draws of seed 12345, as sample.py does);
* ``k-diffusion`` — its 8 main samplers (:data:`KD_MAIN`) on its Karras grid (ρ = 7) from σ̃(T) down to
  σ_min ∈ :data:`KD_SIGMA_MINS` (σ̃(eps) and four fixed levels), then to 0, with the toolkit's score
  wrapped as its denoiser (σ̃ = σ(t)/m(t), x̃ = x/m); its step count is the largest whose NFE fits the budget.
  The best of these 40 settings per model and budget is chosen on the selection seed and scored on the others.

Each is scored on ``--scoring-seeds`` seeds (disjoint from the selection seed); the tables give mean ± standard
error and the verdict of the default and of the fit against the peer's best at 2 standard errors of the difference.

Usage::

    python -m sde_diffusion.demo --quiet                       # once: trains outputs/demo/{digits,toy}_run
    python -m benchmarks.trained_samplers --seeds 3 --write    # → RESULTS.md, "Trained models"
    python -m benchmarks.trained_samplers --peer --scoring-seeds 8 --write   # → "Trained networks against k-diffusion"
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


# ------------------------------------------------------------------ the peer on trained networks
PEER_NFES = (5, 10, 20, 50)
KD_MAIN = ("sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2", "sample_lms",
           "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde")
KD_SIGMA_MINS = ("eps", 0.002, 0.01, 0.03, 0.1)
SELECTION_SEED = 0
FIT_SEED = 12345


def _mean_se(v: List[float]) -> Tuple[float, float]:
    from .fitted_schedules import _stats  # mean and standard error, as that benchmark reports them

    return _stats(v)


def verdict(a: List[float], b: List[float]) -> str:
    """``better`` / ``worse`` / ``tie``: a against b (lower is better) at 2 standard errors of the difference."""
    import math

    (ma, sa), (mb, sb) = _mean_se(a), _mean_se(b)
    if not (math.isfinite(ma) and math.isfinite(mb)):
        return "better" if math.isfinite(ma) else ("worse" if math.isfinite(mb) else "tie")
    se = math.sqrt(sa**2 + sb**2)
    return "better" if ma < mb - 2 * se else ("worse" if ma > mb + 2 * se else "tie")


def peer_benchmark(label: str, model: Any, metric: Callable[[torch.Tensor], float], n: int, batch: int,
                   scoring: List[int], rows: List[Dict[str, Any]], log: Callable[[Dict[str, Any]], None],
                   nfes: Tuple[int, ...] = PEER_NFES, kd_top: Optional[int] = None,
                   save: Callable[[], None] = lambda: None, refit: bool = False) -> None:
    """Rows for ``default``, ``schedule=fit`` and k-diffusion's best on one trained model, appended to ``rows``
    (budgets already there are skipped; ``save`` is called after each budget). ``kd_top``: from the third
    budget on, only the k-diffusion samplers that ranked in the top ``kd_top`` on the selection seed at the
    budget before (every σ_min of them is still swept). ``refit``: for the budgets already there, fit again with
    today's ``fit_schedule`` and replace the ``schedule=fit`` rows only."""
    from sde_diffusion.samplers import make_sampler
    from sde_diffusion.samplers.fitted import default_objective, fit_batch, fit_schedule

    from .common import EDMDenoiser, load_kdiffusion_sampling, sigma_tilde_range
    from .samplers import _kd_call, kd_settings

    kd, status = load_kdiffusion_sampling()
    if kd is None:
        sys.exit(f"k-diffusion is needed for --peer: {status} (make peers)")
    sde, score = model.sde, model.score_model(use_ema=True)
    shape = tuple(model.model_shape)
    s_lo, s_hi = sigma_tilde_range(sde)
    m_T = float(sde.mean_coeff(torch.tensor(sde.T, dtype=torch.float64)))

    def ours(nfe: int, seed: int, schedule: Any) -> torch.Tensor:
        out = []
        for b, lo in enumerate(range(0, n, batch)):
            k = min(batch, n - lo)
            gen = torch.Generator().manual_seed(1000 * seed + b)
            with torch.no_grad():
                res = sample(sde, score, (k, *shape), sampler=None, steps=nfe, generator=gen, score_kind="learned",
                             schedule=schedule)
            out.append(model.module.to_data(res.samples))
        return torch.cat(out)

    def peer(fn: str, steps: int, s_min: float, seed: int) -> Tuple[torch.Tensor, int]:
        sig = kd.get_sigmas_karras(steps, s_min, s_hi, rho=7.0).to(torch.float32)
        den = EDMDenoiser(sde, score)
        out = []
        for b, lo in enumerate(range(0, n, batch)):
            k = min(batch, n - lo)
            gen = torch.Generator().manual_seed(1000 * seed + b)
            torch.manual_seed(1000 * seed + b)
            x_T = sde.prior_sample((k, *shape), generator=gen)
            with torch.no_grad():
                x = _kd_call(fn, den, x_T / m_T, sig, gen)
            out.append(model.module.to_data(x))
        return torch.cat(out), den.nfe // max(1, len(range(0, n, batch)))

    done = {r["nfe"] for r in rows if r["model"] == label and r["setting"] == "k-diffusion best"}

    def scored(setting: str, nfe: int, schedule: Any) -> None:
        # Our sampler at ``nfe`` on the rule's grid (schedule None) or a fitted one, on every scoring seed.
        for seed in scoring:
            t0 = time.perf_counter()
            rows.append({"model": label, "setting": setting, "nfe": nfe, "seed": seed,
                         "metric": metric(ours(nfe, seed, schedule)), "seconds": time.perf_counter() - t0})
            log(rows[-1])

    def fit_rows(nfe: int) -> None:
        # As sample.py fits: the default objective for a trained network, on fit_batch prior draws.
        smp, steps, _ = make_sampler(sde, None, nfe, {}, "learned")
        objective = default_objective(score, "learned")
        x_fit = sde.prior_sample((fit_batch(objective, shape), *shape), generator=torch.Generator().manual_seed(FIT_SEED))
        t0 = time.perf_counter()
        fitted = fit_schedule(sde, score, smp, steps, x_fit, objective=objective)
        fit_row = {"model": label, "setting": "fit-cost", "nfe": nfe, "fit_nfe": fitted.fit_nfe, "objective": objective,
                   "fit_draws": int(x_fit.shape[0]), "seconds": time.perf_counter() - t0}
        rows.append(fit_row)
        log(fit_row)
        scored("schedule=fit", nfe, fitted)

    previous: Optional[int] = None
    for i, nfe in enumerate(nfes):
        if nfe in done:
            previous = nfe
            if refit:
                rows[:] = [r for r in rows if not (r["model"] == label and r["nfe"] == nfe
                                                   and r["setting"] in ("fit-cost", "schedule=fit"))]
                fit_rows(nfe)
                save()
            continue
        kd_funcs: Tuple[str, ...] = KD_MAIN
        if kd_top and previous is not None and i >= 2:
            sel = [r for r in rows if r["model"] == label and r["setting"] == "kd-select" and r["nfe"] == previous]
            best_of = {fn: min(r["metric"] for r in sel if r["kd"] == fn[7:]) for fn in KD_MAIN
                       if any(r["kd"] == fn[7:] for r in sel)}
            kd_funcs = tuple(sorted(best_of, key=best_of.get)[:kd_top])
        previous = nfe
        fit_rows(nfe)
        scored("default", nfe, None)
        best = None
        for fn, kd_n, smin, s_min in kd_settings(kd_funcs, nfe, KD_SIGMA_MINS, s_lo):
            t0 = time.perf_counter()
            x, used = peer(fn, kd_n, s_min, SELECTION_SEED)
            m = metric(x)
            rows.append({"model": label, "setting": "kd-select", "nfe": nfe, "used_nfe": used, "seed": SELECTION_SEED,
                         "kd": fn[7:], "sigma_min": smin, "metric": m, "seconds": time.perf_counter() - t0})
            log(rows[-1])
            if used <= nfe and (best is None or m < best[0]):
                best = (m, fn, kd_n, s_min, smin)
        if best is None:
            continue
        for seed in scoring:
            t0 = time.perf_counter()
            x, used = peer(best[1], best[2], best[3], seed)
            rows.append({"model": label, "setting": "k-diffusion best", "nfe": nfe, "used_nfe": used, "seed": seed,
                         "kd": best[1][7:], "sigma_min": best[4], "metric": metric(x),
                         "seconds": time.perf_counter() - t0, "kd_swept": [f[7:] for f in kd_funcs]})
            log(rows[-1])
        save()


def peer_table(rows: List[Dict[str, Any]], label: str) -> str:
    body = []
    for nfe in PEER_NFES:
        get = lambda s: [r["metric"] for r in rows if r["model"] == label and r["setting"] == s and r["nfe"] == nfe]  # noqa: E731
        d, f, k = get("default"), get("schedule=fit"), get("k-diffusion best")
        if not d:
            continue
        kd_row = next((r for r in rows if r["model"] == label and r["setting"] == "k-diffusion best" and r["nfe"] == nfe), None)
        cost = next((r for r in rows if r["model"] == label and r["setting"] == "fit-cost" and r["nfe"] == nfe), {})
        ms = lambda v: "–" if not v else "{:.4g} ± {:.2g}".format(*_mean_se(v))  # noqa: E731
        body.append([str(nfe), ms(d), ms(f), ms(k),
                     f"{kd_row['kd']}, σ_min={kd_row['sigma_min']}" if kd_row else "–",
                     verdict(d, k) if k else "–", verdict(f, k) if k else "–", verdict(f, d),
                     f"{cost.get('fit_nfe', '–')} / {cost.get('seconds', 0):.0f} s"])
    return md_table(["NFE", "default", "schedule=fit", "k-diffusion best", "its setting", "default vs peer",
                     "fit vs peer", "fit vs default", "fit NFE / time"], body)


def _print_row(row: Dict[str, Any]) -> None:
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), file=sys.stderr, flush=True)


def peer_report(paths: List[Path], write: bool) -> str:
    """The tables of one or more ``--peer`` result files (e.g. the digits and the moons run separately)."""
    import json

    rows: List[Dict[str, Any]] = []
    commands = []
    for p in paths:
        from .sampler_family import load_results

        data = load_results(Path(p))  # .json or .json.gz
        rows += data["rows"]
        commands.append(data["command"])
    seeds = sorted({r["seed"] for r in rows if r.get("setting") == "default"})
    n_digits = 500
    text = "\n".join([
        "Commands: " + "; ".join(f"`{c}`" for c in commands) + ".",
        f"Selection seed {SELECTION_SEED}; scoring seeds {seeds[0]}–{seeds[-1]} ({len(seeds)}). Models: "
        "`python -m sde_diffusion.demo --quiet` (digits 800 steps, moons 1500 steps, VP). Mean ± standard error over "
        "the scoring seeds; verdicts at 2 standard errors of the difference.", "",
        f"Digits, digits-FD of {n_digits} samples against the 1797 digits (lower is better):", "",
        peer_table(rows, "digits"), "",
        "Moons, sliced W2 of 2000 samples against 20000 fresh draws (lower is better):", "",
        peer_table(rows, "moons")])
    print(text)
    if write:
        heading = "## Trained networks against k-diffusion"
        write_results_section(HERE / "RESULTS.md", heading, f"{heading}\n\n{text}\n")
    return text


def peer_main(args: Any) -> None:
    import json
    import os

    from sde_diffusion.evaluation.digits_classifier import digits_fd, get_classifier
    from sde_diffusion.metrics import sliced_wasserstein

    scoring = list(range(1, 1 + args.scoring_seeds))
    out = args.out or HERE / "results" / "trained_vs_peer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: List[Dict[str, Any]] = json.loads(out.read_text())["rows"] if args.resume and out.exists() else []
    t0 = time.time()

    def log(row: Dict[str, Any]) -> None:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), file=sys.stderr, flush=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"command": command, "scoring_seeds": scoring, "rows": rows}))
        os.replace(tmp, out)

    command = "python -m benchmarks.trained_samplers " + " ".join(sys.argv[1:])
    models = []
    if "digits" in args.models:
        clf = get_classifier()
        models.append(("digits", load_model(args.digits_run), lambda x: digits_fd(x, classifier=clf), args.n_digits, 250))
    if "moons" in args.models:
        toy = load_model(args.toy_run)
        truth = toy.build_datamodule({}).reference(20000, torch.Generator().manual_seed(123))
        models.append(("moons", toy, lambda x: sliced_wasserstein(x, truth, generator=torch.Generator().manual_seed(0)),
                       args.n_toy, 2000))
    for label, model, metric, n, batch in models:
        nfes = tuple(args.digits_nfes) if label == "digits" and args.digits_nfes else PEER_NFES
        peer_benchmark(label, model, metric, n, batch, scoring, rows, _print_row, nfes, args.kd_top,
                       save=lambda: log({"model": label, "saved_s": time.time() - t0}), refit=args.refit)
    text = "\n".join([
        f"Command: `{command}`; selection seed {SELECTION_SEED}, scoring seeds {scoring[0]}–{scoring[-1]}; "
        f"{time.time() - t0:.0f} s on this run. Models: `python -m sde_diffusion.demo --quiet` (digits 800 steps, "
        "moons 1500 steps, VP). Mean ± standard error over the scoring seeds; verdicts at 2 standard errors.", "",
        f"Digits, digits-FD of {args.n_digits} samples against the 1797 digits (lower is better):", "",
        peer_table(rows, "digits"), "",
        f"Moons, sliced W2 of {args.n_toy} samples against 20000 fresh draws (lower is better):", "",
        peer_table(rows, "moons")])
    print(text)
    if args.write:
        heading = "## Trained networks against k-diffusion"
        write_results_section(HERE / "RESULTS.md", heading, f"{heading}\n\n{text}\n")


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
    ap.add_argument("--peer", action="store_true", help="default and schedule=fit against k-diffusion at its best")
    ap.add_argument("--scoring-seeds", type=int, default=8, help="--peer: seeds 1..N score (seed 0 selects the peer's setting)")
    ap.add_argument("--models", default="digits,moons", help="--peer: which demo models")
    ap.add_argument("--out", type=Path, default=None, help="--peer: raw rows (JSON), saved as they come")
    ap.add_argument("--resume", action="store_true", help="--peer: keep the budgets already finished in --out")
    ap.add_argument("--refit", action="store_true",
                    help="--peer with --resume: fit again (today's fit_schedule) at the budgets already finished and "
                         "replace only their schedule=fit rows")
    ap.add_argument("--digits-nfes", type=int, nargs="*", default=None, help="--peer: the digits' budgets (default 5 10 20 50)")
    ap.add_argument("--kd-top", type=int, default=None,
                    help="--peer: from the third budget, sweep only the k-diffusion samplers in the top N at the budget before")
    ap.add_argument("--peer-report", type=Path, nargs="+", default=None, help="print (and --write) the tables of --peer runs")
    args = ap.parse_args()
    if args.peer_report:
        peer_report(args.peer_report, args.write)
        return
    if args.peer:
        peer_main(args)
        return
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
