"""From a composed training config to objects: the SDE, the data module, the network, the sampler
settings and the loss options, plus the checks that run before any training starts.

The config is the one ``conf/train.yaml`` composes (a ``DictConfig`` or a plain ``dict``). Each of
the groups ``sde``, ``data``, ``model`` and ``sampler`` is ``{name: <registry entry>, **kwargs}``::

    cfg = {"sde": {"name": "vp", "beta_min": 0.1, "beta_max": 20.0}, ...}
    sde = build_sde(cfg)                                   # SDES.build("vp", beta_min=0.1, ...)
    dm = build_datamodule(cfg)                             # DATASETS.build(...)
    net = build_network(cfg, dm.data_shape, num_classes)   # MODELS.build(..., data_shape=...)

Every failure is a ``ValueError`` that names the group, the bad value and the accepted ones.
"""
from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from torch import nn

from ..losses import REDUCTIONS, TIME_INPUTS, WEIGHTINGS
from ..registry import Registry
from ..score import PREDICTIONS
from ..sdes import SDE, SDES

LOGGERS = ("csv", "tensorboard")
GROUPS = ("sde", "data", "model", "trainer", "sampler")


def to_container(cfg: Any) -> Dict[str, Any]:
    """A resolved plain-``dict`` copy of ``cfg`` (``DictConfig`` or mapping)."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - hydra-core is a dependency
        DictConfig = ()  # type: ignore[assignment]
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    if isinstance(cfg, Mapping):
        return {k: to_container(v) if isinstance(v, Mapping) else _plain(v) for k, v in cfg.items()}
    raise ValueError(f"expected a config mapping, got {type(cfg).__name__}")


def _plain(v: Any) -> Any:
    try:
        from omegaconf import ListConfig, OmegaConf

        if isinstance(v, ListConfig):
            return OmegaConf.to_container(v, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(v, tuple):
        return list(v)
    return v


def group(cfg: Mapping[str, Any], key: str) -> Tuple[str, Dict[str, Any]]:
    """``(name, kwargs)`` of config group ``key``."""
    node = cfg.get(key)
    if not isinstance(node, Mapping):
        raise ValueError(f"config group {key!r} is missing; choose one with {key}=<name> (conf/{key}/)")
    kwargs = to_container(node)
    if kwargs.get("_target_", "") is None:
        kwargs.pop("_target_")
    name = kwargs.pop("name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"config group {key!r} needs a 'name:' key naming the {key} to build")
    return name, kwargs


def _build(registry: Registry, key: str, name: str, **kwargs: Any) -> Any:
    factory = registry.get(name)  # unknown names: ValueError listing the choices
    try:
        return factory(**kwargs)
    except TypeError as err:
        params = [p for p in inspect.signature(factory).parameters if p not in ("self", "args", "kwargs")]
        raise ValueError(
            f"bad option for {key} {name!r}: {err}; accepted options: {', '.join(params)}"
        ) from None


def _registries() -> Dict[str, Registry]:
    from ..data import DATASETS
    from ..models import MODELS
    from ..samplers import SAMPLERS

    return {"sde": SDES, "data": DATASETS, "model": MODELS, "sampler": SAMPLERS}


# ---------------------------------------------------------------------------------- builders
def build_sde(cfg: Mapping[str, Any]) -> SDE:
    """The forward process of ``cfg.sde``."""
    name, kwargs = group(cfg, "sde")
    return _build(SDES, "sde", name, **kwargs)


def build_datamodule(cfg: Mapping[str, Any]) -> Any:
    """The ``LightningDataModule`` of ``cfg.data`` (not yet set up)."""
    from ..data import DATASETS

    name, kwargs = group(cfg, "data")
    return _build(DATASETS, "data", name, **kwargs)


def build_network(cfg: Mapping[str, Any], data_shape: Sequence[int], num_classes: Optional[int] = None) -> nn.Module:
    """The score network of ``cfg.model`` for ``data_shape`` (raises ValueError on unfit shapes)."""
    from ..models import MODELS

    name, kwargs = group(cfg, "model")
    return _build(
        MODELS, "model", name, data_shape=tuple(int(s) for s in data_shape), num_classes=num_classes, **kwargs
    )


def sampler_settings(cfg: Mapping[str, Any], steps: Optional[int] = None) -> Tuple[str, int, Dict[str, Any]]:
    """``(name, steps, options)`` for ``sde_diffusion.sample`` from ``cfg.sampler``; ``steps`` overrides."""
    name, kwargs = group(cfg, "sampler")
    cfg_steps = kwargs.pop("steps", None)
    steps = steps if steps is not None else cfg_steps
    if steps is None:
        steps = 1000
    return name, int(steps), kwargs


def loss_options(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """Keyword arguments of :func:`~sde_diffusion.losses.dsm_terms` from ``cfg.loss``."""
    loss = to_container(cfg.get("loss") or {})
    return {
        "weighting": loss.get("weighting", "sigma2"),
        "prediction": loss.get("prediction", "eps"),
        "eps": loss.get("eps"),
        "reduction": loss.get("reduction", "mean"),
        "stratified": bool(loss.get("stratified", False)),
        "discrete_steps": loss.get("discrete_steps"),
        "time_input": loss.get("time_input", "i/N"),
    }


def conditioning(cfg: Mapping[str, Any]) -> Tuple[bool, float]:
    """``(class_labels, label_dropout)`` from ``cfg.conditioning``."""
    node = cfg.get("conditioning") or {}
    return bool(node.get("class_labels", False)), float(node.get("label_dropout", 0.0))


def loggers_of(cfg: Mapping[str, Any]) -> list[str]:
    """The logger names of ``cfg.logger`` (a name, a list of names, or null for none)."""
    value = cfg.get("logger", "csv")
    if value is None or value is False:
        return []
    names = [value] if isinstance(value, str) else list(value)
    return [str(n) for n in names]


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


# ---------------------------------------------------------------------------------- validation
def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_config(cfg: Mapping[str, Any]) -> None:
    """Fail fast, before anything is built or trained, on a config that cannot work.

    Checks registry names (listing the choices), loss/optimiser/EMA/callback values, the loggers
    (TensorBoard must be installed when chosen) and the resume settings. Shape problems (e.g. an
    image size the U-Net cannot downsample) surface when the network is built, which
    :func:`sde_diffusion.training.train` also does before the Trainer starts.
    """
    regs = _registries()
    for key in GROUPS:
        if key == "trainer":
            _require(isinstance(cfg.get("trainer"), Mapping), "config group 'trainer' is missing (trainer=cpu|gpu|ddp)")
            continue
        name, _ = group(cfg, key)
        if key == "sampler" and name == "auto":
            continue  # the measured default (samplers/defaults.py), resolved against the SDE
        if name not in regs[key]:
            raise ValueError(f"unknown {key} {name!r}; choose one of: {', '.join(regs[key].names())}")

    opts = loss_options(cfg)
    _require(opts["weighting"] in WEIGHTINGS, f"unknown loss.weighting {opts['weighting']!r}; choose one of: {', '.join(WEIGHTINGS)}")
    _require(opts["prediction"] in PREDICTIONS, f"unknown loss.prediction {opts['prediction']!r}; choose one of: {', '.join(PREDICTIONS)}")
    _require(opts["reduction"] in REDUCTIONS, f"unknown loss.reduction {opts['reduction']!r}; choose one of: {', '.join(REDUCTIONS)}")
    _require(opts["time_input"] in TIME_INPUTS, f"unknown loss.time_input {opts['time_input']!r}; choose one of: {', '.join(TIME_INPUTS)}")
    if opts["discrete_steps"] is not None:
        _require(
            _is_int(opts["discrete_steps"]) and opts["discrete_steps"] >= 1,
            f"loss.discrete_steps must be a positive integer or null, got {opts['discrete_steps']!r}",
        )
        _require(group(cfg, "sde")[0] == "vp", f"loss.discrete_steps (the DDPM loss) needs sde=vp, got sde={group(cfg, 'sde')[0]}")
        _require(opts["weighting"] == "sigma2", "loss.discrete_steps (the DDPM loss) needs loss.weighting=sigma2")
    if opts["eps"] is not None:
        _require(float(opts["eps"]) > 0, f"loss.eps must be positive (or null for sde.eps), got {opts['eps']}")

    optim = cfg.get("optim") or {}
    _require(float(optim.get("lr", 1e-3)) > 0, f"optim.lr must be positive, got {optim.get('lr')}")
    _require(float(optim.get("weight_decay", 0.0)) >= 0, f"optim.weight_decay must be >= 0, got {optim.get('weight_decay')}")
    warm = optim.get("warmup_steps", 0)
    _require(_is_int(warm) and warm >= 0, f"optim.warmup_steps must be an integer >= 0, got {warm!r}")

    ema = cfg.get("ema") or {}
    if ema.get("enabled", True):
        decay = float(ema.get("decay", 0.999))
        _require(0.0 <= decay < 1.0, f"ema.decay must lie in [0, 1), got {decay}")

    class_labels, dropout = conditioning(cfg)
    _require(0.0 <= dropout < 1.0, f"conditioning.label_dropout must lie in [0, 1), got {dropout}")

    for name in loggers_of(cfg):
        _require(name in LOGGERS, f"unknown logger {name!r}; choose any of: {', '.join(LOGGERS)}")
        if name == "tensorboard" and not tensorboard_available():
            raise ValueError(
                "logger=tensorboard needs the tensorboard package, which is not installed: "
                "`pip install tensorboard`, or use logger=csv"
            )

    cbs = cfg.get("callbacks") or {}
    for path in ("samples.every_n_steps", "loss_by_t.every_n_steps", "checkpoint.every_n_steps"):
        head, leaf = path.split(".")
        v = (cbs.get(head) or {}).get(leaf, 0)
        _require(_is_int(v) and v >= 0, f"callbacks.{path} must be an integer >= 0 (0 = off), got {v!r}")

    ckpt = cfg.get("ckpt_path")
    if ckpt not in (None, "last"):
        _require(Path(str(ckpt)).expanduser().is_file(), f"ckpt_path={ckpt} does not exist; give an existing .ckpt file, 'last', or null")


def resolve_checkpoint(cfg: Mapping[str, Any], run_dir: Path) -> Optional[str]:
    """The checkpoint a run continues from, or None for a fresh start.

    * ``ckpt_path=<file>``: that file;
    * ``ckpt_path=last``: ``<run_dir>/checkpoints/last.ckpt``, which must exist;
    * ``resume=true``: ``<run_dir>/checkpoints/last.ckpt`` if it exists, otherwise a fresh start
      (so the same command can be re-issued after every interruption).

    A fresh start in a directory that already holds checkpoints is refused, so that two runs are
    never mixed in one directory.
    """
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    ckpt = cfg.get("ckpt_path")
    if ckpt == "last":
        if not last.is_file():
            raise ValueError(
                f"ckpt_path=last but {last} does not exist; set run_dir=<the run's directory> to resume it"
            )
        return str(last)
    if ckpt is not None:
        path = Path(str(ckpt)).expanduser()
        if not path.is_file():
            raise ValueError(f"ckpt_path={ckpt} does not exist")
        return str(path)
    if cfg.get("resume", False) and last.is_file():
        return str(last)
    existing = sorted((Path(run_dir) / "checkpoints").glob("*.ckpt"))
    if existing:
        raise ValueError(
            f"{Path(run_dir) / 'checkpoints'} already holds checkpoints ({', '.join(p.name for p in existing[:3])}"
            f"{', ...' if len(existing) > 3 else ''}) of an earlier run: continue it with resume=true "
            "(or ckpt_path=<file>), or give a new run_dir"
        )
    return None


def check_resume_compatible(cfg: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
    """A checkpoint continues only the same process, network and data: compare those groups."""
    for key in ("sde", "model"):
        if to_container(cfg.get(key) or {}) != to_container(saved.get(key) or {}):
            raise ValueError(
                f"the checkpoint was trained with {key}={saved.get(key)} but the config asks for "
                f"{key}={cfg.get(key)}; resume with the original settings or start a new run_dir"
            )
    if group(cfg, "data")[0] != group(saved, "data")[0]:
        raise ValueError(
            f"the checkpoint was trained on data={group(saved, 'data')[0]}, not data={group(cfg, 'data')[0]}"
        )


__all__ = [
    "LOGGERS",
    "to_container",
    "group",
    "build_sde",
    "build_datamodule",
    "build_network",
    "sampler_settings",
    "loss_options",
    "conditioning",
    "loggers_of",
    "tensorboard_available",
    "check_config",
    "resolve_checkpoint",
    "check_resume_compatible",
]
