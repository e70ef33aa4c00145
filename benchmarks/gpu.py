"""The GPU profile measured: training images/s, sampling images/s per NFE and peak memory, for the
paper's networks in float32, bf16 (the profile without compile) and compiled (the whole profile);
and, on paper, the FLOPs of one DDPM++ training step and what the paper's 1.3M steps cost.

    .venv/bin/python -m benchmarks.gpu                        # CUDA: every model at batch 128; CPU: see --batch
    .venv/bin/python -m benchmarks.gpu --tiny                 # smoke run: a tiny U-Net on 8×8, batch 4
    .venv/bin/python -m benchmarks.gpu --flops --write        # the FLOP count and the GPU-time estimate → RESULTS.md

Modes (each a set of the ``perf.*`` switches; see ``sde_diffusion.performance``):

* ``fp32``: float32, no TF32, NCHW, AdamW's default implementation, eager;
* ``bf16``: bf16 autocast, TF32, channels_last, fused AdamW, cudnn.benchmark;
* ``compiled``: ``bf16`` plus ``torch.compile`` of the training network and of the sampling network
  (``InferenceNet``, static batch shape).

A training step is the real one: the DSM loss of the VP SDE (σ² weighting), backward, clipping at
1, the AdamW step and the EMA update. Sampling costs one network evaluation per NFE, so sampling
images/s per NFE is the batch over the time of one ``no_grad`` evaluation. Peak memory: CUDA's
``max_memory_allocated`` per case; on a CPU each case runs in its own process and its peak resident
set size is reported (``--in-process``: one process, so the column is its running high-water mark).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
MODES = ("fp32", "bf16", "compiled")
DEFAULT_MODELS = ("ddpmpp_cifar10", "ncsnpp_cifar10")

#: dense bf16 tensor-core peaks (no sparsity), FLOP/s: A100 SXM and H100 SXM datasheets
GPU_PEAKS = {"A100": 312e12, "H100": 989e12}
#: model FLOP utilisation assumed for the paper-scale estimate (a 32×32 convolutional U-Net at
#: batch 128 keeps tensor cores far less busy than a large transformer does)
UTILISATIONS = (0.2, 0.4)
PAPER_STEPS = 1_300_000
PAPER_BATCH = 128


# ---------------------------------------------------------------------------------- building
def model_config(preset: str) -> Any:
    """The ``model`` group of ``conf/model/<preset>.yaml`` as train.py composes it."""
    from sde_diffusion.demo import compose

    return compose([f"model={preset}"]).model


def available_models(names: Sequence[str]) -> List[str]:
    """The presets of ``names`` whose config exists and whose network is registered."""
    from sde_diffusion.registry import MODELS

    out = []
    for name in names:
        if (ROOT / "conf" / "model" / f"{name}.yaml").is_file():
            if str(model_config(name).get("name")) in MODELS.names():
                out.append(name)
    return out


def build_net(preset: str, shape: Sequence[int], device: torch.device, overrides: Optional[Dict[str, Any]] = None) -> Any:
    from sde_diffusion.config import instantiate, to_plain
    from sde_diffusion.registry import MODELS

    node = dict(to_plain(model_config(preset)))
    node.update(overrides or {})
    torch.manual_seed(0)
    return instantiate(node, MODELS, key="model", data_shape=tuple(shape), num_classes=None).to(device)


# ---------------------------------------------------------------------------------- one case
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Any, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` after ``warmup`` untimed calls (compilation happens there)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / steps


def run_case(preset: str, mode: str, batch: int, steps: int, warmup: int, device: torch.device,
             shape: Sequence[int] = (3, 32, 32), overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Train and sample ``preset`` in ``mode``; returns images/s and peak memory (MiB)."""
    from sde_diffusion.losses import dsm_terms
    from sde_diffusion.performance import InferenceNet, channels_last, channels_last_input
    from sde_diffusion.sdes import VPSDE

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    fast = mode != "fp32"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = fast
        torch.backends.cudnn.benchmark = fast
        torch.cuda.reset_peak_memory_stats(device)
    net = build_net(preset, shape, device, overrides).train()
    if fast:
        channels_last(net)
    ema = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.AdamW(net.parameters(), lr=2e-4, **({"fused": True} if fast else {}))
    train_net = torch.compile(net) if mode == "compiled" else net
    sde = VPSDE()
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(batch, *shape, device=device, generator=gen) * 2 - 1
    if fast:
        x = channels_last_input(x)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
            loss = dsm_terms(sde, train_net, x).loss.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in net.parameters()], 1 - 0.9999)

    train_s = _timed(train_step, steps, warmup, device)
    net.eval()
    sampler_net = InferenceNet(net, torch.bfloat16 if fast else None, compile=mode == "compiled")
    t = torch.full((batch,), 0.5, device=device)

    def evaluate() -> None:
        with torch.no_grad():
            sampler_net(x, t)

    eval_s = _timed(evaluate, steps, warmup, device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"model": preset, "mode": mode, "batch": batch, "device": str(device),
            "train_img_s": batch / train_s, "sample_img_s_per_nfe": batch / eval_s, "peak_mib": peak,
            "params": sum(p.numel() for p in net.parameters())}


def run_isolated(args: argparse.Namespace, preset: str, mode: str) -> Dict[str, Any]:
    """``run_case`` in a child process (its own peak memory and compile caches)."""
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--case", f"{preset}:{mode}", "--batch", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
    if args.tiny:
        cmd.append("--tiny")
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"case {preset}:{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------- FLOPs
def training_step_flops(preset: str = "ddpmpp_cifar10", batch: int = PAPER_BATCH, shape: Sequence[int] = (3, 32, 32),
                        overrides: Optional[Dict[str, Any]] = None) -> Dict[str, float]:
    """FLOPs of one training step's network passes (forward + backward) at ``batch``, counted by
    ``torch.utils.flop_counter`` on the meta device (no memory, no compute; 2 FLOPs per
    multiply-add). The optimiser and EMA add ~20 FLOPs per parameter, negligible here."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = build_net(preset, shape, torch.device("meta"), overrides)
        x = torch.empty(batch, *shape)
        t = torch.empty(batch).uniform_()
    with FlopCounterMode(display=False) as counter:
        out = net(x, t)
        forward = counter.get_total_flops()
        out.float().square().mean().backward()
        total = counter.get_total_flops()
    return {"forward": float(forward), "step": float(total), "params": float(sum(p.numel() for p in net.parameters()))}


def flops_section(preset: str = "ddpmpp_cifar10") -> str:
    from benchmarks.common import md_table

    f = training_step_flops(preset)
    total = f["step"] * PAPER_STEPS
    rows = []
    for gpu, peak in GPU_PEAKS.items():
        for u in UTILISATIONS:
            seconds = total / (peak * u)
            rows.append([gpu, f"{peak / 1e12:.0f}", f"{u:.0%}", f"{PAPER_BATCH * PAPER_STEPS / seconds:,.0f}",
                         f"{seconds / 3600:,.0f} h ({seconds / 86400:.1f} days)"])
    table = md_table(["GPU", "bf16 dense peak (TFLOP/s)", "utilisation (assumed)", "training img/s", f"{PAPER_STEPS:,} steps"], rows)
    return (
        "### On paper: FLOPs of a DDPM++ training step and the paper's 1.3M steps\n\n"
        "```\n.venv/bin/python -m benchmarks.gpu --flops --write\n```\n\n"
        f"`model={preset}` ({f['params']:,.0f} parameters), batch {PAPER_BATCH} of 3×32×32, counted with "
        "`torch.utils.flop_counter` on the meta device (2 FLOPs per multiply-add; convolutions, matmuls and "
        "attention): forward "
        f"{f['forward'] / 1e12:.2f} TFLOP ({f['forward'] / PAPER_BATCH / 1e9:.1f} GFLOP per image), forward + backward "
        f"{f['step'] / 1e12:.2f} TFLOP per step ({f['step'] / f['forward']:.2f}× the forward). "
        f"{PAPER_STEPS:,} steps: {total:.3g} FLOP.\n\n"
        f"{table}\n\n"
        "Reading: the peaks are the datasheets' dense bf16 tensor-core figures. The utilisation is an assumption, "
        "not a measurement (no GPU here): a U-Net on 32×32 images with 128–256 channels, GroupNorm and small "
        "attention runs well below a large transformer's 40–50 %, so 20 % is the planning figure and 40 % the "
        "optimistic one. Measure the real figure with `python -m benchmarks.gpu` on the GPU (its `bf16` and "
        "`compiled` rows give training img/s directly). Under DDP at the fixed global batch of 128 "
        "(`data.batch_size`), N GPUs at best divide the time by N; each then holds 128/N images, which lowers "
        "its utilisation.\n"
    )


# ---------------------------------------------------------------------------------- report
def table(rows: List[Dict[str, Any]]) -> str:
    from benchmarks.common import md_table

    base = {r["model"]: r for r in rows if r["mode"] == "fp32"}
    out = []
    for r in rows:
        b = base.get(r["model"])
        speed = f"{r['train_img_s'] / b['train_img_s']:.2f}× / {r['sample_img_s_per_nfe'] / b['sample_img_s_per_nfe']:.2f}×" if b else "—"
        out.append([r["model"], r["mode"], str(r["batch"]), f"{r['train_img_s']:.2f}", f"{r['sample_img_s_per_nfe']:.2f}",
                    f"{r['peak_mib']:,.0f}", speed])
    return md_table(["model", "mode", "batch", "train img/s", "sampling img/s per NFE", "peak MiB", "vs fp32 (train / sample)"], out)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="model presets (conf/model); missing ones are skipped")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--batch", type=int, default=None, help="default: 128 on CUDA, 8 on a CPU, 4 with --tiny")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="a tiny U-Net on 1×8×8 (the test's smoke run)")
    p.add_argument("--in-process", action="store_true", help="no child process per case")
    p.add_argument("--flops", action="store_true", help="only the FLOP count and the paper-scale estimate")
    p.add_argument("--write", action="store_true", help="write the section of RESULTS.md")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    args.device = str(device)
    if args.batch is None:
        args.batch = 4 if args.tiny else (PAPER_BATCH if device.type == "cuda" else 8)
    if args.flops:
        section = flops_section()
        print(section)
        if args.write:
            _write(section, flops=True)
        return []
    shape, overrides = ((1, 8, 8), {"ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4]}) if args.tiny else ((3, 32, 32), None)
    if args.case:
        preset, mode = args.case.split(":")
        print(json.dumps(run_case(preset, mode, args.batch, args.steps, args.warmup, device, shape, overrides)))
        return []
    models = ["unet"] if args.tiny else available_models(args.models.split(","))
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    rows = []
    for preset in models:
        for mode in modes:
            if args.in_process or device.type == "cuda":
                if mode == "compiled":
                    torch._dynamo.reset()
                rows.append(run_case(preset, mode, args.batch, args.steps, args.warmup, device, shape, overrides))
            else:
                rows.append(run_isolated(args, preset, mode))
            print(f"{preset} {mode}: train {rows[-1]['train_img_s']:.2f} img/s, sampling "
                  f"{rows[-1]['sample_img_s_per_nfe']:.2f} img/s per NFE", file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    if args.write:
        cmd = "python -m benchmarks.gpu " + " ".join(argv if argv is not None else sys.argv[1:])
        reading = ("\nReading: on a CPU this measures only that every mode runs. Without AVX-512 BF16 or AMX the "
                   "CPU emulates bfloat16, so `bf16` and `compiled` are many times slower than `fp32` here; the "
                   "profile is for CUDA, where the same command at batch 128 gives the figures that count. Peak "
                   "memory on a CPU is the case's process high-water mark (resident set, torch included).\n"
                   if device.type == "cpu" else "")
        _write(f"### Measured: {device.type.upper()}, torch {torch.__version__}\n\n```\n.venv/bin/{cmd.replace(' --write', '')}\n```\n\n"
               f"{text}\n{reading}")
    return rows


def _write(part: str, flops: bool = False) -> None:
    """Keep ``## GPU profile`` in RESULTS.md as: the on-paper part, then the measured part."""
    from benchmarks.common import write_results_section

    text = RESULTS.read_text() if RESULTS.exists() else ""
    current = text.split("## GPU profile", 1)[1].split("\n## ", 1)[0] if "## GPU profile" in text else ""
    paper, measured = "", ""
    if "### Measured" in current:
        paper, measured = current.split("### Measured", 1)
        measured = "### Measured" + measured
    else:
        paper = current
    paper = paper.split("### On paper", 1)[1] if "### On paper" in paper else ""
    paper = ("### On paper" + paper) if paper else ""
    if flops:
        paper = part
    else:
        measured = part
    section = "## GPU profile\n\n" + "\n".join(s.strip() + "\n" for s in (paper, measured) if s.strip())
    write_results_section(RESULTS, "## GPU profile", section)


if __name__ == "__main__":
    main()
