"""Classical reconstructions over the operator interface, behind one signature::

    recon(op, y, *, generator=None, progress=None, **params) -> torch.Tensor  # [Z, H, W]

``progress(step, total, info)`` is called as work proceeds (the CLI draws a bar from
it; nothing here imports rich or typer). MRI methods may return complex images.

:data:`BASELINES` maps a method name to its function, the tasks it supports and its
default parameters; ``d3ip reconstruct --method NAME`` reaches them through the
engine's method registry (:mod:`d3ip_cli.engine.methods`).

==============  ==========================  ==============================================
name            tasks                       defaults
==============  ==========================  ==============================================
``fbp``         sparse-view, limited-angle  ``filter="ram-lak"``
``cgls``        all                         ``n_iter=20``
``tv``          all                         ``weight=5e-4, weight_z=None (=weight), n_iter=200, rho=1e-2``
``zero-filled`` cs-mri                      --
``l1-wavelet``  cs-mri                      ``weight=1e-3, n_iter=100, wavelet="db4"``
==============  ==========================  ==============================================
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from d3ip_cli.baselines.cgls import cgls
from d3ip_cli.baselines.fbp import fbp
from d3ip_cli.baselines.mri import l1_wavelet, zero_filled
from d3ip_cli.baselines.tv import tv

CT_TASKS = frozenset({"sparse-view", "limited-angle"})
MRI_TASKS = frozenset({"cs-mri"})
ALL_TASKS = CT_TASKS | MRI_TASKS


@dataclasses.dataclass(frozen=True)
class Baseline:
    """A classical method: ``fn(op, y, *, generator, progress, **params)``."""

    name: str
    fn: Callable[..., Any]
    tasks: frozenset[str]
    defaults: dict[str, Any]
    description: str
    warm_start: bool = False
    """Whether ``fn`` takes ``x0`` (the engine passes its initial estimate)."""


BASELINES: dict[str, Baseline] = {
    b.name: b
    for b in (
        Baseline("fbp", fbp, CT_TASKS, {"filter": "ram-lak"}, "filtered back-projection"),
        Baseline("cgls", cgls, ALL_TASKS, {"n_iter": 20}, "least squares by CGLS, early stopping"),
        Baseline("tv", tv, ALL_TASKS, {"weight": 5e-4, "weight_z": None, "n_iter": 200, "rho": 1e-2, "n_cg": 5},
                 "3D total variation (ADMM; separate in-plane and z weights; x >= 0 for CT)", warm_start=True),
        Baseline("zero-filled", zero_filled, MRI_TASKS, {}, "inverse FFT of zero-filled k-space, coil-combined"),
        Baseline("l1-wavelet", l1_wavelet, MRI_TASKS, {"weight": 1e-3, "n_iter": 100, "wavelet": "db4"},
                 "L1-wavelet compressed sensing (sigpy L1WaveletRecon)"),
    )
}

__all__ = ["BASELINES", "Baseline", "CT_TASKS", "MRI_TASKS", "ALL_TASKS", "fbp", "cgls", "tv", "zero_filled",
           "l1_wavelet"]
