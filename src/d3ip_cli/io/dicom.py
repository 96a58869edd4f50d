"""DICOM <-> :class:`~d3ip_cli.core.types.Volume`: series directories, single and
multi-frame files in, a derived series of classic CT/MR Image Storage objects out.

Geometry
--------
DICOM positions are in the patient's LPS+ frame (x to the patient's left, y posterior,
z superior); a :class:`Volume` uses RAS+, so ``F = diag(-1, -1, 1)`` converts both ways.
For a slice with ImagePositionPatient ``p`` (centre of the first transmitted pixel),
ImageOrientationPatient ``[r, c]`` (``r``: direction along a row, i.e. of increasing
column index; ``c``: direction of increasing row index) and PixelSpacing
``[Δrow, Δcol]`` (spacing *between rows*, then *between columns*), the voxel
``(z, h, w)`` of a stack of slices lies at::

    x_LPS = p_0 + z · v + h · Δrow · c + w · Δcol · r

where ``v`` is the step between consecutive slices, estimated as
``(p_last - p_0) / (Z - 1)`` so that gantry tilt (``v`` not parallel to the normal
``n = r × c``) is kept. The Volume affine is therefore::

    A = [[F v, F c Δrow, F r Δcol, F p_0], [0, 0, 0, 1]]

Slices are sorted by ``s = p · n``. When the InstanceNumbers run against that order,
the order is reversed so that axis 0 follows the InstanceNumber (the writer numbers
slices along axis 0, so a written series reads back as the same array). The writer
stores each image in the display convention of scanners (:func:`display_oriented`:
rows towards posterior/inferior, columns towards the patient's left), flipping or
transposing the in-plane axes of a grid stored otherwise (e.g. a RAS NIfTI): the same
voxels at the same positions, so such a series reads back in that display order. Consecutive
differences of ``s`` must be equal (within ``max(0.01 mm, 1 %)``): a difference close
to ``k`` times the spacing means ``k - 1`` missing slices, any other unevenness is
"uneven spacing"; both are refused in strict mode.

Values
------
Stored pixels ``q`` map to real values ``x = slope · q + intercept`` (RescaleSlope /
Intercept, per slice or per frame), which for CT is Hounsfield units. The writer
inverts that with int16 (or uint16) pixels: integer-valued volumes that fit are stored
exactly with slope 1, otherwise ``slope = (max - min) / 65530`` and ``intercept =
(max + min) / 2`` (both rounded to their 16-character DS strings first, so the stored
pixels are quantised against exactly the values a reader sees), a maximum error of
``slope / 2``.

UIDs
----
Derived SeriesInstanceUID and SOPInstanceUIDs come from
:func:`pydicom.uid.generate_uid` with ``entropy_srcs`` built from ``uid_seed``, the
source series, the description, the grid and a hash of the voxel values: the same
inputs and settings give the same UIDs, different content gives different ones.
Study and FrameOfReference UIDs are kept from the source; when the source has none
(NIfTI, NumPy) they are derived from the source file's hash, so several outputs made
from one input share a study and frame of reference.

Compressed transfer syntaxes are decoded by pydicom's pixel-data plugins (the
``codecs`` extra: pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg); when none is
installed the reader fails with :class:`MissingComponentError` (exit 6) naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from d3ip_cli import __version__
from d3ip_cli.core.errors import InputDataError, MissingComponentError, UsageError
from d3ip_cli.core.types import Volume
from d3ip_cli.io.atomic import atomic_output
from d3ip_cli.io.volumes import D3ipWarning

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

CODECS_HINT = "pip install 'd3ip[codecs]' (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg)"

#: Identifying tags carried from a source series into a derived one (``meta["dicom"]``).
CARRIED_TAGS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "IssuerOfPatientID",
    "StudyInstanceUID", "StudyID", "StudyDate", "StudyTime", "StudyDescription", "AccessionNumber",
    "ReferringPhysicianName", "FrameOfReferenceUID", "PositionReferenceIndicator",
    "Manufacturer", "ManufacturerModelName", "InstitutionName", "BodyPartExamined", "Laterality",
    "PatientPosition",
    "SeriesNumber", "SeriesInstanceUID", "SeriesDescription", "Modality", "SOPClassUID",
    "KVP", "ConvolutionKernel", "ScanningSequence", "SequenceVariant", "MRAcquisitionType",
    "MagneticFieldStrength", "RepetitionTime", "EchoTime", "InversionTime", "FlipAngle",
)

#: Carried tags that identify the patient. A derived DICOM series keeps them (it joins the
#: patient's study); JSON files (run records, ``.npy`` geometry sidecars) leave them out, as
#: dcm2niix's anonymised BIDS sidecars do, since those travel with NIfTI files that are often
#: made to share data without names.
IDENTIFYING_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "IssuerOfPatientID", "AccessionNumber",
                    "ReferringPhysicianName", "InstitutionName", "StudyID", "StudyDate", "StudyTime")
# (StudyID: scanners often set it to the patient ID, as pydicom's CT_small.dcm does; dates are
# identifiers under HIPAA's safe harbour)

_ENHANCED_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1": "CT",   # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1": "MR",   # Enhanced MR Image Storage
}
_NON_IMAGE_MODALITIES = {"SR", "PR", "RTSTRUCT", "RTPLAN", "RTDOSE", "SEG", "REG", "KO", "DOC"}


class MultipleSeriesError(InputDataError):
    """A directory holds several series and none was chosen (``--series``).

    ``series`` lists them: dicts with ``series_uid``, ``series_description``,
    ``modality``, ``series_number`` and ``files``.
    """

    def __init__(self, message: str, series: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.series = series


# --------------------------------------------------------------------------- reading


@dataclasses.dataclass
class _Slice:
    """One 2D image (a file, or one frame of a multi-frame file) and its geometry."""

    source: str
    rows: int
    cols: int
    load: Callable[[], np.ndarray]
    ipp: np.ndarray | None = None
    iop: np.ndarray | None = None
    spacing: tuple[float, float] | None = None
    thickness: float | None = None
    between: float | None = None
    slope: float = 1.0
    intercept: float = 0.0
    instance: int | None = None
    uid: str | None = None  # SOPInstanceUID of a single-frame file: two files with one are copies


def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.size == n and np.all(np.isfinite(arr)) else None


def _float(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _dcmread(path: Path, *, headers_only: bool, force: bool = False):
    import pydicom

    return pydicom.dcmread(str(path), stop_before_pixels=headers_only, force=force)


def _check_decoder(ds, source: str) -> None:
    """Fail clearly when a compressed transfer syntax has no installed decoder plugin."""
    from pydicom.uid import UID

    tsuid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsuid is None:
        return
    ts = UID(tsuid)
    if not ts.is_compressed:
        return
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise InputDataError(f"{source}: transfer syntax {ts.name} ({ts}) is not supported") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin"
        raise MissingComponentError(
            f"{source}: '{ts.name}' pixel data needs a decoder plugin: {CODECS_HINT} [{missing}]")


def _ensure_transfer_syntax(ds) -> None:
    """Files without a meta header (no preamble) get the transfer syntax they were read with."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit is not False else
                              ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian)


def _pixels(ds, source: str) -> np.ndarray:
    """Decoded stored pixel values, ``[R, C]`` or ``[frames, R, C]``."""
    _ensure_transfer_syntax(ds)
    _check_decoder(ds, source)
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise InputDataError(f"{source}: colour images (SamplesPerPixel={ds.SamplesPerPixel}) are not supported")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise InputDataError(f"{source}: no pixel data")
    try:
        arr = ds.pixel_array
    except MissingComponentError:
        raise
    except RuntimeError as exc:
        if "missing dependencies" in str(exc) or "plugin" in str(exc):
            raise MissingComponentError(f"{source}: cannot decode the pixel data: {CODECS_HINT}") from None
        raise InputDataError(f"{source}: cannot decode the pixel data ({_first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt pixel data raises many types
        raise InputDataError(f"{source}: cannot decode the pixel data ({type(exc).__name__}: {_first_line(exc)}); "
                             "the file may be truncated or corrupt") from None
    return np.asarray(arr)


def _first_line(exc: BaseException) -> str:
    s = str(exc).strip()
    return s.splitlines()[0] if s else type(exc).__name__


def _meta_from_ds(ds) -> dict[str, Any]:
    """JSON-ready identifying tags (strings/numbers) of ``ds``."""
    from pydicom.multival import MultiValue

    out: dict[str, Any] = {}
    for key in CARRIED_TAGS:
        value = ds.get(key)
        if value is None or value == "":
            continue
        if key == "SeriesNumber":
            value = _int(value)
        elif isinstance(value, MultiValue):
            value = "\\".join(str(v) for v in value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = int(value) if float(value).is_integer() else float(value)
        else:
            value = str(value)
        if value is not None and value != "":
            out[key] = value
    for key in ("WindowCenter", "WindowWidth"):
        v = ds.get(key)
        if isinstance(v, MultiValue):
            v = v[0] if len(v) else None
        f = _float(v)
        if f is not None:
            out[key] = f
    return out


def _modality(ds) -> str:
    sop = str(ds.get("SOPClassUID", ""))
    if sop in _ENHANCED_CLASSES:
        return _ENHANCED_CLASSES[sop]
    mod = str(ds.get("Modality", "")).upper()
    return mod if mod in ("CT", "MR") else "OT"


def _fg_item(ds, frame_item, sequence: str):
    """First item of a functional group macro, per-frame first, then shared."""
    for holder in (frame_item, (ds.get("SharedFunctionalGroupsSequence") or [None])[0]):
        if holder is not None and sequence in holder and len(holder[sequence].value) > 0:
            return holder[sequence].value[0]
    return None


def _slices_from_dataset(ds, source: str, path: Path) -> tuple[list[_Slice], list[str]]:
    """The 2D slices of one file: one for a single-frame image, one per frame otherwise."""
    problems: list[str] = []
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or cols <= 0:
        raise InputDataError(f"{source}: not an image (no Rows/Columns)")
    n_frames = _int(ds.get("NumberOfFrames", 1)) or 1
    cache: dict[str, np.ndarray] = {}

    def all_pixels() -> np.ndarray:
        if "px" not in cache:
            full = ds if "PixelData" in ds or "FloatPixelData" in ds else _dcmread(path, headers_only=False, force=True)
            arr = _pixels(full, source)
            cache["px"] = arr.reshape((n_frames, rows, cols))
        return cache["px"]

    top_ipp = _floats(ds.get("ImagePositionPatient"), 3)
    top_iop = _floats(ds.get("ImageOrientationPatient"), 6)
    top_ps = _floats(ds.get("PixelSpacing"), 2)
    top_thick = _float(ds.get("SliceThickness"))
    top_between = _float(ds.get("SpacingBetweenSlices"))
    top_slope = _float(ds.get("RescaleSlope"))
    top_inter = _float(ds.get("RescaleIntercept"))

    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if n_frames > 1 and per_frame is not None and len(per_frame) == n_frames:
        slices = []
        for f in range(n_frames):
            item = per_frame[f]
            pos = _fg_item(ds, item, "PlanePositionSequence")
            ori = _fg_item(ds, item, "PlaneOrientationSequence")
            meas = _fg_item(ds, item, "PixelMeasuresSequence")
            pvt = _fg_item(ds, item, "PixelValueTransformationSequence")
            content = _fg_item(ds, item, "FrameContentSequence")
            slices.append(_Slice(
                source=f"{source}#frame{f + 1}", rows=rows, cols=cols,
                load=(lambda f=f: all_pixels()[f]),
                ipp=_floats(pos.get("ImagePositionPatient"), 3) if pos is not None else None,
                iop=_floats(ori.get("ImageOrientationPatient"), 6) if ori is not None else top_iop,
                spacing=_tuple2(_floats(meas.get("PixelSpacing"), 2)) if meas is not None else _tuple2(top_ps),
                thickness=_float(meas.get("SliceThickness")) if meas is not None else top_thick,
                between=_float(meas.get("SpacingBetweenSlices")) if meas is not None else top_between,
                slope=(_float(pvt.get("RescaleSlope")) if pvt is not None else top_slope) or 1.0,
                intercept=(_float(pvt.get("RescaleIntercept")) if pvt is not None else top_inter) or 0.0,
                instance=_int(content.get("InStackPositionNumber")) if content is not None else f + 1,
            ))
        return slices, problems
    if n_frames > 1:
        # Classic multi-frame (or an enhanced file stripped of its functional groups):
        # frames are taken as contiguous slices along the normal of the first frame.
        step = top_between or top_thick
        if top_ipp is not None and top_iop is not None:
            n = np.cross(top_iop[:3], top_iop[3:])
            positions = [top_ipp + f * (step or 1.0) * n for f in range(n_frames)]
            problems.append("multi-frame file without per-frame positions: frames assumed contiguous along the "
                            f"slice normal, {step or 1.0:g} mm apart")
        else:
            positions = [None] * n_frames
        return [
            _Slice(source=f"{source}#frame{f + 1}", rows=rows, cols=cols, load=(lambda f=f: all_pixels()[f]),
                   ipp=positions[f], iop=top_iop, spacing=_tuple2(top_ps), thickness=top_thick,
                   between=top_between, slope=top_slope or 1.0, intercept=top_inter or 0.0, instance=f + 1)
            for f in range(n_frames)
        ], problems
    return [_Slice(source=source, rows=rows, cols=cols, load=lambda: all_pixels()[0], ipp=top_ipp, iop=top_iop,
                   spacing=_tuple2(top_ps), thickness=top_thick, between=top_between,
                   slope=top_slope or 1.0, intercept=top_inter or 0.0,
                   instance=_int(ds.get("InstanceNumber")), uid=str(ds.get("SOPInstanceUID", "")) or None)], problems


def _tuple2(a: np.ndarray | None) -> tuple[float, float] | None:
    return (float(a[0]), float(a[1])) if a is not None and np.all(a > 0) else None


def _orthonormal(iop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = iop[:3] / np.linalg.norm(iop[:3])
    c = iop[3:] / np.linalg.norm(iop[3:])
    return r, c


def assemble(slices: list[_Slice], label: str, *, strict: bool = True,
             problems: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Sort ``slices`` into a regular stack; return ``(data, affine, problems, fatal)``.

    ``data`` is ``float32 [Z, H, W]`` in real-world units, ``affine`` the RAS+ matrix of
    the module docstring. ``fatal`` lists the problems that make the grid irregular
    (missing slices, uneven spacing, non-collinear positions); with ``strict`` the first
    one raises :class:`InputDataError` instead.
    """
    problems = list(problems or [])
    fatal: list[str] = []
    if not slices:
        raise InputDataError(f"{label}: no image slices")
    sizes = {(s.rows, s.cols) for s in slices}
    if len(sizes) > 1:
        raise InputDataError(f"{label}: mixed series: slices have different sizes {sorted(sizes)}")
    geometry = all(s.ipp is not None and s.iop is not None for s in slices)
    if geometry:
        iop0 = slices[0].iop
        if any(np.max(np.abs(s.iop - iop0)) > 1e-4 for s in slices):
            n_orient = len({tuple(np.round(s.iop, 4)) for s in slices})
            raise InputDataError(f"{label}: mixed series: {n_orient} different slice orientations "
                                 "(several stacks or localizers in one series)")
    spacings = {s.spacing for s in slices}
    if len(spacings) > 1:
        raise InputDataError(f"{label}: mixed series: slices have different pixel spacings "
                             f"{sorted(map(str, spacings))}")
    ps = slices[0].spacing
    if ps is None:
        problems.append("no PixelSpacing: 1 mm pixels assumed")
        ps = (1.0, 1.0)

    if not geometry:
        if len(slices) > 1:
            problems.append("no patient geometry (ImagePositionPatient/ImageOrientationPatient): slices ordered by "
                            "InstanceNumber, axial orientation and origin 0 assumed")
        else:
            problems.append("no patient geometry (ImagePositionPatient/ImageOrientationPatient): axial orientation "
                            "and origin 0 assumed")
        order = sorted(range(len(slices)), key=lambda i: (slices[i].instance or 0, i))
        slices = [slices[i] for i in order]
        r, c = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
        n = np.cross(r, c)
        step = slices[0].between or slices[0].thickness or 1.0
        v = n * step
        p0 = np.zeros(3)
    else:
        r, c = _orthonormal(slices[0].iop)
        if abs(float(np.dot(r, c))) > 1e-3:
            raise InputDataError(f"{label}: ImageOrientationPatient row and column directions are not orthogonal")
        n = np.cross(r, c)
        n /= np.linalg.norm(n)
        s_pos = np.array([float(np.dot(s.ipp, n)) for s in slices])
        order = np.argsort(s_pos, kind="stable")
        slices = [slices[i] for i in order]
        s_pos = s_pos[order]
        inst = [s.instance for s in slices]
        if len(slices) > 1 and all(i is not None for i in inst) and all(a > b for a, b in zip(inst, inst[1:])):
            slices.reverse()
            s_pos = s_pos[::-1]
        p0 = slices[0].ipp
        if len(slices) == 1:
            step = slices[0].between or slices[0].thickness or 1.0
            v = n * step
        else:
            d = np.abs(np.diff(s_pos))
            if np.min(d) < 1e-3:
                dup = int(np.sum(d < 1e-3))
                copies = [(a, b) for a, b, gap in zip(slices, slices[1:], d) if gap < 1e-3 and a.uid and a.uid == b.uid]
                if copies and len(copies) == dup:  # every shared position is a copy: name them
                    a, b = copies[0]
                    raise InputDataError(
                        f"{label}: {len(copies)} file(s) are copies of another (the same SOPInstanceUID, e.g. "
                        f"{Path(a.source).name} and {Path(b.source).name}): remove the copies")
                also = f" ({len(copies)} of them copies of another file)" if copies else ""
                raise InputDataError(
                    f"{label}: mixed series: {dup} slice(s) share a position with another{also} (several echoes, time "
                    "points or acquisitions in one series); not a single 3D volume")
            v = (slices[-1].ipp - p0) / (len(slices) - 1)
            fatal += _spacing_problems(d, label)
            if not fatal:
                expected = p0[None, :] + np.arange(len(slices))[:, None] * v[None, :]
                resid = np.max(np.linalg.norm(np.stack([s.ipp for s in slices]) - expected, axis=1))
                if resid > max(0.01, 0.01 * float(np.linalg.norm(v))):
                    fatal.append(f"slice positions are not on a line (largest deviation {resid:.3g} mm)")
            cosang = abs(float(np.dot(v, n))) / float(np.linalg.norm(v))
            if cosang < 0.99999:
                problems.append(f"slices are sheared by {np.degrees(np.arccos(min(1.0, cosang))):.2f} deg "
                                "(gantry tilt); the affine keeps the shear")
    problems += fatal
    if fatal and strict:
        raise InputDataError(f"{label}: {fatal[0]}")

    data = np.empty((len(slices), slices[0].rows, slices[0].cols), dtype=np.float32)
    for k, s in enumerate(slices):
        px = s.load()
        data[k] = px.astype(np.float64) * s.slope + s.intercept
    affine = np.eye(4)
    affine[:3, 0] = LPS_TO_RAS @ v
    affine[:3, 1] = LPS_TO_RAS @ (c * ps[0])
    affine[:3, 2] = LPS_TO_RAS @ (r * ps[1])
    affine[:3, 3] = LPS_TO_RAS @ p0
    return data, affine, problems, fatal


def _spacing_problems(d: np.ndarray, label: str) -> list[str]:
    """Gaps and uneven spacing from the sorted slice distances ``d`` (mm)."""
    nominal = float(np.median(d))
    tol = max(0.01, 0.01 * nominal)
    if np.max(np.abs(d - nominal)) <= tol:
        return []
    ratio = d / nominal
    k = np.rint(ratio)
    gaps = np.where((k >= 2) & (np.abs(d - k * nominal) <= tol * k))[0]
    out = []
    if gaps.size:
        missing = int(np.sum(k[gaps] - 1))
        i = int(gaps[0])
        out.append(f"missing slices: {missing} slice(s) missing ({gaps.size} gap(s); first a {d[i]:.4g} mm step "
                   f"after slice {i + 1} where the spacing is {nominal:.4g} mm)")
    rest = np.setdiff1d(np.where(np.abs(d - nominal) > tol)[0], gaps)
    if rest.size:
        out.append(f"uneven slice spacing: steps from {d.min():.4g} to {d.max():.4g} mm (median {nominal:.4g} mm)")
    return out


def _is_image_header(ds) -> bool:
    sop = str(ds.get("SOPClassUID", ""))
    if sop == "1.2.840.10008.1.3.10":  # Media Storage Directory (DICOMDIR)
        return False
    if str(ds.get("Modality", "")).upper() in _NON_IMAGE_MODALITIES:
        return False
    return "Rows" in ds and "Columns" in ds


def _scan_directory(root: Path) -> tuple[dict[str, list[tuple[Path, Any]]], list[str], int]:
    """Headers of the DICOM images under ``root`` grouped by SeriesInstanceUID.

    Returns ``(groups, problems, n_files)``; files that are not DICOM are skipped, DICOM
    files that cannot be parsed are reported.
    """
    from pydicom.errors import InvalidDicomError

    files = sorted(f for f in root.rglob("*") if f.is_file()
                   and not any(part.startswith(".") for part in f.relative_to(root).parts))
    groups: dict[str, list[tuple[Path, Any]]] = {}
    problems: list[str] = []
    not_dicom = unreadable = non_image = 0
    for f in files:
        if f.name.upper() == "DICOMDIR":
            continue
        try:
            ds = _dcmread(f, headers_only=True)
        except InvalidDicomError:
            ds = _read_without_preamble(f)
            if ds is None:
                not_dicom += 1
                continue
        except Exception as exc:  # noqa: BLE001 - truncated headers raise many types
            unreadable += 1
            problems.append(f"unreadable DICOM file {f.relative_to(root)} ({type(exc).__name__}: {_first_line(exc)})")
            continue
        if not _is_image_header(ds):
            non_image += 1
            continue
        groups.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
    if not_dicom:
        problems.append(f"{not_dicom} non-DICOM file(s) ignored")
    if non_image:
        problems.append(f"{non_image} non-image DICOM object(s) ignored")
    return groups, problems, len(files)


def _read_without_preamble(f: Path):
    """Headers of a DICOM file written without the 128-byte preamble and meta group, or None."""
    try:
        ds = _dcmread(f, headers_only=True, force=True)
    except Exception:  # noqa: BLE001 - arbitrary non-DICOM bytes
        return None
    try:
        return ds if "SOPClassUID" in ds and "Rows" in ds and "SeriesInstanceUID" in ds else None
    except Exception:  # noqa: BLE001 - garbage parsed as elements
        return None


def _series_entry(uid: str, members: list[tuple[Path, Any]]) -> dict[str, Any]:
    ds = members[0][1]
    return {"series_uid": uid, "series_description": str(ds.get("SeriesDescription", "")),
            "modality": str(ds.get("Modality", "")), "series_number": _int(ds.get("SeriesNumber")),
            "files": len(members)}


def list_series(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The image series in a DICOM directory (uid, description, modality, number, files)."""
    groups, _, _ = _scan_directory(Path(path))
    return [_series_entry(uid, m) for uid, m in groups.items()]


def _pick_series(groups: dict[str, list], series: str | None, label: str) -> str:
    uids = list(groups)
    if series is not None:
        hits = [u for u in uids if u == series] or [u for u in uids if u.startswith(series)]
        if len(hits) != 1:
            known = ", ".join(uids)
            what = "matches no" if not hits else "matches several"
            raise UsageError(f"--series {series} {what} series in {label} (found: {known})")
        return hits[0]
    if len(uids) > 1:
        entries = [_series_entry(u, groups[u]) for u in uids]
        desc = "; ".join(f"{e['series_uid']} ({e['modality']} '{e['series_description']}', {e['files']} files)"
                         for e in entries)
        raise MultipleSeriesError(f"{label}: mixed series: the directory holds {len(uids)} series; choose one with "
                                  f"--series UID: {desc}", entries)
    return uids[0]


def read_dicom(path: str | os.PathLike, *, series: str | None = None, strict: bool = True) -> Volume:
    """Read a DICOM series directory or a single (possibly multi-frame) DICOM file.

    See the module docstring for geometry and values. ``meta`` gets ``modality``,
    ``units`` (HU for CT), ``series_description``, ``series_uid``, ``problems`` and
    ``dicom`` (:data:`CARRIED_TAGS` of the first slice).
    """
    from pydicom.errors import InvalidDicomError

    p = Path(path)
    label = str(p)
    problems: list[str] = []
    if p.is_dir():
        groups, scan_problems, n_files = _scan_directory(p)
        if not groups:
            if n_files == 0:
                raise InputDataError(f"{label}: empty directory (no files)")
            detail = "; ".join(scan_problems)
            raise InputDataError(f"{label}: no DICOM images among {n_files} file(s) ({detail})")
        uid = _pick_series(groups, series, label)
        members = groups[uid]
        unreadable = [q for q in scan_problems if q.startswith("unreadable")]
        problems += scan_problems
        slices: list[_Slice] = []
        for f, ds in members:
            s, pr = _slices_from_dataset(ds, str(f.relative_to(p)), f)
            slices += s
            problems += pr
        first = members[0][1]
        fatal_extra = [f"{len(unreadable)} DICOM file(s) could not be read"] if unreadable else []
    else:
        try:
            first = _dcmread(p, headers_only=False)
        except InvalidDicomError:
            try:
                first = _dcmread(p, headers_only=False, force=True)
            except Exception:  # noqa: BLE001
                raise InputDataError(f"{label}: not a DICOM file") from None
            if "Rows" not in first:
                raise InputDataError(f"{label}: not a DICOM file") from None
            problems.append("no DICOM file preamble/meta header; read anyway")
        except Exception as exc:  # noqa: BLE001 - truncated files raise many types
            raise InputDataError(f"{label}: unreadable DICOM file ({type(exc).__name__}: {_first_line(exc)})") from None
        if not _is_image_header(first):
            sop = getattr(first.get("SOPClassUID"), "name", "") or "unknown SOP class"
            if "Image" in sop and "Rows" not in first:
                raise InputDataError(f"{label}: incomplete {sop} file (no Rows/Columns): truncated or corrupt")
            raise InputDataError(f"{label}: not an image ({first.get('Modality', 'unknown')} object, {sop})")
        uid = str(first.get("SeriesInstanceUID", ""))
        if series is not None and uid != series and not uid.startswith(series):
            raise UsageError(f"--series {series}: {label} belongs to series {uid}")
        slices, pr = _slices_from_dataset(first, p.name, p)
        problems += pr
        fatal_extra = []

    data, affine, problems, fatal = assemble(slices, label, strict=strict, problems=problems)
    fatal = fatal_extra + fatal
    if fatal_extra:
        problems = fatal_extra + problems
        if strict:
            raise InputDataError(f"{label}: {fatal_extra[0]} (see d3ip info)")
    modality = _modality(first)
    has_rescale = any(s.slope != 1.0 or s.intercept != 0.0 for s in slices) or "RescaleIntercept" in first \
        or _fg_item(first, None, "PixelValueTransformationSequence") is not None
    meta: dict[str, Any] = {
        "modality": modality,
        "units": "HU" if modality == "CT" and has_rescale else "a.u.",
        "series_description": str(first.get("SeriesDescription", "") or ""),
        "series_uid": uid,
        "problems": problems,
        "dicom": _meta_from_ds(first),
    }
    thick = {round(float(s.thickness), 4) for s in slices if s.thickness and s.thickness > 0}
    if len(thick) == 1:  # the nominal slice thickness, which may differ from the spacing (5 mm every 20 mm)
        meta["dicom"]["SliceThickness"] = thick.pop()
    if modality == "CT" and not has_rescale:
        problems.append("CT without RescaleSlope/Intercept: stored values kept (units unknown)")
    raw = str(first.get("Modality", "") or "").upper()
    if modality == "OT" and raw not in ("", "OT"):
        meta["source_modality"] = raw  # e.g. NM, PT: d3ip's physics is CT or MR, chosen by --task
        problems.append(f"Modality {raw} is neither CT nor MR: read as OT (values as stored; --task picks the physics)")
    if not strict:
        meta["fatal_problems"] = fatal
    return Volume(data, affine, meta)


# --------------------------------------------------------------------------- writing


def _ds(x: float) -> str:
    """A float as a DICOM DS string (at most 16 characters)."""
    from pydicom.valuerep import format_number_as_ds

    x = float(x)
    if x == 0.0:
        return "0"
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return format_number_as_ds(x)


def quantise(data: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Integer pixels ``q`` and ``(slope, intercept)`` with ``data ≈ slope·q + intercept``.

    Integer-valued data that fit int16 (or uint16) are stored exactly with slope 1;
    otherwise int16 spans ``[min, max]`` with the DS-rounded slope and intercept. See
    the module docstring for the error bound.
    """
    lo, hi = float(np.min(data)), float(np.max(data))
    if np.all(data == np.round(data)):
        if lo >= -32768 and hi <= 32767:
            return data.astype(np.int16), 1.0, 0.0
        if lo >= 0 and hi <= 65535:
            return data.astype(np.uint16), 1.0, 0.0
        if hi - lo <= 65535:
            return (data - lo).astype(np.uint16), 1.0, float(_ds(lo))
    slope = float(_ds((hi - lo) / 65530.0)) if hi > lo else 1.0
    if slope <= 0:
        slope = 1.0
    while (hi - lo) / slope > 65530.0:
        slope = float(_ds(slope * (1 + 1e-6)))
    intercept = float(_ds((hi + lo) / 2.0))
    q = np.clip(np.rint((data.astype(np.float64) - intercept) / slope), -32768, 32767).astype(np.int16)
    return q, slope, intercept


def _content_hash(volume: Volume) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(volume.data, dtype=np.float32).tobytes())
    return h.hexdigest()


def _pick_modality(volume: Volume) -> str:
    """CT or MR for the SOP class; an unknown modality is guessed from the values (warned)."""
    mod = volume.modality
    if mod in ("CT", "MR"):
        return mod
    from d3ip_cli.core.types import reaches_hu_air

    choice = "CT" if reaches_hu_air(volume.data) else "MR"
    reason = ("values reach HU-like air (<= -500 in at least 1% of the voxels)" if choice == "CT"
              else "no HU-like air (<= -500 in at least 1% of the voxels)")
    warnings.warn(f"the volume's modality is unknown ({mod}): writing {choice} Image Storage because {reason}",
                  D3ipWarning, stacklevel=3)
    return choice


def series_description(description: str | None) -> str:
    """SeriesDescription (LO, 64 chars) naming the method and saying research use."""
    text = (description or f"d3ip {__version__}").strip()
    suffix = " (research use only)"
    if "research" not in text.lower():
        text = text[: 64 - len(suffix)] + suffix
    return text[:64]


def _thickness(src: dict[str, Any], dz: float) -> float:
    """SliceThickness of a derived slice: the source series' own (a reconstruction keeps each
    slice's sampling), else the spacing between slices."""
    try:
        value = float(src.get("SliceThickness") or 0.0)
    except (TypeError, ValueError):
        value = 0.0
    return value if value > 0 else dz


def _window(volume: Volume, slope: float) -> tuple[float, float]:
    d = volume.data
    src = volume.meta.get("dicom", {}) if isinstance(volume.meta.get("dicom"), dict) else {}
    if volume.modality == "CT" and np.any(d >= -1024.0) and np.any(d < -1024.0):
        d = d[d >= -1024.0]  # a scanner's padding outside the field of view (-3024 HU) is not shown
    lo, hi = np.percentile(d, [0.5, 99.5]) if d.size > 1 else (float(d.min()), float(d.max()))
    lo, hi = float(lo), float(hi)
    if hi <= lo:
        lo, hi = float(d.min()), float(d.max())
    if "WindowCenter" in src and "WindowWidth" in src and src["WindowWidth"] > 0:
        c, w = float(src["WindowCenter"]), float(src["WindowWidth"])
        if lo - w < c < hi + w:
            return c, w
    return (lo + hi) / 2.0, max(hi - lo, slope, 1.0)


def display_oriented(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip/transpose the in-plane axes of ``data [Z, H, W]`` to the display convention of DICOM.

    Viewers draw a DICOM image as stored (row 0 at the top, column 0 at the left) and use
    the geometry only to place it. A volume stored the NIfTI way (e.g. RAS: column index
    towards the patient's right... or left, rows towards anterior) would therefore show
    upside down or mirrored. The convention scanners follow: along a row (``r``) the
    dominant LPS component is positive and x before y before z; down a column (``c``) it is
    positive for x/y and negative for z (superior at the top). Same voxels, same
    positions: only the storage order changes (and the affine with it).
    """
    G = LPS_TO_RAS @ affine[:3, :3]
    r, c = G[:, 2], G[:, 1]
    dr, dc = int(np.argmax(np.abs(r))), int(np.argmax(np.abs(c)))
    out, A = data, affine.copy()
    if dr == 2 or (dc != 2 and dr > dc):  # rows should run along x (or y), columns along y or z
        out = np.swapaxes(out, 1, 2)
        A[:, [1, 2]] = A[:, [2, 1]]
        r, c, dr, dc = c, r, dc, dr
    for axis, vec, dom in ((2, r, dr), (1, c, dc)):
        wrong = vec[dom] > 0 if dom == 2 else vec[dom] < 0
        if wrong:
            n = out.shape[axis]
            out = np.flip(out, axis)
            A[:3, 3] = A[:3, 3] + (n - 1) * A[:3, axis]
            A[:3, axis] = -A[:3, axis]
    return np.ascontiguousarray(out), A


def write_dicom_series(volume: Volume, path: str | os.PathLike, *, overwrite: bool = False,
                       description: str | None = None, uid_seed: str = "", series_base: int = 1000) -> Path:
    """Write ``volume`` as a derived DICOM series: one classic CT/MR Image Storage file per slice.

    Files are ``IM00001.dcm`` ... in a directory created atomically. Modality CT gives
    CT Image Storage, MR gives MR Image Storage; an unknown modality picks CT when the
    values reach HU-like air (<= -500 in at least 1 % of the voxels), else MR, and says so with a
    :class:`D3ipWarning`. See the module docstring for geometry, values and UIDs.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    p = Path(path)
    data, affine = display_oriented(np.asarray(volume.data, dtype=np.float32), np.asarray(volume.affine, float))
    if not np.all(np.isfinite(data)):
        raise InputDataError("cannot write a DICOM series: the volume has non-finite values")
    modality = _pick_modality(volume)
    meta = volume.meta
    src: dict[str, Any] = dict(meta.get("dicom") or {})
    Z, H, W = data.shape

    G = LPS_TO_RAS @ affine[:3, :3]
    p0 = LPS_TO_RAS @ affine[:3, 3]
    v, col_step, row_step = G[:, 0], G[:, 1], G[:, 2]
    d_row, d_col = float(np.linalg.norm(col_step)), float(np.linalg.norm(row_step))
    r, c = row_step / d_col, col_step / d_row
    if abs(float(np.dot(r, c))) > 1e-6:
        raise UsageError("cannot write a DICOM series: the volume's in-plane axes are not orthogonal (sheared "
                         "affine); write NIfTI instead")
    n = np.cross(r, c)
    dz = abs(float(np.dot(v, n)))
    if dz < 1e-6:
        raise UsageError("cannot write a DICOM series: the slice axis lies in the image plane")

    q, slope, intercept = quantise(data)
    center, width = _window(volume, slope)
    content = _content_hash(volume)
    seed = str(uid_seed)
    src_series = str(meta.get("series_uid") or src.get("SeriesInstanceUID") or "")
    series_uid = generate_uid(entropy_srcs=[
        "d3ip-series", seed, src_series, description or "", str(volume.shape),
        np.round(affine, 6).tobytes().hex(), content])
    source_key = str(meta.get("source_sha256") or src_series or content)
    study_uid = src.get("StudyInstanceUID") or generate_uid(entropy_srcs=["d3ip-study", source_key])
    for_uid = src.get("FrameOfReferenceUID") or generate_uid(entropy_srcs=["d3ip-frame-of-reference", source_key])
    sop_class = CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE
    desc = series_description(description)
    src_number = _int(src.get("SeriesNumber"))
    series_number = series_base + (src_number or 0)

    def base() -> Dataset:
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL" if modality == "CT" else "OTHER"]
        ds.SOPClassUID = sop_class
        ds.StudyDate = src.get("StudyDate", "")
        ds.StudyTime = src.get("StudyTime", "")
        ds.AccessionNumber = src.get("AccessionNumber", "")
        ds.Modality = modality
        if src.get("Laterality"):
            ds.Laterality = src["Laterality"]
        elif not src.get("BodyPartExamined"):
            # Type 2C: with no body part, dciodvfy cannot tell whether it is paired and reports an
            # absent Laterality as an error; an empty one ("unknown") is only a warning
            ds.Laterality = ""
        ds.Manufacturer = src.get("Manufacturer", "")
        if src.get("InstitutionName"):
            ds.InstitutionName = src["InstitutionName"]
        ds.ReferringPhysicianName = src.get("ReferringPhysicianName", "")
        if src.get("StudyDescription"):
            ds.StudyDescription = src["StudyDescription"]
        ds.SeriesDescription = desc
        ds.DerivationDescription = (f"{desc}; written by d3ip {__version__}"
                                    f"{'; from series ' + src_series if src_series else ''}")[:1024]
        ds.PatientName = src.get("PatientName", "")
        ds.PatientID = src.get("PatientID", "d3ip-" + study_uid[-8:])
        ds.PatientBirthDate = src.get("PatientBirthDate", "")
        ds.PatientSex = src.get("PatientSex", "")
        if src.get("PatientAge"):
            ds.PatientAge = src["PatientAge"]
        if src.get("BodyPartExamined"):
            ds.BodyPartExamined = src["BodyPartExamined"]
        ds.PatientPosition = src.get("PatientPosition", "")
        ds.SoftwareVersions = f"d3ip {__version__}"
        if modality == "CT":
            ds.KVP = src.get("KVP", "")
        else:
            ds.ScanningSequence = src.get("ScanningSequence", "RM").split("\\")
            ds.SequenceVariant = src.get("SequenceVariant", "NONE").split("\\")
            ds.ScanOptions = ""
            ds.MRAcquisitionType = src.get("MRAcquisitionType", "")
            ds.RepetitionTime = src.get("RepetitionTime", "")
            ds.EchoTime = src.get("EchoTime", "")
            ds.EchoTrainLength = ""
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = src.get("StudyID", "")
        ds.SeriesNumber = series_number
        ds.AcquisitionNumber = ""
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = src.get("PositionReferenceIndicator", "")
        ds.ImageOrientationPatient = [_ds(x) for x in np.concatenate([r, c])]
        ds.PixelSpacing = [_ds(d_row), _ds(d_col)]
        ds.SliceThickness = _ds(_thickness(src, dz))
        ds.SpacingBetweenSlices = _ds(dz)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = H, W
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if q.dtype == np.int16 else 0
        ds.WindowCenter = _ds(center)
        ds.WindowWidth = _ds(width)
        if width < 1:
            ds.VOILUTFunction = "LINEAR_EXACT"
        ds.RescaleIntercept = _ds(intercept)
        ds.RescaleSlope = _ds(slope)
        ds.RescaleType = "HU" if modality == "CT" else "US"
        ds.BurnedInAnnotation = "NO"
        return ds

    with atomic_output(p, overwrite=overwrite, directory=True) as tmp:
        for k in range(Z):
            ds = base()
            sop_uid = generate_uid(entropy_srcs=[series_uid, "instance", str(k)])
            ds.SOPInstanceUID = sop_uid
            ds.InstanceNumber = k + 1
            ipp = p0 + k * v
            ds.ImagePositionPatient = [_ds(x) for x in ipp]
            ds.SliceLocation = _ds(float(np.dot(ipp, n)))
            ds.ContentDate = src.get("StudyDate", "")
            ds.ContentTime = src.get("StudyTime", "")
            ds.PixelData = np.ascontiguousarray(q[k]).astype(q.dtype.newbyteorder("<")).tobytes()
            fm = FileMetaDataset()
            fm.MediaStorageSOPClassUID = sop_class
            fm.MediaStorageSOPInstanceUID = sop_uid
            fm.TransferSyntaxUID = ExplicitVRLittleEndian
            fm.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
            fm.ImplementationVersionName = f"D3IP_{__version__}"[:16]
            ds.file_meta = fm
            ds.save_as(tmp / f"IM{k + 1:05d}.dcm", enforce_file_format=True)
    return p
