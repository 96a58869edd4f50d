"""Read and write image volumes in any supported format (DESIGN §4).

This module is the one entry point the engine and the CLI use for volumes::

    vol = read_volume("ct_series/")                 # DICOM directory, file, NIfTI or .npy
    write_volume(vol, "recon.nii.gz")               # format follows the suffix
    write_volume(vol, "recon_dcm", format="dicom")  # a derived DICOM series (directory)

Formats
-------
=========  ===================================  ==========================================
format     recognised paths                     module
=========  ===================================  ==========================================
``dicom``  a directory, ``.dcm``/``.dicom``/    :mod:`d3ip_cli.io.dicom`
           ``.ima`` files, files with the
           ``DICM`` preamble
``nifti``  ``.nii``, ``.nii.gz``                :mod:`d3ip_cli.io.nifti`
``npy``    ``.npy`` (+ ``.npy.json`` sidecar)   :mod:`d3ip_cli.io.numpy_io`
=========  ===================================  ==========================================

Every reader returns a :class:`~d3ip_cli.core.types.Volume` (``float32 [Z, H, W]``,
RAS+ mm affine with columns in array-axis order) whose ``meta`` holds at least
``modality``, ``units``, ``source_format``, ``source_path``, ``series_description``,
``series_uid``, ``problems`` and ``dicom`` (identifying tags for a derived series).

Readers refuse data that cannot form a regular grid (missing slices, uneven spacing,
mixed series) with :class:`~d3ip_cli.core.errors.InputDataError` (exit 3); with
``strict=False`` they build the best volume they can and list those problems in
``meta["problems"]`` and ``meta["fatal_problems"]`` (used by ``d3ip info``).

Writers go through :func:`d3ip_cli.io.atomic.atomic_output`: nothing appears under the
output name until it is complete, and an existing output is kept unless ``overwrite``.
Notes a caller should pass on to the user (for example the modality a DICOM writer
chose) are issued as :class:`D3ipWarning` through :mod:`warnings`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from d3ip_cli.core.errors import InputDataError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from d3ip_cli.core.types import Volume

FORMATS = ("dicom", "nifti", "npy")
_ALIASES = {"dicom": "dicom", "dcm": "dicom", "nifti": "nifti", "nii": "nifti", "nii.gz": "nifti",
            "npy": "npy", "numpy": "npy"}
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_MEASUREMENT_SUFFIXES = (".h5", ".hdf5", ".mrd", ".ismrmrd")


class D3ipWarning(UserWarning):
    """A note from a reader or writer that the command should show and record."""


def _name(path: str | os.PathLike) -> str:
    return Path(path).name.lower()


def _has_dicom_preamble(p: Path) -> bool:
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _suffix_format(name: str) -> str | None:
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith(".npy"):
        return "npy"
    return None


def normalise_format(format: str) -> str:
    """``--format``'s value as ``"dicom"``, ``"nifti"`` or ``"npy"`` (aliases accepted), or a
    usage error (exit 2)."""
    key = format.strip().lower()
    if key not in _ALIASES:
        raise UsageError(f"--format {format!r}: expected one of {', '.join(FORMATS)}")
    return _ALIASES[key]


def detect_format(path: str | os.PathLike, format: str | None = None) -> str:
    """``"dicom"``, ``"nifti"`` or ``"npy"`` for ``path`` (input or output).

    ``format`` (``--format``) wins when given. Otherwise the suffix decides; a path
    without a known suffix is a DICOM series directory (an existing file without a
    suffix is DICOM when it carries the ``DICM`` preamble). Measurement files
    (``.h5``) and unknown suffixes are usage errors (exit 2).
    """
    p = Path(path)
    name = _name(p)
    if format:
        fmt = normalise_format(format)
        by_suffix = _suffix_format(name)
        if by_suffix and by_suffix != fmt:
            raise UsageError(f"--format {format} contradicts the suffix of {p} ({by_suffix})")
        return fmt
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        return "nifti"
    if name.endswith(".npy"):
        return "npy"
    if name.endswith(_DICOM_SUFFIXES):
        return "dicom"
    if name.endswith(_MEASUREMENT_SUFFIXES):
        raise UsageError(f"{p} is a measurement file, not an image volume")
    if p.is_dir() or str(path).endswith(os.sep) or not Path(name).suffix:
        return "dicom"
    if p.is_file() and _has_dicom_preamble(p):
        return "dicom"
    raise UsageError(f"{p}: unsupported volume format {Path(name).suffix!r} "
                     "(expected a DICOM file or directory, .nii, .nii.gz or .npy)")


def is_volume_path(path: str | os.PathLike) -> bool:
    """True for a DICOM file or directory, ``.nii``/``.nii.gz`` or ``.npy``; False otherwise.

    Measurement files (``.h5``, ISMRMRD) and unknown suffixes give False. A suffix-less
    path counts when it is a directory or a file with the DICOM preamble.
    """
    p = Path(path)
    name = _name(p)
    if name.endswith((".nii", ".nii.gz", ".npy") + _DICOM_SUFFIXES):
        return True
    if name.endswith(_MEASUREMENT_SUFFIXES):
        return False
    if p.is_dir():
        return True
    return p.is_file() and _has_dicom_preamble(p)


def read_volume(path: str | os.PathLike, *, series: str | None = None, frame: int | None = None,
                strict: bool = True) -> "Volume":
    """Read a volume from a DICOM file/directory, NIfTI file or ``.npy`` file.

    Parameters
    ----------
    path : a DICOM series directory, DICOM file (single or multi-frame, classic or
        enhanced), ``.nii``/``.nii.gz`` (3D; 4D with ``frame``) or ``.npy``.
    series : SeriesInstanceUID (or a unique prefix of it) to pick when a directory holds
        several series (DICOM only).
    frame : index of the volume to take from a 4D NIfTI or NumPy array.
    strict : refuse (exit 3) grids with missing slices or uneven spacing; with False the
        volume is built anyway and ``meta["fatal_problems"]`` lists what was wrong.

    Returns
    -------
    Volume with ``data`` ``float32 [Z, H, W]`` (CT in HU) and a RAS+ mm affine.
    """
    p = Path(path)
    if not p.exists():
        raise InputDataError(f"{p} does not exist")
    fmt = detect_format(p)
    if fmt != "dicom" and series is not None:
        raise UsageError(f"--series applies to DICOM input only ({p} is {fmt})")
    if fmt == "dicom":
        from d3ip_cli.io import dicom

        if frame is not None:
            raise UsageError("--frame applies to 4D NIfTI/NumPy input only; pick a DICOM series with --series")
        vol = dicom.read_dicom(p, series=series, strict=strict)
    elif fmt == "nifti":
        from d3ip_cli.io import nifti

        vol = nifti.read_nifti(p, frame=frame)
    else:
        from d3ip_cli.io import numpy_io

        vol = numpy_io.read_npy(p, frame=frame)
    return finalize_volume(vol, p, fmt)


def read_single_frame(path: str | os.PathLike, role: str, read: Any = None) -> "Volume":
    """``read(path)`` (default :func:`read_volume`) for a volume whose command has no ``--frame`` of
    its own (``--reference``, ``metrics``): a 4D file is refused with how to take one frame."""
    from d3ip_cli.core.errors import FrameRequired

    try:
        return (read or read_volume)(path)
    except FrameRequired as exc:
        why = " (--frame picks a frame of the input only)" if role.startswith("--") else ""
        raise UsageError(f"{role} {path} is 4D with {exc.frames} frames{why}: take one first, e.g. "
                         f"d3ip convert {path} --frame 0 -o frame0.nii.gz") from None


def finalize_volume(vol: "Volume", path: Path, fmt: str) -> "Volume":
    """Fill the common ``meta`` keys and check that the values are finite.

    A volume with no finite voxel is refused (exit 3). Isolated NaN/inf voxels are set
    to 0 and reported in ``meta["problems"]``.
    """
    import numpy as np

    data = np.asarray(vol.data, dtype=np.float32)
    finite = np.isfinite(data)
    meta = vol.meta
    problems = meta.setdefault("problems", [])
    if not finite.any():
        raise InputDataError(f"{path}: no finite voxel values (all NaN or infinite)")
    if not finite.all():
        n = int((~finite).sum())
        problems.append(f"{n} non-finite voxel value(s) (NaN/inf) set to 0")
        data = np.where(finite, data, np.float32(0))
    if not np.isfinite(vol.affine).all() or abs(np.linalg.det(vol.affine[:3, :3])) < 1e-12:
        raise InputDataError(f"{path}: the voxel-to-world affine is degenerate")
    vol.data = np.ascontiguousarray(data)
    meta.setdefault("modality", "OT")
    meta.setdefault("units", "HU" if meta["modality"] == "CT" else "a.u.")
    meta["source_format"] = fmt
    meta["source_path"] = str(path.resolve())
    meta.setdefault("series_description", "")
    meta.setdefault("series_uid", "")
    meta.setdefault("dicom", {})
    return vol


def write_volume(volume: "Volume", path: str | os.PathLike, *, format: str | None = None,
                 overwrite: bool = False, description: str | None = None, uid_seed: str = "",
                 series_base: int = 1000) -> Path:
    """Write ``volume`` atomically as NIfTI, NumPy or a derived DICOM series; return the path.

    Parameters
    ----------
    format : ``dicom``/``nifti``/``npy``; by default it follows the suffix of ``path``
        (no suffix: a DICOM series directory).
    overwrite : replace an existing output (otherwise :class:`OutputError`, exit 4).
    description : what produced the volume (for example ``"d3ip sparse-view"``); it
        becomes the DICOM SeriesDescription (with "research use") and is recorded in
        NIfTI/NumPy metadata.
    uid_seed : a string that identifies the inputs and settings (for example input hash +
        configuration); DICOM UIDs are derived from it and the written content, so the
        same run writes the same UIDs.
    series_base : the DICOM SeriesNumber is ``series_base`` + the source's series number
        (a second series derived from the same source, such as an uncertainty map, takes
        another base so that viewers list the two apart).
    """
    fmt = output_format(path, format)
    p = Path(path)
    if fmt == "dicom":
        from d3ip_cli.io import dicom

        return dicom.write_dicom_series(volume, p, overwrite=overwrite, description=description, uid_seed=uid_seed,
                                        series_base=series_base)
    if fmt == "nifti":
        from d3ip_cli.io import nifti

        return nifti.write_nifti(volume, p, overwrite=overwrite, description=description)
    from d3ip_cli.io import numpy_io

    return numpy_io.write_npy(volume, p, overwrite=overwrite, description=description)


def output_format(path: str | os.PathLike, format: str | None = None) -> str:
    """The format an output ``path`` will be written in, or a usage error (exit 2) for a name
    other tools could not open: a DICOM series is a folder (no ``.dcm`` suffix); NIfTI and
    NumPy files need their suffix. Called before any work, and again by the writers."""
    fmt = detect_format(path, format)
    p = Path(path)
    name = _name(p)
    if fmt == "dicom" and name.endswith(_DICOM_SUFFIXES):
        raise UsageError(f"{p}: a DICOM series is written as a directory; give a path without a .dcm suffix")
    if fmt == "nifti" and not name.endswith((".nii", ".nii.gz")):
        raise UsageError(f"{p}: a NIfTI file needs a name ending in .nii.gz or .nii (other tools go by it)")
    if fmt == "npy" and not name.endswith(".npy"):
        raise UsageError(f"{p}: a NumPy file needs a name ending in .npy")
    return fmt


def volume_summary(volume: "Volume", *, with_stats: bool = True) -> dict[str, Any]:
    """A JSON-ready description of a volume: grid, geometry, modality and value range.

    ``spacing_mm`` is the voxel size along (Z, H, W), ``orientation`` the RAS+ axis codes
    of those axes (``"SPL"`` = slices go superior, rows posterior, columns left), and
    ``affine`` the 4x4 RAS+ matrix with columns in array-axis order.
    """
    import numpy as np

    meta = volume.meta
    doc: dict[str, Any] = {
        "shape": list(volume.shape),
        "spacing_mm": [round(s, 6) for s in volume.spacing],
        "orientation": volume.orientation,
        "affine": [[float(v) for v in row] for row in volume.affine],
        "modality": volume.modality,
        "units": meta.get("units", "a.u."),
        "series_description": meta.get("series_description", ""),
        "series_uid": meta.get("series_uid", ""),
        "slice_count": volume.shape[0],
    }
    if meta.get("source_modality"):
        doc["source_modality"] = meta["source_modality"]
    if with_stats:
        d = volume.data
        doc["value_range"] = [float(np.min(d)), float(np.max(d))]
        doc["mean"] = float(np.mean(d, dtype=np.float64))
        doc["std"] = float(np.std(d, dtype=np.float64))
    return doc


def reorient_like(volume: Any, affine: Any) -> Any:
    """``volume`` with its axes permuted and flipped (no resampling) so that they run the way
    ``affine``'s do: a reference that dcm2niix stored with flipped rows, or a DICOM series read
    back in another slice order, then lines up voxel for voxel with a reconstruction of the same
    grid. Volumes without a geometry (NumPy) and volumes already aligned are returned as they are."""
    import numpy as np
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    if (volume.meta or {}).get("source_format") == "npy":
        return volume
    start, end = io_orientation(np.asarray(volume.affine, float)), io_orientation(np.asarray(affine, float))
    transform = ornt_transform(start, end)
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return volume
    data = np.ascontiguousarray(apply_orientation(volume.data, transform))
    return volume.replace(data=data, affine=np.asarray(volume.affine, float) @ inv_ornt_aff(transform, volume.data.shape))


def check_same_grid(recon: Any, reference: Any, *, what: str = "reference") -> None:
    """Refuse (exit 3) two volumes of the same shape that sit differently in space.

    The metrics compare voxel arrays, so a reference at another origin, spacing or orientation
    would give a meaningless score; callers first :func:`reorient_like` the reference (axis
    order and flips are not a difference). Volumes without a geometry (NumPy arrays) are
    compared as they are.
    """
    if "npy" in {(v.meta or {}).get("source_format") for v in (recon, reference)}:
        return
    import numpy as np

    a, b = np.asarray(recon.affine, dtype=float), np.asarray(reference.affine, dtype=float)
    tol = 0.01 * float(min(np.linalg.norm(a[:3, :3], axis=0).min(), np.linalg.norm(b[:3, :3], axis=0).min()))
    if not np.allclose(a, b, rtol=0, atol=max(tol, 1e-4)):
        raise InputDataError(f"the {what} is on another grid in space (orientation, spacing or origin differ; "
                             "voxel-wise metrics would be meaningless): resample one onto the other first")
