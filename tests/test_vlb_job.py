"""``sample.py mode=likelihood likelihood.method=vlb``, ``sampler=ddpm`` and ``model.learn_sigma`` end to end."""
from __future__ import annotations

import math
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from sde_diffusion.jobs import cli, run

from helpers import CONF


def _train(run_dir: Path, overrides: List[str]) -> Path:
    from sde_diffusion.fit import fit

    torch.set_num_threads(1)
    common = ["trainer.max_steps=3", "logger=null", "callbacks.samples.enabled=false", "trainer.enable_progress_bar=false",
              "trainer.enable_model_summary=false", "callbacks.loss_by_t.every_n_steps=0", "model.zero_init=false",
              "optim.warmup_steps=0", "optim.lr=1e-3", f"run_dir={run_dir}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides + common)
    fit("score", cfg, output_dir=run_dir)
    return run_dir


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8×8 digits, tiny U-Net with AdaGN and a learned variance, VP SDE."""
    return _train(tmp_path_factory.mktemp("learned") / "run",
                  ["data=digits", "model=unet_small", "model.ch=8", "data.batch_size=16", "model.learn_sigma=true",
                   "model.scale_shift_norm=true"])


@pytest.fixture(scope="module")
def moons_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("moons") / "run",
                  ["data=moons", "model=mlp", "model.hidden=16", "model.num_blocks=1", "data.n=256", "data.batch_size=32"])


def _sample(ckpt: Path, *overrides: str):
    return run(cli.compose([f"ckpt={ckpt}", "progress=false", *overrides], CONF))


@pytest.mark.parametrize("variance", ["beta", "learned"])
def test_bound_report_on_digits(learned_run: Path, tmp_path: Path, variance: str) -> None:
    out = tmp_path / variance
    report = _sample(learned_run, "mode=likelihood", "likelihood.method=vlb", f"likelihood.variance={variance}",
                     "likelihood.train_steps=20", "n=4", "batch_size=2", f"out={out}", "likelihood.solver=euler",
                     "likelihood.steps=3")
    z = np.load(out / "likelihood.npz")
    v = report["vlb"]
    np.testing.assert_allclose(z["vlb_nats"], z["vlb_prior"] + z["vlb_middle"] + z["vlb_decoder"], rtol=1e-6)
    np.testing.assert_allclose(z["vlb_bpd"], z["vlb_nats"] / (64 * math.log(2)), rtol=1e-6)
    assert z["vlb_terms"].shape == (4, 20) and (z["vlb_terms"][:, 1:] >= 0).all()
    np.testing.assert_allclose(z["vlb_terms"].sum(1), z["vlb_middle"] + z["vlb_decoder"], rtol=1e-6)
    assert v["bpd"]["mean"] == pytest.approx(z["vlb_bpd"].mean()) and v["steps"] == 20 and v["decoder"] == "discretized"
    assert sum(row["nats"] for row in v["table"]) == pytest.approx(z["vlb_nats"].mean(), rel=1e-6)
    assert Path(v["plot"]).is_file() and v["estimator_stderr_of_mean"] == 0.0
    # The probability-flow NLL of the same examples sits in the same report.
    assert report["bpd"]["n"] == 4 and "bound_minus_ode_bpd" in v
    # The decoder gives a probability of the stored 17-level pixels: L_0 >= 0.
    assert (z["vlb_decoder"] >= 0).all()


def test_importance_sampled_bound_reports_its_error(learned_run: Path, tmp_path: Path) -> None:
    report = _sample(learned_run, "mode=likelihood", "likelihood.method=vlb", "likelihood.terms=3",
                     "likelihood.with_ode=false", "n=2", "batch_size=2", f"out={tmp_path}")
    z = np.load(tmp_path / "likelihood.npz")
    assert "vlb_terms" not in z and (z["vlb_stderr"] > 0).all() and "logp" not in z
    assert report["vlb"]["estimator_stderr_of_mean"] > 0 and report["nfe"]["total"] == 4  # 3 steps + the decoder
    assert "bpd" not in report or report.get("bpd") is None


def test_ddpm_sampler_with_learned_variance(learned_run: Path, tmp_path: Path) -> None:
    report = _sample(learned_run, "sampler=ddpm", "sampler.variance=learned", "steps=10", "n=4", "batch_size=4",
                     f"out={tmp_path}")
    assert report["nfe"]["total"] == 10
    samples = np.load(tmp_path / "samples.npz")
    assert next(iter(samples.values())).shape[0] == 4


def test_refusals(learned_run: Path, moons_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="likelihood.decoder=gaussian"):
        _sample(moons_run, "mode=likelihood", "likelihood.method=vlb", "n=2", f"out={tmp_path / 'a'}")
    report = _sample(moons_run, "mode=likelihood", "likelihood.method=vlb", "likelihood.decoder=gaussian",
                     "likelihood.train_steps=10", "likelihood.with_ode=false", "n=2", f"out={tmp_path / 'b'}")
    assert report["vlb"]["bpd"] is None and math.isfinite(report["vlb"]["nats"]["mean"])
    with pytest.raises(ValueError, match="model.learn_sigma=true"):
        _sample(moons_run, "mode=likelihood", "likelihood.method=vlb", "likelihood.decoder=gaussian",
                "likelihood.variance=learned", "n=2", f"out={tmp_path / 'c'}")
    with pytest.raises(ValueError, match="model.learn_sigma=true"):
        _sample(moons_run, "sampler=ddpm", "sampler.variance=learned", "steps=5", "n=2", f"out={tmp_path / 'd'}")


@pytest.mark.parametrize("override, message", [
    (["sde=ve"], "variance-preserving process"),
    (["loss.prediction=x0"], "loss.prediction=eps"),
])
def test_learn_sigma_refused_where_it_is_undefined(tmp_path: Path, override: List[str], message: str) -> None:
    from sde_diffusion.config import parse_train

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["data=moons", "model.learn_sigma=true", *override])
    with pytest.raises(ValueError, match=message):
        parse_train(cfg)


@pytest.mark.slow
def test_trained_digits_bound_exceeds_the_ode_nll_and_algorithm_2_matches_the_reverse_sde(tmp_path: Path) -> None:
    """On a digits model trained as `python train.py` does (shortened): bound ≥ exact PF-ODE NLL in bits/dim of the
    same examples; Algorithm 2 with N = 1000 and the reverse SDE at 1000 steps give the same digits-FD within noise."""
    from sde_diffusion import sample
    from sde_diffusion.evaluation.digits_classifier import digits_fd
    from sde_diffusion.jobs.model import load_model

    run_dir = tmp_path / "run"
    from sde_diffusion.fit import fit

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["trainer.max_steps=600", "logger=null", "callbacks.samples.enabled=false",
                                          "trainer.enable_progress_bar=false", f"run_dir={run_dir}"])
    fit("score", cfg, output_dir=run_dir)
    report = _sample(run_dir, "mode=likelihood", "likelihood.method=vlb", "n=64", "batch_size=64", f"out={tmp_path / 'll'}")
    assert report["vlb"]["bpd"]["mean"] > report["bpd"]["mean"]
    assert report["vlb"]["bound_minus_ode_bpd"]["mean"] > 2 * report["vlb"]["bound_minus_ode_bpd"]["stderr"]
    model = load_model(run_dir)
    score = model.score_model()
    fds = {}
    for name, opts in [("ddpm", {}), ("euler_maruyama", {})]:
        vals = []
        for seed in range(2):
            res = sample(model.sde, score, (256, 1, 8, 8), sampler=name, steps=1000,
                         generator=torch.Generator().manual_seed(seed), **opts)
            vals.append(digits_fd(res.samples.clamp(-1, 1)))
        fds[name] = vals
    spread = max(abs(fds["ddpm"][0] - fds["ddpm"][1]), abs(fds["euler_maruyama"][0] - fds["euler_maruyama"][1]), 0.5)
    assert abs(np.mean(fds["ddpm"]) - np.mean(fds["euler_maruyama"])) < 3 * spread
