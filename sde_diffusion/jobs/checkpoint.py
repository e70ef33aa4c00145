"""Finding a training checkpoint, checking it against what was asked for, and loading it for inference.

A checkpoint written by ``train.py`` holds the whole resolved training config (``hyper_parameters.cfg``),
so the SDE, the network and the data module are rebuilt from it alone. A sampling config may
*also* name an ``sde``, ``model`` or ``data`` group; these are checks, not replacements: every key
they state must equal the checkpoint's value, otherwise a ValueError names both (``sde=ve`` on a
VP checkpoint fails instead of silently sampling the wrong process). The data group's name must
match; its other keys override the stored ones (e.g. ``data.root`` on another machine).
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch

from ..config import build_datamodule, to_container

CHECKED_GROUPS = ("sde", "model")


def resolve_checkpoint_path(ckpt: Union[str, Path, None]) -> Path:
    """``ckpt`` as a checkpoint file: a ``.ckpt`` file itself, or for a training run directory its
    ``checkpoints/last.ckpt`` (else the checkpoint with the highest step in ``checkpoints/``)."""
    if ckpt is None or str(ckpt).strip() in ("", "None", "???"):
        raise ValueError("ckpt=<path> is required: a .ckpt file or a training run directory (e.g. ckpt=outputs/train/digits_vp/<date>)")
    path = Path(str(ckpt)).expanduser()
    if path.is_file():
        return path
    if not path.exists():
        raise ValueError(f"ckpt={ckpt} does not exist; give a .ckpt file or a training run directory")
    for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
        if candidate.is_file():
            return candidate
    found = sorted(list(path.glob("checkpoints/*.ckpt")) + list(path.glob("*.ckpt")), key=_step_of)
    if not found:
        raise ValueError(f"no checkpoint in {path} (looked for checkpoints/last.ckpt and *.ckpt)")
    return found[-1]


def _step_of(p: Path) -> tuple:
    m = re.search(r"(\d+)", p.stem)
    return (int(m.group(1)) if m else -1, p.stat().st_mtime)


def run_dir_of(ckpt_path: Path) -> Path:
    """The training run directory of a checkpoint (``<run>/checkpoints/x.ckpt`` → ``<run>``)."""
    parent = ckpt_path.resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def read_checkpoint_info(path: Path) -> Dict[str, Any]:
    """``{"cfg", "data_shape", "num_classes", "global_step"}`` without building anything."""
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same explanation
        raise ValueError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from None
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
    try:
        module = load_checkpoint(path, map_location="cpu")
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


__all__ = [
    "resolve_checkpoint_path",
    "run_dir_of",
    "read_checkpoint_info",
    "check_requested",
    "data_config",
    "LoadedModel",
    "load_model",
]
