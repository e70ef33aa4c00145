"""An independent, functional transcription of score_sde_pytorch's NCSN++/DDPM++ network (``models/ncsnpp.py``,
``layerspp.py``, ``up_or_down_sampling.py``) and score function (``models/utils.py``), working directly on a
state dict in the reference's layout. Tests build checkpoints in that layout with it and compare the converted
networks' scores with what the reference would compute from the same weights.

Nothing here imports sde_diffusion's networks or resamplers.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

# score_sde_pytorch's CIFAR-10 continuous configurations (configs/{vp,subvp,ve}/cifar10_*_continuous.py).
BASE = dict(nf=128, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,), image_size=32, channels=3, skip_rescale=True,
            fir_kernel=(1, 3, 3, 1), progressive="none", progressive_combine="sum")
CONFIGS = {
    "ddpmpp_cifar10": dict(BASE, num_res_blocks=4, fir=False, progressive_input="none", embedding_type="positional"),
    "ddpmpp_deep_cifar10": dict(BASE, num_res_blocks=8, fir=False, progressive_input="none", embedding_type="positional"),
    "ncsnpp_cifar10": dict(BASE, num_res_blocks=4, fir=True, progressive_input="residual", embedding_type="fourier"),
    "ncsnpp_deep_cifar10": dict(BASE, num_res_blocks=8, fir=True, progressive_input="residual", embedding_type="fourier"),
}


def groups(c: int) -> int:
    return min(c // 4, 32)


# ------------------------------------------------------------------------------ the layout
def layout(cfg: Dict) -> List[Tuple[str, Tuple[int, ...]]]:
    """(key, shape) of every tensor of ``all_modules`` in registration order, as NCSNpp.__init__ builds them."""
    nf, ch_mult, nrb = cfg["nf"], cfg["ch_mult"], cfg["num_res_blocks"]
    res = [cfg["image_size"] // 2**i for i in range(len(ch_mult))]
    C = cfg["channels"]
    out: List[Tuple[str, Tuple[int, ...]]] = []
    idx = [0]

    def mod(entries):
        p = f"all_modules.{idx[0]}."
        out.extend((p + k, s) for k, s in entries)
        idx[0] += 1

    def conv(i, o, k=3):
        return [("weight", (o, i, k, k)), ("bias", (o,))]

    def gn(c, name=""):
        return [(name + "weight", (c,)), (name + "bias", (c,))]

    def resblock(i, o=None, updown=False):
        o = o or i
        e = [("GroupNorm_0." + k, s) for k, s in gn(i)] + [("Conv_0." + k, s) for k, s in conv(i, o)]
        e += [("Dense_0.weight", (o, 4 * nf)), ("Dense_0.bias", (o,))]
        e += [("GroupNorm_1." + k, s) for k, s in gn(o)] + [("Conv_1." + k, s) for k, s in conv(o, o)]
        if i != o or updown:
            e += [("Conv_2." + k, s) for k, s in conv(i, o, 1)]
        mod(e)

    def attn(c):
        e = [("GroupNorm_0." + k, s) for k, s in gn(c)]
        for j in range(4):
            e += [(f"NIN_{j}.W", (c, c)), (f"NIN_{j}.b", (c,))]
        mod(e)

    if cfg["embedding_type"] == "fourier":
        mod([("W", (nf,))])
        embed = 2 * nf
    else:
        embed = nf
    mod([("weight", (4 * nf, embed)), ("bias", (4 * nf,))])
    mod([("weight", (4 * nf, 4 * nf)), ("bias", (4 * nf,))])
    pyr = C
    mod(conv(C, nf))
    hs = [nf]
    in_ch = nf
    for lvl in range(len(ch_mult)):
        for _ in range(nrb):
            o = nf * ch_mult[lvl]
            resblock(in_ch, o)
            in_ch = o
            if res[lvl] in cfg["attn_resolutions"]:
                attn(in_ch)
            hs.append(in_ch)
        if lvl != len(ch_mult) - 1:
            resblock(in_ch, updown=True)
            if cfg["progressive_input"] == "input_skip":
                mod([("Conv_0." + k, s) for k, s in conv(C, in_ch, 1)])
                if cfg["progressive_combine"] == "cat":
                    in_ch *= 2
            elif cfg["progressive_input"] == "residual":
                mod([("Conv2d_0." + k, s) for k, s in conv(pyr, in_ch)])
                pyr = in_ch
            hs.append(in_ch)
    in_ch = hs[-1]
    resblock(in_ch)
    attn(in_ch)
    resblock(in_ch)
    for lvl in reversed(range(len(ch_mult))):
        for _ in range(nrb + 1):
            o = nf * ch_mult[lvl]
            resblock(in_ch + hs.pop(), o)
            in_ch = o
        if res[lvl] in cfg["attn_resolutions"]:
            attn(in_ch)
        if cfg["progressive"] == "output_skip":
            mod(gn(in_ch))
            mod(conv(in_ch, C))
        if lvl != 0:
            resblock(in_ch, updown=True)
    if cfg["progressive"] != "output_skip":
        mod(gn(in_ch))
        mod(conv(in_ch, C))
    return out


def random_state(cfg: Dict, seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
    """Random weights in the layout: norms near 1, everything else ~ N(0, 1/fan_in), Fourier W ~ N(0, 16²)."""
    g = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for key, shape in layout(cfg):
        if key.endswith(".W") and len(shape) == 1:
            v = torch.randn(shape, generator=g) * 16.0
        elif "GroupNorm" in key or (len(shape) == 1 and key.endswith("weight")):
            v = (1.0 if key.endswith("weight") else 0.0) + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            v = 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = shape[0] if key.endswith(".W") else int(np.prod(shape[1:]))
            v = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        state[key] = v
    return state


def checkpoint_dict(cfg: Dict, model_state, ema_state, step: int, sigmas: torch.Tensor):
    """A checkpoint as score_sde_pytorch's save_checkpoint writes it (DataParallel ``module.`` keys)."""
    model = OrderedDict([("module.sigmas", sigmas)] + [("module." + k, v) for k, v in model_state.items()])
    shadow = [v.clone() for k, v in ema_state.items() if not (k.endswith(".W") and v.dim() == 1)]
    opt = {"state": {}, "param_groups": [{"lr": 2e-4, "params": list(range(len(shadow)))}]}
    return {"optimizer": opt, "model": model, "ema": {"decay": 0.9999, "num_updates": step, "shadow_params": shadow},
            "step": step}


# ------------------------------------------------------------------------------ the forward pass
def _upfirdn2d(x, k, up=1, down=1, pad=(0, 0)):
    # op/upfirdn2d.py's native path: zero insertion by reshaping, padding, a flipped-kernel conv, striding.
    _, ch, h, w = x.shape
    x = x.reshape(-1, h, 1, w, 1, 1)
    x = F.pad(x, [0, 0, 0, up - 1, 0, 0, 0, up - 1]).reshape(-1, 1, h * up, w * up)
    x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    kern = torch.flip(k, [0, 1])[None, None]
    x = F.conv2d(x, kern)
    x = x[:, :, ::down, ::down]
    return x.reshape(-1, ch, x.shape[-2], x.shape[-1])


def _kernel(k, x):
    k = np.asarray(k, dtype=np.float64)
    k = np.outer(k, k)
    k /= k.sum()
    return torch.tensor(k, dtype=x.dtype)


def _up(x, cfg):
    if not cfg["fir"]:
        n, c, h, w = x.shape
        return x.reshape(-1, c, h, 1, w, 1).repeat(1, 1, 1, 2, 1, 2).reshape(-1, c, 2 * h, 2 * w)
    k = _kernel(cfg["fir_kernel"], x) * 4
    p = k.shape[0] - 2
    return _upfirdn2d(x, k, up=2, pad=((p + 1) // 2 + 1, p // 2))


def _down(x, cfg):
    if not cfg["fir"]:
        n, c, h, w = x.shape
        return x.reshape(-1, c, h // 2, 2, w // 2, 2).mean(dim=(3, 5))
    k = _kernel(cfg["fir_kernel"], x)
    p = k.shape[0] - 2
    return _upfirdn2d(x, k, down=2, pad=((p + 1) // 2, p // 2))


def forward(state, cfg: Dict, x: torch.Tensor, time_cond: torch.Tensor, centered: bool, scale_by_sigma: bool):
    """NCSNpp.forward of the reference, reading ``state`` (keys ``all_modules.<i>.…``) by module index."""
    S = lambda i, k: state[f"all_modules.{i}.{k}"]  # noqa: E731
    act = F.silu
    rs = 1 / np.sqrt(2.0) if cfg["skip_rescale"] else 1.0
    m = [0]

    def nxt():
        i = m[0]
        m[0] += 1
        return i

    def gn(i, h, name=""):
        return F.group_norm(h, groups(h.shape[1]), S(i, name + "weight"), S(i, name + "bias"), eps=1e-6)

    def conv(i, h, name="", stride=1, padding=1):
        return F.conv2d(h, S(i, name + "weight"), S(i, name + "bias"), stride=stride, padding=padding)

    def resblock(h_in, temb, up=False, down=False):
        i = nxt()
        h = act(gn(i, h_in, "GroupNorm_0."))
        x_ = h_in
        if up:
            h, x_ = _up(h, cfg), _up(x_, cfg)
        elif down:
            h, x_ = _down(h, cfg), _down(x_, cfg)
        h = conv(i, h, "Conv_0.")
        h = h + F.linear(act(temb), S(i, "Dense_0.weight"), S(i, "Dense_0.bias"))[:, :, None, None]
        h = act(gn(i, h, "GroupNorm_1."))
        h = conv(i, h, "Conv_1.")
        if f"all_modules.{i}.Conv_2.weight" in state:
            x_ = conv(i, x_, "Conv_2.", padding=0)
        return (x_ + h) * rs

    def nin(i, h, j):
        return torch.einsum("bchw,co->bohw", h, S(i, f"NIN_{j}.W")) + S(i, f"NIN_{j}.b")[None, :, None, None]

    def attn(x_):
        i = nxt()
        B, C, H, W = x_.shape
        h = gn(i, x_, "GroupNorm_0.")
        q, k, v = nin(i, h, 0), nin(i, h, 1), nin(i, h, 2)
        w = torch.einsum("bchw,bcij->bhwij", q, k) * (int(C) ** (-0.5))
        w = F.softmax(w.reshape(B, H, W, H * W), dim=-1).reshape(B, H, W, H, W)
        h = torch.einsum("bhwij,bcij->bchw", w, v)
        return (x_ + nin(i, h, 3)) * rs

    nf, ch_mult, nrb = cfg["nf"], cfg["ch_mult"], cfg["num_res_blocks"]
    if cfg["embedding_type"] == "fourier":
        i = nxt()
        proj = torch.log(time_cond)[:, None] * S(i, "W")[None, :] * 2 * np.pi
        temb = torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)
    else:
        half = nf // 2
        f = math.log(10000) / (half - 1)
        dt = x.dtype  # the reference works in float32; float64 weights get float64 features here
        freqs = torch.exp(torch.arange(half, dtype=dt) * -f)
        arg = time_cond.to(dt)[:, None] * freqs[None, :]
        temb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    i = nxt()
    temb = F.linear(temb, S(i, "weight"), S(i, "bias"))
    i = nxt()
    temb = F.linear(act(temb), S(i, "weight"), S(i, "bias"))
    if not centered:
        x = 2 * x - 1.0
    pyr_in = x
    hs = [conv(nxt(), x)]
    for lvl in range(len(ch_mult)):
        for _ in range(nrb):
            h = resblock(hs[-1], temb)
            if h.shape[-1] in cfg["attn_resolutions"]:
                h = attn(h)
            hs.append(h)
        if lvl != len(ch_mult) - 1:
            h = resblock(hs[-1], temb, down=True)
            if cfg["progressive_input"] == "input_skip":
                pyr_in = _down(pyr_in, cfg) if cfg["fir"] else F.avg_pool2d(pyr_in, 2, stride=2)
                i = nxt()
                p = conv(i, pyr_in, "Conv_0.", padding=0)
                h = p + h if cfg["progressive_combine"] == "sum" else torch.cat([p, h], dim=1)
            elif cfg["progressive_input"] == "residual":
                i = nxt()
                if cfg["fir"]:
                    k = _kernel(cfg["fir_kernel"], pyr_in)
                    pp = (k.shape[0] - 2) + 2
                    z = _upfirdn2d(pyr_in, k, pad=((pp + 1) // 2, pp // 2))
                    z = F.conv2d(z, S(i, "Conv2d_0.weight"), stride=2) + S(i, "Conv2d_0.bias").reshape(1, -1, 1, 1)
                else:
                    z = conv(i, F.pad(pyr_in, (0, 1, 0, 1)), "Conv2d_0.", stride=2, padding=0)
                pyr_in = (z + h) * rs
                h = pyr_in
            hs.append(h)
    h = hs[-1]
    h = resblock(h, temb)
    h = attn(h)
    h = resblock(h, temb)
    pyramid = None
    for lvl in reversed(range(len(ch_mult))):
        for _ in range(nrb + 1):
            h = resblock(torch.cat([h, hs.pop()], dim=1), temb)
        if h.shape[-1] in cfg["attn_resolutions"]:
            h = attn(h)
        if cfg["progressive"] == "output_skip":
            i = nxt()
            ph = act(gn(i, h))
            ph = conv(nxt(), ph)
            pyramid = ph if pyramid is None else _up(pyramid, cfg) + ph
        if lvl != 0:
            h = resblock(h, temb, up=True)
    assert not hs
    if cfg["progressive"] == "output_skip":
        h = pyramid
    else:
        i = nxt()
        h = act(gn(i, h))
        h = conv(nxt(), h)
    assert m[0] == len({k.split(".")[1] for k in state if k.startswith("all_modules.")})
    if scale_by_sigma:
        h = h / time_cond.reshape(-1, 1, 1, 1)
    return h


def reference_score(state, cfg: Dict, sde: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """models/utils.py get_score_fn(continuous=True) with the reference SDE parameters."""
    if sde == "ve":
        sigma = 0.01 * (50.0 / 0.01) ** t
        return forward(state, cfg, x, sigma, centered=False, scale_by_sigma=True)
    beta_min, beta_max = 0.1, 20.0
    log_mean = -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min
    std = torch.sqrt(1.0 - torch.exp(2.0 * log_mean)) if sde == "vp" else 1.0 - torch.exp(2.0 * log_mean)
    h = forward(state, cfg, x, t * 999, centered=True, scale_by_sigma=False)
    return -h / std[:, None, None, None]
