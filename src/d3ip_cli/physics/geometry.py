"""Acquisition geometries as plain data (built from headers and CLI options).

Parallel-beam CT (per slice)
----------------------------
Image pixel ``(i, j)`` of an ``H x W`` slice with pixel size ``(dy, dx)`` mm sits at

.. math::  x_j = (j - \\tfrac{W-1}{2})\\,dx, \\qquad y_i = (\\tfrac{H-1}{2} - i)\\,dy

(``y`` points up, towards row 0). View ``v`` at angle :math:`\\theta_v` integrates along
the lines :math:`x\\cos\\theta + y\\sin\\theta = s_k` with detector positions
:math:`s_k = (k - \\tfrac{K-1}{2})\\,ds`. This is astra-toolbox's ``parallel``
convention, so the backends agree without remapping. Line integrals are in mm times
image units (attenuation per mm gives dimensionless sinograms).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from d3ip_cli.core.errors import UsageError


@dataclasses.dataclass(frozen=True)
class ParallelBeamGeometry:
    """2D parallel-beam geometry shared by all slices.

    Attributes:
        image_shape: ``(H, W)`` pixels.
        angles: view angles in radians (tuple, hashable).
        det_count: number of detector bins ``K``.
        det_spacing: detector bin width ``ds`` in mm.
        pixel_size: ``(dy, dx)`` in mm.
    """

    image_shape: tuple[int, int]
    angles: tuple[float, ...]
    det_count: int
    det_spacing: float = 1.0
    pixel_size: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        h, w = self.image_shape
        if h < 1 or w < 1:
            raise UsageError(f"CT image shape must be positive, got {self.image_shape}")
        if len(self.angles) < 1:
            raise UsageError("CT geometry needs at least one view")
        if self.det_count < 1:
            raise UsageError(f"detector count must be positive, got {self.det_count}")
        if not (self.det_spacing > 0 and min(self.pixel_size) > 0):
            raise UsageError("detector spacing and pixel size must be positive")

    @property
    def n_views(self) -> int:
        return len(self.angles)

    @property
    def sino_shape(self) -> tuple[int, int]:
        return (self.n_views, self.det_count)

    @property
    def angular_step(self) -> float:
        """The angle each view represents in a Riemann sum over :math:`[0, \\pi)` (radians)."""
        a = np.sort(np.mod(np.asarray(self.angles), np.pi))
        if len(a) < 2:
            return math.pi
        steps = np.diff(a)
        step = float(np.median(steps))
        return step if step > 0 else math.pi / len(a)

    def to_dict(self) -> dict[str, Any]:
        return {
            "geometry": "parallel",
            "image_shape": list(self.image_shape),
            "angles_deg": [round(math.degrees(a), 10) for a in self.angles],
            "det_count": self.det_count,
            "det_spacing_mm": self.det_spacing,
            "pixel_size_mm": list(self.pixel_size),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ParallelBeamGeometry":
        return cls(
            image_shape=tuple(int(s) for s in d["image_shape"]),  # type: ignore[arg-type]
            angles=tuple(math.radians(float(a)) for a in d["angles_deg"]),
            det_count=int(d["det_count"]),
            det_spacing=float(d.get("det_spacing_mm", 1.0)),
            pixel_size=tuple(float(p) for p in d.get("pixel_size_mm", (1.0, 1.0))),  # type: ignore[arg-type]
        )


def sparse_view_angles(n_views: int) -> np.ndarray:
    """``n_views`` angles uniform on :math:`[0, \\pi)` (radians)."""
    if int(n_views) != n_views or n_views < 1:
        raise UsageError(f"--views must be a positive integer, got {n_views}")
    return np.arange(int(n_views)) * (np.pi / int(n_views))


def limited_angle_angles(arc_deg: float, step_deg: float = 1.0) -> np.ndarray:
    """Views in 1-degree steps over an arc: angles ``0, 1, ... < arc`` degrees (radians)."""
    if not (0 < arc_deg <= 180):
        raise UsageError(f"--arc must be in (0, 180] degrees, got {arc_deg}")
    deg = np.arange(0.0, float(arc_deg) - 1e-9, step_deg)
    return np.deg2rad(deg)


def default_detector(image_shape: Sequence[int], pixel_size: Sequence[float],
                     det_spacing: float | None = None) -> tuple[int, float]:
    """Detector count and spacing that cover the image diagonal (spacing: the smaller pixel size)."""
    h, w = image_shape
    dy, dx = pixel_size
    ds = float(det_spacing) if det_spacing else float(min(dy, dx))
    diag = math.hypot(h * dy, w * dx)
    return int(math.ceil(diag / ds - 1e-9)), ds
