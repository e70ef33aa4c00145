"""``python -m sde_diffusion.demo`` (``make demo``): train briefly on the embedded digits, sample a grid.

Runs the same code path as ``python train.py`` (the Hydra config in ``conf/`` and
:func:`sde_diffusion.fit.fit`), then draws samples with a registered sampler from the EMA
weights, and does the same for a 2-D toy set. Writes to ``outputs/demo/``:

* ``digits_samples.png`` — a grid of generated 8×8 digits (beside ``digits_data.png``, real ones);
* ``toy_scatter.png`` — samples beside data for a 2-D toy set;
* ``digits_run/`` and ``toy_run/`` — the training runs (checkpoints, logs, in-training figures).

A few minutes on two CPU cores. ``--digits-steps`` / ``--toy-steps`` trade time for quality.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence

import torch

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: List[str]) -> Any:
    """The training config ``conf/train.yaml`` with ``overrides``, as ``python train.py`` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from . import config  # noqa: F401  (registers the schemas conf/train.yaml composes on)

    if not (CONF_DIR / "train.yaml").is_file():
        raise FileNotFoundError(f"the demo needs the source checkout's configs: {CONF_DIR / 'train.yaml'} is missing")
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def _sample(module: Any, n: int, sampler: str, steps: int, seed: int) -> torch.Tensor:
    from .samplers import sample

    with torch.no_grad():
        score_fn = module.score_fn(use_ema=True)
        gen = torch.Generator().manual_seed(seed)
        return sample(module.sde, score_fn, (n, *module.data_shape), sampler=sampler, steps=steps, generator=gen).samples


def run_digits(out: Path, steps: int, sampler: str, sample_steps: int, quiet: bool) -> Path:
    from .plots import save_image_grid
    from .fit import fit

    cfg = compose(
        [
            "data=digits", "model=unet_small", "sde=vp", f"trainer.max_steps={steps}",
            "callbacks.samples.every_n_steps=0", f"callbacks.samples.steps={sample_steps}",
            f"callbacks.checkpoint.every_n_steps={max(steps // 2, 1)}",
            f"trainer.enable_progress_bar={'false' if quiet else 'true'}", "trainer.enable_model_summary=false",
        ]
    )
    result = fit(None, cfg, _fresh(out / "digits_run"))
    module = result.module.eval()
    x = _sample(module, 64, sampler, sample_steps, seed=0)
    dm = result.datamodule
    path = save_image_grid(dm.inverse_scaler(x), out / "digits_samples.png", title=f"generated ({sampler}, {sample_steps} steps, EMA, {steps} training steps)")
    save_image_grid(dm.inverse_scaler(dm.reference(64)), out / "digits_data.png", title="data")
    _report_fd(x)
    return path


def _fresh(run_dir: Path) -> Path:
    # The demo's run directories are its own scratch: each `make demo` trains anew rather than
    # refusing (training never mixes two runs' checkpoints in one directory).
    shutil.rmtree(run_dir, ignore_errors=True)
    return run_dir


def _report_fd(x: torch.Tensor) -> None:
    # digits-FD only when the feature classifier is already cached (training it takes a while).
    try:
        from .evaluation.digits_classifier import digits_fd, get_classifier

        clf = get_classifier(train_if_missing=False)
        print(f"digits-FD of the 64 samples: {digits_fd(x, classifier=clf):.2f} (biased upwards at n=64)")
    except (ImportError, FileNotFoundError):
        pass


def run_toy(out: Path, steps: int, sampler: str, sample_steps: int, quiet: bool) -> Path:
    from .plots import save_scatter
    from .fit import fit

    cfg = compose(
        [
            "data=moons", "data.n=20000", "model=mlp", "model.hidden=64", "sde=vp", f"trainer.max_steps={steps}",
            "optim.lr=3e-3", "ema.decay=0.99", "callbacks.samples.every_n_steps=0", "callbacks.samples.num_samples=1000",
            f"callbacks.samples.steps={sample_steps}", f"callbacks.checkpoint.every_n_steps={steps}",
            f"trainer.enable_progress_bar={'false' if quiet else 'true'}", "trainer.enable_model_summary=false",
        ]
    )
    result = fit(None, cfg, _fresh(out / "toy_run"))
    x = _sample(result.module.eval(), 2000, sampler, sample_steps, seed=0)
    return save_scatter(x, result.datamodule.reference(2000), out / "toy_scatter.png", title=f"moons: {steps} training steps, {sampler}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .samplers import SAMPLERS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output directory (default outputs/demo)")
    parser.add_argument("--digits-steps", type=int, default=800, help="training steps on the digits")
    parser.add_argument("--toy-steps", type=int, default=1500, help="training steps on the 2-D toy (0: skip)")
    parser.add_argument("--sampler", default="euler_maruyama", help=f"one of: {', '.join(SAMPLERS.names())}")
    parser.add_argument("--sample-steps", type=int, default=200)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.sampler not in SAMPLERS:
        parser.error(f"unknown sampler {args.sampler!r}; choose one of: {', '.join(SAMPLERS.names())}")
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    grid = run_digits(args.out, args.digits_steps, args.sampler, args.sample_steps, args.quiet)
    print(f"digits: {grid} ({time.perf_counter() - t0:.0f} s)")
    if args.toy_steps > 0:
        t1 = time.perf_counter()
        scatter = run_toy(args.out, args.toy_steps, args.sampler, args.sample_steps, args.quiet)
        print(f"2-D toy: {scatter} ({time.perf_counter() - t1:.0f} s)")
    print(f"done in {time.perf_counter() - t0:.0f} s; outputs in {args.out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
