r"""Convert checkpoints of other code bases into run directories of this one.

    python -m sde_diffusion.convert score_sde <checkpoint.pth> --config <name> --sde <vp|subvp|ve> --out <run dir>

``score_sde``: a checkpoint of score_sde_pytorch (Song et al. 2021), a ``torch.save``\ d dict with
``model`` (the ``nn.DataParallel`` state dict: keys ``module.all_modules.<i>.…`` and ``module.sigmas``),
``ema`` (``{"decay", "num_updates", "shadow_params": [tensors in parameter order]}``), ``optimizer``
and ``step``. The released continuous-time CIFAR-10 models:

==========================================  =====================  ========
released checkpoint folder                  ``--config``           ``--sde``
==========================================  =====================  ========
``vp/cifar10_ddpmpp_continuous``            ddpmpp_cifar10         vp
``vp/cifar10_ddpmpp_deep_continuous``       ddpmpp_deep_cifar10    vp
``subvp/cifar10_ddpmpp_continuous``         ddpmpp_cifar10         subvp
``subvp/cifar10_ddpmpp_deep_continuous``    ddpmpp_deep_cifar10    subvp
``ve/cifar10_ncsnpp_continuous``            ncsnpp_cifar10         ve
``ve/cifar10_ncsnpp_deep_continuous``       ncsnpp_deep_cifar10    ve
==========================================  =====================  ========

What the run directory holds: ``checkpoints/last.ckpt`` (EMA weights as the EMA, the trained
weights as the network, the training step kept), ``finished.json`` and ``converted.json`` (source,
its sha256, the choices). ``sample.py ckpt=<run dir>``, ``mode=likelihood`` and ``mode=metrics`` use it
like any trained run.

The process and the data range are the reference configuration's: β ∈ [0.1, 20] for VP and
sub-VP, σ ∈ [0.01, 50] with σ(t) = σ_min (σ_max/σ_min)^t for VE (``sde.exact_kernel=false``, the
reference's kernel); the VP and sub-VP models work on data in [−1, 1], the VE models on [0, 1]
(``data.centered=false``, so samples are written as the reference writes them). The samplers end
where the reference's do (``sde.sampling_eps``: 10⁻³ for VP and sub-VP, 10⁻⁵ for VE). Time inputs:
DDPM++ sees 999·t (as the reference's score function gives it), NCSN++ log σ(t).

A checkpoint whose keys or shapes do not fit ``--config`` is refused before anything is written,
naming the first mismatch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .io import sha256_file

CONFIGS = ("ddpmpp_cifar10", "ddpmpp_deep_cifar10", "ncsnpp_cifar10", "ncsnpp_deep_cifar10")
SDES = ("vp", "subvp", "ve")
DATA_SHAPE = (3, 32, 32)


class ConversionError(ValueError):
    """The checkpoint does not fit the requested configuration (the message names the first mismatch)."""


# ---------------------------------------------------------------------------------- the config
def reference_overrides(config: str, sde: str) -> List[str]:
    """The training-config overrides that reproduce the reference configuration ``config`` on ``sde``."""
    if config not in CONFIGS:
        raise ConversionError(f"unknown --config {config!r}; choose one of: {', '.join(CONFIGS)}")
    if sde not in SDES:
        raise ConversionError(f"unknown --sde {sde!r}; choose one of: {', '.join(SDES)}")
    ncsnpp = config.startswith("ncsnpp")
    if sde == "ve" and not ncsnpp:
        raise ConversionError(
            f"--config {config} with --sde ve: the reference trains DDPM++ on VP and sub-VP only; VE checkpoints are "
            f"NCSN++ (--config ncsnpp_cifar10 or ncsnpp_deep_cifar10)")
    out = [f"sde={sde}", "data=cifar10", f"model={config}", "loss.reduction=mean" if sde != "ve" else "loss.reduction=sum"]
    if sde == "ve":
        out += ["sde.exact_kernel=false", "sde.eps=1e-5", "data.centered=false", "model.centered=false",
                "ema.decay=0.999"]
    else:
        if ncsnpp:  # the reference's NCSN++ on VP / sub-VP: positional features of 999 t
            out += ["model.embedding_type=sinusoidal", "model.embedding_scale=999.0", "model.time_input=t"]
    return out


def build_module(config: str, sde: str, extra: Sequence[str] = ()) -> Tuple[Any, Any]:
    """(``ScoreDiffusion``, its ``TrainConfig``) for the reference configuration (random weights);
    ``extra`` are further overrides (``model.ch=64`` for a reference model of another width)."""
    from .config import parse_train
    from .demo import compose
    from .tasks.score_matching import ScoreDiffusion

    cfg = parse_train(compose(reference_overrides(config, sde) + list(extra)))
    return ScoreDiffusion(cfg, DATA_SHAPE, None), cfg


# ---------------------------------------------------------------------------------- key mapping
def _resblock_names(block: nn.Module) -> List[Tuple[str, str]]:
    names = [("GroupNorm_0", "norm_0"), ("Conv_0", "conv_0"), ("Dense_0", "emb_proj"), ("GroupNorm_1", "norm_1"),
             ("Conv_1", "conv_1")]
    if not isinstance(block.skip, nn.Identity):
        names.append(("Conv_2", "skip"))
    return names


def reference_layout(net: nn.Module) -> Iterator[Tuple[str, Tuple[int, ...], Any]]:
    """``(reference key, shape, setter)`` for every tensor of the reference's ``all_modules`` state, in order.

    ``setter(tensors)`` copies the reference tensors of one module into ``net``; it is given once per
    module, on the module's last key (the attention block's four NIN layers are fused into our
    ``qkv``/``proj`` convolutions).
    """
    for i, (kind, module) in enumerate(net.reference_modules()):
        p = f"all_modules.{i}."
        if kind == "fourier":
            yield p + "W", tuple(module.freqs.shape), ("buffer", module, "freqs", p + "W")
        elif kind in ("linear", "conv", "groupnorm"):
            yield p + "weight", tuple(module.weight.shape), None
            yield p + "bias", tuple(module.bias.shape), ("copy", [(module, p)])
        elif kind == "resblock":
            names = _resblock_names(module)
            for k, (ref, ours) in enumerate(names):
                sub = getattr(module, ours)
                yield f"{p}{ref}.weight", tuple(sub.weight.shape), None
                last = k == len(names) - 1
                yield f"{p}{ref}.bias", tuple(sub.bias.shape), (("copy", [(getattr(module, o), f"{p}{r}.") for r, o in names])
                                                                if last else None)
        elif kind == "attn":
            c = module.proj.weight.shape[0]
            yield p + "GroupNorm_0.weight", (c,), None
            yield p + "GroupNorm_0.bias", (c,), None
            for j in range(4):
                yield f"{p}NIN_{j}.W", (c, c), None
                yield f"{p}NIN_{j}.b", (c,), (("attn", module, p) if j == 3 else None)
        elif kind == "combine":
            yield p + "Conv_0.weight", tuple(module.conv.weight.shape), None
            yield p + "Conv_0.bias", tuple(module.conv.bias.shape), ("copy", [(module.conv, p + "Conv_0.")])
        elif kind == "pyramid_down":
            yield p + "Conv2d_0.weight", tuple(module.weight.shape), None
            yield p + "Conv2d_0.bias", tuple(module.bias.shape), ("pyramid", module, p + "Conv2d_0.")
        else:  # pragma: no cover - reference_modules yields only the kinds above
            raise AssertionError(kind)


def _apply(action: Any, state: Mapping[str, Tensor]) -> None:
    kind = action[0]
    with torch.no_grad():
        if kind == "buffer":
            _, module, name, key = action
            getattr(module, name).copy_(state[key])
        elif kind == "copy":
            for module, prefix in action[1]:
                module.weight.copy_(state[prefix + "weight"])
                module.bias.copy_(state[prefix + "bias"])
        elif kind == "pyramid":
            _, module, prefix = action
            module.weight.copy_(state[prefix + "weight"])
            module.bias.copy_(state[prefix + "bias"])
        elif kind == "attn":
            _, module, p = action
            module.norm.weight.copy_(state[p + "GroupNorm_0.weight"])
            module.norm.bias.copy_(state[p + "GroupNorm_0.bias"])
            # NIN computes x·W with W [in, out]; a 1×1 conv holds Wᵀ as [out, in, 1, 1].
            qkv = torch.cat([state[f"{p}NIN_{j}.W"].t() for j in range(3)])
            module.qkv.weight.copy_(qkv[:, :, None, None])
            module.qkv.bias.copy_(torch.cat([state[f"{p}NIN_{j}.b"] for j in range(3)]))
            module.proj.weight.copy_(state[f"{p}NIN_3.W"].t()[:, :, None, None])
            module.proj.bias.copy_(state[f"{p}NIN_3.b"])


def check_layout(state: Mapping[str, Tensor], layout: Sequence[Tuple[str, Tuple[int, ...], Any]], what: str, config: str) -> None:
    """Raise :class:`ConversionError` naming the first key or shape of ``state`` that ``layout`` does not expect."""
    expected = {k: s for k, s, _ in layout}
    for key, shape, _ in layout:
        if key not in state:
            raise ConversionError(f"{what}: key {key} (shape {list(shape)}) is missing; the checkpoint does not hold "
                                  f"--config {config}")
        got = tuple(state[key].shape)
        if got != shape:
            raise ConversionError(f"{what}: {key} has shape {list(got)} but --config {config} expects {list(shape)}")
    extra = [k for k in state if k not in expected]
    if extra:
        raise ConversionError(f"{what}: unexpected key {extra[0]} (shape {list(state[extra[0]].shape)}) "
                              f"({len(extra)} unexpected in all); the checkpoint does not hold --config {config}")


def load_reference_weights(net: nn.Module, state: Mapping[str, Tensor], *, negate_output: bool, what: str, config: str) -> None:
    """Copy a reference ``all_modules`` state (keys without ``module.``) into ``net``, after checking every key and shape."""
    layout = list(reference_layout(net))
    check_layout(state, layout, what, config)
    for _, _, action in layout:
        if action is not None:
            _apply(action, state)
    if negate_output:
        # The reference's VE output is the score h/σ: ε = −h, so the output convolutions change sign.
        with torch.no_grad():
            for conv in net.output_convs():
                conv.weight.neg_()
                conv.bias.neg_()


def ema_state(raw_ema: Any, model_state: Mapping[str, Tensor], net: nn.Module, what: str) -> Dict[str, Tensor]:
    """The EMA's ``shadow_params`` list as a state like ``model_state`` (same keys; frozen tensors kept from the model)."""
    if not isinstance(raw_ema, Mapping) or not isinstance(raw_ema.get("shadow_params"), (list, tuple)):
        raise ConversionError(f"{what}: 'ema' must be a dict with a 'shadow_params' list (score_sde_pytorch's "
                              f"ExponentialMovingAverage.state_dict()), got {type(raw_ema).__name__}")
    frozen = {k for k, _, a in reference_layout(net) if a is not None and a[0] == "buffer"}
    keys = [k for k in model_state if k not in frozen]
    shadow = list(raw_ema["shadow_params"])
    if len(shadow) != len(keys):
        raise ConversionError(f"{what}: the EMA holds {len(shadow)} tensors but the model has {len(keys)} trainable ones")
    out = dict(model_state)
    for k, v in zip(keys, shadow):
        if tuple(v.shape) != tuple(model_state[k].shape):
            raise ConversionError(f"{what}: EMA tensor for {k} has shape {list(v.shape)}, the model's {list(model_state[k].shape)}")
        out[k] = v
    return out


def read_score_sde(path: Path) -> Dict[str, Any]:
    """The checkpoint dict, checked for the reference's fields."""
    if not path.is_file():
        raise ConversionError(f"{path} does not exist; give the .pth file of a score_sde_pytorch checkpoint "
                              f"(e.g. checkpoint_8.pth from the released folders)")
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets one explanation
        raise ConversionError(f"cannot read {path} as a torch checkpoint: {type(err).__name__}: {err}") from None
    if not isinstance(raw, Mapping) or not {"model", "ema", "step"} <= set(raw):
        found = sorted(raw) if isinstance(raw, Mapping) else type(raw).__name__
        raise ConversionError(f"{path} is not a score_sde_pytorch checkpoint: expected a dict with 'model', 'ema', "
                              f"'optimizer' and 'step', found {found}")
    return dict(raw)


def _strip(state: Mapping[str, Tensor], what: str) -> Dict[str, Tensor]:
    out = {}
    for k, v in state.items():
        key = k[len("module."):] if k.startswith("module.") else k
        if key == "sigmas":  # the reference's table of discrete noise levels, not a weight
            continue
        out[key] = v
    if not out:
        raise ConversionError(f"{what}: the model state is empty")
    return out


def convert_score_sde(checkpoint: Path, config: str, sde: str, out: Path, *, extra: Sequence[str] = (),
                      quiet: bool = False) -> Path:
    """Convert a score_sde_pytorch checkpoint into a run directory ``out``; returns its ``checkpoints/last.ckpt``.

    ``extra``: further config overrides for a reference model of other sizes (e.g. ``model.ch=64``)."""
    import lightning

    from .checkpoints import mark_finished
    from .config import to_plain
    from .evaluation.cache import atomic_torch_save
    from .io import write_json

    checkpoint, out = Path(checkpoint).expanduser(), Path(out).expanduser()
    overrides = reference_overrides(config, sde) + list(extra)
    if (out / "checkpoints" / "last.ckpt").exists():
        raise ConversionError(f"{out} already holds a run (checkpoints/last.ckpt); choose another --out or remove it")
    raw = read_score_sde(checkpoint)
    what = str(checkpoint)
    model_state = _strip(raw["model"], what)
    module, cfg = build_module(config, sde, extra)
    net, ema_net = module.net, None
    load_reference_weights(net, model_state, negate_output=(sde == "ve"), what=what, config=config)
    import copy

    ema_net = copy.deepcopy(net)
    load_reference_weights(ema_net, ema_state(raw["ema"], model_state, net, what), negate_output=(sde == "ve"),
                           what=what + " (EMA)", config=config)
    trained = {k: v.clone() for k, v in module.state_dict().items()}
    averaged = dict(trained)
    averaged.update({"net." + k: v.clone() for k, v in ema_net.state_dict().items()})
    step = int(raw["step"])
    ckpt = {
        "epoch": 0,
        "global_step": step,
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": averaged,
        "current_model_state": trained,
        "hyper_parameters": dict(module.hparams),
        "converted_from": {"format": "score_sde", "path": str(checkpoint.resolve())},
    }
    target = atomic_torch_save(ckpt, out / "checkpoints" / "last.ckpt")
    record = {
        "format": "score_sde_pytorch",
        "source": str(checkpoint.resolve()),
        "source_sha256": sha256_file(checkpoint),
        "config": config,
        "sde": sde,
        "step": step,
        "ema": {k: v for k, v in raw["ema"].items() if k != "shadow_params"},
        "data_range": [-1.0, 1.0] if cfg.data.get("centered", True) else [0.0, 1.0],
        "overrides": overrides,
        "parameters": int(net.num_parameters()),
        "model": to_plain(cfg.model),
        "sde_config": to_plain(cfg.sde),
    }
    write_json(out / "converted.json", record)
    mark_finished(out, "score", step)
    if not quiet:
        print(f"converted {checkpoint} ({config}, sde={sde}, step {step}, {record['parameters']:,} parameters, data in "
              f"{record['data_range']}) -> {out}\nsample with: python sample.py ckpt={out}")
    return target


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sde_diffusion.convert",
                                     description="Convert another code base's checkpoint into a run directory.")
    sub = parser.add_subparsers(dest="source", required=True)
    p = sub.add_parser("score_sde", help="a score_sde_pytorch checkpoint (Song et al. 2021)")
    p.add_argument("checkpoint", type=Path, help="the .pth file")
    p.add_argument("--config", required=True, choices=CONFIGS, help="the network configuration it holds")
    p.add_argument("--sde", required=True, choices=SDES, help="the process it was trained on (DDPM++ serves vp and subvp)")
    p.add_argument("--out", required=True, type=Path, help="the run directory to write")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a further config override for a model of other sizes, e.g. --set model.ch=64 (repeatable)")
    args = parser.parse_args(argv)
    try:
        convert_score_sde(args.checkpoint, args.config, args.sde, args.out, extra=args.set)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


__all__ = ["CONFIGS", "SDES", "ConversionError", "reference_overrides", "build_module", "reference_layout",
           "load_reference_weights", "ema_state", "read_score_sde", "convert_score_sde", "main"]


if __name__ == "__main__":
    raise SystemExit(main())
