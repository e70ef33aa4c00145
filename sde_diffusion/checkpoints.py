"""Where training runs keep their checkpoints, and how a run says it has finished.

The low-level pieces every checkpoint reader shares (score models, classifiers, the sampling jobs),
with no dependency on any of them:

* :func:`resolve_checkpoint_path` — ``ckpt=`` as a file: a ``.ckpt`` itself, or a run directory's
  ``checkpoints/last.ckpt`` (else its highest-step checkpoint);
* :func:`mark_finished` / :func:`latest_finished_run` — a run that completes its ``fit`` writes
  ``<run>/finished.json`` (``{"task", "global_step", "checkpoint", "finished_at"}``) atomically;
  ``python sample.py`` without ``ckpt=`` takes the newest finished run of a task under a root.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

CLASSIFIER_KIND = "noisy_classifier"  # the "kind" a classifier checkpoint carries; score models have none
AUTOENCODER_KIND = "autoencoder"
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
    path = run_dir / FINISHED
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
    return path


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
    "AUTOENCODER_KIND",
    "CLASSIFIER_KIND",
    "FINISHED",
    "resolve_checkpoint_path",
    "run_dir_of",
    "mark_finished",
    "finished_runs",
    "latest_finished_run",
]
