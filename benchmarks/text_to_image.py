r"""Prompt adherence of text-to-image models on ``data=digit_pairs``, judged by the packaged digits classifier.

For each guidance weight w, every evaluated pair (a, b) is asked for with one caption drawn from the
grammar (a fixed draw per pair), ``--n`` samples each, with the sampler ``python sample.py`` picks at
``--steps`` NFE. A sample counts as right when the classifier reads a in the left half and b in the right
half. Pairs: ``--seen`` training pairs drawn with a fixed seed, and all 10 held-out pairs (never in a
training batch; chance 1 %). A label-conditional run (``conditioning.class_labels=true``, label 10·a + b)
is scored the same way on its labels: its held-out labels were never trained, which is its ceiling.

Usage::

    python train.py data=digit_pairs conditioning.text.encoder=tiny run_dir=outputs/t2i/pixel
    python train.py data=digit_pairs conditioning.class_labels=true run_dir=outputs/t2i/labels
    python -m benchmarks.text_to_image --run outputs/t2i/pixel --label-run outputs/t2i/labels --write
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from sde_diffusion import sample
from sde_diffusion.config import parse_sample
from sde_diffusion.data.digit_pairs import HELD_OUT_PAIRS, caption, halves, training_pairs
from sde_diffusion.evaluation.digits_classifier import classify
from sde_diffusion.guidance import ClassifierFreeGuidance, ContextGuidance
from sde_diffusion.jobs.model import load_model
from sde_diffusion.jobs.sample_job import choose_sampler

from .common import md_table, write_results_section

HERE = Path(__file__).resolve().parent


def eval_pairs(n_seen: int, seed: int) -> Tuple[List[Tuple[int, int]], List[Tuple[int, int]]]:
    seen = training_pairs()
    pick = torch.randperm(len(seen), generator=torch.Generator().manual_seed(seed))[:n_seen].tolist()
    return [seen[i] for i in sorted(pick)], list(HELD_OUT_PAIRS)


def both_right(images: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """[n] bool: the classifier reads a left and b right (images in model range [−1, 1])."""
    left, right = halves(images)
    return (classify(left) == a) & (classify(right) == b)


def score_model_samples(loaded, guided, n: int, steps: int, seed: int) -> torch.Tensor:
    cfg = parse_sample({"ckpt": str(loaded.path), "steps": steps})
    choice = choose_sampler(loaded.sde, cfg)
    with torch.no_grad():
        res = sample(loaded.sde, guided, (n, *loaded.model_shape), sampler=choice.sampler, steps=choice.steps,
                     generator=torch.Generator().manual_seed(seed))
        x = res.samples
        if loaded.is_latent:
            x = loaded.module.to_data(x)
    return x.clamp(-1, 1)


def adherence(run: str, scales: Sequence[float], pairs: List[Tuple[int, int]], n: int, steps: int, seed: int,
              labels: bool = False) -> Dict[float, List[float]]:
    """For each w, the share of samples with both digits right, per pair (in ``pairs`` order)."""
    loaded = load_model(run)
    module, score = loaded.module, loaded.score_model(use_ema=True)
    out: Dict[float, List[float]] = {}
    for w in scales:
        rates = []
        for k, (a, b) in enumerate(pairs):
            if labels:
                guided = ClassifierFreeGuidance(score, y=10 * a + b, scale=w, null_label=int(loaded.num_classes))
            else:
                prompt = caption(a, b, torch.Generator().manual_seed(1000 * seed + 10 * a + b))
                c, u = module.encode_prompts([prompt] * n), module.encode_prompts([""])
                guided = ContextGuidance(score, c["context"], c["context_mask"], u["context"], u["context_mask"], w)
            x = score_model_samples(loaded, guided, n, steps, seed + k)
            rates.append(float(both_right(x, a, b).float().mean()))
        out[w] = rates
    return out


def training_seconds(run: str) -> Optional[float]:
    """Wall time of the fit from the run's CSV log timestamps, if recorded (else the log file's span)."""
    p = Path(run) / "train_seconds.json"
    if p.is_file():
        return float(json.loads(p.read_text())["seconds"])
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a text model run (pixel)")
    parser.add_argument("--latent-run", default=None, help="a latent text model run")
    parser.add_argument("--label-run", default=None, help="a label-conditional run on digit_pairs")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 3.0, 5.0])
    parser.add_argument("--seen", type=int, default=20)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    seen, held = eval_pairs(args.seen, args.seed)
    runs = [("text, pixel", args.run, False)]
    if args.latent_run:
        runs.append(("text, latent", args.latent_run, False))
    if args.label_run:
        runs.append(("labels, pixel", args.label_run, True))
    rows = []
    for name, run, labels in runs:
        t0 = time.perf_counter()
        res = adherence(run, args.scales, seen + held, args.n, args.steps, args.seed, labels)
        for w in args.scales:
            r = res[w]
            s_rate, h_rate = sum(r[: len(seen)]) / len(seen), sum(r[len(seen):]) / len(held)
            rows.append([name, f"{w:g}", f"{100 * s_rate:.0f} %", f"{100 * h_rate:.0f} %",
                         f"{sum(x >= 0.5 for x in r[len(seen):])}/{len(held)}"])
            print(rows[-1], flush=True)
        print(f"{name}: evaluated in {time.perf_counter() - t0:.0f} s", flush=True)
    header = ["model", "guidance w", f"both right, {len(seen)} seen pairs", "both right, 10 held-out pairs",
              "held-out pairs right in ≥ half"]
    table = md_table(header, rows)
    print(table)
    if args.write:
        section = "\n".join([
            "## Text to image: prompt adherence on digit_pairs", "",
            "Command (from the repository root, after the training runs listed in benchmarks/text_to_image.py):", "",
            "```",
            f".venv/bin/python -m benchmarks.text_to_image --run {args.run}"
            + (f" --latent-run {args.latent_run}" if args.latent_run else "")
            + (f" --label-run {args.label_run}" if args.label_run else "")
            + f" --seen {args.seen} --n {args.n} --steps {args.steps} --write",
            "```", "",
            f"{args.n} samples per pair with the sampler `python sample.py steps={args.steps}` picks; a sample is right "
            "when the digits classifier reads the asked digit in each half. Seen pairs are drawn from the 90 training "
            f"pairs with seed {args.seed}; held-out pairs are the 10 never in a training batch (chance 1 %).", "",
            table, "",
        ])
        write_results_section(HERE / "RESULTS.md", "## Text to image: prompt adherence on digit_pairs", section)
        print("wrote benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
