"""The one place that opens a checkpoint: :func:`read` (what it holds, without building anything)
and :func:`load` (the trained module), each checking the checkpoint's kind; plus where runs keep
their checkpoints and how a run says it has finished.

    info = read("outputs/train/digits_vp/<date>")          # run dir or .ckpt; CheckpointInfo
    info.kind, info.global_step, info.data_shape            # 'score', 1000, (1, 8, 8)
    module = load(info.path, kind="score")                  # ScoreDiffusion, eval mode
    clf = load("outputs/classifier/...", kind="classifier") # NoisyClassifier

Kinds are the training tasks' names (``sde_diffusion.registry.TASKS``: score, classifier,
autoencoder); a checkpoint of another kind is refused with a message that says what it is and
where it belongs. A run that completes its fit writes ``<run>/finished.json``
(``{"task", "global_step", "checkpoint", "finished_at"}``); ``python sample.py`` without ``ckpt=``
takes the newest finished score-model run under a root (:func:`latest_finished_run`).
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

from .io import write_json

CLASSIFIER_KIND = "noisy_classifier"  # the "kind" a classifier checkpoint carries; score models have none
AUTOENCODER_KIND = "autoencoder"
#: the marker each kind of checkpoint stores under "kind" (score checkpoints store none)
KIND_MARKERS = {"score": None, "classifier": CLASSIFIER_KIND, "autoencoder": AUTOENCODER_KIND}
# What each kind is, and where it belongs, for the refusal messages.
_WHAT = {
    "score": "a score-model checkpoint (python train.py; it goes to sample.py ckpt=)",
    "classifier": "a noisy-classifier checkpoint (python train.py task=classifier; it goes to guidance.classifier=)",
    "autoencoder": "an autoencoder checkpoint (python train.py task=autoencoder; it encodes and decodes images but "
                   "draws no samples; it goes to latent=)",
}
FINISHED = "finished.json"


def _step_of(p: Path) -> tuple:
    m = re.search(r"(\d+)", p.stem)
    return (int(m.group(1)) if m else -1, p.stat().st_mtime)


def resolve_checkpoint_path(ckpt: Union[str, Path, None], key: str = "ckpt") -> Path:
    """``ckpt`` as a checkpoint file: a ``.ckpt`` file itself, or for a training run directory its
    ``checkpoints/last.ckpt`` (else the checkpoint with the highest step in ``checkpoints/``).
    ``key`` is the option's name in error messages."""
    if ckpt is None or str(ckpt).strip() in ("", "None", "???"):
        raise ValueError(f"{key}=<path> is required: a .ckpt file or a training run directory (e.g. {key}=outputs/train/digits_vp/<date>)")
    path = Path(str(ckpt)).expanduser()
    if path.is_file():
        return path
    if not path.exists():
        raise ValueError(f"{key}={ckpt} does not exist; give a .ckpt file or a training run directory")
    for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
        if candidate.is_file():
            return candidate
    found = sorted(list(path.glob("checkpoints/*.ckpt")) + list(path.glob("*.ckpt")), key=_step_of)
    if not found:
        raise ValueError(f"no checkpoint in {path} (looked for checkpoints/last.ckpt and *.ckpt)")
    return found[-1]


@dataclass
class CheckpointInfo:
    """What a checkpoint holds, read without building a network.

    ``cfg`` is the stored training config (a plain dict, as written; :attr:`train_config` parses
    it), ``latent`` what a latent model recorded about its autoencoder (path, scale, weights digest).
    """

    path: Path
    kind: str
    cfg: Dict[str, Any]
    data_shape: tuple
    num_classes: Optional[int]
    global_step: int
    has_ema: bool
    latent: Optional[Dict[str, Any]]
    hparams: Dict[str, Any]

    @property
    def run_dir(self) -> Path:
        return run_dir_of(self.path)

    @property
    def train_config(self) -> Any:
        """The stored config as a :class:`~sde_diffusion.config.TrainConfig`."""
        from .config import saved_train_config

        return saved_train_config(self.cfg)


def _kind_of(raw: Any) -> Optional[str]:
    if not isinstance(raw, Mapping):
        return None
    marker = raw.get("kind")
    for kind, mark in KIND_MARKERS.items():
        if marker == mark:
            return kind
    return None


def read(ckpt: Union[str, Path, None], kind: Optional[str] = None, key: str = "ckpt") -> CheckpointInfo:
    """Open ``ckpt`` (a ``.ckpt`` or a run directory, see :func:`resolve_checkpoint_path`) and describe it.

    With ``kind`` (score | classifier | autoencoder), a checkpoint of another kind is a ValueError
    saying what it is and where it belongs; ``key`` names the option in messages.
    """
    import torch

    path = resolve_checkpoint_path(ckpt, key=key)
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same explanation
        raise ValueError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from None
    found = _kind_of(raw)
    hp = raw.get("hyper_parameters") if isinstance(raw, Mapping) else None
    if found is None or not isinstance(hp, Mapping) or "cfg" not in hp or "data_shape" not in hp:
        raise ValueError(f"{key}={ckpt}: {path} is not a checkpoint written by train.py (no hyper_parameters.cfg/data_shape)")
    if kind is not None and found != kind:
        raise ValueError(f"{key}={ckpt}: {path} is {_WHAT[found]}, not {_NOUN[kind]}; {_WANT[kind]}")
    from .config import to_plain

    info = CheckpointInfo(
        path=path,
        kind=found,
        cfg=to_plain(hp["cfg"]),
        data_shape=tuple(int(s) for s in hp["data_shape"]),
        num_classes=None if hp.get("num_classes") is None else int(hp["num_classes"]),
        global_step=int(raw.get("global_step", -1)),
        has_ema="current_model_state" in raw,
        latent=to_plain(hp.get("latent")) if hp.get("latent") else None,
        hparams=to_plain(dict(hp)),
    )
    del raw
    return info


_NOUN = {"score": "a score model", "classifier": "a noisy-classifier checkpoint",
         "autoencoder": "an autoencoder checkpoint"}
_WANT = {
    "score": "give a score model's run or .ckpt (python train.py) as ckpt=, and a classifier as guidance.classifier=",
    "classifier": "train a classifier with `python train.py task=classifier data=<the model's data>`",
    "autoencoder": "train one with `python train.py task=autoencoder`",
}


def load(ckpt: Union[str, Path, CheckpointInfo, None], kind: str = "score", map_location: Any = "cpu",
         key: str = "ckpt", **options: Any) -> Any:
    """The trained LightningModule of ``ckpt`` (eval mode), after :func:`read` checked its kind.

    ``ckpt`` may be what :func:`read` returned (the file is then not read twice). ``options`` go to
    the task's loader (e.g. ``latent=<moved autoencoder run>`` for latent models). A network that
    does not fit its stored config is a ValueError naming the config.
    """
    from .registry import TASKS

    info = ckpt if isinstance(ckpt, CheckpointInfo) else read(ckpt, kind=kind, key=key)
    if info.kind != kind:
        raise ValueError(f"{key}: {info.path} is {_WHAT[info.kind]}, not {_NOUN[kind]}; {_WANT[kind]}")
    try:
        module = TASKS.get(kind)().load_module(info, map_location=map_location, **options)
    except RuntimeError as err:
        first = "\n".join(str(err).strip().splitlines()[:4])
        raise ValueError(
            f"checkpoint {info.path}: its weights do not fit the network its config describes "
            f"(model={info.cfg.get('model')}, data_shape={info.data_shape}, num_classes={info.num_classes}): {first}"
        ) from None
    return module.eval()


def run_dir_of(ckpt_path: Path) -> Path:
    """The training run directory of a checkpoint (``<run>/checkpoints/x.ckpt`` → ``<run>``)."""
    parent = ckpt_path.resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def mark_finished(run_dir: Union[str, Path], task: str, global_step: int) -> Path:
    """Write ``<run_dir>/finished.json`` atomically: the run completed and ``checkpoints/last.ckpt`` is final."""
    run_dir = Path(run_dir)
    payload = {
        "task": task,
        "global_step": int(global_step),
        "checkpoint": "checkpoints/last.ckpt",
        "finished_at": time.time(),
    }
    return write_json(run_dir / FINISHED, payload)


def _read_marker(path: Path) -> Optional[Dict[str, Any]]:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def finished_runs(root: Union[str, Path], task: str = "score") -> List[Path]:
    """Run directories under ``root`` (any depth) that finished training ``task``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for marker in root.rglob(FINISHED):
        info = _read_marker(marker)
        if info is None or info.get("task") != task:
            continue
        if not (marker.parent / str(info.get("checkpoint", "checkpoints/last.ckpt"))).is_file():
            continue
        found.append((float(info.get("finished_at", marker.stat().st_mtime)), marker.parent))
    return [run for _, run in sorted(found, key=lambda p: p[0], reverse=True)]


def latest_finished_run(root: Union[str, Path], task: str = "score") -> Path:
    """The newest run under ``root`` that finished training ``task``; ValueError naming the fix otherwise."""
    runs = finished_runs(root, task)
    if runs:
        return runs[0]
    root = Path(root)
    unfinished = sorted({p.parent.parent for p in root.rglob("checkpoints/last.ckpt")}) if root.is_dir() else []
    hint = (
        f"; {len(unfinished)} unfinished or older run(s) there hold checkpoints (e.g. {unfinished[-1]}): "
        "pass one as ckpt=<run dir>, or resume it with `python train.py run_dir=<run dir> resume=true`"
        if unfinished
        else ""
    )
    what = "score-model" if task == "score" else task
    raise ValueError(
        f"no finished {what} training run under {root}: train one first with `python train.py`, "
        f"or give ckpt=<run dir or .ckpt>{hint}"
    )


__all__ = [
    "CheckpointInfo",
    "read",
    "load",
    "KIND_MARKERS",
    "AUTOENCODER_KIND",
    "CLASSIFIER_KIND",
    "FINISHED",
    "resolve_checkpoint_path",
    "run_dir_of",
    "mark_finished",
    "finished_runs",
    "latest_finished_run",
]
