"""Score networks: shapes, configs, conditioning, gradients, embeddings, errors, dtypes, compile."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from sde_diffusion.models import (
    MLP,
    MODELS,
    GaussianFourierEmbedding,
    SinusoidalEmbedding,
    UNet,
    build_model,
)
from sde_diffusion.models.layers import num_groups
from sde_diffusion.models.unet import unet_layout

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
TINY_UNET = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)


def _build_from_conf(file: str, data_shape, num_classes=None, **overrides):
    cfg = OmegaConf.load(CONF / file)
    for base in cfg.pop("defaults", []):  # a preset: its base file, then its own keys on top
        if base != "_self_":
            cfg = OmegaConf.merge(OmegaConf.load(CONF / f"{base}.yaml"), cfg)
    kwargs = {k: v for k, v in cfg.items() if k not in ("name", "defaults")}
    kwargs.update(overrides)
    return build_model(cfg.name, data_shape, num_classes, **kwargs)


def _inputs(shape, batch=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=g, dtype=dtype)
    t = torch.rand(batch, generator=g, dtype=dtype)
    return x, t


# ----------------------------------------------------------------------------- shapes and configs
@pytest.mark.parametrize("num_classes", [None, 3])
def test_mlp_output_shape(num_classes):
    net = build_model("mlp", (5,), num_classes, hidden=32, num_blocks=2, time_dim=16)
    x, t = _inputs((5,), batch=7)
    y = None if num_classes is None else torch.tensor([0, 1, 2, 3, 0, 1, 2])
    assert net(x, t, y).shape == (7, 5)
    assert net.num_classes == num_classes


@pytest.mark.parametrize(
    "shape, kwargs",
    [
        ((1, 8, 8), TINY_UNET),
        ((3, 32, 32), dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.1)),
        ((3, 16, 24), TINY_UNET | dict(attn_resolutions=(8,))),  # non-square; resolution = min(H, W)
        ((2, 8, 16), TINY_UNET | dict(resblock_updown=False, num_heads=2, embedding_type="fourier")),
        ((1, 8, 8), TINY_UNET | dict(resblock_updown=False, resamp_with_conv=False, skip_rescale=False)),
    ],
)
def test_unet_output_shape(shape, kwargs):
    net = build_model("unet", shape, num_classes=10, **kwargs)
    x, t = _inputs(shape, batch=3)
    assert net(x, t, torch.tensor([0, 5, 10])).shape == (3, *shape)
    assert net(x, t).shape == (3, *shape)


def test_scalar_time_is_broadcast():
    net = build_model("mlp", (2,), hidden=16, num_blocks=1, time_dim=8, zero_init=False)
    x, _ = _inputs((2,), batch=3)
    torch.testing.assert_close(net(x, torch.tensor(0.3)), net(x, torch.full((3,), 0.3)))


def test_ddpmpp_cifar10_config_parameter_count():
    with torch.device("meta"):
        net = _build_from_conf("ddpmpp_cifar10.yaml", (3, 32, 32))
    assert isinstance(net, UNet)
    assert (net.ch, net.ch_mult, net.num_res_blocks, net.attn_resolutions) == (128, (1, 2, 2, 2), 4, (16,))
    # DDPM++ cont. (VP) is reported with 62M parameters; this implementation has 61,804,419.
    assert 58e6 < net.num_parameters() < 64e6
    attn_layers = [n for n, m in net.named_modules() if type(m).__name__ == "AttnBlock"]
    # 16x16 level: 4 on the way down, 1 on the way up; plus the middle block.
    assert len(attn_layers) == 6


def test_unet_small_config_trains_shape_on_digits():
    net = _build_from_conf("unet_small.yaml", (1, 8, 8), num_classes=10)
    assert 3e5 < net.num_parameters() < 1e6
    x, t = _inputs((1, 8, 8), batch=2)
    assert net(x, t, torch.tensor([3, 10])).shape == (2, 1, 8, 8)


def test_mlp_config_builds_for_2d():
    net = _build_from_conf("mlp.yaml", (2,))
    assert isinstance(net, MLP)
    x, t = _inputs((2,), batch=5)
    assert net(x, t).shape == (5, 2)


# ----------------------------------------------------------------------------- conditioning
def _conditional_nets():
    torch.manual_seed(0)
    yield build_model("mlp", (3,), 4, hidden=32, num_blocks=2, time_dim=16, zero_init=False), (3,)
    yield build_model("unet", (1, 8, 8), 4, zero_init=False, **TINY_UNET), (1, 8, 8)


@pytest.mark.parametrize("index", [0, 1])
def test_labels_change_output_and_null_label_equals_none(index):
    net, shape = list(_conditional_nets())[index]
    net.eval()
    x, t = _inputs(shape, batch=4)
    out_a = net(x, t, torch.tensor([0, 0, 0, 0]))
    out_b = net(x, t, torch.tensor([1, 1, 1, 1]))
    rel = (out_a - out_b).norm() / out_a.norm()
    assert rel > 1e-3
    null = net(x, t, torch.full((4,), net.null_label))
    torch.testing.assert_close(net(x, t, None), null, rtol=0, atol=0)
    assert (null - out_a).norm() / out_a.norm() > 1e-3


def test_unconditional_model_ignores_labels():
    net = build_model("mlp", (2,), hidden=16, num_blocks=1, time_dim=8, zero_init=False).eval()
    x, t = _inputs((2,), batch=3)
    torch.testing.assert_close(net(x, t, torch.tensor([0, 1, 2])), net(x, t), rtol=0, atol=0)
    assert net.null_label is None


def test_label_shape_mismatch_raises():
    net = build_model("mlp", (2,), 3, hidden=16, num_blocks=1, time_dim=8)
    x, t = _inputs((2,), batch=3)
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        net(x, t, torch.tensor([0, 1]))


# ----------------------------------------------------------------------------- initialisation, gradients
@pytest.mark.parametrize("name, shape, kwargs", [("mlp", (2,), {}), ("unet", (1, 8, 8), TINY_UNET)])
def test_zero_init_gives_zero_output(name, shape, kwargs):
    net = build_model(name, shape, 3, **kwargs)
    x, t = _inputs(shape)
    assert net(x, t).abs().max().item() == 0.0


@pytest.mark.parametrize("index", [0, 1])
def test_gradient_reaches_every_parameter(index):
    net, shape = list(_conditional_nets())[index]
    x, t = _inputs(shape, batch=5)
    y = torch.arange(5)  # every label once, including the null label 4, so each embedding row gets gradient
    (net(x, t, y) ** 2).sum().backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []


# ----------------------------------------------------------------------------- embeddings
def test_fourier_embedding_deterministic_and_distinct():
    torch.manual_seed(123)
    a = GaussianFourierEmbedding(32, scale=16.0)
    torch.manual_seed(123)
    b = GaussianFourierEmbedding(32, scale=16.0)
    t = torch.linspace(0.0, 1.0, 50)
    ea, eb = a(t), b(t)
    torch.testing.assert_close(ea, eb, rtol=0, atol=0)
    assert ea.shape == (50, 32)
    # sin² + cos² = 1 for each frequency.
    torch.testing.assert_close(ea[:, :16] ** 2 + ea[:, 16:] ** 2, torch.ones(50, 16))
    dist = torch.cdist(ea, ea) + torch.eye(50) * 1e9
    assert dist.min() > 0.1
    # Frozen frequencies are saved with the model, so a checkpoint restores the same embedding.
    assert "freqs" in a.state_dict() and not any(True for _ in a.parameters())
    assert abs(a.freqs.std().item() - 16.0) < 16.0 * 0.6


def test_sinusoidal_embedding_matches_ddpm_formula():
    emb = SinusoidalEmbedding(8, scale=1000.0)
    t = torch.tensor([0.0, 0.25, 1.0])
    out = emb(t)
    tau = 1000.0 * t[:, None]
    omega = torch.tensor([10000.0 ** (-k / 3) for k in range(4)])
    expected = torch.cat([torch.sin(tau * omega), torch.cos(tau * omega)], dim=1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    assert out[0].tolist() == [0.0] * 4 + [1.0] * 4
    assert SinusoidalEmbedding(7)(t).shape == (3, 7)


def test_unknown_embedding_type_lists_choices():
    with pytest.raises(ValueError, match="fourier, sinusoidal"):
        build_model("mlp", (2,), embedding_type="learned")


# ----------------------------------------------------------------------------- errors
def test_bad_image_size_names_sizes_and_fix():
    with pytest.raises(ValueError) as info:
        build_model("unet", (3, 20, 28), ch=8, ch_mult=(1, 2, 2, 2))
    msg = str(info.value)
    assert "20x28" in msg and "[1, 2, 2, 2]" in msg and "divisible" in msg
    assert "24x32" in msg and "at most 3 entries" in msg
    with pytest.raises(ValueError, match="12x8"):
        UNet.validate_data_shape((1, 12, 8), ch_mult=(1, 2, 2, 2))
    UNet.validate_data_shape((1, 16, 8), ch_mult=(1, 2, 2, 2))  # non-square but divisible: fine


def test_attention_resolution_must_exist():
    with pytest.raises(ValueError, match=r"level resolutions are \[8, 4\]"):
        build_model("unet", (1, 8, 8), **(TINY_UNET | dict(attn_resolutions=(16,))))
    # The digits U-Net on CIFAR-sized images: the message names the networks built for the size.
    with pytest.raises(ValueError, match=r"\[32, 16\].*model=unet \(levels and attention sized to the image\), model=ddpmpp_cifar10"):
        build_model("unet", (3, 32, 32), **(TINY_UNET | dict(attn_resolutions=(4,))))


@pytest.mark.parametrize(
    "shape, mult, attn",
    [
        ((1, 8, 8), (1, 2), (4,)),
        ((3, 16, 16), (1, 2, 2), (16,)),
        ((3, 32, 32), (1, 2, 2, 2), (16,)),
        ((3, 64, 64), (1, 2, 2, 2, 2), (16,)),
        ((3, 24, 24), (1, 2, 2), (6,)),          # 24 → 12 → 6: stops before an odd size
        ((1, 6, 6), (1,), (6,)),                 # too small to halve above 4×4: one level
        ((3, 32, 64), (1, 2, 2, 2), (16,)),      # non-square: by the shorter side
    ],
)
def test_unet_sized_to_the_image(shape, mult, attn):
    assert unet_layout(shape) == (mult, attn)
    net = build_model("unet", shape, ch=8, ch_mult=None, num_res_blocks=1, attn_resolutions=None, dropout=0.0)
    assert (net.ch_mult, net.attn_resolutions) == (mult, attn)
    x = torch.randn(2, *shape)
    assert net(x, torch.rand(2)).shape == x.shape


def test_wrong_data_shapes_raise():
    with pytest.raises(ValueError, match="data_shape \\(D,\\)"):
        build_model("mlp", (1, 8, 8))
    with pytest.raises(ValueError, match="\\(C, H, W\\)"):
        build_model("unet", (2,))
    net = build_model("mlp", (2,), hidden=8, num_blocks=1, time_dim=8)
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        net(torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="t must have shape"):
        net(torch.zeros(4, 2), torch.zeros(3))


def test_unknown_model_name_lists_choices():
    with pytest.raises(ValueError, match="choose one of: mlp, ncsnpp, unet"):
        build_model("transformer", (2,))
    assert MODELS.names() == ["mlp", "ncsnpp", "unet"]


def test_group_count_adapts_to_channels():
    assert [num_groups(c) for c in (1, 3, 8, 24, 48, 64, 128, 256)] == [1, 1, 2, 6, 12, 16, 32, 32]


# ----------------------------------------------------------------------------- dtypes and compile
def test_float64_forward():
    net = build_model("unet", (1, 8, 8), 3, zero_init=False, **TINY_UNET).double()
    x, t = _inputs((1, 8, 8), dtype=torch.float64)
    out = net(x, t, torch.tensor([0, 1, 2, 3]))
    assert out.dtype == torch.float64 and torch.isfinite(out).all()


def test_autocast_bf16_matches_float32():
    torch.manual_seed(0)
    net = build_model("unet", (3, 8, 16), 3, zero_init=False, **TINY_UNET).eval()
    x, t = _inputs((3, 8, 16))
    y = torch.tensor([0, 1, 2, 3])
    ref = net(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t.double(), y)  # a float64 t must not break the embedding either
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits (relative 2^-8 ≈ 0.4 % per op); allow 5 % of the output scale.
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize(
    "name, shape, kwargs, backend",
    [("mlp", (2,), dict(hidden=16, num_blocks=2, time_dim=8), "aot_eager"), ("unet", (1, 8, 8), TINY_UNET, "eager")],
)
def test_torch_compile_full_graph(name, shape, kwargs, backend):
    torch._dynamo.reset()
    net = build_model(name, shape, 3, zero_init=False, **kwargs).eval()
    x, t = _inputs(shape)
    y = torch.tensor([0, 1, 2, 3])
    compiled = torch.compile(net, backend=backend, fullgraph=True)  # fullgraph: any graph break fails
    torch.testing.assert_close(compiled(x, t, y), net(x, t, y))
    torch.testing.assert_close(compiled(x, t), net(x, t))


@pytest.mark.slow
def test_torch_compile_inductor_unet():
    torch._dynamo.reset()
    net = build_model("unet", (1, 8, 8), 3, zero_init=False, **TINY_UNET).eval()
    x, t = _inputs((1, 8, 8))
    compiled = torch.compile(net, fullgraph=True)
    torch.testing.assert_close(compiled(x, t), net(x, t), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- learning
def test_mlp_fits_function_of_x_and_t():
    def target(x, t):
        return torch.sin(math.pi * t)[:, None] * x + torch.cos(math.pi * t)[:, None] * x.flip(-1)

    torch.manual_seed(0)
    net = build_model("mlp", (2,), hidden=64, num_blocks=2, time_dim=32, embedding_type="fourier")
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        x, t = torch.randn(256, 2, generator=g), torch.rand(256, generator=g)
        loss = ((net(x, t) - target(x, t)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, t = torch.randn(4096, 2, generator=g), torch.rand(4096, generator=g)
    with torch.no_grad():
        mse = ((net(x, t) - target(x, t)) ** 2).mean().item()
    # The target has variance ≈ 1 (the zero-initialised network starts at MSE ≈ 1).
    assert mse < 0.01


# ---------------------------------------------------------------------------------- AdaGN and learned variances
def test_scale_shift_norm_block_is_adagn() -> None:
    from sde_diffusion.models.layers import ResBlock

    torch.manual_seed(0)
    block = ResBlock(8, 8, 16, zero_init=False, scale_shift_norm=True).eval()
    assert block.emb_proj.out_features == 16
    x, e = torch.randn(3, 8, 4, 4), torch.randn(3, 16)
    h = block.conv_0(torch.nn.functional.silu(block.norm_0(x)))
    a, b = block.emb_proj(torch.nn.functional.silu(e)).chunk(2, dim=1)
    h = block.norm_1(h) * (1 + a[:, :, None, None]) + b[:, :, None, None]
    expected = (x + block.conv_1(torch.nn.functional.silu(h))) / math.sqrt(2)
    torch.testing.assert_close(block(x, e), expected)
    # The default block is unchanged: the embedding is added before the norm.
    plain = ResBlock(8, 8, 16, zero_init=False).eval()
    h = plain.conv_0(torch.nn.functional.silu(plain.norm_0(x))) + plain.emb_proj(torch.nn.functional.silu(e))[:, :, None, None]
    torch.testing.assert_close(plain(x, e), (x + plain.conv_1(torch.nn.functional.silu(plain.norm_1(h)))) / math.sqrt(2))


def test_learn_sigma_networks_return_prediction_and_v() -> None:
    from sde_diffusion.models import build_model
    from sde_diffusion.score import ScoreModel
    from sde_diffusion.sdes import VPSDE

    for name, shape, opts in [("unet", (1, 8, 8), {"ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1,
                                                    "scale_shift_norm": True}),
                              ("mlp", (2,), {"hidden": 16, "num_blocks": 1})]:
        net = build_model(name, shape, learn_sigma=True, zero_init=False, **opts).eval()
        x, t = torch.randn(4, *shape), torch.rand(4)
        out = net(x, t)
        assert out.shape == (4, 2 * shape[0], *shape[1:])
        model = ScoreModel(net, VPSDE(), learn_sigma=True)
        s = model(x, t)
        assert s.shape == x.shape
        sigma = VPSDE().marginal_std(t).reshape(-1, *([1] * len(shape)))
        torch.testing.assert_close(s, -out[:, : shape[0]] / sigma)
        torch.testing.assert_close(model.last_frac, (out[:, shape[0]:] + 1) / 2)
