"""NumPy ``.npy`` <-> :class:`~d3ip_cli.core.types.Volume`.

A ``.npy`` file holds only the array ``[Z, H, W]`` (a 2D array is one slice; a 4D
array needs ``frame``). The geometry lives in the JSON sidecar ``X.npy.json`` (the
same file as the run record, :func:`d3ip_cli.io.atomic.sidecar_path`) under the key
``"volume"``::

    {"volume": {"shape": [Z, H, W], "affine": [[...4x4 RAS+ mm...]], "meta": {...}}, ...}

The writer creates that sidecar; a command that then writes its run record to the same
path keeps the key (:meth:`d3ip_cli.core.record.RunRecord.add_output` copies it), so
``d3ip convert X.npy -o Y.nii.gz`` round trips. A bare ``.npy`` without the sidecar is
read as axial slices of 1 mm voxels (:data:`BARE_AFFINE`: an array shown as stored is in
the radiological display convention) with a note in ``meta["problems"]``.
Arrays are loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from d3ip_cli import __version__
from d3ip_cli.core.errors import FrameRequired, InputDataError, UsageError
from d3ip_cli.core.types import Volume
from d3ip_cli.io.atomic import _remove, atomic_output, sidecar_path, write_json

BARE_AFFINE = np.array([[0.0, 0.0, -1.0, 0.0],   # columns (w) -> the patient's left (-R)
                        [0.0, -1.0, 0.0, 0.0],   # rows (h) -> posterior (-A)
                        [1.0, 0.0, 0.0, 0.0],    # slices (z) -> superior (+S)
                        [0.0, 0.0, 0.0, 1.0]])
"""RAS+ affine of a ``.npy`` without geometry: axial slices, 1 mm voxels, the way a bare
``[Z, H, W]`` array of a head is usually meant (row 0 anterior, column 0 the patient's right)."""

_META_KEYS = ("modality", "units", "series_description", "series_uid", "dicom", "nifti", "description",
              "source_sha256")


def read_npy(path: str | os.PathLike, *, frame: int | None = None) -> Volume:
    """Read ``X.npy`` (and its ``X.npy.json`` geometry when present)."""
    from d3ip_cli.io.nifti import _file_sha256, _first_line

    p = Path(path)
    if p.is_file():
        with open(p, "rb") as fh:
            if fh.read(6) != b"\x93NUMPY":
                raise InputDataError(f"{p}: not a NumPy .npy file (no .npy header)")
    try:
        arr = np.load(p, allow_pickle=False, mmap_mode=None)
    except Exception as exc:  # noqa: BLE001 - ValueError/OSError/EOFError for bad files
        raise InputDataError(f"{p}: not a readable .npy array ({type(exc).__name__}: {_first_line(exc)})") from None
    if arr.dtype.kind not in "biuf":
        raise InputDataError(f"{p}: {arr.dtype} arrays are not supported (expected real numbers)")
    if arr.ndim == 4:
        if frame is None:
            raise FrameRequired(f"{p} is 4D with {arr.shape[0]} frames on axis 0: choose one with --frame N "
                                f"(0..{arr.shape[0] - 1})", arr.shape[0])
        if not 0 <= frame < arr.shape[0]:
            raise UsageError(f"--frame {frame}: {p} has frames 0..{arr.shape[0] - 1}")
        arr = arr[frame]
    elif frame not in (None, 0):
        raise UsageError(f"--frame {frame}: {p} is not 4D")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise InputDataError(f"{p}: expected a [Z, H, W] array, got shape {arr.shape}")
    problems: list[str] = []
    meta: dict[str, Any] = {}
    affine = BARE_AFFINE.copy()
    side = sidecar_path(p)
    geometry = None
    if side.is_file():
        with contextlib.suppress(OSError, ValueError):
            geometry = json.loads(side.read_text()).get("volume")
    if isinstance(geometry, dict) and "affine" in geometry:
        try:
            affine = np.asarray(geometry["affine"], dtype=np.float64).reshape(4, 4)
        except (TypeError, ValueError):
            raise InputDataError(f"{side}: the 'volume.affine' entry is not a 4x4 matrix") from None
        shape = geometry.get("shape")
        if shape is not None and list(shape) != list(arr.shape):
            problems.append(f"sidecar {side.name} describes shape {shape}, array is {list(arr.shape)}: affine kept")
        saved = geometry.get("meta") or {}
        meta.update({k: saved[k] for k in _META_KEYS if k in saved})
    else:
        problems.append(f"no geometry sidecar ({side.name}): axial slices of 1 mm voxels assumed "
                        "(slices towards superior, rows towards posterior, columns towards the patient's left)")
    meta["problems"] = problems
    meta.setdefault("source_sha256", _file_sha256(p))
    return Volume(np.ascontiguousarray(arr, dtype=np.float32), affine, meta)


def geometry_doc(volume: Volume, description: str | None = None) -> dict[str, Any]:
    """The ``"volume"`` entry of the sidecar: shape, affine, spacing and carried meta."""
    from d3ip_cli.io.volumes import volume_summary

    from d3ip_cli.io.dicom import IDENTIFYING_TAGS

    doc = volume_summary(volume, with_stats=False)
    meta = {k: volume.meta[k] for k in _META_KEYS if k in volume.meta}
    if isinstance(meta.get("dicom"), dict):  # no patient names or IDs in JSON files
        meta["dicom"] = {k: v for k, v in meta["dicom"].items() if k not in IDENTIFYING_TAGS}
    if description:
        meta["description"] = description
    doc["meta"] = meta
    return doc


def write_npy(volume: Volume, path: str | os.PathLike, *, overwrite: bool = False,
              description: str | None = None) -> Path:
    """Write ``X.npy`` (float32 ``[Z, H, W]``) and its geometry sidecar ``X.npy.json``."""
    p = Path(path)
    data = np.ascontiguousarray(volume.data, dtype=np.float32)
    with atomic_output(p, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, data, allow_pickle=False)
    try:
        write_json(sidecar_path(p), {"tool": "d3ip", "version": __version__,
                                     "volume": geometry_doc(volume, description)}, overwrite=True)
    except BaseException:
        _remove(p)
        raise
    return p
