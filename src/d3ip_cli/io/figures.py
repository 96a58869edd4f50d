"""PNG figures: image grids and curves (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from d3ip_cli.io.atomic import atomic_output


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_image_grid(images: np.ndarray, path: str | os.PathLike, *, ncols: int = 8, title: str | None = None,
                    vmin: float = 0.0, vmax: float = 1.0, overwrite: bool = True) -> Path:
    """Write ``images [N, H, W]`` as a grey-level grid PNG."""
    plt = _plt()
    images = np.asarray(images)
    n = images.shape[0]
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.6 * ncols, 1.6 * nrows + (0.4 if title else 0)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_output(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


def save_curve(xs: Sequence[float], ys: Sequence[float], path: str | os.PathLike, *, xlabel: str, ylabel: str,
               title: str | None = None, logy: bool = False, smooth: int = 0, overwrite: bool = True) -> Path:
    """Write a line plot PNG (optionally with a running mean of ``smooth`` points)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    ax.plot(xs, ys, lw=0.6, alpha=0.5 if smooth else 1.0)
    if smooth and len(ys) > smooth:
        k = np.ones(smooth) / smooth
        ax.plot(xs[smooth - 1:], np.convolve(ys, k, mode="valid"), lw=1.5, label=f"running mean ({smooth})")
        ax.legend()
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_output(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)
