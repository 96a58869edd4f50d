"""Image-quality metrics on 3D volumes with an explicit data range.

For a reconstruction ``x`` and reference ``r`` (both ``[Z, H, W]``, same units) with
data range :math:`L` (default: :math:`\\max r - \\min r`):

- ``psnr`` :math:`= 10 \\log_{10}(L^2 / \\mathrm{MSE})` over the whole volume (scikit-image);
- ``ssim``: mean over axial slices of the 2D SSIM (scikit-image, 7x7 uniform window,
  smaller and odd on tiny slices, the same ``L``);
- ``nrmse`` :math:`= \\|x - r\\|_2 / \\|r\\|_2`;
- ``z_rel_l2``: through-slice error :math:`\\|\\Delta_z x - \\Delta_z r\\|_2 / \\|\\Delta_z r\\|_2`
  with :math:`\\Delta_z` the difference between neighbouring slices (``None`` for one slice).

An optional boolean ``mask`` restricts PSNR/NRMSE to a region (e.g. the field of view).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from d3ip_cli.core.errors import InputDataError


def _as3d(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise InputDataError(f"{name} must be a 3D volume [Z, H, W], got shape {list(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        raise InputDataError(f"{name} holds non-finite values")
    return arr


def ssim_slices(recon: np.ndarray, reference: np.ndarray, data_range: float) -> float | None:
    """Mean 2D SSIM over axial slices; ``None`` when slices are smaller than 3x3."""
    from skimage.metrics import structural_similarity

    h, w = reference.shape[-2:]
    win = min(7, h, w)
    win -= (win + 1) % 2
    if win < 3:
        return None
    vals = [structural_similarity(r, x, data_range=data_range, win_size=win) for x, r in zip(recon, reference)]
    return float(np.mean(vals))


def volume_metrics(recon: Any, reference: Any, *, data_range: float | None = None,
                   mask: np.ndarray | None = None) -> dict[str, Any]:
    """PSNR, SSIM, NRMSE and through-slice error of ``recon`` against ``reference``.

    Returns a JSON-ready dict: ``psnr`` (``None`` with ``identical: true`` when the
    volumes are equal), ``ssim``, ``nrmse``, ``z_rel_l2``, ``data_range`` and a
    ``normalisation`` note.
    """
    x = _as3d(recon, "reconstruction")
    r = _as3d(reference, "reference")
    if x.shape != r.shape:
        raise InputDataError(f"reconstruction shape {list(x.shape)} differs from reference shape {list(r.shape)}")
    rng = float(r.max() - r.min()) if data_range is None else float(data_range)
    if not rng > 0:
        raise InputDataError("the reference is constant: give an explicit data range")
    sel = np.ones(r.shape, bool) if mask is None else np.asarray(mask, bool)
    diff = (x - r)[sel]
    mse = float(np.mean(diff ** 2))
    if mse == 0:
        psnr = None
    elif mask is None:
        from skimage.metrics import peak_signal_noise_ratio

        psnr = float(peak_signal_noise_ratio(r, x, data_range=rng))
    else:
        psnr = 10.0 * math.log10(rng ** 2 / mse)
    out: dict[str, Any] = {
        "psnr": None if psnr is None else round(psnr, 4),
        "ssim": ssim_slices(x, r, rng),
        "nrmse": round(float(np.linalg.norm(diff) / max(np.linalg.norm(r[sel]), 1e-300)), 6),
        "z_rel_l2": None,
        "data_range": rng,
        "normalisation": "same units as the volumes; data_range = reference max - min unless given",
    }
    if mse == 0:
        out["identical"] = True
    if out["ssim"] is not None:
        out["ssim"] = round(out["ssim"], 6)
    if r.shape[0] > 1:
        dz_r = np.diff(r, axis=0)
        den = float(np.linalg.norm(dz_r))
        if den > 0:
            out["z_rel_l2"] = round(float(np.linalg.norm(np.diff(x, axis=0) - dz_r) / den), 6)
    return out
