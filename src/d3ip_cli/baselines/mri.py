"""MRI baselines: zero-filled and L1-wavelet (sigpy's ``L1WaveletRecon``), per slice.

L1-wavelet solves, for each slice,

.. math::  \\min_x \\tfrac12 \\|M F S x - y\\|_2^2 + \\lambda \\|\\Psi x\\|_1

with a Daubechies-4 wavelet :math:`\\Psi`, on the CPU through sigpy (the operator's
mask and coil maps are passed on; single coil uses maps of ones).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from d3ip_cli.core.errors import UsageError
from d3ip_cli.physics.base import LinearOperator
from d3ip_cli.physics.mri import CartesianMRI


def _mri(op: LinearOperator, method: str) -> CartesianMRI:
    if not isinstance(op, CartesianMRI):
        raise UsageError(f"method {method} applies to the cs-mri task")
    return op


def zero_filled(op: LinearOperator, y: torch.Tensor, *, generator: torch.Generator | None = None,
                progress: Callable[[int, int, dict], None] | None = None, **_: Any) -> torch.Tensor:
    """:math:`(\\sum_c |S_c|^2)^{-1} \\sum_c \\bar S_c F^{-1} y_c` (complex ``[Z, H, W]``)."""
    with torch.no_grad():
        x = _mri(op, "zero-filled").pinv(y)
    if progress is not None:
        progress(1, 1, {"stage": "zero-filled"})
    return x


def l1_wavelet(op: LinearOperator, y: torch.Tensor, *, weight: float = 1e-3, n_iter: int = 100, wavelet: str = "db4",
               generator: torch.Generator | None = None, progress: Callable[[int, int, dict], None] | None = None,
               **_: Any) -> torch.Tensor:
    """Per-slice L1-wavelet reconstruction with sigpy; ``weight`` is :math:`\\lambda` (images scaled to ~[0, 1])."""
    import sigpy as sp
    import sigpy.mri.app

    mri = _mri(op, "l1-wavelet")
    ksp = y.detach().cpu().numpy().astype(np.complex64)
    mask = mri.mask.detach().cpu().numpy().astype(np.float32)
    maps = None if mri.maps is None else mri.maps.detach().cpu().numpy().astype(np.complex64)
    z = ksp.shape[0]
    out = np.zeros(mri.in_shape, dtype=np.complex64)
    for i in range(z):
        mps = np.ones((1,) + ksp.shape[-2:], np.complex64) if maps is None else maps[i]
        app = sigpy.mri.app.L1WaveletRecon(ksp[i], mps, float(weight), weights=mask[i], wave_name=wavelet,
                                           max_iter=int(n_iter), device=sp.cpu_device, show_pbar=False)
        out[i] = app.run()
        if progress is not None:
            progress(i + 1, z, {"stage": "l1-wavelet", "slice": i})
    return torch.from_numpy(out).to(y.device)
