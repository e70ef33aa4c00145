"""NCSN++ (sde_diffusion/models/ncsnpp.py) and its FIR resampling (models/resampling.py)."""
from __future__ import annotations

import math

import pytest
import torch

import score_sde_reference as R
from sde_diffusion.models import build_model
from sde_diffusion.models.ncsnpp import NCSNpp
from sde_diffusion.models.resampling import (conv_downsample_fir, downsample_fir, fir_kernel_2d, upfirdn2d,
                                             upsample_fir)
from sde_diffusion.sdes import VESDE, VPSDE

SMALL = dict(ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8])


# ----------------------------------------------------------------------------- FIR resampling
def test_fir_resamplers_match_the_reference_native_upfirdn2d():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    cfg = {"fir": True, "fir_kernel": (1, 3, 3, 1)}
    torch.testing.assert_close(upsample_fir(x), R._up(x, cfg), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(downsample_fir(x), R._down(x, cfg), rtol=1e-12, atol=1e-12)
    assert upsample_fir(x).shape == (2, 3, 16, 16) and downsample_fir(x).shape == (2, 3, 4, 4)


def test_fir_resampling_keeps_constants_and_reduces_to_nearest_and_average():
    x = torch.full((1, 2, 8, 8), 3.0, dtype=torch.float64)
    # Interior pixels of a constant image keep their value (zero padding only touches the border).
    assert torch.allclose(upsample_fir(x)[..., 2:-2, 2:-2], torch.tensor(3.0, dtype=torch.float64))
    assert torch.allclose(downsample_fir(x)[..., 1:-1, 1:-1], torch.tensor(3.0, dtype=torch.float64))
    y = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(upsample_fir(y, (1, 1)), torch.nn.functional.interpolate(y, scale_factor=2.0, mode="nearest"))
    torch.testing.assert_close(downsample_fir(y, (1, 1)), torch.nn.functional.avg_pool2d(y, 2))


def test_fir_kernel_is_normalised_outer_product_and_rejects_bad_kernels():
    k = fir_kernel_2d((1, 3, 3, 1), torch.zeros(1))
    assert k.shape == (4, 4) and abs(float(k.sum()) - 1) < 1e-6 and float(k[1, 1]) == pytest.approx(9 / 64)
    with pytest.raises(ValueError, match="positive sum"):
        fir_kernel_2d((1, -1), torch.zeros(1))


def test_conv_downsample_equals_filter_then_strided_conv():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 3, 3, 3, generator=gen, dtype=torch.float64)
    k = fir_kernel_2d((1, 3, 3, 1), x)
    # Filter padded by 2 on each side, then a valid stride-2 3x3 conv: the reference's fused op.
    ref = torch.nn.functional.conv2d(upfirdn2d(x, k, pad=(2, 2)), w, stride=2)
    torch.testing.assert_close(conv_downsample_fir(x, w), ref)
    assert ref.shape == (2, 5, 4, 4)


# ----------------------------------------------------------------------------- the network
@pytest.mark.parametrize("name,blocks,count", [
    ("ncsnpp", 4, 62_758_787), ("ncsnpp", 8, 107_586_947), ("unet", 4, 61_804_419), ("unet", 8, 106_632_579)])
def test_parameter_counts_equal_the_reference(name, blocks, count):
    with torch.device("meta"):
        net = build_model(name, (3, 32, 32), ch=128, ch_mult=[1, 2, 2, 2], num_res_blocks=blocks, attn_resolutions=[16])
    assert net.num_parameters() == count
    # The independent transcription of the reference's constructor gives the same count (Fourier W frozen).
    cfg = R.CONFIGS[("ncsnpp" if name == "ncsnpp" else "ddpmpp") + ("_deep" if blocks == 8 else "") + "_cifar10"]
    total = sum(math.prod(s) for k, s in R.layout(cfg) if not (k.endswith(".W") and len(s) == 1))
    assert total == count


@pytest.mark.parametrize("opts", [
    dict(progressive="none", progressive_input="residual"),
    dict(progressive="output_skip", progressive_input="input_skip"),
    dict(progressive="output_skip", progressive_input="input_skip", progressive_combine="cat", fir=False),
    dict(progressive="none", progressive_input="none", embedding_type="sinusoidal", time_input="t"),
])
def test_ncsnpp_variants_match_the_reference_forward(opts):
    torch.manual_seed(0)
    net = build_model("ncsnpp", (3, 16, 16), zero_init=False, dropout=0.0, **SMALL, **opts).double().eval()
    net.bind_sde(VESDE(sigma_min=0.01, sigma_max=50.0, exact_kernel=False))
    from sde_diffusion.convert import reference_layout, load_reference_weights

    cfg = dict(R.BASE, nf=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), image_size=16,
               fir=opts.get("fir", True), progressive=opts["progressive"], progressive_input=opts["progressive_input"],
               progressive_combine=opts.get("progressive_combine", "sum"),
               embedding_type="positional" if opts.get("embedding_type") == "sinusoidal" else "fourier")
    assert [(k, s) for k, s, _ in reference_layout(net)] == R.layout(cfg)
    state = {k: v.double() for k, v in R.random_state(cfg, seed=3).items()}
    load_reference_weights(net, state, negate_output=False, what="test", config="small")
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    t = torch.tensor([0.2, 0.7], dtype=torch.float64)
    if opts.get("time_input") == "t":
        ref = R.forward(state, cfg, x, t * 1000, centered=True, scale_by_sigma=False)
    else:
        ref = R.forward(state, cfg, x, 0.01 * 5000.0 ** t, centered=True, scale_by_sigma=False)
    # The sinusoidal frequencies are float32 numbers in both (the reference computes in float32).
    tol = 1e-4 if opts.get("time_input") == "t" else 1e-9
    torch.testing.assert_close(net(x, t), ref, rtol=tol, atol=tol)


def test_zero_init_network_outputs_zero_and_labels_condition():
    net = build_model("ncsnpp", (3, 16, 16), num_classes=3, progressive="output_skip", progressive_input="input_skip",
                      **SMALL).bind_sde(VPSDE())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.1, 0.9])
    assert torch.count_nonzero(net(x, t, torch.tensor([0, 1]))) == 0
    torch.manual_seed(0)
    net = build_model("ncsnpp", (3, 16, 16), num_classes=3, zero_init=False, dropout=0.0, **SMALL).bind_sde(VPSDE()).eval()
    a, b = net(x, t, torch.tensor([0, 0])), net(x, t, torch.tensor([1, 1]))
    assert (a - b).abs().max() > 1e-4
    torch.testing.assert_close(net(x, t), net(x, t, torch.tensor([3, 3])))


def test_log_sigma_input_needs_the_sde_and_bad_options_are_named():
    net = build_model("ncsnpp", (3, 16, 16), **SMALL)
    with pytest.raises(RuntimeError, match="bind_sde"):
        net(torch.randn(1, 3, 16, 16), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="progressive.*output_skip"):
        build_model("ncsnpp", (3, 16, 16), progressive="residual", **SMALL)
    with pytest.raises(ValueError, match="time_input"):
        build_model("ncsnpp", (3, 16, 16), time_input="sigma", **SMALL)
    with pytest.raises(ValueError, match="not divisible"):
        build_model("ncsnpp", (3, 12, 12), ch=16, ch_mult=[1, 2, 2, 2], num_res_blocks=1, attn_resolutions=[])


def test_uncentred_input_is_mapped_to_the_centred_range():
    torch.manual_seed(0)
    a = build_model("ncsnpp", (3, 16, 16), zero_init=False, **SMALL).bind_sde(VPSDE()).eval()
    b = build_model("ncsnpp", (3, 16, 16), zero_init=False, centered=False, **SMALL).bind_sde(VPSDE()).eval()
    b.load_state_dict(a.state_dict())
    x01, t = torch.rand(2, 3, 16, 16), torch.tensor([0.3, 0.6])
    torch.testing.assert_close(b(x01, t), a(2 * x01 - 1, t))


def test_ncsnpp_trains_one_dsm_step_through_the_training_module():
    from sde_diffusion.config import parse_train
    from sde_diffusion.demo import compose as compose_train
    from sde_diffusion.tasks.score_matching import ScoreDiffusion

    cfg = parse_train(compose_train(["sde=ve", "model=ncsnpp_cifar10", "data=digits", "data.size=16", "model.ch=16",
                                     "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[8]",
                                     "model.zero_init=false"]))
    module = ScoreDiffusion(cfg, (1, 16, 16))
    terms = module.dsm_terms(torch.rand(8, 1, 16, 16) * 2 - 1)
    loss = terms.loss.mean()
    loss.backward()
    grads = [p.grad for p in module.net.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # sigma^2 weighting summed over pixels: an untrained epsilon net scores about D = 256 per sample.
    assert 0.2 * 256 < float(loss) < 20 * 256
