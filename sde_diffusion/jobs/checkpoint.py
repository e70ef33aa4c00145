"""Finding a training checkpoint, checking it against what was asked for, and loading it for inference.

A checkpoint written by ``train.py`` holds the whole resolved training config (``hyper_parameters.cfg``),
so the SDE, the network and the data module are rebuilt from it alone. A sampling config may
*also* name an ``sde``, ``model`` or ``data`` group; these are checks, not replacements: every key
they state must equal the checkpoint's value, otherwise a ValueError names both (``sde=ve`` on a
VP checkpoint fails instead of silently sampling the wrong process). The data group's name must
match; its other keys override the stored ones (e.g. ``data.root`` on another machine).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch

from ..checkpoints import AUTOENCODER_KIND, CLASSIFIER_KIND, resolve_checkpoint_path, run_dir_of
from ..config import build_datamodule, to_container

CHECKED_GROUPS = ("sde", "model")


def read_checkpoint_info(path: Path) -> Dict[str, Any]:
    """``{"cfg", "data_shape", "num_classes", "global_step"}`` without building anything."""
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same explanation
        raise ValueError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from None
    if isinstance(raw, Mapping) and raw.get("kind") == CLASSIFIER_KIND:
        raise ValueError(
            f"{path} is a noisy-classifier checkpoint (python train.py task=classifier), not a score model: "
            "give a score model's run or .ckpt as ckpt=, and the classifier as guidance.classifier=<path>"
        )
    if isinstance(raw, Mapping) and raw.get("kind") == AUTOENCODER_KIND:
        raise ValueError(
            f"{path} is an autoencoder checkpoint (python train.py task=autoencoder): it encodes and decodes "
            "images but draws no samples; give a score model's run or .ckpt as ckpt="
        )
    hp = raw.get("hyper_parameters") if isinstance(raw, Mapping) else None
    if not isinstance(hp, Mapping) or "cfg" not in hp or "data_shape" not in hp:
        raise ValueError(f"{path} is not a checkpoint written by train.py (no hyper_parameters.cfg/data_shape)")
    info = {
        "cfg": to_container(hp["cfg"]),
        "data_shape": tuple(int(s) for s in hp["data_shape"]),
        "num_classes": hp.get("num_classes"),
        "global_step": int(raw.get("global_step", -1)),
        "has_ema": "current_model_state" in raw,
    }
    del raw
    return info


def _fmt(node: Any) -> str:
    if isinstance(node, Mapping):
        return "{" + ", ".join(f"{k}: {v}" for k, v in node.items()) + "}"
    return str(node)


def check_requested(saved: Mapping[str, Any], request: Mapping[str, Any], ckpt: Path) -> None:
    """Raise ValueError when a group the sampling config names differs from the checkpoint's."""
    for key in CHECKED_GROUPS:
        want = request.get(key)
        if want is None:
            continue
        want = to_container(want)
        have = to_container(saved.get(key) or {})
        diff = {k: (have.get(k, "<unset>"), v) for k, v in want.items() if have.get(k, "<unset>") != v}
        if diff:
            details = "; ".join(f"{key}.{k}: checkpoint {a!r}, requested {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"checkpoint {ckpt} was trained with {key}={_fmt(have)} but {key}={_fmt(want)} was requested "
                f"({details}). Drop the {key}= override to use the checkpoint's, or pick a checkpoint trained with it."
            )
    want_data = request.get("data")
    if want_data is not None:
        want_name = to_container(want_data).get("name")
        have_name = (saved.get("data") or {}).get("name")
        if want_name is not None and want_name != have_name:
            raise ValueError(
                f"checkpoint {ckpt} was trained on data={have_name} but data={want_name} was requested"
            )


def data_config(saved: Mapping[str, Any], request: Mapping[str, Any]) -> Dict[str, Any]:
    """The checkpoint's data group with the requested data keys (if any) on top."""
    data = dict(to_container(saved.get("data") or {}))
    if request.get("data") is not None:
        data.update(to_container(request["data"]))
    return data


@dataclass
class LoadedModel:
    """A checkpoint ready for inference.

    Attributes: ``module`` (eval mode, on ``device``/``dtype``, no parameter gradients), ``path``,
    ``run_dir``, ``train_cfg`` (the checkpoint's config), ``global_step``, ``data_shape``,
    ``num_classes`` (None if unconditional), ``has_ema``.
    """

    module: Any
    path: Path
    run_dir: Path
    train_cfg: Dict[str, Any]
    global_step: int
    data_shape: tuple
    num_classes: Optional[int]
    has_ema: bool

    @property
    def sde(self) -> Any:
        return self.module.sde

    @property
    def model_shape(self) -> tuple:
        """What the score model samples: ``data_shape``, or the latent shape of a latent model."""
        return tuple(self.module.model_shape)

    @property
    def is_latent(self) -> bool:
        return self.module.codec is not None

    def score_model(self, use_ema: bool = True) -> Any:
        """s_θ(x, t, **cond) (a :class:`~sde_diffusion.score.ScoreModel`), EMA weights when asked and present."""
        if use_ema and not self.has_ema:
            warnings.warn(f"{self.path} holds no EMA weights (trained with ema.enabled=false?): using the trained weights",
                          stacklevel=2)
        return self.module.score_fn(use_ema=use_ema and self.has_ema)

    def build_datamodule(self, request: Mapping[str, Any]) -> Any:
        return build_datamodule({"data": data_config(self.train_cfg, request)})


def load_model(
    ckpt: Union[str, Path, None],
    request: Optional[Mapping[str, Any]] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Resolve, check (see the module docstring) and load a checkpoint with ``training.load_checkpoint``."""
    from ..training import load_checkpoint

    path = resolve_checkpoint_path(ckpt)
    info = read_checkpoint_info(path)
    check_requested(info["cfg"], request or {}, path)
    latent = (request or {}).get("latent")  # sample.py latent=<moved autoencoder run>
    try:
        module = load_checkpoint(path, map_location="cpu", latent=str(latent) if latent else None)
    except RuntimeError as err:
        first = "\n".join(str(err).strip().splitlines()[:4])
        raise ValueError(
            f"checkpoint {path}: its weights do not fit the network its config describes "
            f"(model={_fmt(info['cfg'].get('model'))}, data_shape={info['data_shape']}, "
            f"num_classes={info['num_classes']}): {first}"
        ) from None
    module = module.to(device=torch.device(device), dtype=dtype).eval()
    module.requires_grad_(False)
    ema = module.ema
    if ema is not None:
        ema.to(device=torch.device(device), dtype=dtype).eval().requires_grad_(False)
    return LoadedModel(
        module=module,
        path=path,
        run_dir=run_dir_of(path),
        train_cfg=info["cfg"],
        global_step=info["global_step"],
        data_shape=tuple(module.data_shape),
        num_classes=module.num_classes,
        has_ema=ema is not None,
    )


def _same_value(a: Any, b: Any) -> bool:
    # 20 and 20.0 in two configs are the same SDE parameter.
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


@dataclass
class LoadedClassifier:
    """A noisy classifier ready for guidance: ``module`` (``(x, t) -> logits [B, num_classes]``, eval
    mode, frozen parameters), its checkpoint ``path`` and ``global_step``, ``num_classes``."""

    module: Any
    path: Path
    global_step: int
    num_classes: int


def _check_same_space(clf_latent: Optional[Mapping[str, Any]], model: "LoadedModel", file: Path) -> None:
    """Guidance adds ∇ log p(y | x_t) to the score, so both must live in one space: pixels, or the
    latents of one autoencoder (same weights digest)."""
    model_latent = model.module.hparams.get("latent") if model.is_latent else None
    if model_latent is None and clf_latent is None:
        return
    if model_latent is None:
        raise ValueError(
            f"the classifier {file} was trained on autoencoder latents (latent={clf_latent.get('path')}) but the score "
            f"model {model.path} works on pixels; train the classifier without latent="
        )
    if clf_latent is None:
        raise ValueError(
            f"the score model {model.path} works on autoencoder latents, but the classifier {file} was trained on "
            "pixels: the guidance gradient must be taken in the latent space the score lives in; train one with "
            f"`python train.py task=classifier latent={model_latent.get('path')} data=<the model's data>`"
        )
    if clf_latent.get("weights_sha256") != model_latent.get("weights_sha256"):
        raise ValueError(
            f"the classifier {file} was trained on the latents of another autoencoder (weights digest "
            f"{str(clf_latent.get('weights_sha256'))[:12]}…) than the score model {model.path} "
            f"({str(model_latent.get('weights_sha256'))[:12]}…); train the classifier with the score model's latent="
        )


def load_guidance_classifier(
    path: Union[str, Path, None],
    model: LoadedModel,
    label: Optional[int],
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedClassifier:
    """Load the noisy classifier at ``path`` (``guidance.classifier``) for guiding ``model``.

    Checked before any weights are read, each failure a ValueError saying what differs: the file
    is a classifier checkpoint (not a score model), its SDE (every key of the ``sde`` group) and
    data shape equal the score model's, both work in the same space (pixels, or the latents of the
    same autoencoder by weights digest), a ``label`` in [0, num_classes) is given, and for a
    class-conditional score model the class counts agree. The
    :class:`~sde_diffusion.classifier.NoisyClassifier` is put on ``device``/``dtype`` in eval mode
    with frozen parameters (gradients with respect to x still flow).
    """
    from ..classifier import load_classifier

    file = resolve_checkpoint_path(path, key="guidance.classifier")
    try:
        raw = torch.load(str(file), map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same explanation
        raise ValueError(f"cannot read classifier checkpoint {file}: {type(err).__name__}: {err}") from None
    if not isinstance(raw, Mapping) or raw.get("kind") != CLASSIFIER_KIND:
        raise ValueError(
            f"guidance.classifier={path}: {file} is not a noisy-classifier checkpoint (a score model's checkpoint "
            "goes to ckpt=); train a classifier with `python train.py task=classifier data=<the model's data>`"
        )
    hp = raw["hyper_parameters"]
    clf_sde = to_container(to_container(hp["cfg"]).get("sde") or {})
    model_sde = to_container(model.train_cfg.get("sde") or {})
    keys = sorted(set(clf_sde) | set(model_sde))
    diff = [k for k in keys if not _same_value(clf_sde.get(k, "<unset>"), model_sde.get(k, "<unset>"))]
    if diff:
        details = "; ".join(f"sde.{k}: classifier {clf_sde.get(k, '<unset>')!r}, score model {model_sde.get(k, '<unset>')!r}"
                            for k in diff)
        raise ValueError(
            f"the classifier {file} was trained with sde={_fmt(clf_sde)} but the score model {model.path} with "
            f"sde={_fmt(model_sde)} ({details}); train the classifier with the score model's SDE"
        )
    _check_same_space(hp.get("latent"), model, file)
    clf_shape = tuple(int(s) for s in hp["data_shape"])
    if clf_shape != tuple(model.data_shape):
        raise ValueError(
            f"the classifier {file} takes data of shape {clf_shape} but the score model {model.path} generates "
            f"{tuple(model.data_shape)}; train the classifier on the score model's data"
        )
    num_classes = int(hp["num_classes"])
    global_step = int(raw.get("global_step", -1))
    del raw
    if label is None:
        raise ValueError(f"guidance.classifier needs label=<class in 0..{num_classes - 1}>: the class to steer towards")
    if not 0 <= label < num_classes:
        raise ValueError(f"label={label} is out of range: the classifier has {num_classes} classes (0..{num_classes - 1})")
    if model.num_classes is not None and int(model.num_classes) != num_classes:
        raise ValueError(
            f"the classifier {file} has {num_classes} classes but the class-conditional score model has "
            f"{model.num_classes}; their labels cannot mean the same classes"
        )
    # A latent classifier shares the score model's (verified) autoencoder, wherever it now lives.
    codec_path = str(model.module.codec.path) if model.is_latent and model.module.codec.path is not None else None
    clf = load_classifier(file, map_location="cpu", latent=codec_path).to(device=torch.device(device), dtype=dtype).eval()
    clf.requires_grad_(False)
    return LoadedClassifier(module=clf, path=file, global_step=global_step, num_classes=num_classes)


__all__ = [
    "resolve_checkpoint_path",
    "run_dir_of",
    "read_checkpoint_info",
    "check_requested",
    "data_config",
    "LoadedModel",
    "load_model",
    "LoadedClassifier",
    "load_guidance_classifier",
]
