"""Data modules: toy sets, embedded digits, CIFAR-10 from a fake local archive, image folders."""
from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sde_diffusion.data import DATASETS, TOY_DATASETS, Toy2D
from sde_diffusion.data import cifar10 as cifar
from sde_diffusion.data.digits import DigitsDataModule, digits_resource, load_digits
from sde_diffusion.data.folder import FolderDataModule
from sde_diffusion.data.toy2d import Toy2DDataModule
from helpers import N_PER_BATCH, pixel as _pixel
from helpers import fake_cifar_members as _fake_members
from helpers import write_cifar_archive as _write_tar

CONF_DATA = Path(__file__).resolve().parents[1] / "conf" / "data"


# ====================================================================== toy 2-D sets
@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_batches_shape_dtype_labels(name):
    dm = DATASETS.build("toy2d", dataset=name, n=2000, batch_size=256, seed=1)
    assert dm.data_shape == (2,) and dm.is_image is False  # known before setup
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (256, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert y.shape == (256,) and y.dtype == torch.int64
    expected_classes = {"swiss_roll": None, "checkerboard": None, "moons": 2, "8gaussians": 8, "gmm": 8}[name]
    assert dm.num_classes == expected_classes
    if expected_classes is None:
        assert (y == 0).all()
    else:
        assert 0 <= y.min() and y.max() < expected_classes
    assert len(dm.train_set) == 2000 and len(dm.val_set) == 200


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_normalised_to_zero_mean_unit_average_variance(name):
    # The normalisation uses closed-form moments, so a large sample must match them within
    # Monte-Carlo error: 5 standard errors of the sample mean and of the mean squared norm.
    n = 200_000
    x, _ = Toy2D(name).sample(n, torch.Generator().manual_seed(0), dtype=torch.float64)
    mean = x.mean(0)
    se_mean = x.std(0) / math.sqrt(n)
    assert (mean.abs() < 5 * se_mean).all(), (mean, se_mean)
    sq = ((x - mean) ** 2).sum(1)  # E = tr Cov = 2
    assert abs(sq.mean().item() - 2.0) < 5 * sq.std().item() / math.sqrt(n)
    std = x.std(0)
    assert ((std > 0.5) & (std < 1.5)).all(), std  # roughly unit per coordinate, aspect kept


def test_toy_noise_free_geometry():
    g = torch.Generator().manual_seed(3)
    # swiss roll: x = t (cos t, sin t) with t in [1.5π, 4.5π]
    x, _ = Toy2D("swiss_roll", noise=0.0, normalize=False).sample_raw(5000, g)
    r = x.norm(dim=1)
    assert r.min() >= 1.5 * math.pi - 1e-9 and r.max() <= 4.5 * math.pi + 1e-9
    torch.testing.assert_close(x, torch.stack([r * torch.cos(r), r * torch.sin(r)], 1))
    # moons: unit half-circles around (0, 0) (upper, y=0) and (1, 0.5) (lower, y=1)
    x, y = Toy2D("moons", noise=0.0, normalize=False).sample_raw(5000, g)
    centre = torch.where(y[:, None] == 0, torch.tensor([0.0, 0.0], dtype=x.dtype), torch.tensor([1.0, 0.5], dtype=x.dtype))
    torch.testing.assert_close((x - centre).norm(dim=1), torch.ones(5000, dtype=x.dtype))
    assert (x[y == 0, 1] >= 0).all() and (x[y == 1, 1] <= 0.5).all()
    # checkerboard: only squares with floor(x1) + floor(x2) even, each holding ~1/8 of the mass
    n = 16_000
    x, _ = Toy2D("checkerboard", normalize=False).sample_raw(n, g)
    cell = torch.floor(x).long()
    assert ((cell[:, 0] + cell[:, 1]) % 2 == 0).all()
    assert x.min() >= -2 and x.max() < 2
    counts = torch.unique(cell, dim=0, return_counts=True)[1].double()
    assert counts.numel() == 8
    p = 1 / 8
    assert ((counts / n - p).abs() < 5 * math.sqrt(p * (1 - p) / n)).all()


def test_toy_reproducible_with_seed():
    a = Toy2DDataModule("moons", n=3000, seed=7, batch_size=100)
    b = Toy2DDataModule("moons", n=3000, seed=7, batch_size=100)
    c = Toy2DDataModule("moons", n=3000, seed=8, batch_size=100)
    assert torch.equal(a.train_set.x, b.train_set.x) and torch.equal(a.train_set.y, b.train_set.y)
    assert not torch.equal(a.train_set.x, c.train_set.x)
    xa, ya = next(iter(a.train_dataloader()))
    xb, yb = next(iter(b.train_dataloader()))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)  # same shuffling too
    # validation points are disjoint draws, not copies of training points
    assert torch.cdist(a.val_set.x, a.train_set.x).min() > 0


def test_toy_reference_is_a_fresh_deterministic_draw():
    dm = Toy2DDataModule("swiss_roll", n=1000, seed=0)
    r1, r2 = dm.reference(500), dm.reference(500)
    assert r1.shape == (500, 2) and r1.dtype == torch.float32
    assert torch.equal(r1, r2)
    assert torch.cdist(r1, dm.train_set.x).min() > 0  # not the training points
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(dm.reference(10, g1), dm.reference(10, g2))
    assert dm.reference(20000).abs().max() < 10  # same normalised distribution


@pytest.mark.parametrize("mixture", ["ring", "random"])
def test_gmm_labels_are_components_of_the_exact_mixture(mixture):
    dm = Toy2DDataModule("gmm", mixture=mixture, components=5, n=40_000, n_val=10, seed=2)
    gm = dm.mixture  # in model coordinates
    assert dm.num_classes == 5 and gm.num_components == 5
    torch.testing.assert_close(gm.mean(), torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)
    assert abs(torch.trace(gm.covariance()).item() - 2.0) < 1e-12
    x, y = dm.train_set.x.double(), dm.train_set.y
    for k in range(5):
        xk = x[y == k]
        se = torch.sqrt(torch.diagonal(gm.covs[k]) / xk.shape[0])
        assert ((xk.mean(0) - gm.means[k]).abs() < 5 * se).all()


def test_toy_bad_arguments():
    with pytest.raises(ValueError, match="swiss_roll, moons, 8gaussians, checkerboard, gmm"):
        Toy2DDataModule("spiral")
    with pytest.raises(ValueError, match="batch_size"):
        Toy2DDataModule("moons", batch_size=0)
    with pytest.raises(ValueError, match="noise"):
        Toy2D("moons", noise=-1.0)


def test_unknown_dataset_name_lists_choices():
    with pytest.raises(ValueError, match="cifar10, digit_pairs, digits, folder, toy2d"):
        DATASETS.build("mnist")


# ====================================================================== digits
SKLEARN_CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # sklearn.datasets.load_digits
SKLEARN_FIRST_IMAGE_ROW0 = [0, 0, 5, 13, 9, 1, 0, 0]


def test_load_digits_from_package_resources(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # must not depend on the working directory
    images, labels = load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == torch.uint8
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert images.min() == 0 and images.max() == 16
    assert torch.bincount(labels).tolist() == SKLEARN_CLASS_COUNTS
    assert images[0, 0].tolist() == SKLEARN_FIRST_IMAGE_ROW0 and labels[0] == 0
    res = digits_resource()
    assert res.name == "digits.npz" and res.is_file()
    with np.load(io.BytesIO(res.read_bytes())) as npz:
        assert np.array_equal(npz["images"], images.numpy())


def test_digits_module_split_scaling_and_round_trip():
    dm = DATASETS.build("digits", batch_size=64, seed=0)
    assert (dm.data_shape, dm.num_classes, dm.is_image) == ((1, 8, 8), 10, True)
    assert len(dm.train_set) + len(dm.val_set) == 1797 and len(dm.val_set) == 180
    labels = torch.cat([dm.train_set.y, dm.val_set.y])
    assert torch.bincount(labels).tolist() == SKLEARN_CLASS_COUNTS  # a partition of the set
    # val loader is unshuffled: x must be 2 v / 16 − 1 of the stored images, exactly
    x, y = next(iter(dm.val_dataloader()))
    v = dm.val_set.x[:64].double()
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32
    torch.testing.assert_close(x.double(), v / 8 - 1, atol=1e-7, rtol=0)
    assert torch.equal(y, dm.val_set.y[:64])
    xs = torch.cat([b[0] for b in dm.train_dataloader()])
    assert xs.min() == -1 and xs.max() == 1
    u = dm.inverse_scaler(xs)
    assert u.min() == 0 and u.max() == 1
    torch.testing.assert_close(u * 16, torch.round(u * 16), atol=1e-5, rtol=0)  # 17 levels
    torch.testing.assert_close(dm.scaler(u), xs, atol=1e-6, rtol=0)
    # seeded split
    other = DigitsDataModule(seed=0)
    assert torch.equal(other.val_set.x, dm.val_set.x)
    assert not torch.equal(DigitsDataModule(seed=1).val_set.y, dm.val_set.y)


def test_digits_uncentered_and_dequantised():
    plain = DigitsDataModule(centered=False)
    x, _ = next(iter(plain.val_dataloader()))
    assert x.min() == 0 and x.max() == 1
    dq = DigitsDataModule(centered=False, uniform_dequantization=True, batch_size=180)
    x1, _ = next(iter(dq.val_dataloader()))
    x2, _ = next(iter(dq.val_dataloader()))
    v = dq.val_set.x.double()
    assert (x1 >= 0).all() and (x1 < 1).all()
    assert torch.equal(torch.floor(x1.double() * 17), v)  # (v + u)/17 with u in [0, 1)
    assert not torch.equal(x1, x2)  # fresh noise every pass
    u = x1.double() * 17 - v
    n = u.numel()
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)


def test_image_reference():
    dm = DigitsDataModule()
    ref = dm.reference(100)
    assert ref.shape == (100, 1, 8, 8) and ref.dtype == torch.float32
    assert torch.equal(ref, dm.reference(100))
    flat = ref.flatten(1)
    assert torch.unique(flat, dim=0).shape[0] >= 99  # drawn without replacement
    with pytest.raises(ValueError, match="1797"):
        dm.reference(1798)


# ====================================================================== CIFAR-10 (fake archive)
@pytest.fixture(autouse=False)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tests must not touch the network")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture(params=["tar.gz", "folder"])
def cifar_root(request, tmp_path, no_network):
    if request.param == "tar.gz":
        _write_tar(tmp_path / cifar.ARCHIVE_NAME)
    else:
        folder = tmp_path / cifar.EXTRACTED_DIR
        folder.mkdir()
        for name, payload in _fake_members().items():
            (folder / name).write_bytes(payload)
    return tmp_path


def test_cifar10_decodes_pixel_layout_and_labels(cifar_root):
    dm = DATASETS.build("cifar10", root=str(cifar_root), batch_size=8, random_flip=False)
    assert (dm.data_shape, dm.num_classes, dm.is_image) == ((3, 32, 32), 10, True)
    tr, va = dm.train_set, dm.val_set
    assert tr.x.shape == (5 * N_PER_BATCH, 3, 32, 32) and tr.x.dtype == torch.uint8
    assert va.x.shape == (N_PER_BATCH, 3, 32, 32)
    n, c, h, w = np.meshgrid(np.arange(20), np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    assert np.array_equal(tr.x.numpy(), _pixel(n, c, h, w))  # CHW, train batches 1..5 in order
    n, c, h, w = np.meshgrid(np.arange(20, 24), np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    assert np.array_equal(va.x.numpy(), _pixel(n, c, h, w))  # test_batch is the val split
    assert tr.y.tolist() == [i % 10 for i in range(20)] and tr.y.dtype == torch.int64
    x, y = next(iter(dm.val_dataloader()))
    torch.testing.assert_close(x.double(), va.x.double() * 2 / 255 - 1, atol=1e-6, rtol=0)
    assert torch.equal(y, va.y)


def test_cifar10_random_flip_mirrors_some_training_images(cifar_root):
    torch.manual_seed(0)
    dm = cifar.CIFAR10DataModule(root=cifar_root, batch_size=20, random_flip=True)
    x, y = next(iter(dm.train_dataloader()))
    by_label = {}
    for img, lab in zip(dm.train_set.x, dm.train_set.y):
        by_label.setdefault(int(lab), []).append(img.double() * 2 / 255 - 1)
    flipped = kept = 0
    for img, lab in zip(x.double(), y):
        cands = by_label[int(lab)]
        kept += any(torch.allclose(img, s, atol=1e-6) for s in cands)
        flipped += any(torch.allclose(img, s.flip(-1), atol=1e-6) for s in cands)
    assert kept + flipped == 20 and kept > 0 and flipped > 0
    # validation batches are never flipped
    xv, _ = next(iter(dm.val_dataloader()))
    torch.testing.assert_close(xv.double(), dm.val_set.x.double() * 2 / 255 - 1, atol=1e-6, rtol=0)


def test_cifar10_missing_archive_message(tmp_path, no_network):
    root = tmp_path / "nowhere"
    dm = cifar.CIFAR10DataModule(root=root)  # construction never touches the disk
    assert dm.data_shape == (3, 32, 32)
    with pytest.raises(FileNotFoundError) as err:
        dm.setup()
    msg = str(err.value)
    assert "cifar-10-python.tar.gz" in msg and str(root.resolve()) in msg and "download=true" in msg


def test_cifar10_download_rejects_wrong_md5(tmp_path, monkeypatch, no_network):
    monkeypatch.setattr(cifar, "_stream_url", lambda url, out, **kw: out.write(b"<html>not the archive</html>"))
    dm = cifar.CIFAR10DataModule(root=tmp_path, download=True)
    with pytest.raises(cifar.ChecksumError, match=cifar.CIFAR10_MD5):
        dm.prepare_data()
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left behind


def test_cifar10_download_accepts_matching_md5(tmp_path, monkeypatch, no_network):
    payload = _write_tar(tmp_path / "source.tar.gz")
    (tmp_path / "source.tar.gz").unlink()
    monkeypatch.setattr(cifar, "_stream_url", lambda url, out, **kw: out.write(payload))
    root = tmp_path / "cifar"
    path = cifar.download_cifar10(root, md5=hashlib.md5(payload).hexdigest())
    assert path == root / cifar.ARCHIVE_NAME and sorted(os.listdir(root)) == [cifar.ARCHIVE_NAME]
    dm = cifar.CIFAR10DataModule(root=root)
    assert len(dm.train_set) == 20


def test_cifar10_refuses_foreign_pickles(tmp_path):
    folder = tmp_path / cifar.EXTRACTED_DIR
    folder.mkdir()
    for name in cifar.TRAIN_BATCHES + cifar.TEST_BATCHES:
        (folder / name).write_bytes(pickle.dumps({b"data": os.getcwd}, protocol=2))  # a callable global
    with pytest.raises(ValueError, match="refusing to unpickle"):
        cifar.CIFAR10DataModule(root=tmp_path).setup()


# ====================================================================== image folder
def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def test_folder_crop_resize_channels(tmp_path):
    # 12×4 image: left, middle, right thirds red, green, blue → the center crop is all green
    strip = np.zeros((4, 12, 3), np.uint8)
    strip[:, :4, 0] = 255
    strip[:, 4:8, 1] = 255
    strip[:, 8:, 2] = 255
    _png(tmp_path / "a" / "strip.png", strip)
    # 16×16 image, top half white: after resizing to 8×8 the top stays bright (no transpose/flip)
    half = np.zeros((16, 16, 3), np.uint8)
    half[:8] = 255
    _png(tmp_path / "b" / "deep" / "half.PNG", half)
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(tmp_path / "c.jpg", quality=95)
    (tmp_path / "notes.txt").write_text("ignored")

    dm = DATASETS.build("folder", root=str(tmp_path), image_size=8, channels=3, val_fraction=0.0, batch_size=8)
    assert (dm.data_shape, dm.is_image, dm.num_classes) == ((3, 8, 8), True, None)
    assert [p.name for p in dm.train_set.files] == ["strip.png", "half.PNG", "c.jpg"]  # sorted paths
    strip_img, half_img, jpg = (dm.train_set[i][0].float() for i in range(3))  # uint8 [3, 8, 8]
    assert strip_img.shape == (3, 8, 8)
    assert (strip_img[1] == 255).all() and (strip_img[0] == 0).all() and (strip_img[2] == 0).all()
    assert (half_img[:, :3] > 250).all() and (half_img[:, 5:] < 5).all()
    assert (jpg - 200).abs().max() <= 3  # JPEG quantisation of a flat colour
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (3, 3, 8, 8) and x.dtype == torch.float32 and (y == 0).all()
    assert x.min() >= -1 and x.max() <= 1 and (x == 1).any() and (x == -1).any()

    gray = FolderDataModule(tmp_path, image_size=4, channels=1, val_fraction=0.0)
    g = gray.train_set[0][0]  # the green strip in luminance: L = 0.299 R + 0.587 G + 0.114 B
    assert g.shape == (1, 4, 4) and (g.int() - round(0.587 * 255)).abs().max() <= 1


def test_folder_split_is_seeded(tmp_path):
    for i in range(10):
        _png(tmp_path / f"{i}.png", np.full((5, 5, 3), 20 * i, np.uint8))
    a = FolderDataModule(tmp_path, image_size=5, val_fraction=0.2, seed=3)
    b = FolderDataModule(tmp_path, image_size=5, val_fraction=0.2, seed=3)
    assert len(a.val_set) == 2 and len(a.train_set) == 8
    assert a.val_set.files == b.val_set.files
    assert not set(a.val_set.files) & set(a.train_set.files)


def test_folder_errors(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=r"missing.*\.png, \.jpg, \.jpeg"):
        FolderDataModule(missing).setup()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    with pytest.raises(FileNotFoundError) as err:
        FolderDataModule(empty).setup()
    assert str(empty.resolve()) in str(err.value) and ".jpeg" in str(err.value)
    (empty / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        FolderDataModule(empty, val_fraction=0.0).train_set[0]
    with pytest.raises(ValueError, match="channels"):
        FolderDataModule(empty, channels=2)


# ====================================================================== configs
def test_every_data_config_builds(tmp_path):
    from hydra import compose, initialize_config_dir

    import sde_diffusion.config  # noqa: F401  (registers the schema conf/train.yaml composes on)

    names = sorted(p.stem for p in CONF_DATA.glob("*.yaml"))
    assert {"toy2d", "swiss_roll", "moons", "8gaussians", "checkerboard", "gmm", "digits", "cifar10", "folder"} <= set(names)
    with initialize_config_dir(config_dir=str(CONF_DATA.parent), version_base="1.3"):
        for name in names:
            overrides = [f"data={name}"] + ([f"data.root={tmp_path}"] if name == "folder" else [])
            full = compose("train", overrides=overrides, return_hydra_config=True)
            # Each data set brings the network that suits it.
            brought = {"digits": "unet_small", "digit_pairs": "unet_pairs", "cifar10": "ddpmpp_cifar10", "folder": "unet"}.get(name, "mlp")
            assert full.hydra.runtime.choices.model == brought, name
            cfg = {k: v for k, v in dict(full.data).items() if k != "_target_"}
            dm = DATASETS.build(cfg.pop("name"), **cfg)
            assert isinstance(dm.data_shape, tuple) and isinstance(dm.is_image, bool)
            if name in TOY_DATASETS:
                assert dm.dataset_name == name and dm.data_shape == (2,)


def test_digits_upsampled_once_keep_their_17_levels():
    from sde_diffusion.data.digits import load_digits, upsample_digits
    from sde_diffusion.evaluation.digits_classifier import as_images

    dm = DigitsDataModule(size=32, batch_size=16)
    assert dm.data_shape == (1, 32, 32)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 32, 32) and y.shape == (16,)
    levels = (x + 1) / 2 * 16  # model range [-1, 1] back to 0..16
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-5)
    images, _ = load_digits()
    up = upsample_digits(images[:50], 32)
    assert up.dtype == torch.uint8 and int(up.max()) <= 16
    # Area-averaging the upsampled digit gives back a (bilinear-blurred) copy of the original:
    # same layout (no transposition or shift), within ~1 of 16 levels on average.
    back = torch.nn.functional.avg_pool2d(up[:, None].float(), 4)[:, 0]
    orig = images[:50].float()
    assert float((back - orig).abs().mean()) < 1.5
    assert float(torch.corrcoef(torch.stack([back.flatten(), orig.flatten()]))[0, 1]) > 0.95
    assert float(torch.corrcoef(torch.stack([back.flatten(), orig.transpose(1, 2).flatten()]))[0, 1]) < 0.8
    assert as_images(x).shape == (16, 1, 8, 8)  # the digits classifier sees them at 8×8
    assert torch.equal(upsample_digits(images[:3], 8), images[:3])
    with pytest.raises(ValueError, match="data.size must be a multiple of 8"):
        DigitsDataModule(size=12)
