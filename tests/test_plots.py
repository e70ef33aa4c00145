"""Figures: pixel-exact image grids, figure sizes, CSV loss logs, atomic writes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sde_diffusion import plots


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _no_temporaries(root: Path) -> bool:
    return not [p for p in root.iterdir() if p.name.endswith(".tmp")]


def test_grid_is_pixel_exact(tmp_path: Path) -> None:
    imgs = np.arange(10, dtype=np.uint8)[:, None, None, None] * 20 + np.zeros((10, 8, 8, 1), np.uint8)
    path = plots.save_image_grid(imgs, tmp_path / "g.png", nrow=5, pad=1, scale=4, title="ten")
    assert plots.grid_size(10, 8, 8, nrow=5, pad=1, scale=4) == (76, 184)
    assert Image.open(path).size == (184, 76)
    px = _pixels(path)[..., 0]
    for i in range(10):
        r, c = divmod(i, 5)
        top, left = 4 * (1 + r * 9), 4 * (1 + c * 9)
        assert (px[top : top + 32, left : left + 32] == 20 * i).all()
    assert (px[:4] == 255).all()  # the padding line above the first row
    assert Image.open(path).info.get("Title") == "ten"
    assert _no_temporaries(tmp_path)


def test_float_images_are_clamped_and_rounded() -> None:
    x = torch.tensor([-0.5, 0.0, 0.1, 1.0, 3.0, float("nan")]).reshape(1, 1, 2, 3)
    out = plots.to_uint8_images(x)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 3, 1)
    assert out.reshape(-1).tolist() == [0, 0, round(25.5), 255, 255, 0]


def test_rgb_grid_and_triptych_sizes(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    p = plots.save_image_grid(rgb, tmp_path / "rgb.png", nrow=3, scale=2)
    assert Image.open(p).size == ((3 * 8 + 1) * 2, (5 + 2) * 2)
    np.testing.assert_array_equal(_pixels(p)[2:12:2, 2:16:2], rgb[0])
    t = plots.save_triptych(rgb, rgb // 2, rgb, tmp_path / "t.png", max_items=2, scale=3)
    assert Image.open(t).size[::-1] == plots.grid_size(6, 5, 7, nrow=2, pad=1, scale=3)
    with pytest.raises(ValueError, match="same image shape"):
        plots.save_triptych(rgb, rgb[:, :4], rgb, tmp_path / "bad.png")


def test_scatter_and_trajectory_sizes(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    s, r = torch.randn(300, 2, generator=g), torch.randn(500, 2, generator=g)
    assert Image.open(plots.save_scatter(s, r, tmp_path / "s.png")).size == (800, 400)
    assert Image.open(plots.save_scatter(s, None, tmp_path / "s1.png", size=(5, 3), dpi=80)).size == (400, 240)
    paths = torch.randn(11, 20, 2, generator=g).cumsum(0)
    p = plots.save_trajectories(paths, paths * 0.5, tmp_path / "tr.png", times=torch.linspace(1, 0, 11), reference=r)
    assert Image.open(p).size == (1000, 500)
    with pytest.raises(ValueError, match=r"\[S, B, >=2\]"):
        plots.save_trajectories(paths[:, :, :1], paths, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists() and _no_temporaries(tmp_path)


def test_strip_sizes(tmp_path: Path) -> None:
    k = 5
    frames = torch.rand(k, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    p = plots.save_denoising_strip(frames, frames, torch.linspace(1, 1e-3, k), tmp_path / "d.png", panel=1.2, dpi=100)
    assert Image.open(p).size == (round(k * 120), round(2 * 120 + 40))
    pts = torch.randn(4, 50, 2)
    m = plots.save_marginal_strip(pts, torch.linspace(1, 0, 4), tmp_path / "m.png", panel=2.0, dpi=50)
    assert Image.open(m).size == (400, 120)
    with pytest.raises(ValueError, match="same length"):
        plots.save_denoising_strip(frames, frames[:3], torch.linspace(1, 0, k), tmp_path / "bad.png")


def _write_csv(path: Path, rows: list) -> None:
    header = ["epoch", "loss_by_t/0.00-0.50", "loss_by_t/0.50-1.00", "lr-AdamW", "step", "train/loss"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")


def test_read_loss_by_t_from_csv_logs(tmp_path: Path) -> None:
    # Lightning's CSV logger: one row per logging call, empty cells for the other metrics.
    _write_csv(tmp_path / "logs/version_0/metrics.csv", [
        ["", "", "", 1e-4, 0, ""], [0, 0.9, 0.4, "", 0, 1.0], [0, 0.8, "", "", 10, 0.9], [0, 0.7, 0.2, "", 20, 0.8]])
    # A resumed run (version_1) repeats step 20 with new values and continues.
    _write_csv(tmp_path / "logs/version_1/metrics.csv", [[0, 0.6, 0.15, "", 20, 0.7], [0, 0.5, 0.1, "", 30, 0.6]])
    table = plots.read_loss_by_t(tmp_path / "logs")
    np.testing.assert_allclose(table.edges, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(table.mids, [0.25, 0.75])
    assert table.steps.tolist() == [0, 10, 20, 30]
    np.testing.assert_allclose(table.values, [[0.9, 0.4], [0.8, np.nan], [0.6, 0.15], [0.5, 0.1]])
    p = plots.save_loss_by_t(table, tmp_path / "loss.png")
    assert Image.open(p).size == (600, 400)
    _write_csv(tmp_path / "empty/version_0/metrics.csv", [["", "", "", 1e-4, 0, ""]])
    with pytest.raises(FileNotFoundError, match="LossByTime"):
        plots.read_loss_by_t(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no metrics.csv"):
        plots.read_loss_by_t(tmp_path / "nothing")


def test_failed_write_leaves_no_file(tmp_path: Path) -> None:
    two_channels = np.zeros((2, 4, 4, 2), np.uint8)
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        plots.save_image_grid(two_channels, tmp_path / "bad.png")
    assert list(tmp_path.iterdir()) == []
    plots.save_image_grid(np.zeros((1, 4, 4, 1), np.uint8), tmp_path / "ok.png", scale=1)
    old = (tmp_path / "ok.png").read_bytes()
    with pytest.raises(ValueError):
        plots.save_image_grid(two_channels, tmp_path / "ok.png")
    assert (tmp_path / "ok.png").read_bytes() == old and _no_temporaries(tmp_path)
