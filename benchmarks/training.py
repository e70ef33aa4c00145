"""Training benchmarks: Lightning overhead and digits sample quality versus training steps.

    .venv/bin/python -m benchmarks.training                 # both parts, writes "## Training" in RESULTS.md
    .venv/bin/python -m benchmarks.training --part throughput --steps 60
    .venv/bin/python -m benchmarks.training --part quality --run-dir outputs/train/digits_vp/<run>

Throughput: the same network, loss (dsm_terms with the config's options), AdamW + warm-up,
gradient clipping at 1 and EMA (torch AveragedModel with the same foreach EMA update) run

* in a plain PyTorch loop, and
* through ``ScoreDiffusion`` + ``lightning.Trainer`` with the callbacks of a real run (EMA, loss by
  t, CSV logger, progress bar off), and with the EMA callback only.

Both read the same in-memory data through a DataLoader; steps after a warm-up are timed, the
variants alternate and the best of ``--repeats`` is kept (the machine may be shared). One thread.

Quality: the default digits run (``python train.py``) with a checkpoint every ``--every`` steps;
for each checkpoint, ``--n`` samples from the EMA weights (Euler–Maruyama, ``--sample-steps``)
and their digits-FD against all 1797 digits (sde_diffusion.evaluation.digits_fd), with the FD of
``--n`` real digits as the floor.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from sde_diffusion.callbacks import EMA
from sde_diffusion.demo import compose
from sde_diffusion.fit import build_trainer
from sde_diffusion.losses import dsm_terms
from sde_diffusion.tasks.common import LinearWarmup
from sde_diffusion.tasks.score_matching import ScoreDiffusion

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "RESULTS.md"


# ---------------------------------------------------------------------------------- throughput
CASES = {
    "digits U-Net (unet_small, 1×8×8, batch 128)": (["data=digits", "model=unet_small"], (1, 8, 8), 128),
    "2-D MLP (mlp, batch 512)": (["data=moons", "model=mlp"], (2,), 512),
}


def make_loader(shape: Sequence[int], batch: int, n: int = 4096) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=g).clamp(-1, 1)
    return DataLoader(TensorDataset(x, torch.zeros(n, dtype=torch.long)), batch_size=batch, shuffle=True, drop_last=True, generator=g)


def time_plain(cfg: Any, shape: Sequence[int], batch: int, steps: int, warmup: int) -> Tuple[float, float]:
    """(wall, CPU) seconds per step of a hand-written loop doing the same work as ScoreDiffusion."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    module = ScoreDiffusion(cfg, shape)  # only to build the identical sde / net / loss options
    sde, net, opts = module.sde, module.net, module.loss_options
    o = module.optim_cfg
    opt = torch.optim.AdamW(net.parameters(), lr=o["lr"], betas=o["betas"], eps=o["eps"], weight_decay=o["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LinearWarmup(o["warmup_steps"]))
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True)
    net.train()
    done, t0, c0 = 0, 0.0, 0.0
    while done < steps + warmup:
        for x, _ in make_loader(shape, batch):
            if done == warmup:
                t0, c0 = time.perf_counter(), time.process_time()
            loss = dsm_terms(sde, net, x, **opts).loss.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            ema.update_parameters(net)
            float(loss)  # the Lightning loop also reads the loss every step (progress / logging)
            done += 1
            if done == steps + warmup:
                break
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


class StepTimer(Callback):
    """Wall and CPU time from the start of step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.t0 = self.t1 = self.c0 = self.c1 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.t0, self.c0 = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.t1, self.c1 = time.perf_counter(), time.process_time()


def time_lightning(cfg: Any, shape: Sequence[int], batch: int, steps: int, warmup: int, full: bool, out: Path) -> Tuple[float, float]:
    from sde_diffusion.callbacks import build_callbacks, build_loggers
    from sde_diffusion.config import to_container

    torch.manual_seed(0)
    plain = to_container(cfg)
    module = ScoreDiffusion(plain, shape)
    timer = StepTimer(warmup)
    if full:
        callbacks = [c for c in build_callbacks(plain, out) if type(c).__name__ not in ("ModelCheckpoint", "SampleFigures")]
        loggers = build_loggers(plain, out)
    else:
        callbacks, loggers = [EMA(decay=0.999)], []
    plain["trainer"].update(max_steps=steps + warmup, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, val_check_interval=None, limit_val_batches=0)
    trainer = build_trainer(plain, out, callbacks + [timer], loggers)
    trainer.fit(module, train_dataloaders=make_loader(shape, batch))
    return (timer.t1 - timer.t0) / steps, (timer.c1 - timer.c0) / steps


def throughput(steps: int, warmup: int, repeats: int, out: Path) -> List[List[str]]:
    rows = []
    for name, (over, shape, batch) in CASES.items():
        cfg = compose(over + [f"data.batch_size={batch}", "trainer.enable_progress_bar=false", "callbacks.samples.enabled=false", f"run_dir={out}"])
        inf = (float("inf"), float("inf"))
        best: Dict[str, Tuple[float, float]] = {"plain": inf, "lightning": inf, "lightning_full": inf}
        for _ in range(repeats):
            runs = {
                "plain": time_plain(cfg, shape, batch, steps, warmup),
                "lightning": time_lightning(cfg, shape, batch, steps, warmup, False, out / "bare"),
                "lightning_full": time_lightning(cfg, shape, batch, steps, warmup, True, out / "full"),
            }
            best = {k: (min(best[k][0], v[0]), min(best[k][1], v[1])) for k, v in runs.items()}
        wall0, cpu0 = best["plain"]
        for key, label in (("plain", "plain PyTorch loop"), ("lightning", "Lightning, EMA callback only"), ("lightning_full", "Lightning, callbacks + CSV logger of a run")):
            wall, cpu = best[key]
            rows.append([
                name, label, f"{1000 * cpu:.1f}", f"{1000 * wall:.1f}", f"{batch / cpu:,.0f}",
                "—" if key == "plain" else f"{100 * (cpu / cpu0 - 1):+.1f} %",
                "—" if key == "plain" else f"{100 * (wall / wall0 - 1):+.1f} %",
            ])
        print(rows[-3:], flush=True)
    return rows


# ---------------------------------------------------------------------------------- quality
def quality(run_dir: Optional[Path], max_steps: int, every: int, n: int, sample_steps: int, out: Path) -> List[List[str]]:
    from sde_diffusion.evaluation.digits_classifier import digits_fd, get_classifier, load_digits
    from sde_diffusion.samplers import sample
    from sde_diffusion.tasks.score_matching import load_checkpoint, train

    if run_dir is None:
        run_dir = out / "digits_quality"
        shutil.rmtree(run_dir, ignore_errors=True)  # this script's own scratch run: start clean
        cfg = compose([f"trainer.max_steps={max_steps}", f"callbacks.checkpoint.every_n_steps={every}",
                       "callbacks.samples.every_n_steps=0", "trainer.enable_progress_bar=false"])
        t0 = time.perf_counter()
        train(cfg, run_dir)
        print(f"trained {max_steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    clf = get_classifier()
    images = load_digits()[0]  # [1797, 1, 8, 8] in [-1, 1], the model's range
    real = images[torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(1))[:n]]
    rows = [["real digits (floor)", "—", f"{digits_fd(real, classifier=clf):.2f}"]]
    ckpts = sorted((run_dir / "checkpoints").glob("step_*.ckpt"), key=lambda p: int(re.findall(r"\d+", p.stem)[0]))
    for path in ckpts:
        module = load_checkpoint(path)
        with torch.no_grad():
            x = sample(module.sde, module.score_fn(use_ema=True), (n, *module.data_shape), sampler="euler_maruyama",
                       steps=sample_steps, generator=torch.Generator().manual_seed(0)).samples
        step = int(re.findall(r"\d+", path.stem)[0])
        rows.append([f"{step}", f"{module.cfg['ema']['decay']}", f"{digits_fd(x.clamp(-1, 1), classifier=clf):.2f}"])
        print(rows[-1], flush=True)
    return rows


# ---------------------------------------------------------------------------------- report
def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


SUBSECTIONS = ("### Throughput", "### Sample quality")


def write_section(blocks: Dict[str, str]) -> None:
    """Update the ``## Training`` section of RESULTS.md: replace the ``###`` blocks given, keep the
    others (so the two parts can be run separately), leave every other section alone."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(r"^## Training\n.*?(?=^## |\Z)", re.S | re.M)
    found = pattern.search(old)
    current: Dict[str, str] = {}
    if found:
        for part in re.split(r"(?=^### )", found.group(0), flags=re.M)[1:]:
            current[part.splitlines()[0].strip()] = part.rstrip() + "\n"
    current.update({k: v.rstrip() + "\n" for k, v in blocks.items()})
    section = "## Training\n\n" + "\n".join(current[k] for k in SUBSECTIONS if k in current) + "\n"
    new = pattern.sub(lambda _: section, old) if found else old.rstrip() + "\n\n" + section
    RESULTS.write_text(new)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("all", "throughput", "quality"), default="all")
    p.add_argument("--steps", type=int, default=60, help="timed steps per throughput measurement")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--run-dir", type=Path, default=None, help="evaluate this run's checkpoints instead of training")
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--n", type=int, default=500, help="samples per digits-FD")
    p.add_argument("--sample-steps", type=int, default=200)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_training")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    command = "OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.training " + " ".join(argv if argv is not None else sys.argv[1:])
    blocks: Dict[str, str] = {}
    if args.part in ("all", "throughput"):
        rows = throughput(args.steps, args.warmup, args.repeats, args.out)
        blocks["### Throughput"] = "\n".join([
            "### Throughput", "", "```", command, "```", "",
            f"Same network, loss, AdamW + warm-up, clipping and EMA; 1 CPU thread; {args.steps} timed steps after "
            f"{args.warmup}, best of {args.repeats} alternating runs. CPU time is the robust figure on a shared "
            "machine (wall time includes waiting for the core).", "",
            md_table(["network", "loop", "CPU ms/step", "wall ms/step", "samples/CPU-s", "overhead (CPU)", "overhead (wall)"], rows),
        ])
    if args.part in ("all", "quality"):
        rows = quality(args.run_dir, args.max_steps, args.every, args.n, args.sample_steps, args.out)
        blocks["### Sample quality"] = "\n".join([
            "### Sample quality", "", "```", command, "```", "",
            f"The default digits run (`python train.py`: unet_small, VP, batch 128, lr 2e-3, EMA 0.995) continued to "
            f"{args.max_steps} steps; {args.n} samples from the EMA weights of each checkpoint, Euler–Maruyama with "
            f"{args.sample_steps} steps; digits-FD against all 1797 digits (lower is better; the first row is "
            f"{args.n} real digits).", "",
            md_table(["training steps", "EMA decay", "digits-FD"], rows),
        ])
    for block in blocks.values():
        print(block, "\n")
    if not args.no_write:
        write_section(blocks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
