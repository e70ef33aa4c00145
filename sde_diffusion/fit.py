r"""The one training driver: :func:`fit` runs any :class:`Task` on a typed :class:`~sde_diffusion.config.TrainConfig`.

A task says what is trained; everything around it is shared: the output directory, resuming
(``resume=true`` / ``ckpt_path``, refusing a checkpoint of another kind or another process,
network or data), seeding, the data module, callbacks (checkpoints, EMA, loggers, progress), the
Trainer, and the ``finished.json`` marker that ``sample.py`` looks for.

A new training task is one class in one module (plus ``conf/task/<name>.yaml`` for a command-line
name), e.g.::

    @TASKS.register("denoiser")
    class DenoiserTask(Task):
        def build_module(self, cfg, datamodule, resumed):
            return MyLightningModule(cfg, datamodule.data_shape)

        def load_module(self, info, map_location="cpu", **options):
            return MyLightningModule.load_from_checkpoint(str(info.path), map_location=map_location)

    result = fit(DenoiserTask(), parse_train({... "task": "denoiser"}))
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Union

import lightning as L
import torch

from .checkpoints import CheckpointInfo, mark_finished, read
from .io import write_json
from .config import TrainConfig, instantiate, parse_train, to_plain
from .preemption import Preempted, ResumeDataPosition, StopOnSignal
from .performance import Profile, apply_backend_flags, channels_last, resolve_profile
from .registry import DATASETS, TASKS

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What :func:`fit` leaves behind; ``extras`` holds what the task's :meth:`Task.after_fit` adds
    (e.g. the classifier's accuracy table)."""

    module: Any
    trainer: "L.Trainer"
    datamodule: Any
    output_dir: Path
    extras: Dict[str, Any] = field(default_factory=dict)

    @property
    def last_checkpoint(self) -> Path:
        return self.output_dir / "checkpoints" / "last.ckpt"

    def __getattr__(self, name: str) -> Any:
        # result.classifier, result.accuracy, ...: what after_fit stored
        extras = self.__dict__.get("extras") or {}
        if name in extras:
            return extras[name]
        raise AttributeError(name)


class Task:
    """What :func:`fit` needs to know about one kind of training.

    ``name`` is the registry name, the ``task=`` value and the checkpoint kind
    (:func:`sde_diffusion.checkpoints.load`). Subclasses implement :meth:`build_module` and
    :meth:`load_module`; the other hooks have defaults.
    """

    name: ClassVar[str] = ""
    #: the in-training sample figures and loss-per-t curves of a score model apply
    draws_samples: ClassVar[bool] = False

    def check_data(self, cfg: TrainConfig, datamodule: Any) -> None:
        """Refuse a data set the task cannot use (before the network is built)."""

    def build_module(self, cfg: TrainConfig, datamodule: Any, resumed: Optional[CheckpointInfo]) -> "L.LightningModule":
        """The LightningModule to fit; ``resumed`` describes the checkpoint being continued (or None)."""
        raise NotImplementedError

    def check_resume(self, cfg: TrainConfig, saved: CheckpointInfo) -> None:
        """Refuse to continue ``saved`` with ``cfg`` when they train different things.

        The default compares the process, the network and the data set.
        """
        have = saved.train_config
        for key in ("sde", "model"):
            if _options(getattr(cfg, key)) != _options(getattr(have, key)):
                raise ValueError(
                    f"the checkpoint was trained with {key}={saved.cfg.get(key)} but the config asks for "
                    f"{key}={getattr(cfg, key)}; resume with the original settings or start a new run_dir"
                )
        if cfg.data.get("name") != have.data.get("name"):
            raise ValueError(f"the checkpoint was trained on data={have.data.get('name')}, not data={cfg.data.get('name')}")

    def callbacks(self, cfg: TrainConfig, output_dir: Path) -> List[Any]:
        """Callbacks of this task besides the shared ones."""
        return []

    def after_fit(self, cfg: TrainConfig, result: FitResult) -> None:
        """Runs after ``trainer.fit`` on every rank (before the run is marked finished)."""

    def load_module(self, info: CheckpointInfo, map_location: Any = "cpu", **options: Any) -> "L.LightningModule":
        """The trained module of checkpoint ``info`` (called by :func:`sde_diffusion.checkpoints.load`)."""
        raise NotImplementedError


def _options(node: Dict[str, Any]) -> Dict[str, Any]:
    # A stored group node of an older version has no _target_ key; None and absent are the same.
    return {k: v for k, v in to_plain(node).items() if not (k == "_target_" and v is None)}


def output_dir_for(cfg: TrainConfig, output_dir: Optional[Union[str, Path]] = None) -> Path:
    """Where a run writes: ``output_dir`` if given, else Hydra's run directory, else ``cfg.run_dir``."""
    if output_dir is not None:
        return Path(output_dir)
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return Path(HydraConfig.get().runtime.output_dir)
    except ImportError:  # pragma: no cover
        pass
    if not cfg.run_dir:
        raise ValueError("no output directory: pass output_dir=... or set run_dir in the config")
    return Path(str(cfg.run_dir))


def resume_checkpoint(cfg: TrainConfig, run_dir: Path) -> Optional[Path]:
    """The checkpoint a run continues from, or None for a fresh start.

    * ``ckpt_path=<file>``: that file; ``ckpt_path=last``: ``<run_dir>/checkpoints/last.ckpt``, which must exist;
    * ``resume=true``: ``<run_dir>/checkpoints/last.ckpt`` if it exists, else a fresh start (so the
      same command can be re-issued after every interruption).

    A fresh start in a directory that already holds checkpoints is refused, so that two runs are
    never mixed in one directory.
    """
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    if cfg.ckpt_path == "last":
        if not last.is_file():
            raise ValueError(f"ckpt_path=last but {last} does not exist; set run_dir=<the run's directory> to resume it")
        return last
    if cfg.ckpt_path is not None:
        path = Path(str(cfg.ckpt_path)).expanduser()
        if not path.is_file():
            raise ValueError(f"ckpt_path={cfg.ckpt_path} does not exist; give an existing .ckpt file, 'last', or null")
        return path
    if cfg.resume and last.is_file():
        return last
    existing = sorted((Path(run_dir) / "checkpoints").glob("*.ckpt"))
    if existing:
        raise ValueError(
            f"{Path(run_dir) / 'checkpoints'} already holds checkpoints ({', '.join(p.name for p in existing[:3])}"
            f"{', ...' if len(existing) > 3 else ''}) of an earlier run: continue it with resume=true "
            "(or ckpt_path=<file>), or give a new run_dir"
        )
    return None


def build_trainer(cfg: TrainConfig, output_dir: Path, callbacks: List[Any], loggers: List[Any],
                  profile: Optional[Profile] = None) -> "L.Trainer":
    """A Trainer from ``cfg.trainer``: its keys are Trainer arguments, except ``name`` (dropped) and
    ``num_threads`` (torch's intra-op CPU threads, applied by :func:`fit`). ``profile`` (default:
    :func:`~sde_diffusion.performance.resolve_profile` of ``cfg``) fills ``precision`` when the
    config leaves it null, and ``benchmark`` (cuDNN autotuning) unless the config sets it."""
    from .preemption import AtomicCheckpointIO

    profile = profile or resolve_profile(cfg)
    kwargs = {k: v for k, v in to_plain(cfg.trainer).items() if k not in ("name", "num_threads")}
    if "accumulate_grad_batches" in kwargs:
        raise ValueError("trainer.accumulate_grad_batches is derived from the global batch: set data.batch_size "
                         "(examples per step, all processes together) and data.batch_per_device instead")
    if kwargs.get("precision") is None:
        kwargs["precision"] = profile.precision
    if kwargs.get("benchmark") is None and profile.cudnn_benchmark:
        kwargs["benchmark"] = True
    kwargs.setdefault("plugins", [AtomicCheckpointIO()])
    # The data modules split each global batch among the processes themselves (ResumableRandomSampler).
    kwargs["use_distributed_sampler"] = False
    try:
        return L.Trainer(default_root_dir=str(output_dir), callbacks=callbacks, logger=loggers or False, **kwargs)
    except TypeError as err:
        raise ValueError(f"bad trainer option: {err}") from None


def apply_profile(profile: Profile, module: Any, datamodule: Any) -> None:
    """Put ``profile``'s switches on a freshly built module and data module (before the Trainer):
    ``module.profile`` (read by the tasks' optimiser and compile steps), NHWC weights, the loader
    workers and, for static shapes, no incomplete last batch."""
    module.profile = profile
    if profile.channels_last:
        channels_last(module)
    if profile.loader_workers is not None and hasattr(datamodule, "num_workers"):
        datamodule.num_workers = int(profile.loader_workers)
    if hasattr(datamodule, "drop_last"):
        datamodule.drop_last = bool(profile.static_shapes)


def fit(
    task: Union[Task, str, None],
    cfg: Any,
    output_dir: Optional[Union[str, Path]] = None,
    *,
    extra_callbacks: Sequence[Any] = (),
    datamodule: Any = None,
) -> FitResult:
    """Train ``task`` (a :class:`Task`, its registered name, or None for ``cfg.task``) as ``cfg`` says.

    Args:
        cfg: a :class:`~sde_diffusion.config.TrainConfig` (or anything :func:`parse_train` takes).
        output_dir: where checkpoints, logs and figures go (default: Hydra's run directory, else ``cfg.run_dir``).
        extra_callbacks: more Lightning callbacks (tests, benchmarks).
        datamodule: use this data module instead of building ``cfg.data`` (tests).

    Every problem of the config, the data or a checkpoint to continue is a ValueError (a missing
    data file a FileNotFoundError) raised before the Trainer starts.
    """
    from .callbacks import build_callbacks, build_loggers

    cfg = parse_train(cfg)
    if task is None:
        task = instantiate(cfg.task, TASKS, key="task")
    elif isinstance(task, str):
        task = TASKS.resolve(task)()
    configured = cfg.task.get("_target_")
    if (TASKS.resolve(configured).name if configured else cfg.task.get("name")) != task.name:
        raise ValueError(f"{type(task).__name__} fits task={task.name} but the config says task={cfg.task_name}; "
                         "fit(None, cfg) trains what the config names (as train.py does)")
    out = output_dir_for(cfg, output_dir)
    cfg.run_dir = str(out)
    ckpt_path = resume_checkpoint(cfg, out)
    resumed = None
    if ckpt_path is not None:
        resumed = read(ckpt_path, kind=task.name, key="ckpt_path")
        task.check_resume(cfg, resumed)
    profile = resolve_profile(cfg)
    if profile.num_threads:
        torch.set_num_threads(int(profile.num_threads))
    apply_backend_flags(profile)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = datamodule if datamodule is not None else instantiate(cfg.data, DATASETS, key="data")
    task.check_data(cfg, dm)
    module = task.build_module(cfg, dm, resumed)  # network shape errors surface here
    apply_profile(profile, module, dm)
    dm.setup("fit")  # missing data files surface here, before the Trainer starts
    out.mkdir(parents=True, exist_ok=True)
    callbacks = (build_callbacks(cfg, out, samples=task.draws_samples) + task.callbacks(cfg, out)
                 + list(extra_callbacks) + [ResumeDataPosition(), StopOnSignal(out / "checkpoints")])
    trainer = build_trainer(cfg, out, callbacks, build_loggers(cfg, out), profile)
    if hasattr(dm, "batch_layout"):
        layout = dm.batch_layout(trainer.world_size)
        trainer.accumulate_grad_batches = layout.accumulate
        if trainer.is_global_zero:
            log.info("%s", layout.describe())
            write_json(out / "batch_layout.json", asdict(layout))
    if trainer.is_global_zero:
        log.info("%s", profile.describe())
        write_json(out / "profile.json", profile.to_dict())
    if ckpt_path is not None:
        log.info("continuing from %s", ckpt_path)
    with warnings.catch_warnings():
        # Runs are measured in steps across epochs (max_epochs=-1): Lightning logs every
        # log_every_n_steps optimiser steps whatever the epoch length, so its warning about epochs
        # shorter than the logging interval does not apply.
        warnings.filterwarnings("ignore", message=r"The number of training batches .* is smaller than the logging interval")
        # Lightning 2.6's batch flattening constructs torch's deprecated LeafSpec on every step
        # (lightning/pytorch/utilities/_pytree.py); nothing here can change that but the warning.
        warnings.filterwarnings("ignore", message=r".*LeafSpec.* is deprecated")
        try:
            trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path is not None else None)
        except Preempted:
            pass  # last.ckpt was saved at the end of the step; the run stays unfinished
    if any(isinstance(cb, StopOnSignal) and cb.saved_at is not None for cb in trainer.callbacks):
        log.info("stopped by a signal at step %d; continue with run_dir=%s resume=true", trainer.global_step, out)
        return FitResult(module=module, trainer=trainer, datamodule=dm, output_dir=out, extras={"stopped": True})
    result = FitResult(module=module, trainer=trainer, datamodule=dm, output_dir=out)
    task.after_fit(cfg, result)
    if trainer.is_global_zero and not trainer.interrupted:
        mark_finished(out, task.name, trainer.global_step)
    return result


def fitter(task_class: type) -> Callable[..., FitResult]:
    """``train(cfg, output_dir=None, *, extra_callbacks=(), datamodule=None)``: :func:`fit` with a new
    ``task_class()`` — each task module's short name for training it from Python."""

    def train(cfg: Any, output_dir: Optional[Union[str, Path]] = None, *, extra_callbacks: Sequence[Any] = (),
              datamodule: Any = None) -> FitResult:
        return fit(task_class(), cfg, output_dir, extra_callbacks=extra_callbacks, datamodule=datamodule)

    train.__doc__ = f"Fit a {task_class.__name__}: ``fit({task_class.__name__}(), cfg, ...)`` (see :func:`fit`)."
    return train


__all__ = ["Task", "FitResult", "fit", "fitter", "output_dir_for", "resume_checkpoint", "build_trainer", "apply_profile"]
