"""Sample metrics against analytic values and null distributions; the digits classifier; FID loading."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.linalg import sqrtm
from scipy.stats import wasserstein_distance

from sde_diffusion import metrics
from sde_diffusion.evaluation import digits_classifier as dc
from sde_diffusion.evaluation.inception import ENV_INCEPTION, INCEPTION_FILENAME, INCEPTION_URL, InceptionWeightsMissing
from sde_diffusion.metrics import fid_from_features, frechet_distance, gaussian_stats, mmd, sliced_wasserstein, wasserstein_1d


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small kernels on a shared 2-core machine: extra threads only add contention.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gauss(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:, 0] += shift
    return x


# ---------------------------------------------------------------------- 1-D and sliced Wasserstein
def test_wasserstein_1d_hand_computed_and_scipy():
    a = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    b = torch.tensor([[0.0], [0.5], [1.0]], dtype=torch.float64)
    # Quantile functions differ by 0.5 on u ∈ (1/3, 2/3]: W1 = 1/6, W2² = 1/12.
    assert wasserstein_1d(a, b, p=1).item() == pytest.approx(1 / 6)
    assert wasserstein_1d(a, b, p=2).item() == pytest.approx(1 / 12)
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=37), rng.normal(0.3, 2.0, size=53)
    ours = wasserstein_1d(torch.from_numpy(u)[:, None], torch.from_numpy(v)[:, None], p=1).item()
    assert ours == pytest.approx(wasserstein_distance(u, v), rel=1e-10)


def test_sliced_wasserstein_of_a_shift_is_norm_over_sqrt_d():
    # Population value for N(0, I) vs N(δ, I): SW_2² = E_θ (θᵀδ)² = ‖δ‖²/D.
    d, shift = 4, 1.0
    x = _gauss(2000, d, 0)
    y = _gauss(2000, d, 1, shift=shift)
    sw = sliced_wasserstein(x, y, n_projections=500, generator=torch.Generator().manual_seed(0))
    # Finite-sample W between independent draws adds a small positive bias (≈ 0.03 here).
    assert sw == pytest.approx(shift / math.sqrt(d), abs=0.05)


def test_sliced_wasserstein_null_and_alternative():
    x, y = _gauss(300, 5, 2), _gauss(300, 5, 3)
    shifted = _gauss(300, 5, 4, shift=1.0)
    pooled = torch.cat([x, y])
    null = []
    for i in range(20):
        perm = torch.randperm(600, generator=torch.Generator().manual_seed(100 + i))
        null.append(sliced_wasserstein(pooled[perm[:300]], pooled[perm[300:]], generator=torch.Generator().manual_seed(0)))
    same = sliced_wasserstein(x, y, generator=torch.Generator().manual_seed(0))
    alt = sliced_wasserstein(x, shifted, generator=torch.Generator().manual_seed(0))
    assert same <= 1.5 * max(null)
    assert alt > 2 * max(null)


# ---------------------------------------------------------------------- MMD
def _mmd_reference(x: np.ndarray, y: np.ndarray, h: float) -> float:
    def k(a, b):
        return math.exp(-np.sum((a - b) ** 2) / (2 * h * h))

    n, m = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    sxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return sxx + syy - 2 * sxy


def test_mmd_matches_the_unbiased_formula():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(5, 2)), rng.normal(1.0, 1.0, size=(4, 2))
    assert mmd(x, y, bandwidths=[0.7]) == pytest.approx(_mmd_reference(x, y, 0.7), rel=1e-12)
    both = _mmd_reference(x, y, 0.7) + _mmd_reference(x, y, 2.0)
    assert mmd(x, y, bandwidths=[0.7, 2.0]) == pytest.approx(both, rel=1e-12)


def test_mmd_is_unbiased_under_the_null_and_detects_a_shift():
    vals = np.array([mmd(_gauss(100, 3, 2 * i), _gauss(100, 3, 2 * i + 1), bandwidths=[1.0, 2.0]) for i in range(30)])
    # Unbiased: the mean over independent null pairs is zero within its standard error.
    assert abs(vals.mean()) < 4 * vals.std(ddof=1) / math.sqrt(len(vals))
    alt = mmd(_gauss(100, 3, 500), _gauss(100, 3, 501, shift=1.0), bandwidths=[1.0, 2.0])
    assert alt > vals.mean() + 10 * vals.std(ddof=1)


def test_mmd_kernels_and_errors():
    x, y = _gauss(50, 2, 0), _gauss(50, 2, 1, shift=2.0)
    assert mmd(x, y, kernel="imq") > 0.1
    with pytest.raises(ValueError, match="kernel"):
        mmd(x, y, kernel="poly")
    with pytest.raises(ValueError, match="bandwidths"):
        mmd(x, y, bandwidths=[-1.0])
    with pytest.raises(ValueError, match="same number of features"):
        mmd(x, _gauss(50, 3, 2))


# ---------------------------------------------------------------------- Fréchet distance
def test_frechet_distance_analytic_cases():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(6, 6))
    cov = a @ a.T + 0.1 * np.eye(6)
    mu = rng.normal(size=6)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-9)
    delta = rng.normal(size=6)
    assert frechet_distance(mu, cov, mu + delta, cov) == pytest.approx(float(delta @ delta), rel=1e-9)
    # Commuting (diagonal) covariances: Σ (√a_i − √b_i)².
    va, vb = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = float(((np.sqrt(va) - np.sqrt(vb)) ** 2).sum())
    assert frechet_distance(mu, np.diag(va), mu, np.diag(vb)) == pytest.approx(expected, rel=1e-9)
    # General case against scipy's sqrtm of Σ₁Σ₂.
    b = rng.normal(size=(6, 6))
    cov2 = b @ b.T
    ref = float(np.trace(cov) + np.trace(cov2) - 2 * np.trace(sqrtm(cov @ cov2)).real)
    assert frechet_distance(mu, cov, mu, cov2) == pytest.approx(ref, rel=1e-8)


def test_frechet_distance_singular_covariance_is_finite():
    cov = np.diag([1.0, 0.0, 0.0])
    assert frechet_distance(np.zeros(3), cov, np.zeros(3), cov) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(3), cov, np.zeros(2), cov)


def test_fid_from_features_uses_unbiased_covariance_and_converges():
    f = _gauss(50, 3, 0).numpy()
    mu, cov = gaussian_stats(f)
    assert np.allclose(cov.numpy(), np.cov(f, rowvar=False))
    big1, big2 = _gauss(20000, 3, 1), _gauss(20000, 3, 2, shift=1.0)
    # Population value ‖Δμ‖² = 1; sampling error of the fits is O(D/N).
    assert fid_from_features(big1, big2) == pytest.approx(1.0, abs=0.02)


# ---------------------------------------------------------------------- digits classifier
@pytest.fixture(scope="session")
def digits_clf(tmp_path_factory):
    path = tmp_path_factory.mktemp("digits_cache") / dc.FILENAME
    clf = dc.get_classifier(path)  # trains (seeded) and stores atomically
    return clf


def test_classifier_is_cached_with_its_accuracy(digits_clf):
    assert digits_clf.path.is_file()
    state = torch.load(digits_clf.path, weights_only=True)
    assert state["accuracy"] == pytest.approx(digits_clf.accuracy)
    assert not list(digits_clf.path.parent.glob("*.tmp"))
    dc._LOADED.clear()
    reloaded = dc.get_classifier(digits_clf.path, train_if_missing=False)
    images, _ = dc.load_digits()
    assert torch.equal(reloaded.features(images[:50]), digits_clf.features(images[:50]))


def test_classifier_held_out_accuracy(digits_clf):
    images, labels = dc.load_digits()
    _, test_idx = dc.split_indices(images.shape[0])
    acc = (dc.classify(images[test_idx], classifier=digits_clf) == labels[test_idx]).double().mean().item()
    assert acc >= 0.9
    assert acc == pytest.approx(digits_clf.accuracy)
    flat = dc.classify(images[test_idx].reshape(-1, 64), classifier=digits_clf)
    assert torch.equal(flat, dc.classify(images[test_idx], classifier=digits_clf))


def test_digits_fd_zero_on_itself_small_on_halves_large_on_noise(digits_clf):
    images, _ = dc.load_digits()
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))
    a, b = images[perm[:900]], images[perm[900:]]
    assert dc.digits_fd(images, images, classifier=digits_clf) == pytest.approx(0.0, abs=1e-6)
    halves = dc.digits_fd(a, b, classifier=digits_clf)
    noise = torch.rand(900, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert dc.digits_fd(noise, b, classifier=digits_clf) > 20 * halves
    assert metrics.digits_fd(a, None, classifier=digits_clf) < dc.digits_fd(noise, None, classifier=digits_clf)


def test_digits_input_shape_error(digits_clf):
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\]"):
        dc.classify(torch.zeros(3, 1, 28, 28), classifier=digits_clf)


def test_missing_classifier_without_training_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m sde_diffusion.evaluation.digits_classifier"):
        dc.get_classifier(tmp_path / "none.pt", train_if_missing=False)


def test_command_line_writes_a_loadable_file(tmp_path, capsys):
    out = tmp_path / "clf.pt"
    assert dc.main(["--out", str(out), "--epochs", "1"]) == 0
    state = torch.load(out, weights_only=True)
    assert state["format_version"] == dc.FORMAT_VERSION and 0 <= state["accuracy"] <= 1
    assert "held-out accuracy" in capsys.readouterr().out


# ---------------------------------------------------------------------- FID wrapper
class _TinyFeatures(torch.nn.Module):
    """Stands in for the TorchScript Inception file: same call signature, 6 features."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(img.to(torch.float32), size=(8, 8), mode="bilinear", align_corners=False)
        x = (x - 128.0) / 128.0
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], 1)


def test_fid_missing_weights_message(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_INCEPTION, raising=False)
    with pytest.raises(InceptionWeightsMissing) as info:
        metrics.FID(cache=tmp_path)
    msg = str(info.value)
    assert INCEPTION_URL in msg and str(tmp_path / INCEPTION_FILENAME) in msg and ENV_INCEPTION in msg
    monkeypatch.setenv(ENV_INCEPTION, str(tmp_path / "nowhere.pt"))
    with pytest.raises(FileNotFoundError, match="does not name an existing file"):
        metrics.FID(cache=tmp_path)


def test_fid_pipeline_with_a_local_torchscript_file(tmp_path, monkeypatch):
    path = tmp_path / INCEPTION_FILENAME
    torch.jit.script(_TinyFeatures()).save(str(path))
    monkeypatch.delenv(ENV_INCEPTION, raising=False)
    fid = metrics.FID(cache=tmp_path)  # found in the cache directory
    g = torch.Generator().manual_seed(0)
    real = torch.rand(64, 3, 16, 16, generator=g)
    fake = torch.rand(64, 3, 16, 16, generator=g) * 0.6
    fid.update(real, real=True)
    fid.update(fake, real=False)
    # Independent route: 8-bit quantisation, the same features, our Fréchet distance.
    ref_feats = _TinyFeatures()
    fr = ref_feats(torch.round(real * 255))
    ff = ref_feats(torch.round(fake * 255))
    assert fid.compute() == pytest.approx(fid_from_features(fr, ff), rel=1e-4)
    same = metrics.FID(path)
    same.update(real, real=True)
    same.update((real * 255).round().to(torch.uint8), real=False)  # uint8 input is accepted
    assert same.compute() == pytest.approx(0.0, abs=1e-4)
