"""FID / IS / KID at the paper's protocol: the scores (evaluation/scores.py), the cached real statistics
(evaluation/feature_stats.py), mode=metrics with the Inception path, the checkpoint sweep and the
periodic evaluation during training (jobs/metrics_job.py, callbacks.PeriodicMetrics)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sde_diffusion.evaluation.feature_stats import reference_statistics
from sde_diffusion.evaluation.scores import inception_score, kernel_inception_distance
from sde_diffusion.metrics import fid_from_features

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


# ----------------------------------------------------------------------------- IS and KID
def test_inception_score_of_confident_balanced_and_of_constant_predictions():
    k = 10
    eye = torch.eye(k).repeat(20, 1)                       # one-hot, every class equally often
    assert inception_score(eye, splits=10)[0] == pytest.approx(k, rel=1e-9)
    same = torch.full((200, k), 1.0 / k)                   # no information: IS = 1
    assert inception_score(same, splits=4) == pytest.approx((1.0, 0.0), abs=1e-12)
    # Two classes, p(y|x) = (0.9, 0.1) or (0.1, 0.9) half each: IS = exp(KL((0.9, 0.1) || (0.5, 0.5))).
    p = torch.tensor([[0.9, 0.1], [0.1, 0.9]], dtype=torch.float64).repeat(50, 1)
    kl = 0.9 * np.log(0.9 / 0.5) + 0.1 * np.log(0.1 / 0.5)
    assert inception_score(p, splits=1)[0] == pytest.approx(np.exp(kl), rel=1e-9)


def test_kid_is_the_unbiased_cubic_kernel_mmd():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(30, 4, generator=g, dtype=torch.float64) + 0.5
    k = lambda a, b: (float(a @ b) / 4 + 1) ** 3  # noqa: E731
    n = 30
    brute = (sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
             + sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
             - 2 * sum(k(x[i], y[j]) for i in range(n) for j in range(n)) / n**2)
    kid, std = kernel_inception_distance(x, y, subsets=1, subset_size=30)
    assert kid == pytest.approx(brute, rel=1e-9) and std == 0.0
    # Same distribution: unbiased, so the mean over subsets scatters around 0, far below a shifted pair.
    a, b = torch.randn(2000, 8, generator=g), torch.randn(2000, 8, generator=g)
    same, _ = kernel_inception_distance(a, b, subsets=20, subset_size=500)
    shifted, _ = kernel_inception_distance(a, b + 0.3, subsets=20, subset_size=500)
    assert abs(same) < 0.01 < shifted


# ----------------------------------------------------------------------------- cached statistics
class _CountingEvaluator:
    name = "counting"

    def __init__(self, digest: str = "d" * 64) -> None:
        self.digest, self.calls = digest, 0

    def features(self, images01):
        self.calls += 1
        return images01.reshape(images01.shape[0], -1)[:, :6].double()


def test_reference_statistics_are_cached_per_data_digest_and_weights(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = torch.rand(50, 1, 4, 4, generator=g)
    chunks = lambda: iter([data[:25], data[25:]])  # noqa: E731
    ev = _CountingEvaluator()
    first = reference_statistics(ev, "toy", chunks, 50, cache=tmp_path)
    assert not first.loaded and ev.calls == 2
    feats = data.reshape(50, -1)[:, :6].double()
    torch.testing.assert_close(first.mu, feats.mean(0))
    again = reference_statistics(ev, "toy", chunks, 50, cache=tmp_path)
    assert again.loaded and ev.calls == 2 and again.path == first.path
    torch.testing.assert_close(again.sigma, first.sigma)
    other = reference_statistics(ev, "toy", lambda: iter([data[:25] * 0.5, data[25:]]), 50, cache=tmp_path)
    assert not other.loaded and other.path != first.path          # other data: another digest
    new_weights = reference_statistics(_CountingEvaluator("e" * 64), "toy", chunks, 50, cache=tmp_path)
    assert not new_weights.loaded and new_weights.path != first.path


# ----------------------------------------------------------------------------- the Inception path
class _TinyInception(torch.nn.Module):
    """The TorchScript Inception's call signature: pool features, or softmax probabilities without the output bias."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(6, 5)

    def forward(self, img: torch.Tensor, return_features: bool = False, no_output_bias: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(img.to(torch.float32), size=(8, 8), mode="bilinear", align_corners=False)
        x = (x - 128.0) / 128.0
        f = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], 1)
        if return_features:
            return f
        logits = f @ self.head.weight.t()
        if not no_output_bias:
            logits = logits + self.head.bias
        return torch.softmax(logits, dim=1)


def test_fid_is_kid_with_a_local_inception_file_use_the_cache_and_warn_below_10k(tmp_path, monkeypatch, capsys):
    from sde_diffusion.config import instantiate
    from sde_diffusion.jobs.metrics_job import fid_metrics, reference_chunks
    from sde_diffusion.jobs.shards import batch_seed
    from sde_diffusion.registry import DATASETS

    torch.manual_seed(0)
    weights = tmp_path / "inception.pt"
    net = _TinyInception()
    torch.jit.script(net).save(str(weights))
    dm = instantiate({"name": "digits", "size": 8}, DATASETS, key="data")
    dm.setup()
    g = torch.Generator().manual_seed(1)
    fake = torch.rand(40, 1, 8, 8, generator=g)
    out = fid_metrics(fake, dm, 300, str(weights), 0, torch.device("cpu"), stats_cache=str(tmp_path / "stats"))
    real = torch.cat(list(reference_chunks(dm, 300, batch_seed(0, "metrics-ref", 0))))
    q = lambda x: torch.round(x.clamp(0, 1) * 255).expand(-1, 3, -1, -1)  # noqa: E731 - 8-bit RGB, as the wrapper
    assert out["fid"] == pytest.approx(fid_from_features(net(q(real), True).double(), net(q(fake), True).double()), rel=1e-6)
    assert out["is"] == pytest.approx(inception_score(net(q(fake), no_output_bias=True).double(), splits=10)[0], rel=1e-6)
    assert out["fid_reference"] == 300 and not out["reference_stats_cached"]
    assert "biased upward" in out["warning"] and "biased upward" in capsys.readouterr().err
    again = fid_metrics(fake, dm, 300, str(weights), 0, torch.device("cpu"), stats_cache=str(tmp_path / "stats"))
    assert again["reference_stats_cached"] and again["fid"] == pytest.approx(out["fid"], rel=1e-9)
    assert again["kid"] == pytest.approx(out["kid"], rel=1e-9)


def test_missing_inception_weights_leave_fid_null_with_the_instruction(tmp_path, monkeypatch):
    from sde_diffusion.jobs.metrics_job import fid_metrics

    monkeypatch.setenv("SDE_DIFFUSION_CACHE", str(tmp_path))
    monkeypatch.delenv("SDE_DIFFUSION_INCEPTION", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    out = fid_metrics(torch.rand(4, 3, 8, 8), None, 10, None, 0, torch.device("cpu"))
    assert out["fid"] is None and "inception-2015-12-05.pt" in out["fid_unavailable"]


# ----------------------------------------------------------------------------- the sweep
def _train_digits(run_dir: Path, *extra: str) -> Path:
    from hydra import compose, initialize_config_dir

    from sde_diffusion.fit import fit

    over = ["data=digits", "model=unet_small", "model.ch=8", "data.batch_size=16", "trainer.max_steps=4",
            "logger=csv", "callbacks.samples.enabled=false", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "callbacks.loss_by_t.every_n_steps=0", "model.zero_init=false",
            "optim.warmup_steps=0", "optim.lr=1e-3", "callbacks.checkpoint.every_n_steps=2", f"run_dir={run_dir}", *extra]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=over)
    fit("score", cfg, output_dir=run_dir)
    return run_dir


@pytest.fixture(scope="module")
def swept_run(tmp_path_factory):
    torch.set_num_threads(1)
    return _train_digits(tmp_path_factory.mktemp("sweep") / "run", "callbacks.metrics.every_n_steps=2",
                         "callbacks.metrics.num_samples=16", "callbacks.metrics.steps=3")


def _metrics_cfg(run: Path, *extra: str):
    from sde_diffusion.jobs import cli

    return cli.compose([f"ckpt={run}", "progress=false", "mode=metrics", "sampler=euler_maruyama", "steps=3", "n=24",
                        "batch_size=24", "figures=false", *extra], CONF)


def test_checkpoint_sweep_scores_every_checkpoint_reports_the_best_and_resumes(swept_run, tmp_path, capsys):
    from sde_diffusion.evaluation.digits_classifier import digits_fd
    from sde_diffusion.jobs import run
    from sde_diffusion.jobs.model import load_model
    from sde_diffusion.jobs.sample_job import from_stored

    out = tmp_path / "sweep"
    summary = run(_metrics_cfg(swept_run, "checkpoints=all", f"out={out}"))
    assert [r["step"] for r in summary["rows"]] == [2, 4] and summary["metric"] == "digits_fd"
    dm = load_model(swept_run).build_datamodule()
    for row in summary["rows"]:
        with np.load(out / f"step_{row['step']:07d}" / "samples.npz") as z:
            x = from_stored(z["samples"], dm)
        assert row["digits_fd"] == pytest.approx(digits_fd(x), rel=1e-6)   # recomputed from the stored samples
    best = min(summary["rows"], key=lambda r: r["digits_fd"])
    assert summary["best"]["step"] == best["step"]
    assert json.loads((out / "sweep.json").read_text())["best"]["step"] == best["step"]
    # Resumable: a finished checkpoint is not sampled again; a removed result is recomputed from its shards.
    stamp = (out / "step_0000002.json").stat().st_mtime_ns
    (out / "step_0000004.json").unlink()
    capsys.readouterr()
    again = run(_metrics_cfg(swept_run, "checkpoints=all", f"out={out}"))
    assert "step 2: done before" in capsys.readouterr().out
    assert (out / "step_0000002.json").stat().st_mtime_ns == stamp
    assert again["rows"][1]["digits_fd"] == pytest.approx(summary["rows"][1]["digits_fd"], rel=1e-12)


def test_sweep_is_refused_outside_metrics_mode(swept_run):
    from sde_diffusion.config import parse_sample
    from sde_diffusion.jobs import cli

    with pytest.raises(ValueError, match="checkpoints=all.*mode=metrics"):
        parse_sample(cli.compose([f"ckpt={swept_run}", "checkpoints=all"], CONF))


def test_periodic_metrics_during_training_are_logged_and_written(swept_run):
    lines = [json.loads(x) for x in (swept_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4]
    assert all(r["n"] == 16 and r["digits_fd"] > 0 and r["digits_is"] >= 1 for r in lines)
    csv = next(swept_run.glob("logs/**/metrics.csv")).read_text()
    assert "metrics/digits_fd" in csv
