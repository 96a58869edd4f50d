"""Intensity normalisation between file units and the prior's scale (DESIGN §6).

Every reconstruction runs on a normalised image ``x`` (about ``[0, 1]``) and maps back
on output. The affine map ``v = scale * x + offset`` is recorded (run record and
measurement file) as :meth:`IntensityScale.to_dict`.

- ``ct-attenuation`` (CT in HU): :math:`x = (HU + 1000) / 2000`, i.e. linear attenuation
  relative to twice water: air 0, water 0.5, +1000 HU 1. Since :math:`\\mu = \\mu_w (1 + HU/1000)`,
  one normalised unit is :math:`2\\mu_w` per mm (``mu_per_unit``, with
  :math:`\\mu_w = 0.0192` /mm at ~70 keV), which converts line integrals for photon noise.
  HU below -1024 (padding outside the scanner's field of view) are clipped first. An image
  that does not record its units (NIfTI from dcm2niix, NumPy) is read as HU for a CT task
  when its values reach HU-like air (<= -500 in at least 1 % of the voxels), as ``d3ip convert``
  decides for DICOM output.
- ``robust-max`` (MR magnitudes, other images): :math:`x = (v - o) / (p_{99.5} - o)` with
  ``o = min(0, min v)``, so the 99.5th percentile maps to 1.
- ``identity``: already normalised.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from d3ip_cli.core.types import reaches_hu_air

MU_WATER_PER_MM = 0.0192
HU_FLOOR = -1024.0


@dataclasses.dataclass(frozen=True)
class IntensityScale:
    """``v = scale * x + offset`` plus what the numbers mean."""

    kind: str = "identity"
    scale: float = 1.0
    offset: float = 0.0
    units: str = "a.u."
    mu_per_unit: float = 2 * MU_WATER_PER_MM
    percentile: float | None = None
    clip_min: float | None = None

    def normalise(self, v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64)
        if self.clip_min is not None:
            v = np.maximum(v, self.clip_min)
        return ((v - self.offset) / self.scale).astype(np.float32)

    def denormalise(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) * self.scale + self.offset).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["formula"] = "value = scale * x + offset (x: normalised image the methods work on)"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "IntensityScale":
        if not d:
            return cls()
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


def robust_max(v: np.ndarray, percentile: float = 99.5) -> float:
    a = np.abs(np.asarray(v, dtype=np.float64)).ravel()
    m = float(np.percentile(a, percentile)) if a.size else 0.0
    if not m > 0:
        m = float(a.max()) if a.size and a.max() > 0 else 1.0
    return m


def hu_by_values(data: np.ndarray, modality: str, units: str, task_modality: str) -> bool:
    """Whether an image that does not record its units (a NIfTI written by dcm2niix, a NumPy
    array) and is given to a CT task holds HU (:func:`reaches_hu_air`)."""
    return task_modality == "CT" and modality not in ("CT", "MR") and units != "HU" and reaches_hu_air(data)


def scale_for_volume(data: np.ndarray, modality: str, units: str, task_modality: str) -> IntensityScale:
    """Choose the normalisation of an image volume (see module docstring); an image of
    unrecorded units given to a CT task is read as HU when :func:`hu_by_values` says so."""
    if (modality == "CT" and units == "HU") or hu_by_values(data, modality, units, task_modality):
        return IntensityScale("ct-attenuation", scale=2000.0, offset=-1000.0, units="HU", clip_min=HU_FLOOR)
    lo = float(np.min(data))
    offset = min(0.0, lo)
    top = float(np.percentile(np.asarray(data, dtype=np.float64) - offset, 99.5))
    if not top > 0:
        top = float(np.max(np.asarray(data) - offset)) or 1.0
    return IntensityScale("robust-max", scale=top, offset=offset, units=units, percentile=99.5)


def clip_reference(ref: np.ndarray, scale: IntensityScale, notes: list[str], what: str = "--reference") -> np.ndarray:
    """A reference clipped as an image read with ``scale`` is (CT below -1024 HU: the padding
    outside a scanner's field of view), so that a reconstruction is scored against what the data
    can show; a note says so. Without it, a head CT padded with -3024 HU scores ~14 dB lower."""
    if scale.clip_min is None or not np.any(ref < scale.clip_min):
        return ref
    notes.append(f"{what} values below {scale.clip_min:g} {scale.units} were clipped, as the reconstructed "
                 "image's are (outside the field of view)")
    return np.maximum(ref, np.float32(scale.clip_min))


def scale_for_image(img_magnitude: np.ndarray, units: str = "a.u.") -> IntensityScale:
    """Robust-max scale of a first reconstruction (k-space with no recorded scale)."""
    return IntensityScale("robust-max", scale=robust_max(img_magnitude), offset=0.0, units=units, percentile=99.5)
