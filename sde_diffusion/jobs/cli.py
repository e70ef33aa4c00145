"""From the command line of ``sample.py`` to the config it composes: the overrides that are not
what Hydra would take them for.

* ``task=<name>`` is a value of :class:`~sde_diffusion.config.SampleConfig` (sample | inpaint |
  colorize), while ``conf/task/`` is train.py's config group: Hydra would read ``task=inpaint`` as a
  choice of that group. :func:`split_task` takes it off the command line before Hydra sees it, and
  :func:`request` sets it on the composed config.
* ``sde=``/``model=``/``data=`` are checks against the checkpoint. A data group brings its network
  (``conf/data/<name>.yaml`` overrides ``model``), which is not a request: :func:`drop_implied_model`.

    task, rest = split_task(["ckpt=runs/x", "task=inpaint", "mask=left"])   # "inpaint", [ckpt=..., mask=left]
    cfg = request(hydra_compose("sample", rest), rest, task)                  # what sample.py parses
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

_TASK = re.compile(r"^\+{0,2}task=(.*)$")


def split_task(args: Sequence[str]) -> Tuple[Optional[str], List[str]]:
    """``(task, other args)``: the value of the last ``task=<name>`` argument (None if none) and the rest."""
    task, rest = None, []
    for arg in args:
        m = _TASK.match(str(arg))
        if m:
            task = m.group(1).strip().strip("'\"")
        else:
            rest.append(str(arg))
    return task, rest


def drop_implied_model(cfg: Any, overrides: Sequence[str]) -> Any:
    """``cfg`` without the ``model`` group unless the command line named it (``model=…`` or ``model.<key>=…``).

    A data config brings its network (``conf/data/<name>.yaml`` overrides ``model``), so
    ``sample.py data=digits`` would otherwise ask the checkpoint for that network's *default*
    settings; in sample.py the groups are checks of what the user asked for, nothing more.
    """
    keys = {str(o).split("=", 1)[0].lstrip("+~") for o in overrides}
    if cfg.model is None or any(k == "model" or k.startswith("model.") for k in keys):
        return cfg
    return _with(cfg, model=None)


def keep_requested_data(cfg: Any, overrides: Sequence[str]) -> Any:
    """``cfg`` whose ``data`` group holds only its name and the ``data.<key>=`` values the command line gave.

    The data group's file would otherwise bring its *defaults* (``centered: true``, ``size``, ...) as
    overrides of the checkpoint's stored values, and a run trained on [0, 1] data (or another size)
    would be read back in the wrong range.
    """
    if getattr(cfg, "data", None) is None:
        return cfg
    keys = {str(o).split("=", 1)[0].lstrip("+~") for o in overrides}
    given = {k.split(".")[1] for k in keys if k.startswith("data.") and len(k.split(".")) > 1}
    data = {k: cfg.data[k] for k in cfg.data if k == "name" or k in given}
    return _with(cfg, data=data)


def request(cfg: Any, overrides: Sequence[str], task: Optional[str] = None) -> Any:
    """The composed ``cfg`` as the command line meant it: the implied model dropped, the data group cut to
    what was asked, ``task`` set."""
    cfg = keep_requested_data(drop_implied_model(cfg, overrides), overrides)
    return cfg if task is None else _with(cfg, task=task)


def compose(overrides: Sequence[str], config_dir: Union[str, Path]) -> Any:
    """What ``python sample.py <overrides>`` composes (with Hydra's compose API, from ``config_dir``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    task, rest = split_task(overrides)
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        cfg = hydra_compose("sample", overrides=rest)
    return request(cfg, rest, task)


def _with(cfg: Any, **values: Any) -> Any:
    from omegaconf import open_dict

    cfg = cfg.copy()
    with open_dict(cfg):
        for key, value in values.items():
            cfg[key] = value
    return cfg


__all__ = ["split_task", "drop_implied_model", "keep_requested_data", "request", "compose"]
