r"""NCSN++ (Song et al. 2021, Appendix H): the DDPM++ U-Net with FIR resampling, progressive input and
output branches and Gaussian Fourier features of the noise level.

Layout (``L = len(ch_mult)`` levels; level ``i`` at ``ch · ch_mult[i]`` channels and ``H / 2^i``)::

    e = MLP(features(τ)) (+ label embedding)    τ = log σ(t) (time_input=log_sigma) or t (time_input=t)
    x ← 2x − 1 when the data are in [0, 1] (centered=false)
    conv3×3(C → ch)
    down, level i:  num_res_blocks × [ResBlock (+ Attn)], then (i < L−1) a down-ResBlock (FIR) and
                    progressive_input = input_skip:  h ← Combine(FIR↓(x_pyr), h),  x_pyr = FIR↓ x_pyr
                                      = residual:    x_pyr ← (ConvFIR↓(x_pyr) + h)/√2,  h ← x_pyr
    middle:         ResBlock, Attn, ResBlock
    up, level i:    (num_res_blocks + 1) × ResBlock on [h, skip], Attn, then
                    progressive = output_skip:  y ← FIR↑(y) + conv3×3(SiLU(GN(h)))   (y = 0 at the top)
                    and (i > 0) an up-ResBlock (FIR)
    out:            y (output_skip), else conv3×3(SiLU(GN(h)))

``Combine`` is a 1×1 conv of the input pyramid added to (``sum``) or concatenated with (``cat``) the
features. With the reference configs' options this is the network of score_sde_pytorch's
``models/ncsnpp.py``, module for module (see :meth:`NCSNpp.reference_modules`), and
``sde_diffusion.convert`` loads its checkpoints.

The network predicts ε (``loss.prediction=eps``). The reference's VE models output ``h / σ`` as the
score (``scale_by_sigma``); that is the same ε-parameterisation with ε = −h, so converted weights
flip the sign of the output convolutions and nothing is divided by σ here.

``time_input=log_sigma`` needs the process's σ(t): the training module calls :meth:`bind_sde`
(any code that builds the network by hand does the same).

Shapes: ``x [B, C, H, W]``, ``t [B]``, ``y [B] | None`` → ``[B, C, H, W]``.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import MODELS
from .embeddings import LabelEmbedding, TimeEmbedding
from .layers import AttnBlock, ResBlock, conv1x1, conv3x3, group_norm
from .resampling import DEFAULT_FIR_KERNEL, conv_downsample_fir, downsample_fir, upsample_fir
from .score_net import ScoreNet, xavier_init_
from .unet import check_unet_args

PROGRESSIVE = ("none", "output_skip")
PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
COMBINE = ("sum", "cat")
TIME_INPUTS = ("t", "log_sigma")


class Combine(nn.Module):
    """``conv1x1(pyramid) + h`` (``sum``) or ``[conv1x1(pyramid), h]`` along channels (``cat``)."""

    def __init__(self, in_ch: int, out_ch: int, method: str = "sum") -> None:
        super().__init__()
        self.conv = conv1x1(in_ch, out_ch)
        self.method = method

    def forward(self, pyramid: Tensor, h: Tensor) -> Tensor:
        p = self.conv(pyramid)
        return p + h if self.method == "sum" else torch.cat([p, h], dim=1)


class PyramidDownsample(nn.Module):
    """The residual input branch's ``[B, C, H, W] → [B, O, H/2, W/2]``: a 3×3 conv fused with the FIR
    filter and stride 2 (:func:`~.resampling.conv_downsample_fir`), or without FIR a stride-2 conv on
    the input padded by one pixel right and below."""

    def __init__(self, in_ch: int, out_ch: int, fir_kernel: Optional[Sequence[float]]) -> None:
        super().__init__()
        self.fir_kernel = None if fir_kernel is None else tuple(float(v) for v in fir_kernel)
        conv = xavier_init_(nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=0))
        self.weight, self.bias = conv.weight, conv.bias

    def forward(self, x: Tensor) -> Tensor:
        if self.fir_kernel is not None:
            h = conv_downsample_fir(x, self.weight, self.fir_kernel)
        else:
            h = F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, stride=2)
        return h + self.bias[None, :, None, None]


class OutputBranch(nn.Module):
    """``conv3×3(SiLU(GN(h)))`` to the image channels: one level's term of the output pyramid."""

    def __init__(self, in_ch: int, out_ch: int, zero_init: bool) -> None:
        super().__init__()
        self.norm = group_norm(in_ch)
        self.conv = conv3x3(in_ch, out_ch, zero=zero_init)

    def forward(self, h: Tensor) -> Tensor:
        return self.conv(F.silu(self.norm(h)))


class _Level(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        self.attns = nn.ModuleList()
        self.resample: Optional[nn.Module] = None
        self.pyramid: Optional[nn.Module] = None


@MODELS.register("ncsnpp")
class NCSNpp(ScoreNet):
    """NCSN++ ``net(x [B, C, H, W], t [B], y [B] | None) -> ε̂ [B, C, H, W]`` (see the module docstring).

    Args:
        data_shape, num_classes, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, skip_rescale,
            num_heads, zero_init: as :class:`~sde_diffusion.models.unet.UNet`.
        fir: resample with the FIR filter ``fir_kernel`` (else nearest / 2×2 average).
        progressive: ``output_skip`` (a pyramid of per-level outputs, upsampled and summed) or ``none``.
        progressive_input: ``input_skip`` (the downsampled input joins each level through
            :class:`Combine`), ``residual`` (a strided-conv input branch added to the features) or ``none``.
        progressive_combine: ``sum`` or ``cat`` for ``input_skip``.
        embedding_type: ``fourier`` (Gaussian Fourier features, width 2·ch) or ``sinusoidal`` (width ch).
        fourier_scale: std of the Fourier frequencies (16 in NCSN++).
        embedding_scale: the sinusoidal features' time factor (999 in score_sde_pytorch's DDPM++ cont.).
        time_input: what the features see: ``log_sigma`` (log σ(t), NCSN++) or ``t``.
        centered: the data are in [−1, 1]; ``false``: in [0, 1], mapped to 2x − 1 first (the
            reference's VE models).
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        num_classes: Optional[int] = None,
        ch: int = 128,
        ch_mult: Optional[Sequence[int]] = None,
        num_res_blocks: int = 4,
        attn_resolutions: Optional[Sequence[int]] = None,
        dropout: float = 0.1,
        fir: bool = True,
        fir_kernel: Sequence[float] = DEFAULT_FIR_KERNEL,
        skip_rescale: bool = True,
        progressive: str = "none",
        progressive_input: str = "residual",
        progressive_combine: str = "sum",
        embedding_type: str = "fourier",
        fourier_scale: float = 16.0,
        embedding_scale: Optional[float] = None,
        time_input: str = "log_sigma",
        centered: bool = True,
        num_heads: int = 1,
        zero_init: bool = True,
    ) -> None:
        super().__init__(data_shape, num_classes)
        for name, value, choices in (("progressive", progressive, PROGRESSIVE),
                                     ("progressive_input", progressive_input, PROGRESSIVE_INPUT),
                                     ("progressive_combine", progressive_combine, COMBINE),
                                     ("time_input", time_input, TIME_INPUTS),
                                     ("embedding_type", embedding_type, ("fourier", "sinusoidal"))):
            if value not in choices:
                hint = (" (the reference's progressive=residual needs a fused up-convolution that its own PyTorch "
                        "port cannot run, and no released configuration uses it)" if name == "progressive" else "")
                raise ValueError(f"unknown {name}={value!r}; choose one of: {', '.join(choices)}{hint}")
        ch_mult, attn_resolutions, resolutions = check_unet_args(
            self.data_shape, ch, ch_mult, num_res_blocks, attn_resolutions, dropout)
        channels = self.data_shape[0]
        self.ch, self.ch_mult, self.num_res_blocks, self.attn_resolutions = ch, ch_mult, num_res_blocks, attn_resolutions
        self.progressive, self.progressive_input = progressive, progressive_input
        self.time_input, self.centered = time_input, bool(centered)
        self.fir_kernel: Optional[Tuple[float, ...]] = tuple(float(v) for v in fir_kernel) if fir else None
        self.skip_scale = 1.0 / math.sqrt(2.0) if skip_rescale else 1.0
        self.__dict__["_sde"] = None

        emb_dim = 4 * ch
        if embedding_type == "fourier":
            self.time_embed = TimeEmbedding("fourier", 2 * ch, emb_dim, fourier_scale)
        else:
            self.time_embed = TimeEmbedding("sinusoidal", ch, emb_dim, embedding_scale)
        self.label_embed = LabelEmbedding(self.num_classes, emb_dim) if self.num_classes is not None else None

        def res(in_c: int, out_c: int, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(in_c, out_c, emb_dim, dropout, skip_rescale, up=up, down=down, zero_init=zero_init,
                            fir_kernel=self.fir_kernel)

        def attn(c: int) -> nn.Module:
            return AttnBlock(c, num_heads, skip_rescale, zero_init)

        self.conv_in = conv3x3(channels, ch)
        skips, in_c, pyr_c = [ch], ch, channels
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = _Level()
            for _ in range(num_res_blocks):
                level.blocks.append(res(in_c, ch * mult))
                in_c = ch * mult
                level.attns.append(attn(in_c) if resolutions[i] in attn_resolutions else nn.Identity())
                skips.append(in_c)
            if i < len(ch_mult) - 1:
                level.resample = res(in_c, in_c, down=True)
                if progressive_input == "input_skip":
                    level.pyramid = Combine(channels, in_c, progressive_combine)
                    in_c = 2 * in_c if progressive_combine == "cat" else in_c
                elif progressive_input == "residual":
                    level.pyramid = PyramidDownsample(pyr_c, in_c, self.fir_kernel)
                    pyr_c = in_c
                skips.append(in_c)
            self.down.append(level)

        in_c = skips[-1]
        self.mid_block_0, self.mid_attn, self.mid_block_1 = res(in_c, in_c), attn(in_c), res(in_c, in_c)

        self.up = nn.ModuleList()
        for i in reversed(range(len(ch_mult))):
            level = _Level()
            for _ in range(num_res_blocks + 1):
                level.blocks.append(res(in_c + skips.pop(), ch * ch_mult[i]))
                in_c = ch * ch_mult[i]
            level.attns.append(attn(in_c) if resolutions[i] in attn_resolutions else nn.Identity())
            if progressive == "output_skip":
                level.pyramid = OutputBranch(in_c, channels, zero_init)
            if i > 0:
                level.resample = res(in_c, in_c, up=True)
            self.up.append(level)
        assert not skips, "every skip connection must be consumed exactly once"
        self.out = OutputBranch(in_c, channels, zero_init) if progressive != "output_skip" else None

    # ------------------------------------------------------------------ the noise level
    def bind_sde(self, sde: Any) -> "NCSNpp":
        """Give the network the process whose σ(t) ``time_input=log_sigma`` reads (kept out of the module tree)."""
        self.__dict__["_sde"] = sde
        return self

    def _time_features_input(self, t: Tensor) -> Tensor:
        if self.time_input == "t":
            return t
        sde = self.__dict__.get("_sde")
        if sde is None:
            raise RuntimeError(
                "NCSN++ with time_input=log_sigma needs the SDE's sigma(t): build it through the training module "
                "(ScoreDiffusion binds it) or call net.bind_sde(sde) first; time_input=t needs none")
        sigma = sde.marginal_std(t.to(torch.float64) if t.dtype != torch.float64 else t)
        # σ(0) = 0 for VP-type processes: a floor keeps log σ finite at t = 0.
        return torch.log(sigma.clamp_min(1e-30)).to(t.dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        t = self._check_inputs(x, t)
        emb = self.time_embed(self._time_features_input(t))
        if self.label_embed is not None:
            emb = emb + self.label_embed(y, x.shape[0])
        if not self.centered:
            x = 2 * x - 1

        pyramid_in = x
        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(h, emb))
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h, emb)
                if self.progressive_input == "input_skip":
                    pyramid_in = downsample_fir(pyramid_in, self.fir_kernel) if self.fir_kernel else F.avg_pool2d(pyramid_in, 2)
                    h = level.pyramid(pyramid_in, h)
                elif self.progressive_input == "residual":
                    pyramid_in = (level.pyramid(pyramid_in) + h) * self.skip_scale
                    h = pyramid_in
                skips.append(h)

        h = self.mid_block_1(self.mid_attn(self.mid_block_0(h, emb)), emb)

        out: Optional[Tensor] = None
        for level in self.up:
            for block in level.blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            h = level.attns[0](h)
            if level.pyramid is not None:
                branch = level.pyramid(h)
                if out is None:
                    out = branch
                else:
                    out = (upsample_fir(out, self.fir_kernel) if self.fir_kernel else F.interpolate(out, scale_factor=2.0, mode="nearest")) + branch
            if level.resample is not None:
                h = level.resample(h, emb)
        return out if self.out is None else self.out(h)

    # ------------------------------------------------------------------ the reference's module order
    def reference_modules(self) -> Iterator[Tuple[str, nn.Module]]:
        """``(kind, module)`` in the order of score_sde_pytorch's ``all_modules`` for this configuration.

        Kinds: ``fourier``, ``linear``, ``conv``, ``resblock``, ``attn``, ``combine``, ``pyramid_down``,
        ``groupnorm``. Used by :mod:`sde_diffusion.convert` to map a reference checkpoint's weights.
        """
        if isinstance(self.time_embed.features, nn.Module) and self.time_embed.embedding_type == "fourier":
            yield "fourier", self.time_embed.features
        yield "linear", self.time_embed.mlp[0]
        yield "linear", self.time_embed.mlp[2]
        yield "conv", self.conv_in
        for level in self.down:
            for block, attn in zip(level.blocks, level.attns):
                yield "resblock", block
                if not isinstance(attn, nn.Identity):
                    yield "attn", attn
            if level.resample is not None:
                yield "resblock", level.resample
                if level.pyramid is not None:
                    yield ("combine" if isinstance(level.pyramid, Combine) else "pyramid_down"), level.pyramid
        yield "resblock", self.mid_block_0
        yield "attn", self.mid_attn
        yield "resblock", self.mid_block_1
        for level in self.up:
            for block in level.blocks:
                yield "resblock", block
            if not isinstance(level.attns[0], nn.Identity):
                yield "attn", level.attns[0]
            if level.pyramid is not None:
                yield "groupnorm", level.pyramid.norm
                yield "conv", level.pyramid.conv
            if level.resample is not None:
                yield "resblock", level.resample
        if self.out is not None:
            yield "groupnorm", self.out.norm
            yield "conv", self.out.conv

    def output_convs(self) -> List[nn.Conv2d]:
        """The convolutions whose outputs sum to the network's output (negated by the VE converter)."""
        if self.out is not None:
            return [self.out.conv]
        return [level.pyramid.conv for level in self.up if level.pyramid is not None]


__all__ = ["NCSNpp", "Combine", "PyramidDownsample", "OutputBranch", "PROGRESSIVE", "PROGRESSIVE_INPUT"]
