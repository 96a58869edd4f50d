"""NIfTI-1 <-> :class:`~d3ip_cli.core.types.Volume`.

Axis convention
---------------
NIfTI stores voxels as ``[i, j, k]`` (fastest first: columns, rows, slices) with a
RAS+ affine ``A_nii`` acting on ``(i, j, k, 1)``. A :class:`Volume` is ``[Z, H, W]``
with its affine acting on ``(z, h, w, 1)``. With ``i = w``, ``j = h``, ``k = z``::

    data_volume = data_nifti.transpose(2, 1, 0)
    A_volume    = A_nii @ P,   P = the permutation (z, h, w) -> (w, h, z)

so ``A_volume[:, 0] = A_nii[:, 2]`` (slice step), ``A_volume[:, 2] = A_nii[:, 0]``.
``P`` is its own inverse, so the writer applies the same permutation back.

Reading uses nibabel's choice of affine (sform when its code is set, else qform) and
scales it to millimetres when ``xyzt_units`` says metres or microns. The writer sets
sform and qform to the same matrix (code 1, scanner, unless the source NIfTI had
another), ``xyzt_units`` to mm/s and ``descrip`` to ``d3ip <version>; <modality>;
<units>``; the reader parses that ``descrip`` back, so modality and units survive a
round trip. Integer-valued volumes within int16 range are stored as int16 (lossless,
smaller), everything else as float32.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np

from d3ip_cli import __version__
from d3ip_cli.core.errors import FrameRequired, InputDataError, UsageError
from d3ip_cli.core.types import Volume
from d3ip_cli.io.atomic import atomic_output

#: (z, h, w, 1) <-> (i, j, k, 1) = (w, h, z, 1); its own inverse.
AXES_PERMUTATION = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)

_UNIT_TO_MM = {"mm": 1.0, "unknown": 1.0, "meter": 1000.0, "micron": 1e-3}


def _file_sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _parse_descrip(descrip: str) -> dict[str, str]:
    """``"d3ip 0.1.0; CT; HU"`` -> ``{"modality": "CT", "units": "HU"}``; else ``{}``."""
    if not descrip.startswith("d3ip "):
        return {}
    parts = [s.strip() for s in descrip.split(";")]
    out: dict[str, str] = {}
    if len(parts) >= 2 and parts[1] in ("CT", "MR", "OT"):
        out["modality"] = parts[1]
    if len(parts) >= 3 and parts[2]:
        out["units"] = parts[2]
    if len(parts) >= 4:
        out["description"] = "; ".join(parts[3:])
    return out


def read_nifti(path: str | os.PathLike, *, frame: int | None = None) -> Volume:
    """Read a 2D, 3D or (with ``frame``) 4D NIfTI file as a :class:`Volume`."""
    import nibabel as nib

    p = Path(path)
    try:
        img = nib.load(str(p))
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for bad files
        raise InputDataError(f"{p}: not a readable NIfTI file ({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputDataError(f"{p}: not a NIfTI image ({type(img).__name__})")
    shape = img.shape
    dtype = img.get_data_dtype()
    if dtype.kind == "c" or dtype.names:
        raise InputDataError(f"{p}: {dtype} voxels are not supported (expected real scalar values)")
    problems: list[str] = []
    try:
        if len(shape) == 4 and shape[3] > 1:
            if frame is None:
                raise FrameRequired(f"{p} is 4D with {shape[3]} frames: choose one with --frame N (0..{shape[3] - 1})",
                                    shape[3])
            if not 0 <= frame < shape[3]:
                raise UsageError(f"--frame {frame}: {p} has frames 0..{shape[3] - 1}")
            arr = np.asarray(img.dataobj[..., frame], dtype=np.float32)
        elif len(shape) > 4 and any(s > 1 for s in shape[4:]):
            raise InputDataError(f"{p}: {len(shape)}D NIfTI (shape {shape}) is not supported")
        else:
            if frame not in (None, 0):
                raise UsageError(f"--frame {frame}: {p} is not 4D")
            arr = np.asarray(img.dataobj, dtype=np.float32)
            arr = arr.reshape(arr.shape[:3] if arr.ndim >= 3 else arr.shape + (1,) * (3 - arr.ndim))
    except (UsageError, InputDataError):
        raise
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt data blocks
        raise InputDataError(f"{p}: cannot read the voxel data ({type(exc).__name__}: {_first_line(exc)})") from None
    if arr.ndim != 3:
        arr = arr.reshape(arr.shape[:3])

    space_unit = img.header.get_xyzt_units()[0]
    scale = _UNIT_TO_MM.get(space_unit, 1.0)
    if space_unit == "unknown":
        problems.append("NIfTI spatial units not set: millimetres assumed")
    A_nii = np.array(img.affine, dtype=np.float64)
    A_nii[:3, :] *= scale
    affine = A_nii @ AXES_PERMUTATION
    hdr = img.header
    # a C string: it ends at the first NUL (FSL leaves "FSL3.3\0" and bytes of an older text after it)
    descrip = hdr["descrip"].item().split(b"\x00", 1)[0].decode("latin-1", "replace").strip()
    parsed = _parse_descrip(descrip)
    sform_code = int(hdr["sform_code"])
    qform_code = int(hdr["qform_code"])
    if sform_code == 0 and qform_code == 0:
        problems.append("NIfTI has neither sform nor qform: voxel-size-only affine")
    meta = {
        "modality": parsed.get("modality", "OT"),
        "units": parsed.get("units", "a.u."),
        "series_description": parsed.get("description", "") if parsed else descrip,
        "series_uid": "",
        "problems": problems,
        "dicom": {},
        "nifti": {"sform_code": sform_code, "qform_code": qform_code, "descrip": descrip},
        "source_sha256": _file_sha256(p),
    }
    if frame is not None and len(shape) == 4:
        meta["frame"] = int(frame)
    return Volume(np.ascontiguousarray(arr.transpose(2, 1, 0)), affine, meta)


def nifti_image(volume: Volume, description: str | None = None):
    """The :class:`nibabel.Nifti1Image` ``write_nifti`` would write (in memory)."""
    import nibabel as nib

    data = np.asarray(volume.data, dtype=np.float32).transpose(2, 1, 0)
    if np.all(np.isfinite(data)) and data.size and np.all(data == np.round(data)) \
            and data.min() >= -32768 and data.max() <= 32767:
        data = data.astype(np.int16)
    A_nii = np.asarray(volume.affine, dtype=np.float64) @ AXES_PERMUTATION
    img = nib.Nifti1Image(np.ascontiguousarray(data), A_nii)
    hdr = img.header
    src = volume.meta.get("nifti", {}) if isinstance(volume.meta.get("nifti"), dict) else {}
    sform_code = int(src.get("sform_code") or 1)
    qform_code = int(src.get("qform_code") or sform_code)
    img.set_sform(A_nii, code=sform_code)
    img.set_qform(A_nii, code=qform_code)
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_slope_inter(1.0, 0.0)
    units = volume.meta.get("units", "HU" if volume.modality == "CT" else "a.u.")
    descrip = f"d3ip {__version__}; {volume.modality}; {units}"
    if description:
        descrip += f"; {description}"
    hdr["descrip"] = descrip.encode("ascii", "replace")[:79]
    return img


def write_nifti(volume: Volume, path: str | os.PathLike, *, overwrite: bool = False,
                description: str | None = None) -> Path:
    """Write ``volume`` as a NIfTI-1 file (``.nii`` or gzip-compressed ``.nii.gz``)."""
    img = nifti_image(volume, description)
    raw = img.to_bytes()
    p = Path(path)
    if p.name.lower().endswith(".gz"):
        raw = gzip.compress(raw, compresslevel=6, mtime=0)
    with atomic_output(p, overwrite=overwrite) as tmp:
        tmp.write_bytes(raw)
    return p


def _first_line(exc: BaseException) -> str:
    s = str(exc).strip()
    return s.splitlines()[0] if s else type(exc).__name__
