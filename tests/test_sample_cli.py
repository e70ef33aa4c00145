"""sample.py and the jobs behind it, on tiny checkpoints trained here for three steps."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from sde_diffusion import sample
from sde_diffusion.config import parse_sample
from sde_diffusion.guidance import ClassifierFreeGuidance
from sde_diffusion.jobs import cli, run
from sde_diffusion.jobs.conditioning import condition_batch, make_mask
from sde_diffusion.jobs.likelihood_job import evaluation_examples, model_input
from sde_diffusion.jobs.model import load_model
from sde_diffusion.jobs.runtime import Runtime
from sde_diffusion.jobs.sample_job import SampleJob, to_stored
from sde_diffusion.jobs.shards import batch_seed, rank_batches
from sde_diffusion.likelihood import log_likelihood
from sde_diffusion.plots import grid_size
from sde_diffusion.sdes import VPSDE

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")


def _compose(name: str, overrides: List[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(name, overrides=overrides)


def _train(run_dir: Path, overrides: List[str]) -> Path:
    from sde_diffusion.fit import fit

    torch.set_num_threads(1)
    common = [
        "trainer.max_steps=3", "logger=csv", "callbacks.samples.enabled=false", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "callbacks.loss_by_t.every_n_steps=1", "trainer.log_every_n_steps=1",
        "model.zero_init=false", "optim.warmup_steps=0", "optim.lr=1e-3", f"run_dir={run_dir}",
    ]
    fit("score", _compose("train", overrides + common), output_dir=run_dir)
    return run_dir


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """moons, tiny MLP, VP SDE, unconditional."""
    return _train(tmp_path_factory.mktemp("toy") / "run",
                  ["data=moons", "model=mlp", "model.hidden=16", "model.num_blocks=1", "data.n=256", "data.batch_size=32"])


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8×8 digits, tiny class-conditional U-Net (label dropout 0.1), VP SDE."""
    return _train(tmp_path_factory.mktemp("digits") / "run",
                  ["data=digits", "model=unet_small", "model.ch=8", "data.batch_size=16", "conditioning.class_labels=true"])


def _sample_cfg(ckpt: Path, *overrides: str):
    """What `python sample.py ckpt=<ckpt> progress=false <overrides>` composes."""
    return cli.compose([f"ckpt={ckpt}", "progress=false", *overrides], CONF)


def _options(cfg) -> Dict:
    """The sampler options the composed config gives (the sampler group's yaml defaults)."""
    return parse_sample(cfg).sampler_options


def _files(root: Path) -> List[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _npz(path: Path) -> Dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


# ---------------------------------------------------------------------------------- sample mode
def test_vector_samples_match_direct_sampler_calls(toy_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = _sample_cfg(toy_run, "sampler=euler_maruyama", "n=10", "batch_size=4", "steps=4", f"out={out}")
    options = _options(cfg)  # the sampler group's yaml defaults
    report = run(cfg)
    z = _npz(out / "samples.npz")
    assert set(z) == {"samples"}
    assert z["samples"].dtype == np.float32 and z["samples"].shape == (10, 2)
    assert np.isfinite(z["samples"]).all()
    # Batch b is exactly sample() with a generator seeded by f(seed, b), from the EMA weights.
    model = load_model(toy_run, device="cpu")
    for b, (lo, hi) in enumerate([(0, 4), (4, 8), (8, 10)]):
        gen = torch.Generator().manual_seed(batch_seed(0, "sample", b))
        with torch.no_grad():
            ref = sample(model.sde, model.module.score_fn(use_ema=True), (hi - lo, 2), sampler="euler_maruyama",
                         steps=4, generator=gen, **options)
        np.testing.assert_array_equal(z["samples"][lo:hi], ref.samples.numpy())
    rj = json.loads((out / "run.json").read_text())
    assert rj["nfe"] == {"per_batch": [4, 4, 4], "total": 12}
    assert rj["sampler"]["expected_nfe_per_batch"] == 4
    assert rj["samples_per_second"] == pytest.approx(10 / rj["seconds"]["sampling"])
    assert rj["checkpoint"]["ema"] is True and rj["checkpoint"]["global_step"] == 3
    assert rj["config"]["n"] == 10 and "torch" in rj["versions"]
    assert report["output_dir"] == str(out)
    assert Image.open(out / "samples.png").size == (800, 400)


def test_default_sampler_is_the_measured_rule_and_is_recorded(toy_run: Path, tmp_path: Path, capsys) -> None:
    from sde_diffusion.samplers.defaults import default_sampler

    out = tmp_path / "auto"
    cfg = _sample_cfg(toy_run, "steps=10", "n=6", "batch_size=6", f"out={out}")  # no sampler=
    run(cfg)
    model = load_model(toy_run, device="cpu")
    choice = default_sampler(model.sde, 10, score="learned")  # sample.py always samples a trained network
    rj = json.loads((out / "run.json").read_text())
    assert rj["sampler"]["default_rule"] == json.loads(json.dumps(choice.as_dict()))
    assert rj["sampler"]["name"] == choice.name and rj["sampler"]["steps"] == choice.steps
    assert rj["nfe"]["total"] == 10  # the budget, exactly
    assert f"sampler: {choice.describe()}" in capsys.readouterr().out
    # Bit for bit what sample() with no sampler named gives.
    gen = torch.Generator().manual_seed(batch_seed(0, "sample", 0))
    with torch.no_grad():
        ref = sample(model.sde, model.module.score_fn(use_ema=True), (6, 2), steps=10, generator=gen)
    np.testing.assert_array_equal(_npz(out / "samples.npz")["samples"], ref.samples.numpy())
    # sampler=pc stays the paper's predictor-corrector, untouched by the rule.
    pc = _sample_cfg(toy_run, "sampler=pc", "steps=3", "n=2", "batch_size=2", f"out={tmp_path / 'pc'}")
    run(pc)
    rj = json.loads((tmp_path / "pc" / "run.json").read_text())
    assert rj["sampler"]["name"] == "pc" and rj["sampler"]["default_rule"] is None
    assert rj["sampler"]["options"]["predictor"] == "reverse_diffusion" and rj["sampler"]["options"]["corrector"] == "langevin"
    assert rj["sampler"]["options"]["snr"] == 0.16 and rj["nfe"]["total"] == 6
    assert rj["sampler"]["clip_denoised"] is None  # vector data: never clamped


def test_clip_denoised_clamps_the_denoiser_for_images(digits_run: Path, tmp_path: Path) -> None:
    from sde_diffusion.score import DataRangeClip

    # The default for a trained network is stochastic: no clamp (auto clamps deterministic defaults).
    run(_sample_cfg(digits_run, "steps=5", "n=3", "batch_size=3", "label=2", f"out={tmp_path / 'a'}", "figures=false"))
    rj = json.loads((tmp_path / "a" / "run.json").read_text())
    assert rj["sampler"]["default_rule"]["score"] == "learned" and rj["sampler"]["options"]["stochastic"] is True
    assert rj["sampler"]["clip_denoised"] is None
    # A named deterministic sampler at its measured settings is clamped too (auto); the paper's pc is not, and
    # clip_denoised=false turns the clamp off. clip_denoised=true asks for it, and is bit for bit DataRangeClip.
    run(_sample_cfg(digits_run, "sampler=ddim", "steps=2", "n=2", "batch_size=2", f"out={tmp_path / 'b'}", "figures=false"))
    rj_b = json.loads((tmp_path / "b" / "run.json").read_text())["sampler"]
    assert rj_b["clip_denoised"] == [-1.0, 1.0] and rj_b["tuned"].endswith("NAMED_RULES['ddim']['learned']")
    assert "auto" not in rj_b["options"].values() and "tuned" not in rj_b["options"]
    run(_sample_cfg(digits_run, "sampler=ddim", "steps=2", "n=2", "batch_size=2", "clip_denoised=false",
                    f"out={tmp_path / 'b2'}", "figures=false"))
    assert json.loads((tmp_path / "b2" / "run.json").read_text())["sampler"]["clip_denoised"] is None
    run(_sample_cfg(digits_run, "sampler=pc", "steps=2", "n=2", "batch_size=2", f"out={tmp_path / 'b3'}", "figures=false"))
    assert json.loads((tmp_path / "b3" / "run.json").read_text())["sampler"]["clip_denoised"] is None
    cfg = _sample_cfg(digits_run, "sampler=ddim", "steps=3", "n=3", "batch_size=3", "label=2", "clip_denoised=true",
                      f"out={tmp_path / 'c'}", "figures=false")
    options = _options(cfg)
    run(cfg)
    assert json.loads((tmp_path / "c" / "run.json").read_text())["sampler"]["clip_denoised"] == [-1.0, 1.0]
    model = load_model(digits_run, device="cpu")
    gen = torch.Generator().manual_seed(batch_seed(0, "sample", 0))
    cfg_score = ClassifierFreeGuidance(model.module.score_fn(use_ema=True), y=torch.full((3,), 2), scale=0.0, null_label=10)
    with torch.no_grad():
        ref = sample(model.sde, DataRangeClip(cfg_score, model.sde, -1.0, 1.0), (3, 1, 8, 8), sampler="ddim", steps=3,
                     generator=gen, **options)
    dm = model.build_datamodule({})
    expected = torch.round(dm.inverse_scaler(ref.samples).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1)
    np.testing.assert_array_equal(_npz(tmp_path / "c" / "samples.npz")["samples"], expected.numpy())
    with pytest.raises(ValueError, match="clip_denoised must be auto, true or false"):
        run(_sample_cfg(digits_run, "clip_denoised=maybe", f"out={tmp_path / 'd'}"))


def test_image_samples_uint8_with_guidance(digits_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "g"
    cfg = _sample_cfg(digits_run, "sampler=pc", "n=6", "batch_size=3", "steps=3", "guidance.scale=2.0", "label=3", f"out={out}")
    options = _options(cfg)
    run(cfg)
    z = _npz(out / "samples.npz")
    assert z["samples"].dtype == np.uint8 and z["samples"].shape == (6, 8, 8, 1)
    np.testing.assert_array_equal(z["labels"], np.full(6, 3))
    model = load_model(digits_run, device="cpu")
    dm = model.build_datamodule({})
    gen = torch.Generator().manual_seed(batch_seed(0, "sample", 1))
    cfg_score = ClassifierFreeGuidance(model.module.score_fn(use_ema=True), y=3, scale=2.0, null_label=10)
    with torch.no_grad():
        ref = sample(model.sde, cfg_score, (3, 1, 8, 8), sampler="pc", steps=3, generator=gen, **options)
    expected = torch.round(dm.inverse_scaler(ref.samples).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1)
    np.testing.assert_array_equal(z["samples"][3:], expected.numpy())
    rj = json.loads((out / "run.json").read_text())
    assert rj["nfe"]["per_batch"] == [6, 6]  # pc: one predictor and one corrector evaluation per step
    assert Image.open(out / "samples.png").size[::-1] == grid_size(6, 8, 8, nrow=6, pad=1, scale=4)


def test_output_dir_names_the_step_budget(toy_run: Path) -> None:
    """Fixed-step runs are tagged with their steps; adaptive ones, which ignore steps, are not."""
    fixed = SampleJob(parse_sample(_sample_cfg(toy_run, "sampler=ddim", "steps=7")))
    adaptive = SampleJob(parse_sample(_sample_cfg(toy_run, "sampler=dpm_solver_adaptive", "steps=7")))
    assert fixed.out_dir.name.startswith("sample-ddim-7steps-seed0-")
    assert adaptive.out_dir.name.startswith("sample-dpm_solver_adaptive-adaptive-seed0-")


def test_balanced_labels_by_default(digits_run: Path, tmp_path: Path) -> None:
    run(_sample_cfg(digits_run, "sampler=euler_maruyama", "n=12", "batch_size=5", "steps=1", f"out={tmp_path}", "figures=false"))
    np.testing.assert_array_equal(_npz(tmp_path / "samples.npz")["labels"], np.arange(12) % 10)


def test_killed_run_resumes_to_identical_output(toy_run: Path, tmp_path: Path) -> None:
    args = ["sampler=euler_maruyama", "n=10", "batch_size=3", "steps=3"]
    full, broken = tmp_path / "full", tmp_path / "broken"
    run(_sample_cfg(toy_run, *args, f"out={full}"))

    class Killed(RuntimeError):
        pass

    def die_after_two(batch: int, arrays: Dict[str, np.ndarray]) -> None:
        if batch == 1:
            raise Killed

    with pytest.raises(Killed):
        run(_sample_cfg(toy_run, *args, f"out={broken}"), on_batch_end=die_after_two)
    assert sorted(p.name for p in (broken / "shards").glob("batch_*.npz")) == ["batch_00000.npz", "batch_00001.npz"]
    assert not (broken / "samples.npz").exists()
    # A writer killed mid-write leaves at most its temporary file; the restart must drop it.
    (broken / "shards" / ".batch_00002.npz.99999.tmp").write_bytes(b"truncated")
    # A shard whose data did not reach the disk (crash of the machine) fails its CRC: drawn again.
    shard = broken / "shards" / "batch_00000.npz"
    data = bytearray(shard.read_bytes())
    at = data.index(np.float32(_npz(shard)["samples"][0, 0]).tobytes())
    data[at : at + 4] = b"\0\0\0\0"
    shard.write_bytes(bytes(data))

    report = run(_sample_cfg(toy_run, *args, f"out={broken}"))
    assert report["batches_drawn_this_run"] == 3
    assert _files(full) == _files(broken)
    a, b = _npz(full / "samples.npz"), _npz(broken / "samples.npz")
    np.testing.assert_array_equal(a["samples"], b["samples"])
    assert np.unique(b["samples"], axis=0).shape[0] == 10  # no duplicated rows
    for k in range(4):
        np.testing.assert_array_equal(_npz(full / f"shards/batch_{k:05d}.npz")["samples"],
                                      _npz(broken / f"shards/batch_{k:05d}.npz")["samples"])


def test_rank_split_gives_the_single_process_result(toy_run: Path, tmp_path: Path) -> None:
    args = ["sampler=euler_maruyama", "n=11", "batch_size=2", "steps=2", "figures=false"]
    run(_sample_cfg(toy_run, *args, f"out={tmp_path / 'one'}"))
    job = SampleJob(parse_sample(_sample_cfg(toy_run, *args, f"out={tmp_path / 'two'}")), runtime=Runtime())
    job.runner.prepare()
    assert job.runner.run_batches(rank=1, world_size=2) == [1, 3, 5]
    assert sorted(p.name for p in job.runner.store.root.glob("batch_*.npz")) == [f"batch_{b:05d}.npz" for b in (1, 3, 5)]
    with pytest.raises(RuntimeError, match="not finished"):
        job.finalize()
    assert job.runner.run_batches(rank=0, world_size=2) == [0, 2, 4]
    job.finalize()
    np.testing.assert_array_equal(_npz(tmp_path / "one/samples.npz")["samples"], _npz(tmp_path / "two/samples.npz")["samples"])
    owned = [rank_batches(6, r, 4) for r in range(4)]
    assert sorted(sum(owned, [])) == list(range(6)) and all(len(set(o)) == len(o) for o in owned)


def test_changed_settings_do_not_reuse_shards(toy_run: Path, tmp_path: Path) -> None:
    run(_sample_cfg(toy_run, "sampler=euler_maruyama", "n=4", "batch_size=4", "steps=2", f"out={tmp_path}", "figures=false"))
    with pytest.raises(ValueError, match="different job.*steps: 2 → 3"):
        run(_sample_cfg(toy_run, "sampler=euler_maruyama", "n=4", "batch_size=4", "steps=3", f"out={tmp_path}"))
    run(_sample_cfg(toy_run, "sampler=euler_maruyama", "n=4", "batch_size=4", "steps=3", f"out={tmp_path}",
                    "resume=false", "figures=false"))
    assert json.loads((tmp_path / "run.json").read_text())["nfe"]["total"] == 3


# ---------------------------------------------------------------------------------- errors
def test_requested_sde_must_match_checkpoint(toy_run: Path) -> None:
    with pytest.raises(ValueError, match=r"trained with sde=\{name: vp.*but sde=\{name: ve"):
        run(_sample_cfg(toy_run, "sampler=euler_maruyama", "sde=ve"))
    with pytest.raises(ValueError, match=r"model.hidden: checkpoint 16, requested 128"):
        run(_sample_cfg(toy_run, "sampler=euler_maruyama", "model=mlp"))


def test_weights_that_do_not_fit_the_config_fail_clearly(toy_run: Path, tmp_path: Path) -> None:
    ck = torch.load(toy_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    ck["hyper_parameters"]["cfg"]["model"]["hidden"] = 24
    bad = tmp_path / "bad.ckpt"
    torch.save(ck, bad)
    with pytest.raises(ValueError, match=r"(?s)weights do not fit.*'hidden': 24.*size mismatch"):
        run(_sample_cfg(bad, "sampler=euler_maruyama"))


def test_unknown_sampler_lists_the_choices(toy_run: Path) -> None:
    cfg = _sample_cfg(toy_run, "sampler=euler_maruyama", "sampler.name=nope")
    with pytest.raises(ValueError, match=r"unknown sampler 'nope'; choose one of: .*euler_maruyama.*pc"):
        run(cfg)
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="euler_maruyama"):
        _sample_cfg(toy_run, "sampler=nope")


def test_guidance_needs_a_conditional_model(toy_run: Path) -> None:
    with pytest.raises(ValueError, match="class-conditional"):
        run(_sample_cfg(toy_run, "sampler=euler_maruyama", "guidance.scale=1.5"))



def test_without_ckpt_a_missing_run_names_train_py(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no finished score-model training run under .*`python train\.py`"):
        run(cli.compose(["sampler=euler_maruyama", f"runs_root={tmp_path}"], CONF))


def test_without_ckpt_the_newest_finished_score_run_is_sampled(toy_run: Path, tmp_path: Path, capsys) -> None:
    """Unfinished runs and classifier runs are passed over; the choice is the job's first output line."""
    root = tmp_path / "outputs" / "train"
    older = root / "moons_vp" / "older"
    shutil.copytree(toy_run, older)
    newer = root / "moons_vp" / "newer"
    shutil.copytree(toy_run, newer)
    marker = json.loads((newer / "finished.json").read_text())
    assert marker["task"] == "score" and marker["global_step"] == 3
    (newer / "finished.json").write_text(json.dumps({**marker, "finished_at": marker["finished_at"] + 10}))
    (older / "finished.json").write_text(json.dumps({**marker, "finished_at": marker["finished_at"] - 10}))
    # Newer still, but killed (no marker) or a classifier: neither is taken.
    killed = root / "moons_vp" / "killed"
    shutil.copytree(toy_run, killed)
    (killed / "finished.json").unlink()
    clf = tmp_path / "outputs" / "train" / "clf"
    shutil.copytree(toy_run, clf)
    (clf / "finished.json").write_text(json.dumps({**marker, "task": "classifier", "finished_at": marker["finished_at"] + 99}))
    capsys.readouterr()
    report = run(cli.compose(["sampler=euler_maruyama", "n=3", "batch_size=3", "steps=2", "progress=false",
                              f"runs_root={root}", f"out={tmp_path / 'out'}"], CONF))
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"ckpt: {newer} ")
    assert json.loads((tmp_path / "out" / "run.json").read_text())["checkpoint"]["path"] == str((newer / "checkpoints" / "last.ckpt").resolve())
    assert report["output_dir"] == str(tmp_path / "out")


# ---------------------------------------------------------------------------------- tasks
def test_inpainting_keeps_observed_pixels(digits_run: Path, tmp_path: Path) -> None:
    run(_sample_cfg(digits_run, "task=inpaint", "mask=left", "sampler=euler_maruyama", "n=4", "batch_size=4",
                    "steps=3", f"out={tmp_path}"))
    z = _npz(tmp_path / "samples.npz")
    mask = z["mask"].astype(bool)  # [8, 8, 1], 1 = observed
    assert mask.shape == (8, 8, 1) and not mask[:, :4].any() and mask[:, 4:].all()
    obs = np.broadcast_to(mask, z["samples"].shape)
    np.testing.assert_array_equal(z["samples"][obs], z["observed"][obs])
    assert (z["masked"][~obs] == 128).all()  # unknown pixels shown mid-grey
    model = load_model(digits_run, device="cpu")
    ref = model.build_datamodule({}).reference(4, generator=torch.Generator().manual_seed(batch_seed(0, "observed", 0)))
    np.testing.assert_array_equal(z["observed"], to_stored(ref, model.build_datamodule({})))
    assert Image.open(tmp_path / "triptych.png").size[::-1] == grid_size(12, 8, 8, nrow=4, pad=1, scale=4)


def test_tweedie_inpainting_runs(digits_run: Path, tmp_path: Path) -> None:
    run(_sample_cfg(digits_run, "task=inpaint", "mask=center", "inpaint.method=tweedie", "sampler=euler_maruyama",
                    "n=2", "batch_size=2", "steps=2", f"out={tmp_path}", "figures=false"))
    z = _npz(tmp_path / "samples.npz")
    obs = np.broadcast_to(z["mask"].astype(bool), z["samples"].shape)
    assert z["mask"].sum() == 64 - 16
    np.testing.assert_array_equal(z["samples"][obs], z["observed"][obs])


def test_colorize_needs_three_channels(digits_run: Path) -> None:
    with pytest.raises(ValueError, match="3-channel"):
        run(_sample_cfg(digits_run, "task=colorize", "sampler=euler_maruyama", "n=2", "batch_size=2", "steps=1"))
    with pytest.raises(ValueError, match=r"unknown task 'classifier'; choose one of: colorize, inpaint, sample "
                                         r"\(task=classifier is trained by train\.py\)"):
        run(_sample_cfg(digits_run, "task=classifier", "sampler=euler_maruyama"))


def test_colorize_keeps_the_grey_level() -> None:
    # Standard normal data: the exact score of p_t is −x/(m² + σ²) = −x for VP.
    sde, gen = VPSDE(), torch.Generator().manual_seed(0)
    observed = torch.rand(3, 3, 4, 4, generator=gen) * 2 - 1
    cond = condition_batch("colorize", "replace", sde, lambda x, t: -x, observed, None, gen)
    out = cond.finish(sample(sde, cond.score_fn, observed.shape, sampler="euler_maruyama", steps=5, generator=gen,
                             x_T=cond.x_T, hook=cond.hook).samples)
    torch.testing.assert_close(out.mean(1), observed.mean(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(cond.masked, observed.mean(1, keepdim=True).expand_as(observed), atol=1e-6, rtol=0)
    assert (out - observed).abs().max() > 0.1  # the colours themselves are sampled


def test_named_masks() -> None:
    m = make_mask("center", (3, 8, 6))
    assert m.shape == (3, 8, 6) and m[:, 2:6, 1:4].sum() == 0 and m.sum() == 3 * (48 - 12)
    assert make_mask("bottom", (1, 5, 4))[0, :, 0].tolist() == [1, 1, 1, 0, 0]
    assert make_mask("right", (2,)).tolist() == [1.0, 0.0]
    r = make_mask("random", (2, 16, 16), ratio=0.25, seed=1)
    assert torch.equal(r[0], r[1]) and abs(float(1 - r[0].mean()) - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 256)
    with pytest.raises(ValueError, match="for images"):
        make_mask("top", (2,))
    with pytest.raises(ValueError, match="not one of"):
        make_mask("nowhere", (1, 4, 4))


# ---------------------------------------------------------------------------------- likelihood, metrics, plots
def test_likelihood_mode_matches_log_likelihood(toy_run: Path, tmp_path: Path) -> None:
    report = run(_sample_cfg(toy_run, "mode=likelihood", "n=6", "batch_size=3", f"out={tmp_path}",
                             "likelihood.rtol=1e-2", "likelihood.atol=1e-2"))
    z = _npz(tmp_path / "likelihood.npz")
    assert z["logp"].shape == (6,) and np.isfinite(z["logp"]).all()
    model = load_model(toy_run, device="cpu")
    x = evaluation_examples(model.build_datamodule({}), 6, "val", 0)
    direct = log_likelihood(model.sde, model.module.score_fn(use_ema=True), x[3:], rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(z["logp"][3:], direct.logp.double().numpy(), rtol=1e-6, atol=1e-6)
    assert report["nll_nats"]["mean"] == pytest.approx(-z["logp"].mean())
    assert report["nfe"]["total"] == sum(report["nfe"]["per_batch"]) > 0
    assert json.loads((tmp_path / "likelihood.json").read_text())["bpd"] is None
    # D = 2: the default `auto` takes the exact trace, so the estimator adds no error.
    assert report["divergence"]["used"] == "exact" and not report["divergence"]["stochastic"]
    assert report["divergence"]["estimator_stderr_per_example"] == 0.0 and (z["logp_stderr"] == 0).all()


def test_likelihood_bits_per_dim_for_images(digits_run: Path, tmp_path: Path) -> None:
    report = run(_sample_cfg(digits_run, "mode=likelihood", "n=2", "batch_size=2", f"out={tmp_path}",
                             "likelihood.solver=euler", "likelihood.steps=3"))
    z = _npz(tmp_path / "likelihood.npz")
    # D = 64: the default `auto` estimates the trace (2 Rademacher probes) and reports its error.
    div = report["divergence"]
    assert div["used"] == "hutchinson" and div["stochastic"] and "D = 64" in div["rule"]
    assert z["logp_stderr"].shape == (2,) and (z["logp_stderr"] > 0).all()
    assert div["estimator_stderr_per_example"] == pytest.approx(z["logp_stderr"].mean())
    assert div["estimator_stderr_of_mean"] == pytest.approx(np.sqrt((z["logp_stderr"] ** 2).sum()) / 2)
    # x = 2(k + U)/17 − 1: log-density of 17-level pixels = log p(x) + D log 2 − D log 17.
    expected = -(z["logp"] + 64 * math.log(2) - 64 * math.log(17)) / (64 * math.log(2))
    np.testing.assert_allclose(z["bpd"], expected, rtol=1e-5)
    assert report["bpd"]["mean"] == pytest.approx(expected.mean(), rel=1e-5)
    model = load_model(digits_run, device="cpu")
    dm = model.build_datamodule({})
    k = evaluation_examples(dm, 2, "val", 0)
    assert k.dtype == torch.uint8 and int(k.max()) <= 16
    x = model_input(k, dm, torch.Generator().manual_seed(batch_seed(0, "likelihood", 0)), torch.float32, torch.device("cpu"))
    assert -1 <= float(x.min()) and float(x.max()) < 1


def test_metrics_mode_vectors(toy_run: Path, tmp_path: Path) -> None:
    from sde_diffusion.metrics import sliced_wasserstein

    report = run(_sample_cfg(toy_run, "mode=metrics", "sampler=euler_maruyama", "n=40", "batch_size=20", "steps=3",
                             f"out={tmp_path}", "figures=false"))
    v = report["vectors"]
    samples = torch.as_tensor(_npz(tmp_path / "samples.npz")["samples"]).double()
    ref = load_model(toy_run, device="cpu").build_datamodule({}).reference(
        40, generator=torch.Generator().manual_seed(batch_seed(0, "metrics-ref", 0)))
    assert v["sliced_wasserstein"] == pytest.approx(sliced_wasserstein(samples, ref, generator=torch.Generator().manual_seed(0)))
    # Three training steps: far from the data, far above what real data score.
    assert v["sliced_wasserstein"] > 5 * v["sliced_wasserstein_floor"] and v["mmd2"] > v["mmd2_floor"]
    assert json.loads((tmp_path / "metrics.json").read_text())["vectors"] == v


def test_plots_mode_writes_every_figure(toy_run: Path, tmp_path: Path) -> None:
    report = run(_sample_cfg(toy_run, "mode=plots", "sampler=euler_maruyama", "steps=4", "plots.steps=4",
                             "plots.num_samples=16", "plots.trajectories=8", "plots.strip=4", f"out={tmp_path}"))
    sizes = {k: Image.open(p).size for k, p in report["files"].items()}
    assert sizes == {"samples": (800, 400), "trajectories": (1000, 500), "denoising": (800, 240), "loss_by_t": (600, 400)}
    assert report["notes"] == []


def test_cli_subprocess(toy_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), f"ckpt={toy_run}", "sampler=euler_maruyama", "n=5", "batch_size=5",
         "steps=2", f"out={out}", "sampler.denoise=true"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"wrote {out}" in proc.stdout
    assert _files(out) == ["run.json", "samples.npz", "samples.png", "shards/batch_00000.npz", "shards/plan.json"]
    rj = json.loads((out / "run.json").read_text())
    assert rj["nfe"]["total"] == 3 and rj["sampler"]["options"]["denoise"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"]  # Hydra leaves nothing in the working directory


@pytest.mark.slow
def test_two_process_ddp_run_matches_single_process(toy_run: Path, tmp_path: Path) -> None:
    args = [f"ckpt={toy_run}", "sampler=euler_maruyama", "n=9", "batch_size=2", "steps=2", "progress=false"]
    run(_sample_cfg(toy_run, *args[1:], f"out={tmp_path / 'one'}"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), *args, f"out={tmp_path / 'ddp'}", "trainer=ddp",
         "trainer.accelerator=cpu", "trainer.devices=2"],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(_npz(tmp_path / "one/samples.npz")["samples"], _npz(tmp_path / "ddp/samples.npz")["samples"])
    assert json.loads((tmp_path / "ddp/run.json").read_text())["runtime"]["world_size"] == 2
    shutil.rmtree(tmp_path / "ddp", ignore_errors=True)


def test_a_data_override_does_not_imply_a_model_check(digits_run: Path, tmp_path: Path) -> None:
    """conf/data/digits.yaml brings model=unet_small; in sample.py only a model the user typed is checked."""
    from sde_diffusion.jobs import drop_implied_model

    implied = _compose("sample", [f"ckpt={digits_run}", "data=digits"])  # Hydra alone
    assert implied.model is not None  # Hydra composed the data set's default network ...
    assert drop_implied_model(implied, ["data=digits"]).model is None  # ... which is not a request
    typed = _compose("sample", [f"ckpt={digits_run}", "data=digits", "model.ch=16"])
    assert drop_implied_model(typed, ["data=digits", "model.ch=16"]).model.ch == 16
    # sample.py's composition drops it the same way.
    assert _sample_cfg(digits_run, "data=digits").model is None
    assert _sample_cfg(digits_run, "data=digits", "model.ch=16").model.ch == 16
    # The digits run has model.ch=8: sampling it with data=digits works, a typed model.ch=16 is refused.
    run(_sample_cfg(digits_run, "data=digits", "sampler=euler_maruyama", "steps=2", "n=2", "batch_size=2",
                    f"out={tmp_path / 'ok'}"))
    with pytest.raises(ValueError, match="model.ch: checkpoint 8, requested 16"):
        run(_sample_cfg(digits_run, "data=digits", "model.ch=16", "sampler=euler_maruyama", "steps=2", "n=2",
                        "batch_size=2"))


# ---------------------------------------------------------------------------------- config, runner, registries
def test_sample_yaml_only_chooses_groups_and_agrees_with_the_schema() -> None:
    """Every default lives in SampleConfig: conf/sample.yaml holds the defaults list and Hydra's settings only."""
    import dataclasses

    import yaml

    from sde_diffusion.config import SampleConfig, to_plain

    raw = yaml.safe_load((ROOT / "conf" / "sample.yaml").read_text())
    assert set(raw) <= {"defaults", "hydra"}, f"conf/sample.yaml repeats schema keys: {sorted(set(raw) - {'defaults', 'hydra'})}"
    assert raw["defaults"][0] == "sample_schema"
    assert not any(isinstance(d, dict) and "task" in d for d in raw["defaults"])  # task is a value, not a group
    composed = to_plain(cli.compose([], CONF))
    schema = to_plain(SampleConfig())
    sampler_yaml = yaml.safe_load((ROOT / "conf" / "sampler" / "auto.yaml").read_text())
    assert composed.pop("sampler") == {**schema.pop("sampler"), **sampler_yaml}
    assert composed == schema
    assert {f.name for f in dataclasses.fields(SampleConfig)} == set(composed) | {"sampler"}


def test_unknown_mode_or_task_lists_the_choices(toy_run: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown mode 'nope'; choose one of: likelihood, metrics, plots, sample$"):
        run(_sample_cfg(toy_run, "mode=nope"))
    with pytest.raises(ValueError, match=r"unknown task 'nope'; choose one of: colorize, inpaint, sample$"):
        run(_sample_cfg(toy_run, "task=nope"))
    with pytest.raises(ValueError, match=r"unknown task 'score'; .*\(task=score is trained by train\.py\)"):
        run(_sample_cfg(toy_run, "task=score"))
    # task= is a value: Hydra never reads it as a choice of train.py's group conf/task/.
    assert cli.split_task(["n=2", "task=inpaint", "mask=left"]) == ("inpaint", ["n=2", "mask=left"])
    assert parse_sample(_sample_cfg(toy_run, "task=colorize")).task == "colorize"
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"ckpt={toy_run}", "task=classifier"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "error: unknown task 'classifier'; choose one of: colorize, inpaint, sample (task=classifier is trained" in proc.stderr


class _NoisePayload:
    """A payload without a model: each item is a draw of the batch's generator (and its index)."""

    purpose, desc = "noise", "noise"

    def __init__(self) -> None:
        self.drawn: List[int] = []

    def draw(self, batch, start, count, generator, progress):
        self.drawn.append(batch)
        progress(0.5)
        x = torch.randn(count, 3, generator=generator).numpy()
        return {"x": x, "index": np.arange(start, start + count)}, 7


def test_runner_resumes_a_killed_run_bit_for_bit(tmp_path: Path) -> None:
    from sde_diffusion.jobs.runner import Runner, batch_generator

    def runner(root: Path, payload: _NoisePayload, **kw) -> Runner:
        return Runner(payload, root / "shards", "fp", n=11, batch_size=3, seed=5, runtime=Runtime(),
                      settings={"what": "noise"}, progress=False, **kw)

    whole = runner(tmp_path / "whole", _NoisePayload()).run(tmp_path / "whole" / "out.npz")
    assert whole.nfe == [7, 7, 7, 7] and whole.drawn == [0, 1, 2, 3]
    np.testing.assert_array_equal(whole.arrays["index"], np.arange(11))
    # Batch b is its own stream: f(seed, purpose, b), whoever draws it and whenever.
    expected = torch.randn(2, 3, generator=batch_generator(5, "noise", 3)).numpy()
    np.testing.assert_array_equal(whole.arrays["x"][9:], expected)

    class Killed(RuntimeError):
        pass

    def die(batch: int, arrays) -> None:
        if batch == 2:
            raise Killed

    first = _NoisePayload()
    with pytest.raises(Killed):
        runner(tmp_path / "killed", first).run(tmp_path / "killed" / "out.npz", on_batch_end=die)
    assert first.drawn == [0, 1, 2] and not (tmp_path / "killed" / "out.npz").exists()
    (tmp_path / "killed" / "shards" / ".batch_00003.npz.4242.tmp").write_bytes(b"half a shard")
    again = _NoisePayload()
    resumed = runner(tmp_path / "killed", again).run(tmp_path / "killed" / "out.npz")
    assert again.drawn == [3] and resumed.drawn == [3]  # the finished shards are reused
    assert _files(tmp_path / "whole") == _files(tmp_path / "killed")
    for name in ["out.npz"] + [f"shards/batch_{b:05d}.npz" for b in range(4)]:
        a, b = _npz(tmp_path / "whole" / name), _npz(tmp_path / "killed" / name)
        assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a if k != "seconds"), name
    # Two ranks split the batches (b mod 2) and merge to the same file.
    split = runner(tmp_path / "split", _NoisePayload())
    split.prepare()
    assert split.run_batches(rank=1, world_size=2) == [1, 3] and split.run_batches(rank=0, world_size=2) == [0, 2]
    merged = split.merge(tmp_path / "split" / "out.npz")
    np.testing.assert_array_equal(merged.arrays["x"], whole.arrays["x"])
    # Other settings never reuse the shards.
    with pytest.raises(ValueError, match="different job"):
        Runner(_NoisePayload(), tmp_path / "whole" / "shards", "other", n=11, batch_size=3, seed=6,
               runtime=Runtime(), progress=False).prepare()


def test_the_sampler_is_built_once_per_run(toy_run: Path, tmp_path: Path, monkeypatch) -> None:
    from sde_diffusion.samplers import sampler as base

    built = []
    real = base.build_sampler

    def counting(name, **options):
        built.append(name)
        return real(name, **options)

    monkeypatch.setattr(base, "build_sampler", counting)  # what make_sampler and sample(name) build with
    report = run(_sample_cfg(toy_run, "n=7", "batch_size=2", "steps=4", f"out={tmp_path}", "figures=false"))
    assert report["batches"] == 4 and built == [report["sampler"]["name"]]  # the default, resolved and built once
