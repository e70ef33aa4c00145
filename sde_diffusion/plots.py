r"""Figures of samples, trajectories, denoising and training losses (matplotlib, Agg, atomic PNGs).

This module is the one home of the package's figures (``sample.py`` and the training callbacks
draw with it). Every ``save_*`` function writes one PNG through :func:`sde_diffusion.io.atomic_path`
(a temporary file and a rename), so a reader (or a killed run) never sees half a file, and returns
its path. No pyplot: figures are built with the
object-oriented API on the Agg canvas, so nothing depends on a display or on global figure state.

Pixel sizes are predictable:

* image grids (:func:`save_image_grid`, :func:`save_triptych`) are written pixel for pixel: an
  ``n``-image grid of ``H×W`` images with ``nrow`` per row and padding ``pad`` is
  ``(rows·(H+pad)+pad)·scale`` high and ``(nrow·(W+pad)+pad)·scale`` wide (:func:`grid_size`),
  each image pixel a ``scale×scale`` block (nearest neighbour, no smoothing);
* plots with axes are ``figsize·dpi`` pixels (no tight bounding box).

Inputs are numpy arrays or tensors. Images are either uint8 ``[N, H, W, C]`` (as stored in
``samples.npz``) or floats ``[N, C, H, W]`` in [0, 1] (clamped, then rounded to 8 bits): map
model-range images to [0, 1] first, e.g. with the data module's ``inverse_scaler``.

Usage::

    save_image_grid(images, "samples.png", nrow=8, title="step 1000")   # images in [0, 1] or uint8
    save_scatter(samples, reference, "samples.png", title="step 1000")
    save_trajectories(sde_path, ode_path, "trajectories.png", times=times)
    save_loss_by_t(read_loss_by_t(run_dir / "logs"), "loss_by_t.png")
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .io import atomic_path

ArrayLike = Any  # numpy array or torch tensor
PathLike = Union[str, Path]

LOSS_BY_T_PREFIX = "loss_by_t/"
_BUCKET = re.compile(r"^loss_by_t/(\d+(?:\.\d*)?)-(\d+(?:\.\d*)?)$")


# ---------------------------------------------------------------------------------- helpers
def _numpy(x: ArrayLike) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if hasattr(x, "is_floating_point") and x.is_floating_point():
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _atomic(path: PathLike, write: Any) -> Path:
    """Call ``write(tmp_path)`` inside :func:`~sde_diffusion.io.atomic_path` (renamed to ``path`` on success)."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def _figure(width: float, height: float, dpi: int) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: PathLike, dpi: Optional[int] = None) -> Path:
    """Write a matplotlib figure as PNG, atomically; the size is ``figsize·dpi`` pixels."""
    return _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi or fig.dpi))


def to_uint8_images(images: ArrayLike) -> np.ndarray:
    """Images as uint8 ``[N, H, W, C]``.

    uint8 input is taken as ``[N, H, W, C]`` already; float input is ``[N, C, H, W]`` in [0, 1],
    clamped and rounded: ``round(255·clip(x, 0, 1))``.
    """
    a = _numpy(images)
    if a.ndim != 4:
        raise ValueError(f"images must have 4 dimensions ([N, H, W, C] uint8 or [N, C, H, W] float), got shape {a.shape}")
    if a.dtype == np.uint8:
        return a
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"images must be uint8 [N, H, W, C] or floats in [0, 1] [N, C, H, W], got dtype {a.dtype}")
    a = np.nan_to_num(a.astype(np.float64), nan=0.0)
    return np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)


def grid_size(n: int, height: int, width: int, nrow: Optional[int] = None, pad: int = 1, scale: int = 1) -> Tuple[int, int]:
    """(pixel height, pixel width) of the PNG that :func:`save_image_grid` writes for ``n`` images."""
    nrow = _nrow(n, nrow)
    rows = math.ceil(n / nrow)
    return (rows * (height + pad) + pad) * scale, (nrow * (width + pad) + pad) * scale


def _nrow(n: int, nrow: Optional[int]) -> int:
    if nrow is None:
        return max(1, math.ceil(math.sqrt(n)))
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    return min(int(nrow), max(n, 1))


def tile_images(images: np.ndarray, nrow: Optional[int] = None, pad: int = 1, pad_value: int = 255) -> np.ndarray:
    """Tile uint8 ``[N, H, W, C]`` into one ``[H', W', C]`` array, ``nrow`` images per row."""
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"need at least one image of shape [N, H, W, C], got {images.shape}")
    n, h, w, c = images.shape
    nrow = _nrow(n, nrow)
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        grid[top : top + h, left : left + w] = images[i]
    return grid


def _write_pixels(grid: np.ndarray, path: PathLike, scale: int, title: Optional[str]) -> Path:
    import matplotlib.image as mpimg

    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    if scale > 1:
        grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    if grid.shape[2] == 1:
        # Grey as RGB rather than through a colormap, whose 256-entry table shifts some levels by one.
        grid = np.repeat(grid, 3, axis=2)
    elif grid.shape[2] not in (3, 4):
        raise ValueError(f"images need 1, 3 or 4 channels, got {grid.shape[2]}")
    metadata = {"Title": title} if title else None
    return _atomic(path, lambda tmp: mpimg.imsave(tmp, grid, format="png", metadata=metadata))


# ---------------------------------------------------------------------------------- image grids
def save_image_grid(
    images: ArrayLike,
    path: PathLike,
    nrow: Optional[int] = None,
    title: Optional[str] = None,
    *,
    pad: int = 1,
    scale: int = 4,
) -> Path:
    """A pixel-exact PNG grid of ``images``: floats ``[N, C, H, W]`` in [0, 1] (clamped; map model-range
    images with the data module's ``inverse_scaler`` first) or uint8 ``[N, H, W, C]``; C = 1 (grey), 3 or 4.

    ``nrow`` images per row (None: ⌈√N⌉), ``pad`` white pixels between images, each image pixel a
    ``scale×scale`` block (:func:`grid_size`). ``title`` goes into the PNG's metadata, not into the
    picture, so the size stays exact.
    """
    grid = tile_images(to_uint8_images(images), nrow=nrow, pad=pad)
    return _write_pixels(grid, path, scale, title)


def save_triptych(
    observed: ArrayLike,
    masked: ArrayLike,
    completed: ArrayLike,
    path: PathLike,
    max_items: int = 8,
    pad: int = 1,
    scale: int = 4,
    title: Optional[str] = None,
) -> Path:
    """Three rows of the same ``k ≤ max_items`` examples: observed, masked (the input), completed."""
    rows = [to_uint8_images(a) for a in (observed, masked, completed)]
    k = min(max_items, *(r.shape[0] for r in rows))
    if k < 1:
        raise ValueError("the triptych needs at least one example")
    shapes = {r.shape[1:] for r in rows}
    if len(shapes) != 1:
        raise ValueError(f"observed, masked and completed must have the same image shape, got {sorted(shapes)}")
    grid = tile_images(np.concatenate([r[:k] for r in rows]), nrow=k, pad=pad)
    return _write_pixels(grid, path, scale, title)


# ---------------------------------------------------------------------------------- 2-D plots
def _points(x: ArrayLike, name: str) -> np.ndarray:
    a = _numpy(x).astype(np.float64)
    a = a.reshape(a.shape[0], -1) if a.ndim >= 2 else a.reshape(-1, 1)
    if a.shape[1] < 2:
        raise ValueError(f"{name} needs at least two coordinates per point for a 2-D plot, got shape {a.shape}")
    return a[:, :2]


def _limits(*sets: np.ndarray, margin: float = 0.1) -> Tuple[Tuple[float, float], Tuple[float, float]]:
    """Axis limits covering the central 99.8 % of the finite points of all sets, plus a margin."""
    pts = np.concatenate([s[np.isfinite(s).all(1)] for s in sets if s.size])
    if pts.size == 0:
        return (-1.0, 1.0), (-1.0, 1.0)
    lo, hi = np.quantile(pts, 0.001, axis=0), np.quantile(pts, 0.999, axis=0)
    span = np.maximum(hi - lo, 1e-6)
    lo, hi = lo - margin * span, hi + margin * span
    return (float(lo[0]), float(hi[0])), (float(lo[1]), float(hi[1]))


def save_scatter(
    samples: ArrayLike,
    reference: Optional[ArrayLike],
    path: PathLike,
    title: Optional[str] = None,
    *,
    size: Tuple[float, float] = (8.0, 4.0),
    dpi: int = 100,
    max_points: int = 20000,
) -> Path:
    """Data (left) beside samples (right), first two coordinates of ``[N, ≥2]`` points (tensors or
    arrays, in data coordinates), shared axis limits; ``size·dpi`` pixels (800×400 by default).

    Without ``reference`` only the samples are drawn (one panel, same figure size).
    """
    s = _points(samples, "samples")[:max_points]
    r = _points(reference, "reference")[:max_points] if reference is not None else None
    xlim, ylim = _limits(s, r) if r is not None else _limits(s)
    fig = _figure(*size, dpi=dpi)
    panels = [(r, "data"), (s, "samples")] if r is not None else [(s, "samples")]
    for k, (pts, name) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5, linewidths=0, color="C0" if name == "data" else "C1")
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.set_aspect("equal", adjustable="box")
        ax.set_title(f"{name} (n={pts.shape[0]})", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi)


def save_trajectories(
    sde_paths: ArrayLike,
    ode_paths: ArrayLike,
    path: PathLike,
    times: Optional[ArrayLike] = None,
    reference: Optional[ArrayLike] = None,
    title: Optional[str] = None,
    size: Tuple[float, float] = (10.0, 5.0),
    dpi: int = 100,
    max_lines: int = 200,
) -> Path:
    """Two panels of 2-D paths ``[S, B, ≥2]`` (state at S recorded times, B particles).

    Left the reverse SDE, right the probability-flow ODE, started from the same prior points
    (first state). Each particle is one line; start points are marked grey, end points black;
    ``reference`` data, if given, are drawn faintly beneath. ``times`` (``[S]``) label the colour bar.
    """
    paths = []
    for name, p in (("sde_paths", sde_paths), ("ode_paths", ode_paths)):
        a = _numpy(p).astype(np.float64)
        if a.ndim < 3 or a.reshape(a.shape[0], a.shape[1], -1).shape[2] < 2:
            raise ValueError(f"{name} must have shape [S, B, >=2] (states over time), got {a.shape}")
        paths.append(a.reshape(a.shape[0], a.shape[1], -1)[:, :max_lines, :2])
    ref = _points(reference, "reference") if reference is not None else None
    # Frame the prior draws and the data (or, without data, every state): a few runaway paths
    # should leave the frame, not shrink everything else to a dot.
    frame = [paths[0][0], ref] if ref is not None else [p.reshape(-1, 2) for p in paths]
    xlim, ylim = _limits(np.concatenate(frame), margin=0.1)
    fig = _figure(*size, dpi=dpi)
    for k, (p, name) in enumerate(zip(paths, ("reverse SDE", "probability-flow ODE"))):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.plot(p[:, :, 0], p[:, :, 1], lw=0.4, alpha=0.4, color="C1")
        if ref is not None:
            ax.scatter(ref[:, 0], ref[:, 1], s=1, alpha=0.3, color="C0", linewidths=0, zorder=2.5)
        ax.scatter(p[0, :, 0], p[0, :, 1], s=6, color="0.6", label="start (t = T)", zorder=3)
        ax.scatter(p[-1, :, 0], p[-1, :, 1], s=6, color="k", label="end (t = eps)", zorder=3)
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.set_aspect("equal", adjustable="box")
        steps = p.shape[0] - 1
        ax.set_title(f"{name} ({steps} steps)", fontsize=9)
        if k == 0:
            ax.legend(fontsize=7, loc="upper right")
    if times is not None:
        t = _numpy(times).reshape(-1)
        fig.text(0.5, 0.01, f"t from {float(t[0]):.3g} to {float(t[-1]):.3g}", ha="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi)


# ---------------------------------------------------------------------------------- over time
def save_denoising_strip(
    x_t: ArrayLike,
    x0_hat: Optional[ArrayLike],
    times: ArrayLike,
    path: PathLike,
    title: Optional[str] = None,
    panel: float = 1.2,
    dpi: int = 100,
) -> Path:
    """One image along the reverse process: x_t (top row) and Tweedie's x̂_0 (bottom row) at K times.

    ``x_t``, ``x0_hat``: K images (uint8 ``[K, H, W, C]`` or floats ``[K, C, H, W]`` in [0, 1]);
    ``times``: ``[K]``. Size ``(K·panel) × (rows·panel + 0.4)`` inches at ``dpi``.
    """
    rows = [("x_t", to_uint8_images(x_t))]
    if x0_hat is not None:
        rows.append(("x̂_0", to_uint8_images(x0_hat)))
    t = _numpy(times).reshape(-1)
    k = rows[0][1].shape[0]
    if any(r.shape[0] != k for _, r in rows) or t.shape[0] != k:
        raise ValueError(f"x_t, x0_hat and times must have the same length, got {[r.shape[0] for _, r in rows]} and {t.shape[0]}")
    fig = _figure(k * panel, len(rows) * panel + 0.4, dpi=dpi)
    for i, (name, imgs) in enumerate(rows):
        for j in range(k):
            ax = fig.add_subplot(len(rows), k, i * k + j + 1)
            img = imgs[j]
            if img.shape[2] == 1:
                ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            else:
                ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"t={float(t[j]):.3g}", fontsize=7)
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi)


def save_marginal_strip(
    points: ArrayLike,
    times: ArrayLike,
    path: PathLike,
    reference: Optional[ArrayLike] = None,
    title: Optional[str] = None,
    panel: float = 2.0,
    dpi: int = 100,
) -> Path:
    """The batch ``[K, B, ≥2]`` at K times of the reverse process, one scatter panel per time.

    Size ``(K·panel) × (panel + 0.4)`` inches at ``dpi``.
    """
    p = _numpy(points).astype(np.float64)
    if p.ndim < 3:
        raise ValueError(f"points must have shape [K, B, >=2], got {p.shape}")
    p = p.reshape(p.shape[0], p.shape[1], -1)[..., :2]
    t = _numpy(times).reshape(-1)
    if t.shape[0] != p.shape[0]:
        raise ValueError(f"points has {p.shape[0]} time slices but times has {t.shape[0]}")
    ref = _points(reference, "reference") if reference is not None else None
    xlim, ylim = _limits(p.reshape(-1, 2), *([ref] if ref is not None else []), margin=0.05)
    k = p.shape[0]
    fig = _figure(k * panel, panel + 0.4, dpi=dpi)
    for j in range(k):
        ax = fig.add_subplot(1, k, j + 1)
        if ref is not None:
            ax.scatter(ref[:, 0], ref[:, 1], s=1, alpha=0.15, color="C0", linewidths=0)
        ax.scatter(p[j, :, 0], p[j, :, 1], s=2, alpha=0.6, color="C1", linewidths=0)
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.set_aspect("equal", adjustable="box")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"t={float(t[j]):.3g}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi)


# ---------------------------------------------------------------------------------- training logs
@dataclass
class LossByT:
    """The ``loss_by_t/<lo>-<hi>`` columns of the training CSV logs.

    Attributes:
        edges: ``[K+1]`` bucket edges in t.
        steps: ``[S]`` global steps at which the buckets were logged (ascending).
        values: ``[S, K]`` mean ε-space error per bucket (NaN where a bucket had no sample).
    """

    edges: np.ndarray
    steps: np.ndarray
    values: np.ndarray

    @property
    def mids(self) -> np.ndarray:
        return 0.5 * (self.edges[1:] + self.edges[:-1])


def metrics_csv_files(log_dir: PathLike) -> List[Path]:
    """The CSV logger's ``metrics.csv`` files under ``log_dir`` (one per version), oldest first."""
    root = Path(log_dir)
    if root.is_file():
        return [root]
    files = list(root.glob("**/metrics.csv"))

    def version(p: Path) -> Tuple[int, str]:
        m = re.search(r"version_(\d+)", str(p))
        return (int(m.group(1)) if m else -1, str(p))

    return sorted(files, key=version)


def read_loss_by_t(source: Union[PathLike, Sequence[PathLike]]) -> LossByT:
    """Collect the ``loss_by_t`` columns from CSV logs (a log directory, a file or a list of files).

    Rows without any bucket value are skipped; when a step appears in several files (a resumed
    run) the later file wins. Raises FileNotFoundError when there is no such column.
    """
    if isinstance(source, (str, Path)):
        files = metrics_csv_files(source)
    else:
        files = [Path(p) for p in source]
    if not files:
        raise FileNotFoundError(f"no metrics.csv under {source}; train with logger=csv to get loss-by-t logs")
    by_step: Dict[int, Dict[Tuple[float, float], float]] = {}
    buckets: set = set()
    for f in files:
        with open(f, newline="") as fh:
            reader = csv.DictReader(fh)
            cols = {}
            for name in reader.fieldnames or []:
                m = _BUCKET.match(name)
                if m:
                    cols[name] = (float(m.group(1)), float(m.group(2)))
            if not cols:
                continue
            buckets.update(cols.values())
            for row in reader:
                vals = {cols[c]: float(row[c]) for c in cols if row.get(c) not in (None, "")}
                if not vals or row.get("step") in (None, ""):
                    continue
                by_step.setdefault(int(float(row["step"])), {}).update(vals)
    if not buckets or not by_step:
        raise FileNotFoundError(
            f"no '{LOSS_BY_T_PREFIX}<lo>-<hi>' values in {[str(f) for f in files]}; "
            "they are logged by the LossByTime callback (callbacks.loss_by_t.every_n_steps > 0)"
        )
    order = sorted(buckets)
    edges = np.array([order[0][0]] + [hi for _, hi in order], dtype=np.float64)
    steps = np.array(sorted(by_step), dtype=np.int64)
    values = np.full((steps.size, len(order)), np.nan)
    for i, s in enumerate(steps):
        for j, b in enumerate(order):
            values[i, j] = by_step[int(s)].get(b, np.nan)
    return LossByT(edges=edges, steps=steps, values=values)


def save_loss_by_t(
    table: LossByT,
    path: PathLike,
    max_curves: int = 8,
    title: Optional[str] = None,
    size: Tuple[float, float] = (6.0, 4.0),
    dpi: int = 100,
) -> Path:
    """The ε-space error per t-bucket against t, one line per logged step (up to ``max_curves``,
    evenly spread, always including the last), darker for later steps; log-scale y."""
    from matplotlib import colormaps

    s = table.steps.size
    pick = sorted({int(round(i)) for i in np.linspace(0, s - 1, min(max_curves, s))})
    cmap = colormaps["viridis"]
    fig = _figure(*size, dpi=dpi)
    ax = fig.add_subplot(1, 1, 1)
    for rank, i in enumerate(pick):
        shade = 0.15 + 0.75 * (rank / max(len(pick) - 1, 1))
        ax.plot(table.mids, table.values[i], marker="o", ms=3, lw=1.2 if i == pick[-1] else 0.8,
                color=cmap(shade), label=f"step {int(table.steps[i])}")
    ax.set_xlabel("t (bucket mid-point)")
    ax.set_ylabel("ε-space error  E‖ε_θ − ε‖²")
    finite = table.values[np.isfinite(table.values)]
    # A log axis only pays off over a wide range; within a decade it just clutters the labels.
    if finite.size and (finite > 0).all() and finite.max() > 10 * finite.min():
        ax.set_yscale("log")
    ax.set_xlim(float(table.edges[0]), float(table.edges[-1]))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path, dpi)


def save_vlb_terms(
    times: ArrayLike,
    terms: ArrayLike,
    path: PathLike,
    prior: Optional[float] = None,
    title: Optional[str] = None,
    size: Tuple[float, float] = (6.0, 4.0),
    dpi: int = 100,
) -> Path:
    """The bound's terms against time: L_{i−1} (nats, mean over examples; the first is L_0) at each step's network
    time t_i, log-scale y; L_T as a dashed line when given."""
    t, v = _numpy(times).reshape(-1), _numpy(terms).reshape(-1)
    fig = _figure(*size, dpi=dpi)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(t[1:], v[1:], lw=1.2, label="L_{t-1}: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))")
    ax.plot(t[:1], v[:1], "o", ms=4, label="L_0: decoder")
    if prior is not None:
        ax.axhline(float(prior), ls="--", lw=0.8, color="grey", label="L_T: KL to the prior")
    ax.set_xlabel("t (network time of the step)")
    ax.set_ylabel("nats per example")
    if (v[1:] > 0).all():
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path, dpi)


__all__ = [
    "save_vlb_terms",
    "LossByT",
    "grid_size",
    "tile_images",
    "to_uint8_images",
    "save_figure",
    "save_image_grid",
    "save_triptych",
    "save_scatter",
    "save_trajectories",
    "save_denoising_strip",
    "save_marginal_strip",
    "metrics_csv_files",
    "read_loss_by_t",
    "save_loss_by_t",
]
