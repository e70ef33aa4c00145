"""Digits-FD of the same samples raw and clamped to [−1, 1] (as images are shown), for the default sampler and the
k-diffusion setting that ``trained_samplers --peer`` selected at each budget (read from its results file;
RESULTS.md, "Trained networks against k-diffusion"): whether the verdicts depend on the post-processing. The protocol is that benchmark's (scoring seeds
1–8, batches of 250 seeded 1000·seed + b, the demo's digits model).

Usage::

    python -m sde_diffusion.demo --quiet          # trains outputs/demo/digits_run
    python -m benchmarks.digits_clamp
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import torch

from sde_diffusion import sample
from sde_diffusion.evaluation.digits_classifier import digits_fd, get_classifier
from sde_diffusion.jobs.model import load_model

from .common import EDMDenoiser, load_kdiffusion_sampling, md_table, sigma_tilde_range
from .samplers import _kd_call, kd_settings

N, BATCH, SEEDS = 500, 250, range(1, 9)
HERE = Path(__file__).resolve().parent


def peer_settings(path: Path, nfes: List[int]) -> List[Tuple[int, str, Any]]:
    """(NFE, k-diffusion sampler, σ_min as recorded) that ``trained_samplers --peer`` selected on the digits."""
    from .sampler_family import load_results

    chosen = {(r["nfe"], f"sample_{r['kd']}", r["sigma_min"]) for r in load_results(path)["rows"]
              if r["model"] == "digits" and r["setting"] == "k-diffusion best" and r["nfe"] in nfes}
    return sorted(chosen)


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--digits-run", type=Path, default=Path("outputs/demo/digits_run"))
    ap.add_argument("--peer-run", type=Path, default=HERE / "results" / "trained_vs_peer.json.gz",
                    help="the trained_samplers --peer results whose selected settings are re-scored")
    ap.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    kd, status = load_kdiffusion_sampling()
    if kd is None:
        raise SystemExit(f"k-diffusion is needed: {status} (make peers)")
    clf = get_classifier()
    model = load_model(args.digits_run)
    sde, score = model.sde, model.score_model(use_ema=True)
    shape = (1, 8, 8)
    s_lo, s_hi = sigma_tilde_range(sde)
    m_T = float(sde.mean_coeff(torch.tensor(sde.T, dtype=torch.float64)))

    def batches(draw: Callable[[torch.Generator, int], torch.Tensor], seed: int) -> torch.Tensor:
        out = []
        for b, _ in enumerate(range(0, N, BATCH)):
            gen = torch.Generator().manual_seed(1000 * seed + b)
            torch.manual_seed(1000 * seed + b)
            with torch.no_grad():
                out.append(draw(gen, BATCH))
        return torch.cat(out)

    def ours(nfe: int) -> Callable[[torch.Generator, int], torch.Tensor]:
        return lambda gen, k: sample(sde, score, (k, *shape), sampler=None, steps=nfe, generator=gen,
                                     score_kind="learned").samples

    def peer(fn: str, nfe: int, smin: Any) -> Callable[[torch.Generator, int], torch.Tensor]:
        _, steps, _, s_min = next(kd_settings([fn], nfe, [smin], s_lo))
        sig = kd.get_sigmas_karras(steps, s_min, s_hi, rho=7.0).to(torch.float32)

        def draw(gen: torch.Generator, k: int) -> torch.Tensor:
            x_T = sde.prior_sample((k, *shape), generator=gen)
            return _kd_call(fn, EDMDenoiser(sde, score), x_T / m_T, sig, gen)
        return draw

    def cell(v: List[float]) -> str:
        return f"{statistics.mean(v):.2f} ± {statistics.stdev(v) / len(v) ** 0.5:.2f}"

    rows = []
    for nfe, fn, smin in peer_settings(args.peer_run, args.nfe):
        for name, draw in (("default", ours(nfe)), (f"k-diffusion {fn[7:]}, σ_min={smin}", peer(fn, nfe, smin))):
            raw, clamped = [], []
            for seed in SEEDS:
                x = batches(draw, seed)
                raw.append(digits_fd(x, classifier=clf))
                clamped.append(digits_fd(x.clamp(-1, 1), classifier=clf))
            rows.append([nfe, name, cell(raw), cell(clamped)])
            print(rows[-1], flush=True)
    print(md_table(["NFE", "sampler", "digits-FD, raw", "digits-FD, clamped to [−1, 1]"], rows))


if __name__ == "__main__":
    main()
