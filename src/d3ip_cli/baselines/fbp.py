"""Filtered back-projection (CT): :math:`x = \\frac{\\Delta\\theta}{dx\\,dy} A^T (h * y)`.

The windowed ramp filter ``h`` and the scaling live with the CT operator
(:meth:`d3ip_cli.physics.ct.ParallelBeamCT.fbp`); this is the baseline wrapper.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from d3ip_cli.core.errors import UsageError
from d3ip_cli.physics.base import LinearOperator
from d3ip_cli.physics.ct import FBP_FILTERS, ParallelBeamCT


def fbp(op: LinearOperator, y: torch.Tensor, *, filter: str = "ram-lak", generator: torch.Generator | None = None,
        progress: Callable[[int, int, dict], None] | None = None, **_: Any) -> torch.Tensor:
    """FBP of a sinogram ``y [Z, V, K]`` -> ``[Z, H, W]``; ``filter`` is one of
    ``ram-lak``, ``shepp-logan``, ``cosine``, ``hamming``, ``hann``."""
    if not isinstance(op, ParallelBeamCT):
        raise UsageError("method fbp applies to CT tasks (sparse-view, limited-angle)")
    if filter not in FBP_FILTERS:
        raise UsageError(f"--filter {filter}: not an FBP filter; choose one of {', '.join(FBP_FILTERS)}")
    with torch.no_grad():
        x = op.fbp(y, filter)
    if progress is not None:
        progress(1, 1, {"stage": "fbp"})
    return x
