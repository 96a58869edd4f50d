"""The in-memory volume shared by readers, writers, operators and the engine.

Conventions
-----------
``Volume.data`` is ``float32 [Z, H, W]``: axis 0 is the slice axis the operators
stack over, axis 1 the image rows, axis 2 the image columns.

``Volume.affine`` is a 4x4 matrix in RAS+ millimetres (the NIfTI convention) whose
*columns are in array-axis order*: for an index ``(z, h, w)``::

    [R, A, S, 1]^T = affine @ [z, h, w, 1]^T

so ``affine[:3, 0]`` is the step between slices, ``affine[:3, 1]`` the step between
rows and ``affine[:3, 2]`` the step between columns. Writers permute these columns
to whatever their format wants (NIfTI stores ``[W, H, Z]``; DICOM uses LPS).

``Volume.meta`` carries what a derived DICOM series needs (modality, patient/study
identifiers, frame of reference, units) plus free provenance entries. Values are
JSON-serialisable.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

HU_AIR_LIKE = -500.0
"""Values at or below this read as HU air."""

HU_AIR_FRACTION = 0.01
"""...in at least this fraction of the voxels: a CT image holds air around the body or in the
lungs (CT_small.dcm: 21 %), while an MR image's negative values are a few filter undershoots
(nibabel's anatomical.nii reaches -610 in 0.009 % of its voxels)."""


def reaches_hu_air(data: np.ndarray) -> bool:
    """Whether values read as HU: at least 1 % of the voxels at or below -500 (HU-like air). The
    one rule for images that do not record their units: a CT task's normalisation, and
    the SOP class ``d3ip convert`` picks for DICOM."""
    a = np.asarray(data)
    return a.size > 0 and float(np.count_nonzero(a <= HU_AIR_LIKE)) >= HU_AIR_FRACTION * a.size


@dataclasses.dataclass
class Volume:
    """A 3D image: ``data`` ``float32 [Z, H, W]``, ``affine`` 4x4 RAS+ mm, ``meta``."""

    data: np.ndarray
    affine: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(4))
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data = np.asarray(self.data)
        if self.data.ndim != 3:
            raise ValueError(f"Volume data must be 3D [Z, H, W], got shape {self.data.shape}")
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (Z, H, W)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def modality(self) -> str:
        """``"CT"``, ``"MR"`` or ``"OT"`` (other/unknown)."""
        return str(self.meta.get("modality", "OT"))

    @property
    def orientation(self) -> str:
        """Axis codes (e.g. ``"SPL"``) of the array axes (Z, H, W), RAS+ letters."""
        import nibabel.orientations as nio

        return "".join(nio.aff2axcodes(self.affine))

    def replace(self, **changes: Any) -> "Volume":
        """A copy with some fields replaced (``meta`` is copied shallowly)."""
        fields = {"data": self.data, "affine": self.affine.copy(), "meta": dict(self.meta)}
        fields.update(changes)
        return Volume(**fields)
