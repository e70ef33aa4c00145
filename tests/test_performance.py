"""The GPU profile (sde_diffusion.performance): how it resolves, and that each switch computes the same
thing as the plain float32 path where the CPU can run it (bf16 autocast, channels_last, fused AdamW,
compiled networks with static shapes)."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from sde_diffusion.config import parse_train
from sde_diffusion.losses import dsm_terms
from sde_diffusion.models import UNet
from sde_diffusion.performance import (
    InferenceNet,
    auto_precision,
    channels_last,
    channels_last_input,
    machine_cores,
    resolve_profile,
)
from sde_diffusion.sdes import VPSDE
from sde_diffusion.tasks.common import adamw_with_warmup

from helpers import CONF, QUIET_TRAINING


def _train_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return parse_train(compose("train", overrides=list(overrides)))


def _net(seed: int = 0, attn_resolutions=(4,), **kw) -> UNet:
    torch.manual_seed(seed)
    # zero_init off: a zero-initialised output layer would make every comparison trivially equal.
    return UNet((1, 8, 8), ch=16, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=list(attn_resolutions), dropout=0.0,
                zero_init=False, **kw).eval()


# ------------------------------------------------------------------------------- resolution
def test_cpu_profile_is_the_plain_float32_path() -> None:
    p = resolve_profile(_train_cfg(), cuda=False)
    assert p.precision == "32-true" and not p.cuda
    assert not any([p.tf32, p.channels_last, p.fused_adamw, p.cudnn_benchmark, p.compile, p.static_shapes])
    assert p.num_threads == 1 and p.loader_workers is None  # one thread per process; the data group's workers


def test_cuda_profile_switches_everything_on_and_each_switch_overrides() -> None:
    p = resolve_profile(_train_cfg("trainer.devices=1"), cuda=True)
    assert p.precision == "bf16-mixed"
    assert all([p.tf32, p.channels_last, p.fused_adamw, p.cudnn_benchmark, p.compile, p.static_shapes])
    assert p.num_threads == machine_cores() and p.loader_workers == min(8, machine_cores())
    q = resolve_profile(_train_cfg("perf.tf32=false", "perf.channels_last=false", "compile=false",
                                   "trainer.precision=32-true", "trainer.num_threads=3", "perf.loader_workers=0"), cuda=True)
    assert q.precision == "32-true" and not q.tf32 and not q.channels_last and q.fused_adamw
    assert not q.compile and not q.static_shapes  # static shapes follow compile unless set
    assert q.num_threads == 3 and q.loader_workers == 0
    # On a CPU a switch can be forced on.
    r = resolve_profile(_train_cfg("perf.channels_last=true", "perf.static_shapes=true"), cuda=False)
    assert r.channels_last and r.static_shapes and not r.fused_adamw
    assert auto_precision(False) == "32-true"


def test_profile_switches_are_validated() -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="perf.tf32=maybe"):  # typed: refused at composition
        _train_cfg("perf.tf32=maybe")
    # fp16's scaled gradients cannot be clipped before a fused step: fused is off by default there,
    # and refused with clipping when forced on.
    assert not resolve_profile(_train_cfg("trainer.precision=16-mixed"), cuda=True).fused_adamw
    with pytest.raises(ValueError, match="perf.fused_adamw=true cannot clip gradients under trainer.precision=16-mixed"):
        resolve_profile(_train_cfg("trainer.precision=16-mixed", "perf.fused_adamw=true"), cuda=True)
    with pytest.raises(ValueError, match="trainer.num_threads must be an integer >= 1, auto or null"):
        _train_cfg("trainer.num_threads=0")
    with pytest.raises(ValueError, match="perf.loader_workers"):
        _train_cfg("perf.loader_workers=-1")


# ------------------------------------------------------------------------------- numerics per switch
def test_bf16_autocast_loss_is_finite_and_close_to_float32() -> None:
    net, sde = _net(), VPSDE()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(32, 1, 8, 8, generator=gen) * 2 - 1
    noise, u = torch.randn(32, 1, 8, 8, generator=gen), torch.rand(32, generator=gen)
    ref = dsm_terms(sde, net, x, noise=noise, u=u).loss.mean()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = dsm_terms(sde, net, x, noise=noise, u=u).loss.mean()
    assert torch.isfinite(low) and low.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: a relative error of a few 1e-3 per op, ~1 % on the loss.
    assert abs(low.item() - ref.item()) < 0.03 * ref.item()
    # Gradients flow and agree in direction.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dsm_terms(sde, net, x, noise=noise, u=u).loss.mean().backward()
    g_low = torch.cat([p.grad.flatten() for p in net.parameters()])
    net.zero_grad()
    dsm_terms(sde, net, x, noise=noise, u=u).loss.mean().backward()
    g_ref = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert torch.isfinite(g_low).all()
    assert torch.nn.functional.cosine_similarity(g_low, g_ref, dim=0) > 0.99


def test_channels_last_gives_the_same_outputs() -> None:
    net = _net()
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    ref = net(x, t)
    nhwc = channels_last(copy.deepcopy(net))
    assert nhwc.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    xin = channels_last_input(x)
    assert xin.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc(xin, t), ref, rtol=1e-5, atol=1e-5)
    assert channels_last_input(torch.randn(3, 2)).shape == (3, 2)  # vectors pass through


def test_fused_adamw_takes_the_same_steps() -> None:
    from sde_diffusion.config.schema import OptimConfig

    class Fused:
        fused_adamw = True

    # A network whose every parameter gets a real gradient: the U-Net's attention key biases and its
    # biases before a GroupNorm have analytically zero gradients, where Adam's g/(√v + ε) is rounding
    # noise in any kernel.
    def mlp() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.Linear(32, 4))

    nets = [mlp(), mlp()]
    opts = [adamw_with_warmup(nets[0].parameters(), OptimConfig(warmup_steps=0), None)["optimizer"],
            adamw_with_warmup(nets[1].parameters(), OptimConfig(warmup_steps=0), Fused())["optimizer"]]
    assert not opts[0].defaults.get("fused") and opts[1].defaults["fused"] is True
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 16, generator=gen), torch.randn(64, 4, generator=gen)
    start = [p.detach().clone() for p in nets[0].parameters()]
    for _ in range(5):
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            (net(x) - y).square().mean().backward()
            opt.step()
    for a, b, a0 in zip(nets[0].parameters(), nets[1].parameters(), start):
        assert (a - a0).abs().max() > 1e-4  # the steps were taken
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_adamw_gradients_are_clipped_like_lightnings() -> None:
    from sde_diffusion.tasks.common import ClipFusedGradients

    class Base:
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            self.delegated = True

    class Module(ClipFusedGradients, Base):
        pass

    w = torch.nn.Parameter(torch.zeros(3, 4))
    w.grad = torch.full((3, 4), 2.0)  # norm 4·√3
    fused = torch.optim.AdamW([w], fused=True)
    Module().configure_gradient_clipping(fused, 1.0, "norm")
    torch.testing.assert_close(w.grad.norm(), torch.tensor(1.0))
    w.grad = torch.full((3, 4), -2.0)
    Module().configure_gradient_clipping(fused, 0.5, "value")
    assert torch.equal(w.grad, torch.full((3, 4), -0.5))
    plain = Module()
    plain.configure_gradient_clipping(torch.optim.AdamW([w]), 1.0, "norm")
    assert plain.delegated  # an unfused optimiser keeps Lightning's own clipping


class _CountingBackend:
    """A torch.compile backend that runs the traced graph eagerly and counts compilations."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: List[torch.Tensor]):
        self.graphs += 1
        return gm.forward


def test_inference_net_pads_short_batches_so_one_graph_serves() -> None:
    torch._dynamo.reset()
    net, backend = _net(), _CountingBackend()
    fast = InferenceNet(net, compile=True, backend=backend)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for b in (6, 6, 2, 5):
            x, t = torch.randn(b, 1, 8, 8, generator=gen), torch.rand(b, generator=gen)
            out = fast(x, t)
            assert out.shape == (b, 1, 8, 8)
            torch.testing.assert_close(out, net(x, t), rtol=1e-5, atol=1e-5)
    assert backend.graphs == 1 and fast.sizes == [6]
    torch._dynamo.reset()


def test_inference_net_bf16_answers_in_float32_close_to_eager() -> None:
    net = _net(num_classes=3)
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, 3 % 3])
    with torch.no_grad():
        ref = net(x, t, y=y)
        out = InferenceNet(net, autocast_dtype=torch.bfloat16)(x, t, y=y)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.slow
def test_inductor_compiled_network_equals_eager() -> None:
    torch._dynamo.reset()
    net = _net()
    fast = InferenceNet(net, compile=True)
    x, t = torch.randn(5, 1, 8, 8), torch.rand(5)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, t), net(x, t), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fast(x[:3], t[:3]), net(x[:3], t[:3]), rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------- end to end
def _fit_digits(run_dir: Path, *extra: str):
    from sde_diffusion.fit import fit

    over = QUIET_TRAINING + ["data=digits", "model=unet_small", "model.ch=8", "data.batch_size=24", "trainer.max_steps=3",
                             "optim.warmup_steps=0", "model.zero_init=false", f"run_dir={run_dir}", *extra]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=over)
    old = torch.get_num_threads()
    try:
        return fit("score", cfg, output_dir=run_dir)
    finally:
        torch.set_num_threads(old)


def test_training_with_the_switches_forced_on_the_cpu(tmp_path: Path, monkeypatch) -> None:
    """bf16-mixed, channels_last, fused AdamW and static shapes on a CPU run; compile with the
    network and its EMA copy each compiled (Module.compile replaced by a recorder: inductor is slow)."""
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    _fit_digits(tmp_path / "run", "trainer.precision=bf16-mixed", "perf.channels_last=true", "perf.fused_adamw=true",
                "compile=true", "ema.enabled=true")
    profile = json.loads((tmp_path / "run" / "profile.json").read_text())
    assert profile["precision"] == "bf16-mixed" and profile["channels_last"] and profile["fused_adamw"]
    assert profile["compile"] and profile["static_shapes"]  # static shapes follow compile
    assert len(compiled) == 2 and compiled[0] is not compiled[1]  # the network and the EMA network
    from sde_diffusion.jobs.model import load_model

    model = load_model(tmp_path / "run", device="cpu")
    for p in model.module.net.parameters():
        assert torch.isfinite(p).all()
    metrics = (tmp_path / "run" / "batch_layout.json")
    assert metrics.exists()


def test_static_shapes_drop_the_short_last_batch(tmp_path: Path) -> None:
    from sde_diffusion.registry import DATASETS
    from sde_diffusion.config import instantiate

    cfg = _train_cfg("data=digits", "data.batch_size=64")
    dm = instantiate(cfg.data, DATASETS, key="data")
    dm.setup("fit")
    sizes = {b[0].shape[0] for b in dm.train_dataloader()}
    assert len(sizes) == 2  # the digits' training split is not a multiple of 64
    dm.drop_last = True
    assert {b[0].shape[0] for b in dm.train_dataloader()} == {64}
    assert {b[0].shape[0] for b in dm.val_dataloader()} == {64}


def test_sample_py_bfloat16_is_close_to_float32(tmp_path: Path) -> None:
    from sde_diffusion.jobs import cli, run

    _fit_digits(tmp_path / "run")
    outs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        run(cli.compose([f"ckpt={tmp_path / 'run'}", "progress=false", "sampler=ddim", "steps=4", "n=4", "batch_size=3",
                         f"dtype={dtype}", f"out={out}", "figures=false"], str(CONF)))
        with np.load(out / "samples.npz") as z:
            outs[dtype] = z["samples"].astype(np.float64)
        assert json.loads((out / "run.json").read_text())["config"]["dtype"] == dtype
    # uint8 images from the same noise: bf16's network error moves pixels by a few levels at most.
    diff = np.abs(outs["bfloat16"] - outs["float32"])
    assert outs["bfloat16"].shape == (4, 8, 8, 1)
    assert diff.mean() < 3.0 and diff.max() <= 64


@pytest.mark.slow
def test_sample_py_compiled_matches_eager(tmp_path: Path) -> None:
    from sde_diffusion.jobs import cli, run

    _fit_digits(tmp_path / "run")
    outs = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        run(cli.compose([f"ckpt={tmp_path / 'run'}", "progress=false", "sampler=ddim", "steps=3", "n=5", "batch_size=3",
                         f"compile={flag}", f"out={out}", "figures=false"], str(CONF)))
        with np.load(out / "samples.npz") as z:
            outs[flag] = z["samples"].astype(np.int64)
    assert np.abs(outs["true"] - outs["false"]).max() <= 1


# ------------------------------------------------------------------------------- benchmarks/gpu.py
def test_gpu_benchmark_runs_tiny_on_the_cpu(capsys) -> None:
    from benchmarks import gpu

    rows = gpu.main(["--tiny", "--in-process", "--steps", "1", "--warmup", "1", "--modes", "fp32,bf16"])
    assert [(r["model"], r["mode"]) for r in rows] == [("unet", "fp32"), ("unet", "bf16")]
    for r in rows:
        assert r["batch"] == 4 and r["train_img_s"] > 0 and r["sample_img_s_per_nfe"] > 0 and r["peak_mib"] > 0
    out = capsys.readouterr().out
    assert "| unet | bf16 | 4 |" in out and "vs fp32" in out
    with pytest.raises(SystemExit, match="unknown mode 'fp16'; choose from fp32, bf16, compiled"):
        gpu.main(["--tiny", "--in-process", "--modes", "fp16"])


def test_flop_count_equals_the_layer_by_layer_count() -> None:
    """The meta-device count against multiply-adds summed from every layer's real shapes: convs and
    linears from their outputs, the middle block's attention as QKᵀ and AV, 2·B·L²·C."""
    from sde_diffusion.models.layers import AttnBlock

    from benchmarks import gpu

    over = {"ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": []}
    counted = gpu.training_step_flops("unet_small", batch=3, shape=(1, 8, 8), overrides=over)
    net = gpu.build_net("unet_small", (1, 8, 8), torch.device("cpu"), over)
    macs = []

    def hook(module, inputs, output):
        if isinstance(module, AttnBlock):
            b, c, h, w = output.shape
            macs.append(2 * b * (h * w) ** 2 * c)
        elif isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            macs.append(output.numel() * k)
        else:
            macs.append(output.numel() * module.in_features)

    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, AttnBlock)):
            m.register_forward_hook(hook)
    net(torch.randn(3, 1, 8, 8), torch.rand(3))
    assert counted["forward"] == 2 * sum(macs)
    # backward: gradients of inputs and of weights, one forward's worth each (no input gradient for
    # the first layers that see only the data and the time features)
    assert 2.5 * counted["forward"] < counted["step"] <= 3 * counted["forward"]
