"""sde_diffusion/convert.py: score_sde_pytorch checkpoints → run directories.

Checkpoints are built in the reference's layout (``module.all_modules.<i>`` keys, ``module.sigmas``, the
``model``/``ema``/``optimizer``/``step`` fields, the EMA as a list of tensors in parameter order) by
tests/score_sde_reference.py, an independent transcription of the reference network and score function;
the converted run's scores must equal the reference's on the same weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import score_sde_reference as R
from sde_diffusion.convert import CONFIGS, ConversionError, build_module, convert_score_sde, main, reference_layout
from sde_diffusion.jobs.model import load_model

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.ch=16", "model.num_res_blocks=1"]
RELEASED = [("ddpmpp_cifar10", "vp"), ("ddpmpp_deep_cifar10", "vp"), ("ddpmpp_cifar10", "subvp"),
            ("ddpmpp_deep_cifar10", "subvp"), ("ncsnpp_cifar10", "ve"), ("ncsnpp_deep_cifar10", "ve")]


def small_cfg(config: str) -> dict:
    return dict(R.CONFIGS[config], nf=16, num_res_blocks=1)


def write_reference_checkpoint(path: Path, config: str, step: int = 1234) -> tuple:
    cfg = small_cfg(config)
    model, ema = R.random_state(cfg, seed=0), R.random_state(cfg, seed=1)
    if "all_modules.0.W" in model:  # the frozen Fourier W is not averaged
        ema["all_modules.0.W"] = model["all_modules.0.W"]
    torch.save(R.checkpoint_dict(cfg, model, ema, step, torch.linspace(50, 0.01, 1000)), path)
    return cfg, model, ema


@pytest.mark.parametrize("config,sde", RELEASED)
def test_converted_run_scores_equal_the_reference_on_the_same_weights(tmp_path, config, sde):
    cfg, model_w, ema_w = write_reference_checkpoint(tmp_path / "ckpt.pth", config)
    convert_score_sde(tmp_path / "ckpt.pth", config, sde, tmp_path / "run", extra=SMALL, quiet=True)
    loaded = load_model(tmp_path / "run")
    assert loaded.global_step == 1234 and loaded.has_ema
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=gen)
    x = x if sde == "ve" else 2 * x - 1          # the VE models' data are in [0, 1]
    t = torch.tensor([1e-3, 0.3, 0.95])
    for use_ema, weights in ((True, ema_w), (False, model_w)):
        ours = loaded.score_model(use_ema=use_ema)(x, t)
        ref = R.reference_score(weights, cfg, sde, x, t)
        err = float((ours - ref).abs().max() / ref.abs().max())
        assert err < 1e-3, (use_ema, err)
    record = json.loads((tmp_path / "run" / "converted.json").read_text())
    assert record["data_range"] == ([0.0, 1.0] if sde == "ve" else [-1.0, 1.0])
    assert record["step"] == 1234 and record["config"] == config and record["sde"] == sde
    assert (tmp_path / "run" / "finished.json").is_file()


@pytest.mark.parametrize("config", CONFIGS)
def test_full_size_layouts_equal_the_reference_key_for_key(config):
    sde = "ve" if config.startswith("ncsnpp") else "vp"
    with torch.device("meta"):
        module, _ = build_module(config, sde)
    assert [(k, s) for k, s, _ in reference_layout(module.net)] == R.layout(R.CONFIGS[config])


def test_the_first_mismatch_is_named_and_nothing_is_written(tmp_path):
    write_reference_checkpoint(tmp_path / "ddpmpp.pth", "ddpmpp_cifar10")
    with pytest.raises(ConversionError, match=r"all_modules\.0\.W.*missing|all_modules\.0\.weight.*shape"):
        convert_score_sde(tmp_path / "ddpmpp.pth", "ncsnpp_cifar10", "ve", tmp_path / "a", extra=SMALL, quiet=True)
    assert not (tmp_path / "a").exists()
    with pytest.raises(ConversionError, match=r"all_modules\.3\.Conv_0\.weight has shape \[16, 16, 3, 3\] but .* expects \[32, 16, 3, 3\]"):
        convert_score_sde(tmp_path / "ddpmpp.pth", "ddpmpp_cifar10", "vp", tmp_path / "b",
                          extra=["model.ch=16", "model.num_res_blocks=1", "model.ch_mult=[2,2,2,2]"], quiet=True)
    with pytest.raises(ConversionError, match=r"key all_modules\.6\.Conv_0\.weight \(shape \[32, 32, 3, 3\]\) is missing"):
        convert_score_sde(tmp_path / "ddpmpp.pth", "ddpmpp_cifar10", "vp", tmp_path / "c",
                          extra=["model.ch=16", "model.num_res_blocks=1", "model.attn_resolutions=[]"], quiet=True)
    raw = torch.load(tmp_path / "ddpmpp.pth", weights_only=True)
    raw["model"]["module.all_modules.99.weight"] = torch.zeros(3)
    torch.save(raw, tmp_path / "extra.pth")
    with pytest.raises(ConversionError, match=r"unexpected key all_modules\.99\.weight"):
        convert_score_sde(tmp_path / "extra.pth", "ddpmpp_cifar10", "vp", tmp_path / "c", extra=SMALL, quiet=True)
    raw = torch.load(tmp_path / "ddpmpp.pth", weights_only=True)
    del raw["ema"]
    torch.save(raw, tmp_path / "noema.pth")
    with pytest.raises(ConversionError, match="'model', 'ema', 'optimizer' and 'step'"):
        convert_score_sde(tmp_path / "noema.pth", "ddpmpp_cifar10", "vp", tmp_path / "d", extra=SMALL, quiet=True)
    raw = torch.load(tmp_path / "ddpmpp.pth", weights_only=True)
    raw["ema"]["shadow_params"] = raw["ema"]["shadow_params"][:-1]
    torch.save(raw, tmp_path / "short.pth")
    with pytest.raises(ConversionError, match="EMA holds"):
        convert_score_sde(tmp_path / "short.pth", "ddpmpp_cifar10", "vp", tmp_path / "e", extra=SMALL, quiet=True)
    with pytest.raises(ConversionError, match="DDPM\\+\\+ on VP and sub-VP only"):
        convert_score_sde(tmp_path / "ddpmpp.pth", "ddpmpp_cifar10", "ve", tmp_path / "f", extra=SMALL, quiet=True)
    with pytest.raises(ConversionError, match="does not exist"):
        convert_score_sde(tmp_path / "missing.pth", "ddpmpp_cifar10", "vp", tmp_path / "g", quiet=True)
    assert not any((tmp_path / d).exists() for d in "abcdefg")


def test_command_line_converts_and_refuses_an_existing_run(tmp_path, capsys):
    write_reference_checkpoint(tmp_path / "ckpt.pth", "ncsnpp_cifar10")
    args = ["score_sde", str(tmp_path / "ckpt.pth"), "--config", "ncsnpp_cifar10", "--sde", "ve", "--out",
            str(tmp_path / "run"), "--set", "model.ch=16", "--set", "model.num_res_blocks=1"]
    assert main(args) == 0
    assert "python sample.py ckpt=" in capsys.readouterr().out
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_sample_py_writes_images_of_a_converted_ve_run_in_its_data_range(tmp_path):
    write_reference_checkpoint(tmp_path / "ckpt.pth", "ncsnpp_cifar10")
    convert_score_sde(tmp_path / "ckpt.pth", "ncsnpp_cifar10", "ve", tmp_path / "run", extra=SMALL, quiet=True)
    from sde_diffusion.jobs import cli, run

    run(cli.compose([f"ckpt={tmp_path / 'run'}", "n=2", "batch_size=2", "steps=3", "sampler=euler_maruyama",
                     "progress=false"], ROOT / "conf"))
    (out,) = (tmp_path / "run" / "samples").glob("sample-*")
    with np.load(out / "samples.npz") as z:
        images = z["samples"]
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    # The module's inverse scaler is the identity for [0, 1] data: pixels = round(255 * clamp(x, 0, 1)).
    loaded = load_model(tmp_path / "run")
    dm = loaded.build_datamodule()
    assert not dm.centered and float(dm.inverse_scaler(torch.tensor(0.25))) == 0.25


def test_likelihood_and_metrics_modes_run_on_a_converted_ve_run_in_its_data_range(tmp_path):
    import math

    from helpers import write_cifar_archive
    from sde_diffusion.data import cifar10 as cifar
    from sde_diffusion.jobs import cli, run

    write_reference_checkpoint(tmp_path / "ckpt.pth", "ncsnpp_cifar10")
    convert_score_sde(tmp_path / "ckpt.pth", "ncsnpp_cifar10", "ve", tmp_path / "run", extra=SMALL, quiet=True)
    (tmp_path / "data").mkdir()
    write_cifar_archive(tmp_path / "data" / cifar.ARCHIVE_NAME, n_per_batch=4)
    common = [f"ckpt={tmp_path / 'run'}", "progress=false", "data=cifar10", f"data.root={tmp_path / 'data'}", "n=2",
              "batch_size=2"]
    report = run(cli.compose(common + ["mode=likelihood", "likelihood.solver=euler", "likelihood.steps=2",
                                       f"out={tmp_path / 'lik'}"], ROOT / "conf"))
    with np.load(tmp_path / "lik" / "likelihood.npz") as z:
        logp, bpd = z["logp"], z["bpd"]
    # Data in [0, 1]: x = (k + U)/256, so bpd = −(log p(x) − D log 256)/(D ln 2), no factor 2 as for [−1, 1].
    d = 3 * 32 * 32
    np.testing.assert_allclose(bpd, -(logp - d * math.log(256)) / (d * math.log(2)), rtol=1e-5)
    assert report["mode"] == "likelihood"
    metrics = run(cli.compose(common + ["mode=metrics", "sampler=euler_maruyama", "steps=2", "metrics.num_reference=8",
                                        f"out={tmp_path / 'met'}", "metrics.fid_weights=" + str(tmp_path / "none.pt")],
                              ROOT / "conf"))
    assert metrics["fid"]["fid"] is None and "does not exist" in metrics["fid"]["fid_unavailable"]
