"""The typed config: one place for every default, checks at parse time, groups that build any class."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Dict

import pytest
import yaml

from sde_diffusion.config import SampleConfig, TrainConfig, instantiate, parse_train, to_plain
from sde_diffusion.registry import DATASETS, MODELS, SAMPLERS, SDES, import_object

from helpers import CONF

# Groups whose options are constructor arguments of the class the file names.
GROUPS = {"sde": SDES, "model": MODELS, "sampler": SAMPLERS, "data": DATASETS}


def _own_keys(path: Path) -> Dict[str, Any]:
    """The keys a group file sets itself (not through its defaults list)."""
    node = yaml.safe_load(path.read_text()) or {}
    node.pop("defaults", None)
    return node


def _defaults_of(factory: Any) -> Dict[str, Any]:
    """Constructor defaults of ``factory``, following ``**kwargs`` up the class hierarchy (samplers
    list theirs, the shared end-point options included, in ``option_defaults()``)."""
    if hasattr(factory, "option_defaults"):
        return dict(factory.option_defaults())
    out: Dict[str, Any] = {}
    classes = factory.__mro__ if inspect.isclass(factory) else [factory]
    for klass in classes:
        init = klass.__dict__.get("__init__") if inspect.isclass(factory) else klass
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())
        for p in params:
            if p.default is not inspect.Parameter.empty:
                out.setdefault(p.name, p.default)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def _base_files():
    """(group, file) for every group file that is a class's own options (its stem is its `name`)."""
    for group in GROUPS:
        for path in sorted((CONF / group).glob("*.yaml")):
            node = _own_keys(path)
            if node.get("name") == path.stem and path.stem in GROUPS[group]:  # not sampler=auto, the measured rule
                yield group, path


@pytest.mark.parametrize("group, path", list(_base_files()), ids=lambda v: getattr(v, "name", v))
def test_a_group_file_restates_its_constructor_defaults_exactly(group: str, path: Path) -> None:
    # conf/<group>/<name>.yaml lists the options of the class registered as <name> so that the
    # command line can set them; a value there that differs from the constructor's default would be
    # a second default. Presets (another file name) inherit the base file and only override.
    factory = GROUPS[group].get(path.stem)
    defaults = _defaults_of(factory)
    node = _own_keys(path)
    node.pop("name")
    if group == "sampler" and node.pop("tuned", None):
        # `auto` options are the measured best for the budget (NAMED_RULES; tests/test_named_samplers.py),
        # a value no constructor default can state.
        node = {k: v for k, v in node.items() if v != "auto"}
    required = {p for p in inspect.signature(factory).parameters} if inspect.isclass(factory) else set()
    unknown = sorted(k for k in node if k not in defaults and k != "steps" and not (k in required and node[k] == "???"))
    assert not unknown, f"{path.name}: not options of {factory.__name__}: {unknown}"
    differ = {k: (v, defaults[k]) for k, v in node.items() if k in defaults and not _same(v, defaults[k])}
    assert not differ, f"{path.name} sets other values than {factory.__name__}'s defaults (yaml, code): {differ}"


def test_presets_inherit_their_base_file_and_only_override() -> None:
    # A preset (e.g. model/unet_small.yaml) names a registered class other than its file name; it
    # must pull the base file in through its defaults list and set only what it changes.
    for group in GROUPS:
        for path in sorted((CONF / group).glob("*.yaml")):
            raw = yaml.safe_load(path.read_text()) or {}
            node = _own_keys(path)
            name = node.get("name")
            if name in (None, path.stem):
                continue
            assert name in [d if isinstance(d, str) else None for d in raw.get("defaults", [])], (
                f"{group}/{path.name} is a preset of {name!r} but does not list `- {name}` in its defaults"
            )
            base = _own_keys(CONF / group / f"{name}.yaml")
            same = sorted(k for k, v in node.items() if k != "name" and k in base and _same(v, base[k]))
            assert not same, f"{group}/{path.name} repeats values of {name}.yaml: {same}"


def test_train_yaml_repeats_no_schema_default() -> None:
    # Every default of a run lives in the schema; conf/train.yaml only chooses groups and the run directory.
    raw = yaml.safe_load((CONF / "train.yaml").read_text())
    schema_keys = set(TrainConfig.__dataclass_fields__) - {"sde", "model", "data", "trainer", "sampler", "run_dir"}
    assert not sorted(set(raw) & schema_keys), sorted(set(raw) & schema_keys)


def test_parse_train_holds_the_single_defaults() -> None:
    # The values that disagreed between YAML and code before there was a schema.
    cfg = parse_train({"data": {"name": "toy2d"}, "model": {"name": "mlp"}})
    assert cfg.ema.decay == 0.9999 and cfg.loss.stratified is True
    assert cfg.callbacks.checkpoint.every_n_steps == 5000 and cfg.callbacks.samples.every_n_steps == 5000
    from sde_diffusion.callbacks import EMA, SampleFigures

    assert inspect.signature(EMA).parameters["decay"].default == cfg.ema.decay
    assert inspect.signature(SampleFigures).parameters["every_n_steps"].default == cfg.callbacks.samples.every_n_steps


@pytest.mark.parametrize(
    "change, message",
    [
        ({"loss": {"weighting": "foo"}}, r"unknown loss.weighting 'foo'; choose one of: sigma2, g2, importance"),
        ({"ema": {"decay": 1.0}}, r"ema.decay must lie in \[0, 1\)"),
        ({"optim": {"warmup_steps": -1}}, r"optim.warmup_steps must be an integer >= 0"),
        ({"sde": {"name": "nope"}}, r"unknown sde 'nope'; choose one of: cosine_vp, subvp, ve, vp"),
        ({"task": "inpaint"}, r"train.py cannot run task=inpaint"),
        ({"seed": "abc"}, r"seed"),
        ({"loss": {"typo": 1}}, r"typo"),
        ({"sde": {"_target_": "no_such_module.MySDE"}}, r"cannot import module 'no_such_module'"),
    ],
)
def test_parse_train_refuses_bad_values_naming_the_key(change: Dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_train({"data": {"name": "toy2d"}, "model": {"name": "mlp"}, **change})


def test_sample_schema_checks() -> None:
    from sde_diffusion.config import parse_sample

    assert parse_sample({}).sampler["name"] == "auto"
    with pytest.raises(ValueError, match="guidance.classifier_scale=2(.0)? has no effect"):
        parse_sample({"guidance": {"classifier_scale": 2.0}})
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        parse_sample({"n": 0})
    assert SampleConfig().clip_denoised == "auto"


def test_instantiate_builds_registered_names_and_import_paths() -> None:
    from sde_diffusion import VPSDE

    sde = instantiate({"name": "vp", "beta_max": 10.0}, SDES)
    assert isinstance(sde, VPSDE) and sde.beta_max == 10.0
    sde2 = instantiate({"_target_": "sde_diffusion.sdes.vp.VPSDE", "beta_max": 12.0}, SDES)
    assert isinstance(sde2, VPSDE) and sde2.beta_max == 12.0
    assert import_object("sde_diffusion.sdes.vp:VPSDE") is VPSDE
    with pytest.raises(ValueError, match=r"bad option for sde 'vp'.*accepted options: .*beta_max"):
        instantiate({"name": "vp", "gamma": 1.0}, SDES)
    with pytest.raises(ValueError, match="unknown sde 'foo'; choose one of"):
        instantiate({"name": "foo"}, SDES)


def test_a_user_class_drops_the_default_groups_options_with_a_warning() -> None:
    # sde=vp brings beta_min/beta_max; a user's class that does not take them gets a warning, not a crash.
    node = {"name": "vp", "_target_": "custom_processes.ConstantBetaSDE", "beta_min": 0.1, "beta_max": 20.0, "beta": 2.0}
    with pytest.warns(UserWarning, match="takes no option.*beta_max, beta_min"):
        sde = instantiate(node, SDES)
    assert type(sde).__name__ == "ConstantBetaSDE" and sde.beta == 2.0
    assert to_plain(node)["beta"] == 2.0


def test_train_and_sample_a_users_own_process_and_task_from_the_command_line(tmp_path: Path) -> None:
    # The card's extension story end to end: a LinearSDE subclass and a Task defined outside the
    # package, chosen with _target_ on the command line, trained, then sampled back by sample.py.
    import json
    import subprocess
    import sys

    import numpy as np
    import torch

    from helpers import ROOT

    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parent)}
    run = tmp_path / "run"
    train = [sys.executable, str(ROOT / "train.py"), "data=moons", "data.n=512", "model.hidden=16",
             "sde._target_=custom_processes.ConstantBetaSDE", "+sde.beta=3",
             "task._target_=custom_processes.MarkedScoreTask", "+task.marker=mine",
             "trainer.max_steps=4", "trainer.enable_progress_bar=false", "callbacks.samples.enabled=false",
             f"run_dir={run}"]
    proc = subprocess.run(train, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "marker.txt").read_text() == "mine 4"
    stored = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["hyper_parameters"]["cfg"]
    assert stored["sde"]["_target_"] == "custom_processes.ConstantBetaSDE" and stored["sde"]["beta"] == 3

    out = tmp_path / "samples"
    sample = [sys.executable, str(ROOT / "sample.py"), f"ckpt={run}", "n=16", "steps=5", "progress=false", f"out={out}"]
    proc = subprocess.run(sample, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    x = np.load(out / "samples.npz")["samples"]
    assert x.shape == (16, 2) and np.isfinite(x).all()
    assert "ConstantBetaSDE" in json.dumps(json.loads((out / "run.json").read_text()))


def test_a_sampler_class_of_ones_own_by_import_path() -> None:
    # sampler._target_ (sample.py) and sample(sampler="pkg.mod.Class") build a class that is not registered.
    import torch

    from sde_diffusion import GaussianMixture, VPSDE, make_sampler, sample

    sde = VPSDE()
    sampler, steps, choice = make_sampler(sde, "custom_processes.HalfEulerMaruyama", 10, {"scale": 0.5})
    assert type(sampler).__name__ == "HalfEulerMaruyama" and sampler.scale == 0.5 and choice is None
    gm = GaussianMixture.ring(k=4, radius=2.0, std=0.3)
    out = sample(sde, gm.score_fn(sde), (64, 2), sampler="custom_processes.HalfEulerMaruyama", steps=10,
                 generator=torch.Generator().manual_seed(0))
    assert out.samples.shape == (64, 2) and out.nfe == 10 and torch.isfinite(out.samples).all()
