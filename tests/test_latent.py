"""Latent score models: DSM on the scaled posterior means of a frozen autoencoder, sampling through
its decoder, latent likelihoods, and the refusal of any other autoencoder."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from helpers import CONF, QUIET_TRAINING
from sde_diffusion import sample
from sde_diffusion.guidance import ClassifierFreeGuidance
from sde_diffusion.jobs import cli, run
from sde_diffusion.jobs.model import load_model
from sde_diffusion.latent import load_latent_codec, weights_digest
from sde_diffusion.samplers import SAMPLERS

pytestmark = pytest.mark.usefixtures("single_thread")


def _compose(name: str, overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.fixture(scope="module")
def latent_run(ae_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A class-conditional score model on the latents of ``ae_run`` (3 steps)."""
    from sde_diffusion.tasks.score_matching import train

    run_dir = tmp_path_factory.mktemp("latent") / "run"
    cfg = _compose("train", QUIET_TRAINING + [
        f"latent={ae_run}", "data=digits", "data.size=16", "data.batch_size=32", "model.ch=8", "trainer.max_steps=3",
        "conditioning.class_labels=true", "model.zero_init=false", "optim.warmup_steps=0", f"run_dir={run_dir}",
    ])
    train(cfg, run_dir)
    return run_dir


def test_latent_run_records_its_autoencoder(ae_run: Path, latent_run: Path) -> None:
    ckpt = torch.load(latent_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    info = ckpt["hyper_parameters"]["latent"]
    codec = load_latent_codec(ae_run)
    assert info["weights_sha256"] == codec.weights_sha256 == weights_digest(codec.autoencoder.state_dict())
    assert info["latent_shape"] == [2, 8, 8] and info["data_shape"] == [1, 16, 16]
    ae_ckpt = torch.load(ae_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert info["scale_factor"] == pytest.approx(ae_ckpt["latent"]["scale_factor"])
    # The autoencoder is not part of the score checkpoint: only the score network's weights are.
    assert all(k.startswith("net.") for k in ckpt["state_dict"])
    model = load_model(latent_run)
    assert model.is_latent and model.model_shape == (2, 8, 8) and model.data_shape == (1, 16, 16)
    # The score model is trained on c · mean(q(z | x)): the codec's encoding.
    x = model.build_datamodule({}).reference(4)
    with torch.no_grad():
        mean, _ = codec.autoencoder.encode(x)
    torch.testing.assert_close(model.module.to_model_space(x), mean * info["scale_factor"])
    assert model.module.codec.log_det_scale == pytest.approx(2 * 8 * 8 * math.log(info["scale_factor"]))


def test_every_sampler_and_guidance_run_on_a_latent_model(latent_run: Path) -> None:
    model = load_model(latent_run)
    score = model.score_model(use_ema=True)
    y = torch.arange(4) % 10
    for name in SAMPLERS.names():
        out = sample(model.sde, lambda x, t: score(x, t, y=y), (4, *model.model_shape), sampler=name, steps=2,
                     generator=torch.Generator().manual_seed(0))
        images = model.module.to_data(out.samples)
        assert images.shape == (4, 1, 16, 16) and torch.isfinite(images).all(), name
    cfg_score = ClassifierFreeGuidance(score, y=y, scale=2.0, null_label=model.num_classes)
    out = sample(model.sde, cfg_score, (4, *model.model_shape), sampler="dpm_solver", steps=3,
                 generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(model.module.to_data(out.samples)).all()


def test_sample_py_decodes_latents_and_refuses_pixel_tasks(latent_run: Path, tmp_path: Path) -> None:
    base = [f"ckpt={latent_run}", "progress=false", "sampler=euler_maruyama", "steps=2", "n=3", "batch_size=3"]
    report = run(_compose("sample", base + [f"out={tmp_path / 's'}", "guidance.scale=1", "label=5"]))
    with np.load(tmp_path / "s" / "samples.npz") as z:
        assert z["samples"].shape == (3, 16, 16, 1) and z["samples"].dtype == np.uint8  # decoded images
        latents = z["latents"]
    assert latents.shape == (3, 2, 8, 8) and np.isfinite(latents).all()
    assert report["shape"] is not None
    # A fitted grid on a latent model still decodes (this 3-step model's samples give no Gaussian start; a start on
    # samples of that shape: tests/test_gaussian_start.py).
    fitted = run(_compose("sample", base + ["sampler=ddim", "steps=5", "schedule=fit", f"out={tmp_path / 'f'}"]))
    stored = json.loads(Path(fitted["sampler"]["schedule"]["source"]).read_text())
    assert stored["start"] is None and stored["times"][0] == 1.0 and fitted["sampler"]["schedule"]["start_level"] is None
    with np.load(tmp_path / "f" / "samples.npz") as z:
        assert z["samples"].shape == (3, 16, 16, 1) and z["latents"].shape == (3, 2, 8, 8)
    with pytest.raises(ValueError, match="latent score model"):
        run(cli.compose(base + ["task=inpaint", f"out={tmp_path / 'i'}"], CONF))
    with pytest.raises(ValueError, match="not a noisy-classifier checkpoint"):
        run(_compose("sample", base + [f"guidance.classifier={latent_run}", "label=3", f"out={tmp_path / 'c'}"]))


# ---------------------------------------------------------------------------------- classifier guidance on latents
@pytest.fixture(scope="module")
def latent_classifier(ae_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A noisy classifier on the scaled latents of ``ae_run``, trained long enough to beat chance."""
    from sde_diffusion.fit import fit

    run_dir = tmp_path_factory.mktemp("latent_clf") / "run"
    cfg = _compose("train", QUIET_TRAINING + [
        "task=classifier", f"latent={ae_run}", "data=digits", "data.size=16", "data.batch_size=64", "model.ch=16",
        "trainer.max_steps=150", "optim.warmup_steps=0", "classifier.eval_buckets=4", "classifier.eval_repeats=1",
        f"run_dir={run_dir}",
    ])
    fit(None, cfg, run_dir)
    return run_dir


def test_latent_classifier_learns_the_labels_from_latents(ae_run: Path, latent_classifier: Path) -> None:
    from sde_diffusion.tasks.classifier import accuracy_by_time, load_classifier

    ckpt = torch.load(latent_classifier / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    codec = load_latent_codec(ae_run)
    assert ckpt["hyper_parameters"]["latent"]["weights_sha256"] == codec.weights_sha256
    assert not any(k.startswith("codec") or "encoder" in k for k in ckpt["state_dict"])  # the autoencoder stays out
    clf = load_classifier(latent_classifier)
    assert clf.model_shape == (2, 8, 8) and clf.data_shape == (1, 16, 16)
    with torch.no_grad():
        assert clf(torch.zeros(3, 2, 8, 8), 0.5).shape == (3, 10)
    with pytest.raises(ValueError):
        clf(torch.zeros(3, 1, 16, 16), 0.5)  # pixels are not its input
    # Held-out accuracy on encoded digits, recomputed independently of the training job's table:
    # well above chance (10 %) at low noise, and near chance at t = T, where x_T forgets x_0.
    from sde_diffusion.config import instantiate
    from sde_diffusion.registry import DATASETS

    dm = instantiate({**ckpt["hyper_parameters"]["cfg"]["data"], "batch_size": 256}, DATASETS, key="data")
    dm.setup("fit")
    batches = [(codec.encode(x), y) for x, y, *_ in dm.val_dataloader()]
    rows = accuracy_by_time(clf, clf.sde, batches, num_buckets=5, repeats=1, generator=torch.Generator().manual_seed(0))
    assert rows[0].accuracy > 0.5, rows
    assert rows[-1].accuracy < rows[0].accuracy - 0.2, rows
    table = json.loads((latent_classifier / "accuracy_by_t.json").read_text())["buckets"]
    assert table[0]["accuracy"] > 0.5  # the job's own table was computed on latents too


def test_classifier_guidance_on_a_latent_model(latent_run: Path, latent_classifier: Path, tmp_path: Path) -> None:
    base = [f"ckpt={latent_run}", "progress=false", "sampler=euler_maruyama", "steps=2", "n=3", "batch_size=3"]
    report = run(_compose("sample", base + [f"guidance.classifier={latent_classifier}", "label=3",
                                            "guidance.classifier_scale=2", f"out={tmp_path / 'g'}"]))
    assert report["shape"] is not None
    with np.load(tmp_path / "g" / "samples.npz") as z:
        assert z["samples"].shape == (3, 16, 16, 1) and z["latents"].shape == (3, 2, 8, 8)
    # The guidance term is the latent classifier's gradient: log p(3 | u_t) rises along it.
    from sde_diffusion.tasks.classifier import load_classifier
    from sde_diffusion.guidance import ClassifierGuidance

    model, clf = load_model(latent_run), load_classifier(latent_classifier)
    u = torch.randn(8, 2, 8, 8)
    t = torch.full((8,), 0.3)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731 - the guidance term alone
    grad = ClassifierGuidance(zero, clf, y=torch.full((8,), 3), scale=1.0)(u, t)
    with torch.no_grad():
        before = clf.log_prob(u, t)[:, 3]
        after = clf.log_prob(u + 1e-2 * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1), t)[:, 3]
    assert (after > before).all()
    assert model.is_latent

    # A classifier on pixels, or on another autoencoder's latents, is refused before any weights load.
    def doctored(name: str, edit) -> Path:
        path = tmp_path / name / "last.ckpt"
        path.parent.mkdir()
        ckpt = torch.load(latent_classifier / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        edit(ckpt["hyper_parameters"])
        torch.save(ckpt, path)
        return path

    pixel = doctored("pixel", lambda hp: hp.update(latent=None))
    with pytest.raises(ValueError, match="works on autoencoder latents, but the classifier .* was trained on pixels.*latent="):
        run(_compose("sample", base + [f"guidance.classifier={pixel}", "label=3", f"out={tmp_path / 'p'}"]))
    other = doctored("other", lambda hp: hp.update(latent={**hp["latent"], "weights_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="latents of another autoencoder"):
        run(_compose("sample", base + [f"guidance.classifier={other}", "label=3", f"out={tmp_path / 'o'}"]))


def test_a_latent_classifier_is_refused_for_a_pixel_model(latent_classifier: Path) -> None:
    from types import SimpleNamespace

    from sde_diffusion.jobs.model import check_same_space as _check_same_space

    clf_latent = torch.load(latent_classifier / "checkpoints" / "last.ckpt", map_location="cpu",
                            weights_only=False)["hyper_parameters"]["latent"]
    pixel_model = SimpleNamespace(is_latent=False, path=Path("pixel.ckpt"), module=SimpleNamespace(hparams={}))
    with pytest.raises(ValueError, match="trained on autoencoder latents .* but the score model pixel.ckpt works on pixels"):
        _check_same_space(clf_latent, pixel_model, Path("clf.ckpt"))
    _check_same_space(None, pixel_model, Path("clf.ckpt"))  # pixels and pixels: accepted


def test_likelihood_of_a_latent_model_is_a_latent_density(latent_run: Path, tmp_path: Path) -> None:
    report = run(_compose("sample", [f"ckpt={latent_run}", "progress=false", "mode=likelihood", "n=2", "batch_size=2",
                                     "likelihood.solver=euler", "likelihood.steps=2", f"out={tmp_path}"]))
    assert report["bpd"] is None and "latent" in report["what"] and report["latent"]["latent_shape"] == [2, 8, 8]
    assert report["divergence"]["used"] == "hutchinson"  # D = 128 latent dimensions
    with np.load(tmp_path / "likelihood.npz") as z:
        shift = 128 * math.log(report["latent"]["scale_factor"])
        np.testing.assert_allclose(z["logp_z"], z["logp"] + shift, rtol=1e-6)
    assert report["nll_unscaled_latent_nats"]["mean"] == pytest.approx(report["nll_nats"]["mean"] - shift)


def test_another_autoencoder_is_refused(ae_run: Path, latent_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(ae_run, other)
    path = other / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    key = next(k for k in ckpt["state_dict"] if k.startswith("net.encoder"))
    ckpt["state_dict"][key] = ckpt["state_dict"][key] + 1e-3
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="is not the autoencoder this score model was trained with"):
        load_model(latent_run, latent=str(other))
    # The right one, moved elsewhere, is accepted.
    moved = tmp_path / "moved"
    shutil.copytree(ae_run, moved)
    assert load_model(latent_run, latent=str(moved)).module.codec.path == (moved / "checkpoints" / "last.ckpt").resolve()
    # Resuming the score run on another autoencoder is refused as well.
    from sde_diffusion.tasks.score_matching import train

    copy = tmp_path / "resume"
    shutil.copytree(latent_run, copy)
    cfg = _compose("train", QUIET_TRAINING + [
        f"latent={other}", "data=digits", "data.size=16", "data.batch_size=32", "model.ch=8", "trainer.max_steps=4",
        "conditioning.class_labels=true", "model.zero_init=false", "optim.warmup_steps=0", f"run_dir={copy}", "resume=true",
    ])
    with pytest.raises(ValueError, match="is not the autoencoder"):
        train(cfg, copy)
    assert json.loads((latent_run / "finished.json").read_text())["task"] == "score"


class _IdentityAutoencoder(torch.nn.Module):
    """encode(x) = (x, 0), decode(z) = z: the latent path with nothing in between."""

    def __init__(self, shape) -> None:
        super().__init__()
        self.data_shape = self.latent_shape = tuple(shape)
        self.unused = torch.nn.Parameter(torch.zeros(1))  # gives the codec a device and dtype to follow

    def encode(self, x):
        return x, torch.zeros_like(x)

    def decode(self, z):
        return z


def test_identity_autoencoder_reduces_the_latent_path_to_the_pixel_path_bit_for_bit() -> None:
    from sde_diffusion.latent import LatentCodec
    from sde_diffusion.tasks.score_matching import ScoreDiffusion

    cfg = _compose("train", ["data=digits", "model.ch=8", "run_dir=unused"])
    torch.manual_seed(0)
    pixel = ScoreDiffusion(cfg, (1, 8, 8))
    torch.manual_seed(0)
    latent = ScoreDiffusion(cfg, (1, 8, 8))
    latent.__dict__["codec"] = LatentCodec(_IdentityAutoencoder((1, 8, 8)), scale_factor=1.0)
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    batch = (x, torch.arange(16) % 10)
    with pytest.warns(UserWarning):  # self.log outside a Trainer
        a, b = pixel.training_step(batch, 0), latent.training_step(batch, 0)
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["t"], b["t"])
    for sampler in ("euler_maruyama", "dpm_solver"):
        outs = [m.to_data(sample(m.sde, m.score_fn(use_ema=False), (4, *m.model_shape), sampler=sampler, steps=3,
                                 generator=torch.Generator().manual_seed(2)).samples) for m in (pixel.eval(), latent.eval())]
        assert torch.equal(outs[0], outs[1])
