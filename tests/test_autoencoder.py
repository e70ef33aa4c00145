"""The KL-regularised autoencoder: its KL term against torch.distributions, shapes for several f and c."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from helpers import CONF
from helpers import autoencoder_cfg as _cfg
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

from sde_diffusion.models import KLAutoencoder, kl_to_standard_normal


def test_kl_term_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64) * 2
    logvar = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64) * 1.5
    truth = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(torch.zeros_like(mean), torch.ones_like(mean)))
    torch.testing.assert_close(kl_to_standard_normal(mean, logvar), truth.reshape(5, -1).sum(1), rtol=1e-12, atol=1e-12)
    assert torch.equal(kl_to_standard_normal(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2))


@pytest.mark.parametrize(
    "shape, ch_mult, c, latent",
    [
        ((1, 32, 32), (1, 2, 2), 4, (4, 8, 8)),      # f = 4
        ((1, 32, 32), (1, 2, 2, 2), 2, (2, 4, 4)),   # f = 8
        ((3, 16, 24), (1, 2), 3, (3, 8, 12)),        # f = 2, non-square RGB
        ((1, 8, 8), (1,), 1, (1, 8, 8)),             # f = 1
    ],
)
def test_encode_decode_shapes(shape, ch_mult, c, latent):
    ae = KLAutoencoder(shape, latent_channels=c, ch=8, ch_mult=ch_mult)
    x = torch.randn(2, *shape)
    mean, logvar = ae.encode(x)
    assert mean.shape == logvar.shape == (2, *latent) and ae.latent_shape == latent
    assert ae.factor == 2 ** (len(ch_mult) - 1)
    x_hat, m2, _ = ae(x, generator=torch.Generator().manual_seed(1))
    assert x_hat.shape == x.shape and torch.equal(m2, mean)
    with pytest.raises(ValueError, match="the decoder takes latents"):
        ae.decode(torch.zeros(1, c + 1, *latent[1:]))


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="not divisible by the downsampling factor f = 8"):
        KLAutoencoder((1, 20, 20), ch_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match=r"data_shape \(C, H, W\)"):
        KLAutoencoder((2,))


# ---------------------------------------------------------------------------------- task=autoencoder (the ae_run fixture: conftest)


def test_autoencoder_run_learns_and_records_its_latent_scale(ae_run: Path) -> None:
    from sde_diffusion.data.digits import DigitsDataModule
    from sde_diffusion.config import parse_train
    from sde_diffusion.tasks.autoencoder import autoencoder_network, load_autoencoder

    ckpt = torch.load(ae_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["kind"] == "autoencoder" and ckpt["global_step"] == 120
    assert json.loads((ae_run / "finished.json").read_text())["task"] == "autoencoder"
    assert (ae_run / "reconstructions" / "latest.png").stat().st_size > 500
    ae = load_autoencoder(ae_run)
    assert ae.net.latent_shape == (2, 8, 8) and ae.net.factor == 2
    # The recorded scale is the std of the posterior means of the training examples: recompute it.
    dm = DigitsDataModule(size=16, batch_size=500)
    dm.setup("fit")
    with torch.no_grad():
        means = torch.cat([ae.net.encode(b[0])[0] for b in dm.eval_loader("train")])
    assert ckpt["latent"]["std"] == pytest.approx(float(means.double().std(unbiased=False)), rel=1e-5)
    assert ckpt["latent"]["scale_factor"] == pytest.approx(1 / ckpt["latent"]["std"])
    # It learned: the decoded posterior means are far closer to the data than the untrained network's.
    x = next(iter(dm.eval_loader("val")))[0][:200]
    fresh = autoencoder_network(parse_train(ae.cfg).autoencoder, (1, 16, 16))
    with torch.no_grad():
        err = (ae.net.decode(ae.net.encode(x)[0]) - x).abs().mean()
        err0 = (fresh.decode(fresh.encode(x)[0]) - x).abs().mean()
    assert float(err) < 0.5 * float(err0)


def test_autoencoder_resumes_and_refuses_other_options(ae_run: Path, tmp_path: Path) -> None:
    import shutil

    from sde_diffusion.fit import fit

    run = tmp_path / "copy"
    shutil.copytree(ae_run, run)
    res = fit(None, _cfg(run, "trainer.max_steps=130", "resume=true"), run)
    assert res.trainer.global_step == 130
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 130
    with pytest.raises(ValueError, match="autoencoder options differ"):
        fit(None, _cfg(run, "trainer.max_steps=140", "resume=true", "autoencoder.beta=0.5"), run)


def test_sample_py_refuses_an_autoencoder_checkpoint(ae_run: Path) -> None:
    from sde_diffusion.jobs import run

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("sample", overrides=[f"ckpt={ae_run}", "progress=false"])
    with pytest.raises(ValueError, match="is an autoencoder checkpoint .* draws no samples"):
        run(cfg)
