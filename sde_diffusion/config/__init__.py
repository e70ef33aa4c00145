"""Configuration: the typed schema (:mod:`.schema`), parsed once at the entry points, and
:func:`instantiate`, which turns a config group into the object it names.

    from sde_diffusion.config import parse_train, instantiate
    from sde_diffusion.registry import SDES

    cfg = parse_train(hydra_cfg)                 # TrainConfig; every check runs here
    sde = instantiate(cfg.sde, SDES)             # VPSDE(beta_min=0.1, ...) or the user's _target_ class

Every failure is a ``ValueError`` that names the key, the bad value and the accepted ones.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import fields, is_dataclass
from typing import Any, Mapping, Optional, Type, TypeVar

from .schema import (
    AutoencoderConfig,
    CallbacksConfig,
    ClassifierConfig,
    ConditioningConfig,
    EmaConfig,
    GuidanceConfig,
    InpaintConfig,
    LikelihoodConfig,
    LossConfig,
    MetricsConfig,
    OptimConfig,
    PlotsConfig,
    SampleConfig,
    TrainConfig,
)

C = TypeVar("C")

#: ConfigStore names of the schemas; conf/train.yaml and conf/sample.yaml list them first in their defaults.
SCHEMAS = {"train_schema": TrainConfig, "sample_schema": SampleConfig}


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore, so that ``conf/*.yaml`` can compose on them.

    Done when this package is imported (a user composing ``conf/train.yaml`` with Hydra's compose
    API needs nothing else); calling it again is harmless.
    """
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(name=name, node=node)


register_configs()


def to_plain(cfg: Any) -> Any:
    """A resolved plain copy of ``cfg`` (DictConfig, dataclass, mapping or list); leaves scalars alone."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, (DictConfig, ListConfig)):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - hydra-core is a dependency
        pass
    if is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_plain(getattr(cfg, f.name)) for f in fields(cfg)}
    if isinstance(cfg, Mapping):
        return {k: to_plain(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_plain(v) for v in cfg]
    return cfg


def _without_unresolvable_run_dir(cfg: Any) -> Any:
    """``cfg`` with ``run_dir`` unset when it interpolates Hydra's run state (``${hydra:...}``) and
    none exists: a config composed with Hydra's compose API, whose caller gives the directory."""
    from omegaconf import DictConfig, OmegaConf, open_dict
    from omegaconf.errors import InterpolationResolutionError

    if not isinstance(cfg, DictConfig) or "run_dir" not in cfg:
        return cfg
    try:
        cfg.run_dir  # noqa: B018 - resolves it
        return cfg
    except InterpolationResolutionError:
        cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
        with open_dict(cfg):
            cfg.run_dir = None
        return cfg


def _parse(schema: Type[C], cfg: Any, what: str) -> C:
    if isinstance(cfg, schema):
        return cfg
    plain = to_plain(_without_unresolvable_run_dir(cfg))
    if schema is TrainConfig and isinstance(plain.get("task"), str):
        plain["task"] = {"name": plain["task"]}  # configs of earlier versions: task: <name>
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), plain)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ValueError(f"bad {what} config{f' at {key}' if key else ''}: {str(err).splitlines()[0]}") from None


def parse_train(cfg: Any) -> TrainConfig:
    """The typed training config of ``cfg`` (a composed DictConfig, a dict, or a TrainConfig).

    Runs every check of the schema, and checks the task name against the training tasks' registry.
    """
    parsed = _parse(TrainConfig, cfg, "training")
    from ..registry import DATASETS, MODELS, SAMPLE_TASKS, SAMPLERS, SDES, TASKS

    name = parsed.task.get("name")
    if not parsed.task.get("_target_") and name not in TASKS:
        hint = (f"; task={name} is a sampling task: run `python sample.py ckpt=<run> task={name}`"
                if name in SAMPLE_TASKS else "")
        raise ValueError(f"train.py cannot run task={name}: choose one of {', '.join(TASKS.names())}{hint}")
    for key, registry in (("task", TASKS), ("sde", SDES), ("data", DATASETS), ("model", MODELS), ("sampler", SAMPLERS)):
        check_group(getattr(parsed, key), registry, key, allow=("auto",) if key == "sampler" else ())
    return parsed


def parse_sample(cfg: Any) -> SampleConfig:
    """The typed sampling config of ``cfg`` (a composed DictConfig, a dict, or a SampleConfig).

    Runs every check of the schema, and checks ``mode`` and ``task`` against their registries.
    """
    parsed = _parse(SampleConfig, cfg, "sampling")
    from ..registry import MODES, SAMPLE_TASKS, TASKS

    if parsed.task not in SAMPLE_TASKS:
        hint = f" (task={parsed.task} is trained by train.py)" if parsed.task in TASKS else ""
        raise ValueError(f"unknown task {parsed.task!r}; choose one of: {', '.join(SAMPLE_TASKS.names())}{hint}")
    if parsed.mode not in MODES:
        raise ValueError(f"unknown mode {parsed.mode!r}; choose one of: {', '.join(MODES.names())}")
    return parsed


def saved_train_config(saved: Any) -> TrainConfig:
    """The :class:`TrainConfig` of a checkpoint's stored config (a plain dict; a TrainConfig is returned as is).

    Checkpoints of earlier versions stored the same keys; a key this version no longer knows is
    dropped with a warning rather than refusing the checkpoint. The callbacks are not restored:
    they concern only the run that wrote the checkpoint.
    """
    if isinstance(saved, TrainConfig):
        return saved
    plain = dict(to_plain(saved))
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(plain) - known)
    if unknown:
        warnings.warn(f"ignoring checkpoint config keys this version does not know: {', '.join(unknown)}", stacklevel=2)
    clean = {k: v for k, v in plain.items() if k in known and k != "callbacks"}
    for key, section in (("loss", LossConfig), ("optim", OptimConfig), ("ema", EmaConfig),
                         ("conditioning", ConditioningConfig), ("classifier", ClassifierConfig),
                         ("autoencoder", AutoencoderConfig)):
        if isinstance(clean.get(key), Mapping):
            names = {f.name for f in fields(section)}
            clean[key] = {k: v for k, v in clean[key].items() if k in names}
    return _parse(TrainConfig, clean, "checkpoint")


# ---------------------------------------------------------------------------------- objects
def check_group(node: Mapping[str, Any], registry: Any, key: str, allow: tuple = ()) -> None:
    """Refuse a group that names no registered entry (listing the choices) or an unimportable ``_target_``."""
    target, name = node.get("_target_"), node.get("name")
    if target:
        registry.resolve(str(target))
    elif name not in registry and name not in allow:
        raise ValueError(f"unknown {key} {name!r}; choose one of: {', '.join(registry.names())}")


def group_name(node: Mapping[str, Any]) -> str:
    """What a group node names: its ``_target_`` import path if set, else its registered ``name``."""
    return str(node.get("_target_") or node.get("name"))


def _accepted(factory: Any) -> Optional[set]:
    """Keyword names ``factory`` accepts, following ``**kwargs`` up the class hierarchy; None = any."""
    if not inspect.isclass(factory):
        params = inspect.signature(factory).parameters.values()
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None
        return {p.name for p in params}
    names: set = set()
    for klass in factory.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
    return None


def instantiate(node: Mapping[str, Any], registry: Any, key: Optional[str] = None, **extra: Any) -> Any:
    """Build the object a config group names.

    ``node`` is ``{name: <registered name>, **options}`` or ``{_target_: pkg.module.Class, **options}``
    (a class anywhere on the Python path, e.g. a user's own ``SDE`` subclass); ``extra`` are
    arguments the caller supplies (e.g. ``data_shape=`` for a network). With ``_target_``, options of
    the group's default file that the class does not take are dropped with a warning (``sde=vp``
    brings ``beta_min``; ``sde._target_=my.SDE`` may not want it).
    """
    key = key or registry.kind
    if not isinstance(node, Mapping):
        raise ValueError(f"config group {key!r} is missing; choose one with {key}=<name> (conf/{key}/)")
    options = {k: v for k, v in to_plain(node).items() if k not in ("name", "_target_")}
    target = node.get("_target_")
    name = node.get("name")
    if target:
        factory = registry.resolve(str(target))
        accepted = _accepted(factory)
        if accepted is not None:
            dropped = sorted(k for k in options if k not in accepted and k not in extra)
            if dropped:
                warnings.warn(f"{key}._target_={target} takes no option(s) {', '.join(dropped)}; ignored", stacklevel=2)
                options = {k: v for k, v in options.items() if k not in dropped}
        label = str(target)
    elif name:
        check_group(node, registry, key)
        factory = registry.get(str(name))
        label = str(name)
    else:
        raise ValueError(f"config group {key!r} needs a name ({key}=<name>, conf/{key}/) or a {key}._target_=<import path>")
    try:
        return factory(**extra, **options)
    except TypeError as err:
        accepted = _accepted(factory)
        hint = f"; accepted options: {', '.join(sorted(accepted - set(extra)))}" if accepted is not None else ""
        raise ValueError(f"bad option for {key} {label!r}: {err}{hint}") from None


__all__ = [
    "SCHEMAS", "register_configs", "to_plain", "parse_train", "parse_sample", "saved_train_config",
    "check_group", "group_name", "instantiate",
    "TrainConfig", "SampleConfig", "LossConfig", "OptimConfig", "EmaConfig", "ConditioningConfig",
    "CallbacksConfig", "ClassifierConfig", "AutoencoderConfig", "GuidanceConfig", "InpaintConfig",
    "LikelihoodConfig", "MetricsConfig", "PlotsConfig",
]
