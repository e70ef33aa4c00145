"""The trained networks a sampling job uses: the score model (``ckpt=``) and the classifier that
guides it (``guidance.classifier=``), loaded for inference through :mod:`sde_diffusion.checkpoints`
and checked against what was asked for.

A checkpoint written by ``train.py`` holds the whole training config, so the SDE, the network and
the data module are rebuilt from it alone. A sampling config may *also* name an ``sde``, ``model``
or ``data`` group; these are checks, not replacements: every key they state must equal the
checkpoint's value, otherwise a ValueError names both (``sde=ve`` on a VP checkpoint fails instead
of silently sampling the wrong process). The data group's name must match; its other keys override
the stored ones (e.g. ``data.root`` on another machine).

    model = load_model("outputs/train/digits_vp/<date>", device="cpu")
    model.sde, model.data_shape, model.num_classes      # VPSDE(...), (1, 8, 8), None
    score = model.score_model(use_ema=True)             # s_θ(x, t)
    dm = model.build_datamodule()                       # the training data module (reference draws, scaler)
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch

from .. import checkpoints
from ..config import SampleConfig, instantiate, to_plain
from ..registry import DATASETS
from .runtime import Runtime, make_runtime, network_autocast, resolve_dtype

PathLike = Union[str, Path]
CHECKED_GROUPS = ("sde", "model")

def _fmt(node: Any) -> str:
    if isinstance(node, Mapping):
        return "{" + ", ".join(f"{k}: {v}" for k, v in node.items()) + "}"
    return str(node)


def _group(node: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """A group node as a plain dict; an unset ``_target_`` (None, or absent in older checkpoints) is left out."""
    return {k: v for k, v in to_plain(node or {}).items() if not (k == "_target_" and v is None)}


def _same_value(a: Any, b: Any) -> bool:
    # 20 and 20.0 in two configs are the same SDE parameter.
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def check_requested(trained: Any, path: Path, sde: Optional[Mapping[str, Any]] = None,
                    model: Optional[Mapping[str, Any]] = None, data: Optional[Mapping[str, Any]] = None) -> None:
    """Raise ValueError when a group the sampling config names differs from the checkpoint's
    (``trained``: its :class:`~sde_diffusion.config.TrainConfig`)."""
    for key, want in (("sde", sde), ("model", model)):
        if want is None:
            continue
        want, have = _group(want), _group(getattr(trained, key))
        diff = {k: (have.get(k, "<unset>"), v) for k, v in want.items() if have.get(k, "<unset>") != v}
        if diff:
            details = "; ".join(f"{key}.{k}: checkpoint {a!r}, requested {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"checkpoint {path} was trained with {key}={_fmt(have)} but {key}={_fmt(want)} was requested "
                f"({details}). Drop the {key}= override to use the checkpoint's, or pick a checkpoint trained with it."
            )
    if data is not None:
        want_name, have_name = _group(data).get("name"), _group(trained.data).get("name")
        if want_name is not None and want_name != have_name:
            raise ValueError(f"checkpoint {path} was trained on data={have_name} but data={want_name} was requested")


@dataclass
class LoadedModel:
    """A score-model checkpoint ready for inference.

    Attributes: ``module`` (eval mode, on the device and dtype asked for, no parameter gradients),
    ``info`` (what the checkpoint holds, :class:`~sde_diffusion.checkpoints.CheckpointInfo`).
    """

    module: Any
    info: checkpoints.CheckpointInfo
    # How score_model() runs the network: bf16 autocast and/or compiled (see accelerate()).
    autocast_dtype: Optional[torch.dtype] = None
    compile: bool = False
    _wrapped: Dict[int, Any] = field(default_factory=dict, repr=False)

    def accelerate(self, autocast_dtype: Optional[torch.dtype] = None, compile: bool = False) -> "LoadedModel":
        """Run the network of later :meth:`score_model` calls under ``autocast_dtype`` autocast (the
        output comes back in the input's dtype) and/or ``torch.compile``d with static batch shapes
        (:class:`~sde_diffusion.performance.InferenceNet`). Returns ``self``."""
        self.autocast_dtype, self.compile = autocast_dtype, bool(compile)
        self._wrapped.clear()
        return self

    @property
    def path(self) -> Path:
        return self.info.path

    @property
    def run_dir(self) -> Path:
        return self.info.run_dir

    @property
    def global_step(self) -> int:
        return self.info.global_step

    @property
    def train_config(self) -> Any:
        """The checkpoint's training config (a :class:`~sde_diffusion.config.TrainConfig`)."""
        return self.module.cfg

    @property
    def sde(self) -> Any:
        return self.module.sde

    @property
    def data_shape(self) -> tuple:
        return tuple(self.module.data_shape)

    @property
    def model_shape(self) -> tuple:
        """What the score model samples: ``data_shape``, or the latent shape of a latent model."""
        return tuple(self.module.model_shape)

    @property
    def num_classes(self) -> Optional[int]:
        return self.module.num_classes

    @property
    def has_ema(self) -> bool:
        return self.module.ema is not None

    @property
    def is_latent(self) -> bool:
        return self.module.codec is not None

    def training_record(self, *keys: str) -> Dict[str, Any]:
        """The checkpoint's stored config groups ``keys``, as written (for reports)."""
        return {k: self.info.cfg[k] if k in self.info.cfg else None for k in keys}

    def score_model(self, use_ema: bool = True) -> Any:
        """s_θ(x, t, **cond) (a :class:`~sde_diffusion.score.ScoreModel`), EMA weights when asked and present."""
        if use_ema and not self.has_ema:
            warnings.warn(f"{self.path} holds no EMA weights (trained with ema.enabled=false?): using the trained weights",
                          stacklevel=2)
        score = self.module.score_fn(use_ema=use_ema and self.has_ema)
        if self.autocast_dtype is not None or self.compile:
            from ..performance import InferenceNet

            key = id(score.net)
            if key not in self._wrapped:  # one wrapper (one compiled graph) per network
                self._wrapped[key] = InferenceNet(score.net, self.autocast_dtype, self.compile)
            score.net = self._wrapped[key]
        return score

    def build_datamodule(self, data: Optional[Mapping[str, Any]] = None) -> Any:
        """The training data module (not set up), with the keys of ``data`` (a requested data group) on top."""
        node = {**to_plain(self.train_config.data), **_group(data)}
        return instantiate(node, DATASETS, key="data")


def load_model(ckpt: Optional[PathLike], device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32, *,
               latent: Optional[PathLike] = None, sde: Optional[Mapping[str, Any]] = None,
               model: Optional[Mapping[str, Any]] = None, data: Optional[Mapping[str, Any]] = None) -> LoadedModel:
    """The score model of ``ckpt`` (a run directory or ``.ckpt``) on ``device``/``dtype``, in eval mode.

    ``sde``/``model``/``data`` are the groups a sampling config names: checked against the
    checkpoint before any weights load (see the module docstring). ``latent`` is a moved copy of a
    latent model's autoencoder (it must have the recorded weights).
    """
    info = checkpoints.read(ckpt, kind="score", key="ckpt")
    if sde is not None or model is not None or data is not None:
        check_requested(info.train_config, info.path, sde=sde, model=model, data=data)
    module = checkpoints.load(info, kind="score", latent=str(latent) if latent else None)
    module = module.to(device=torch.device(device), dtype=dtype).eval()
    module.requires_grad_(False)
    if module.ema is not None:
        module.ema.to(device=torch.device(device), dtype=dtype).eval().requires_grad_(False)
    return LoadedModel(module=module, info=info)


@dataclass
class LoadedClassifier:
    """A noisy classifier ready for guidance: ``module`` (``(x, t) -> logits [B, num_classes]``, eval
    mode, frozen parameters), its checkpoint ``path`` and ``global_step``, ``num_classes``."""

    module: Any
    path: Path
    global_step: int
    num_classes: int


def check_same_space(clf_latent: Optional[Mapping[str, Any]], model: Any, file: Path) -> None:
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


def load_guidance_classifier(path: Optional[PathLike], model: LoadedModel, label: Optional[int],
                             device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32) -> LoadedClassifier:
    """The noisy classifier at ``path`` (``guidance.classifier``) for guiding ``model``.

    Checked before any weights load, each failure a ValueError saying what differs: the file is a
    classifier checkpoint (not a score model), its SDE (every key of the ``sde`` group) and data
    shape equal the score model's, both work in the same space (pixels, or the latents of the same
    autoencoder by weights digest), a ``label`` in [0, num_classes) is given, and for a
    class-conditional score model the class counts agree. The classifier is put on
    ``device``/``dtype`` in eval mode with frozen parameters (gradients with respect to x still flow).
    """
    info = checkpoints.read(path, kind="classifier", key="guidance.classifier")
    file = info.path
    clf_sde, model_sde = _group(info.train_config.sde), _group(model.train_config.sde)
    keys = sorted(set(clf_sde) | set(model_sde))
    diff = [k for k in keys if not _same_value(clf_sde.get(k, "<unset>"), model_sde.get(k, "<unset>"))]
    if diff:
        details = "; ".join(f"sde.{k}: classifier {clf_sde.get(k, '<unset>')!r}, score model {model_sde.get(k, '<unset>')!r}"
                            for k in diff)
        raise ValueError(
            f"the classifier {file} was trained with sde={_fmt(clf_sde)} but the score model {model.path} with "
            f"sde={_fmt(model_sde)} ({details}); train the classifier with the score model's SDE"
        )
    check_same_space(info.latent, model, file)
    if info.data_shape != tuple(model.data_shape):
        raise ValueError(
            f"the classifier {file} takes data of shape {info.data_shape} but the score model {model.path} generates "
            f"{tuple(model.data_shape)}; train the classifier on the score model's data"
        )
    num_classes = int(info.num_classes)
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
    clf = checkpoints.load(info, kind="classifier", latent=codec_path)
    clf = clf.to(device=torch.device(device), dtype=dtype).eval()
    clf.requires_grad_(False)
    return LoadedClassifier(module=clf, path=file, global_step=info.global_step, num_classes=num_classes)


__all__ = ["LoadedModel", "load_model", "check_requested", "LoadedClassifier", "load_guidance_classifier",
           "check_same_space"]


class ModelJob:
    """What every job on a trained model starts with: where it runs (``runtime``), in which ``dtype``,
    the score model checked against the config's groups (``model``) and its data module (``dm``)."""

    def __init__(self, cfg: SampleConfig, runtime: Optional[Runtime] = None, model: Optional[LoadedModel] = None) -> None:
        self.cfg = cfg
        self.runtime = runtime or make_runtime(cfg)
        self.dtype = resolve_dtype(cfg.dtype)  # the sampler's state (float32 for dtype=bfloat16)
        self.model = model or load_model(cfg.ckpt, self.runtime.device, self.dtype, latent=cfg.latent,
                                         sde=cfg.sde, model=cfg.model, data=cfg.data)
        if network_autocast(cfg.dtype) is not None or cfg.compile:
            self.model.accelerate(network_autocast(cfg.dtype), cfg.compile)
        self.dm = self.model.build_datamodule(cfg.data)
