"""Measurement files: one HDF5 container for sinograms and k-space plus the operator spec.

``d3ip simulate`` writes, and ``d3ip reconstruct`` reads, this layout (DESIGN §4)::

    /                      attrs: format="d3ip-measurement", version=1,
                                  spec, intensity, grid, provenance, meta  (JSON strings)
    /sinogram              float32 [Z, views, detectors]          (CT tasks)
    /kspace                complex64 [Z, coils, ky, kx]            (cs-mri)
    /mask                  uint8 [Z, ky, kx]                       (cs-mri)
    /coil_maps             complex64 [Z, coils, ky, kx]            (cs-mri, when stored)

- ``spec``: the operator specification (:func:`d3ip_cli.physics.registry.operator_spec`):
  task, options, angles in degrees, detector count and spacing, pixel size, image shape,
  and for MRI how coil maps are obtained (``"stored"`` or ``"espirit"``).
- ``intensity``: how image values relate to the normalised scale the data are in.
- ``grid``: ``{"shape": [Z, H, W], "affine": 4x4 RAS+ mm}`` of the image.
- ``provenance``: tool version, command, source file and its SHA-256, seed, noise model.

:func:`read_measurement` also reads fastMRI-style HDF5 (a ``kspace`` dataset
``[slices, coils, ky, kx]`` or ``[slices, ky, kx]``; the mask is taken from a ``mask``
dataset or from the non-zero entries) and ISMRMRD Cartesian raw data (the ``ismrmrd``
package; readout oversampling is removed, one repetition is taken). Any contradiction
between the data and the spec, or non-finite data, is :class:`InputDataError` (exit 3).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from d3ip_cli.core.errors import FrameRequired, InputDataError, MissingComponentError, UsageError

FORMAT_NAME = "d3ip-measurement"
FORMAT_VERSION = 1
MEASUREMENT_SUFFIXES = (".h5", ".hdf5", ".mrd", ".ismrmrd")


@dataclasses.dataclass
class Measurement:
    """Measured data plus everything needed to rebuild its operator.

    Attributes:
        data: ``sinogram [Z, V, K]`` float32 or ``kspace [Z, C, ky, kx]`` complex64.
        spec: operator specification (JSON-able dict, see module docstring).
        arrays: ``mask [Z, ky, kx]`` and optionally ``coil_maps [Z, C, ky, kx]``.
        intensity: the intensity scale (``d3ip_cli.engine.intensity``) or ``{}`` when unknown.
        grid: ``{"shape": [Z, H, W], "affine": [[...]]}``.
        provenance: free JSON-able provenance.
        meta: metadata of the source volume (modality, units, identifiers for DICOM output).
        source_format: ``"d3ip"``, ``"fastmri"`` or ``"ismrmrd"``.
    """

    data: np.ndarray
    spec: dict[str, Any]
    arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    intensity: dict[str, Any] = dataclasses.field(default_factory=dict)
    grid: dict[str, Any] = dataclasses.field(default_factory=dict)
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    source_format: str = "d3ip"

    @property
    def kind(self) -> str:
        return "kspace" if np.iscomplexobj(self.data) or self.data.ndim == 4 else "sinogram"

    @property
    def task(self) -> str:
        return str(self.spec.get("task"))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.grid["shape"])  # type: ignore[return-value]

    @property
    def affine(self) -> np.ndarray:
        return np.asarray(self.grid.get("affine", np.eye(4)), dtype=np.float64)

    def select_slices(self, sl: slice) -> "Measurement":
        """The slab ``sl`` of axis 0 (data, per-slice arrays, grid shape and affine origin)."""
        z = self.data.shape[0]
        idx = range(*sl.indices(z))
        if len(idx) == 0:
            raise UsageError(f"--slices selects no slice out of {z}")
        if idx.step != 1:
            raise UsageError("--slices must be a contiguous range A:B")
        start, stop = idx.start, idx.stop
        aff = self.affine.copy()
        aff[:3, 3] = aff[:3, 3] + aff[:3, 0] * start
        shape = [len(idx)] + list(self.image_shape[1:])
        spec = dict(self.spec, n_slices=len(idx))
        if "image_shape" in spec and len(spec["image_shape"]) == 3:
            spec["image_shape"] = shape
        arrays = {k: v[start:stop] for k, v in self.arrays.items()}
        return dataclasses.replace(self, data=self.data[start:stop], spec=spec, arrays=arrays,
                                   grid={"shape": shape, "affine": aff.tolist()})

    def validate(self, where: str = "measurement") -> "Measurement":
        """Check shapes against the spec and that the data are finite (exit 3 otherwise)."""
        d = self.data
        if not np.all(np.isfinite(d)):
            n = int(np.size(d) - np.count_nonzero(np.isfinite(d)))
            raise InputDataError(f"{where}: the {self.kind} holds {n} non-finite value(s) (NaN/inf)")
        shape = self.image_shape
        if len(shape) != 3 or min(shape) < 1:
            raise InputDataError(f"{where}: invalid image grid shape {list(shape)}")
        if self.kind == "sinogram":
            if d.ndim != 3:
                raise InputDataError(f"{where}: sinogram must be [Z, views, detectors], got {list(d.shape)}")
            views = len(self.spec.get("angles_deg", []))
            det = int(self.spec.get("det_count", -1))
            if d.shape[0] != shape[0] or d.shape[1] != views or d.shape[2] != det:
                raise InputDataError(f"{where}: sinogram shape {list(d.shape)} contradicts its operator spec "
                                     f"([{shape[0]}, {views} views, {det} detectors])")
            if list(self.spec.get("image_shape", shape[1:]))[-2:] != list(shape[1:]):
                raise InputDataError(f"{where}: CT geometry image shape {self.spec.get('image_shape')} "
                                     f"contradicts the grid {list(shape)}")
        else:
            if d.ndim != 4:
                raise InputDataError(f"{where}: k-space must be [Z, coils, ky, kx], got {list(d.shape)}")
            z, c, ky, kx = d.shape
            if (z, ky, kx) != tuple(shape):
                raise InputDataError(f"{where}: k-space shape {list(d.shape)} contradicts the image grid {list(shape)}")
            mask = self.arrays.get("mask")
            if mask is None or tuple(mask.shape) != (z, ky, kx):
                got = None if mask is None else list(mask.shape)
                raise InputDataError(f"{where}: sampling mask shape {got} contradicts k-space {list(d.shape)}")
            maps = self.arrays.get("coil_maps")
            if maps is not None and tuple(maps.shape) != tuple(d.shape):
                raise InputDataError(f"{where}: coil maps shape {list(maps.shape)} contradicts k-space {list(d.shape)}")
            if maps is not None and not np.all(np.isfinite(maps)):
                raise InputDataError(f"{where}: coil maps hold non-finite values")
        return self


def is_measurement_path(path: str | os.PathLike) -> bool:
    """True for a path named like a measurement (``.h5`` ...) or a file with the HDF5 signature."""
    p = Path(path)
    if not p.is_file():
        return p.name.lower().endswith(MEASUREMENT_SUFFIXES)
    if p.name.lower().endswith(MEASUREMENT_SUFFIXES):
        return True  # named as one: a file that is not HDF5 fails as an unreadable measurement (exit 3)
    try:
        with open(p, "rb") as fh:
            return fh.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


def peek_task(path: str | os.PathLike) -> str | None:
    """The task of a measurement file without reading its data (``cs-mri`` for raw k-space files)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") == FORMAT_NAME:
                return json.loads(f.attrs.get("spec", "{}")).get("task")
            if "kspace" in f or ("dataset" in f and "xml" in f["dataset"]):
                return "cs-mri"
    except (OSError, ValueError):
        return None
    return None


def write_measurement(m: Measurement, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``m`` atomically (see the module docstring for the layout)."""
    import h5py

    from d3ip_cli.io.atomic import _json_default, atomic_output

    m.validate("measurement to write")
    # built in memory, then written as bytes: HDF5 writing straight to a full disk crashed the
    # process (h5py's close after a failed write) instead of raising one OSError
    buf = io.BytesIO()
    with atomic_output(path, overwrite=overwrite) as tmp:
        with h5py.File(buf, "w") as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["version"] = FORMAT_VERSION
            for key in ("spec", "intensity", "grid", "provenance", "meta"):
                f.attrs[key] = json.dumps(getattr(m, key), default=_json_default)
            if m.kind == "sinogram":
                f.create_dataset("sinogram", data=m.data.astype(np.float32), compression="gzip", compression_opts=4)
            else:
                f.create_dataset("kspace", data=m.data.astype(np.complex64))
            for name, arr in m.arrays.items():
                f.create_dataset(name, data=arr, compression="gzip", compression_opts=4)
        with open(tmp, "wb") as fh:
            fh.write(buf.getbuffer())
    return Path(path)


def read_measurement(path: str | os.PathLike, *, frame: int | None = None) -> Measurement:
    """Read a d3ip measurement file, fastMRI-style HDF5 or ISMRMRD Cartesian data (validated)."""
    import h5py

    p = Path(path)
    if not p.exists():
        raise InputDataError(f"{p} does not exist")
    try:
        f = h5py.File(p, "r")
    except OSError as exc:
        raise InputDataError(f"{p}: not a readable HDF5 file ({exc})") from None
    with f:
        if f.attrs.get("format") == FORMAT_NAME:
            m = _read_d3ip(f, p)
        elif "dataset" in f and "xml" in f["dataset"]:
            f.close()
            m = _read_ismrmrd(p, frame)
        elif "kspace" in f:
            m = _read_fastmri(f, p)
        else:
            raise InputDataError(f"{p}: HDF5 file is neither a d3ip measurement, fastMRI (kspace) nor ISMRMRD data")
    if frame and m.source_format != "ismrmrd":
        raise UsageError(f"--frame {frame}: {p} holds one volume (repetitions are read from ISMRMRD files only)")
    return m.validate(str(p))


def _json_attr(f: Any, key: str, p: Path) -> dict[str, Any]:
    raw = f.attrs.get(key, "{}")
    try:
        return json.loads(raw)
    except (TypeError, ValueError):
        raise InputDataError(f"{p}: attribute {key!r} is not valid JSON") from None


def _read_d3ip(f: Any, p: Path) -> Measurement:
    version = int(f.attrs.get("version", 0))
    if version > FORMAT_VERSION:
        raise InputDataError(f"{p}: measurement format version {version} is newer than this d3ip supports")
    spec = _json_attr(f, "spec", p)
    if "sinogram" in f:
        data = np.asarray(f["sinogram"][()], dtype=np.float32)
    elif "kspace" in f:
        data = np.asarray(f["kspace"][()]).astype(np.complex64)
    else:
        raise InputDataError(f"{p}: measurement file has neither a sinogram nor a kspace dataset")
    arrays = {k: np.asarray(f[k][()]) for k in ("mask", "coil_maps") if k in f}
    grid = _json_attr(f, "grid", p)
    if "shape" not in grid:
        raise InputDataError(f"{p}: measurement file lacks its image grid")
    return Measurement(data=data, spec=spec, arrays=arrays, intensity=_json_attr(f, "intensity", p), grid=grid,
                       provenance=_json_attr(f, "provenance", p), meta=_json_attr(f, "meta", p), source_format="d3ip")


def _mask_from_kspace(k: np.ndarray) -> np.ndarray:
    """Sampling mask ``[Z, ky, kx]`` from non-zero entries; whole columns/rows when the pattern is 1D."""
    nz = np.any(np.abs(k) > 0, axis=1)
    for axis in (1, 2):  # 1D pattern: every line along ``axis`` (nearly) all zero or all non-zero
        frac = nz.mean(axis=axis, keepdims=True)
        if np.all((frac < 0.1) | (frac > 0.9)):
            return np.ascontiguousarray(np.broadcast_to(frac > 0.5, nz.shape)).astype(np.uint8)
    return nz.astype(np.uint8)


def _mr_measurement(k: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float], source: str,
                    p: Path, extra: dict[str, Any]) -> Measurement:
    z, c, ky, kx = k.shape
    affine = np.diag([spacing[0], spacing[1], spacing[2], 1.0])
    affine[:3, 3] = -0.5 * np.array([z - 1, ky - 1, kx - 1]) * np.array(spacing)
    from d3ip_cli.physics.masks import acceleration_of

    spec = {"task": "cs-mri", "modality": "MR", "image_shape": [z, ky, kx], "coils": c,
            "coil_maps": "espirit" if c > 1 else "none",
            "options": {"acceleration": round(acceleration_of(mask), 4), "mask": "from-data", "coils": c}}
    return Measurement(data=np.ascontiguousarray(k * mask[:, None]).astype(np.complex64), spec=spec,
                       arrays={"mask": np.ascontiguousarray(mask).astype(np.uint8)}, intensity={},
                       grid={"shape": [z, ky, kx], "affine": affine.tolist()},
                       provenance={"source": str(p.resolve()), "source_format": source, **extra},
                       meta={"modality": "MR", "units": "a.u."}, source_format=source)


def _read_fastmri(f: Any, p: Path) -> Measurement:
    ds = f["kspace"]
    k = np.asarray(ds[()])
    if not np.iscomplexobj(k):
        raise InputDataError(f"{p}: fastMRI 'kspace' dataset must be complex, got {k.dtype}")
    if k.ndim == 3:
        k = k[:, None]
    if k.ndim != 4:
        raise InputDataError(f"{p}: fastMRI 'kspace' must be [slices, coils, ky, kx] or [slices, ky, kx], "
                             f"got {list(k.shape)}")
    if not np.all(np.isfinite(k)):
        raise InputDataError(f"{p}: k-space holds non-finite values (NaN/inf)")
    z, c, ky, kx = k.shape
    if "mask" in f:
        m = np.asarray(f["mask"][()]).astype(bool)
        if m.shape == (kx,):
            mask = np.broadcast_to(m[None, None, :], (z, ky, kx)).astype(np.uint8)
        elif m.shape == (z, ky, kx) or m.shape == (ky, kx):
            mask = np.broadcast_to(m, (z, ky, kx)).astype(np.uint8)
        else:
            raise InputDataError(f"{p}: mask shape {list(m.shape)} contradicts k-space {list(k.shape)}")
    else:
        mask = _mask_from_kspace(k)
    return _mr_measurement(k, mask, (1.0, 1.0, 1.0), "fastmri", p, {"attrs": {k_: str(v) for k_, v in f.attrs.items()}})


def _crop_readout(k: np.ndarray, n: int) -> np.ndarray:
    """Remove readout oversampling: centred 1D inverse FFT along x, keep the central ``n``, FFT back."""
    ax = -1
    img = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(k, axes=ax), axis=ax, norm="ortho"), axes=ax)
    x0 = (k.shape[-1] - n) // 2
    img = img[..., x0:x0 + n]
    return np.fft.fftshift(np.fft.fft(np.fft.ifftshift(img, axes=ax), axis=ax, norm="ortho"), axes=ax).astype(np.complex64)


def _read_ismrmrd(p: Path, frame: int | None) -> Measurement:
    try:
        import ismrmrd
        import ismrmrd.xsd
    except ImportError:
        raise MissingComponentError("reading ISMRMRD data needs the 'ismrmrd' package (pip install ismrmrd)") from None
    try:
        dset = ismrmrd.Dataset(str(p), "dataset", create_if_needed=False)
        header = ismrmrd.xsd.CreateFromDocument(dset.read_xml_header())
        enc = header.encoding[0]
        if enc.trajectory is not None and str(getattr(enc.trajectory, "value", enc.trajectory)).lower() != "cartesian":
            raise InputDataError(f"{p}: only Cartesian ISMRMRD data are supported (trajectory {enc.trajectory})")
        e_nx, e_ny = enc.encodedSpace.matrixSize.x, enc.encodedSpace.matrixSize.y
        r_nx = enc.reconSpace.matrixSize.x
        fov = enc.reconSpace.fieldOfView_mm
        lim = enc.encodingLimits
        n_slices = (lim.slice.maximum + 1) if lim.slice is not None else 1
        n_reps = (lim.repetition.maximum + 1) if lim.repetition is not None else 1
        ky_center = lim.kspace_encoding_step_1.center if lim.kspace_encoding_step_1 is not None else e_ny // 2
        if frame is None and n_reps > 1:
            raise FrameRequired(f"{p} holds {n_reps} repetitions: choose one with --frame N (0..{n_reps - 1})", n_reps)
        rep = 0 if frame is None else int(frame)
        if not 0 <= rep < n_reps:
            raise UsageError(f"--frame {rep}: the ISMRMRD file holds {n_reps} repetition(s)")
        k = None
        noise_power, noise_count, noise_dwell, dwell = 0.0, 0, None, None
        for i in range(dset.number_of_acquisitions()):
            acq = dset.read_acquisition(i)
            if acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):  # noise calibration (a noise-adjust scan)
                noise_power += float(np.sum(np.abs(acq.data.astype(np.complex128)) ** 2))
                noise_count += int(acq.data.size)
                noise_dwell = float(acq.sample_time_us) or noise_dwell
                continue
            if acq.idx.repetition != rep:
                continue
            dwell = dwell or float(acq.sample_time_us) or None
            if k is None:
                k = np.zeros((n_slices, acq.active_channels, e_ny, e_nx), dtype=np.complex64)
            line = acq.idx.kspace_encode_step_1 + (e_ny // 2 - ky_center)
            start = e_nx // 2 - acq.center_sample
            n = acq.number_of_samples
            if not (0 <= line < e_ny and 0 <= start and start + n <= e_nx and acq.idx.slice < n_slices):
                raise InputDataError(f"{p}: acquisition {i} lies outside the encoded matrix")
            k[acq.idx.slice, :, line, start:start + n] = acq.data
        dset.close()
    except (InputDataError, UsageError):
        raise
    except Exception as exc:  # noqa: BLE001 - the ismrmrd package raises many kinds of errors
        raise InputDataError(f"{p}: cannot read ISMRMRD data ({type(exc).__name__}: {exc})") from None
    if k is None:
        raise InputDataError(f"{p}: ISMRMRD file holds no imaging acquisitions")
    if not np.all(np.isfinite(k)):
        raise InputDataError(f"{p}: k-space holds non-finite values (NaN/inf)")
    mask = _mask_from_kspace(k)
    if r_nx < e_nx:
        k = _crop_readout(k, r_nx)
        mask = np.ascontiguousarray(mask[..., (e_nx - r_nx) // 2:(e_nx - r_nx) // 2 + r_nx])
    z, c, ky, kx = k.shape
    spacing = (float(fov.z) / max(n_slices, 1) if fov.z else 1.0, float(fov.y) / ky, float(fov.x) / kx)
    extra: dict[str, Any] = {"repetition": rep, "repetitions": n_reps, "encoded_matrix": [e_ny, e_nx],
                             "recon_matrix_x": r_nx}
    if noise_count:
        # E|n|^2 per sample of the noise scan, scaled to the imaging readout's bandwidth (the variance
        # grows as the dwell time shrinks); the readout crop is unitary, so it keeps the per-sample variance
        power = noise_power / noise_count * ((noise_dwell / dwell) if noise_dwell and dwell else 1.0)
        extra["noise"] = {"model": "gaussian", "sigma_absolute": float(np.sqrt(power)),
                          "source": f"{noise_count} noise-calibration samples (mean over coils, not prewhitened)"}
    return _mr_measurement(k, mask, spacing, "ismrmrd", p, extra)
