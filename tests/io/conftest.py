"""Fixtures for the volume I/O tests: real DICOM files, a pydicom-built series, oracles.

The oracles are external programs: ``dcm2niix`` (the reference DICOM -> NIfTI converter,
installed by the ``test`` extra next to the Python interpreter) and ``dciodvfy``
(dicom3tools, from apt). Tests that need them skip only when they are not installed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def find_tool(name: str) -> str | None:
    """``name`` next to the running interpreter (venv bin) or on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    return shutil.which(name)


@pytest.fixture(scope="session")
def testdata():
    """``testdata("CT_small.dcm")`` -> path from pydicom or pydicom-data (no network)."""
    from pydicom.data import get_testdata_file

    def get(name: str) -> str:
        path = get_testdata_file(name, download=False)
        if path is None:
            pytest.skip(f"{name} is not installed (pydicom-data)")
        return str(path)

    return get


@pytest.fixture(scope="session")
def dcm2niix():
    """``dcm2niix(series_dir, out_dir)`` -> the nibabel image dcm2niix writes."""
    exe = find_tool("dcm2niix")
    if exe is None:
        pytest.skip("dcm2niix is not installed (pip install dcm2niix)")

    def convert(series_dir: Path, out_dir: Path):
        import nibabel as nib

        out_dir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([exe, "-b", "n", "-z", "n", "-f", "d2n", "-o", str(out_dir), str(series_dir)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        files = sorted(out_dir.glob("d2n*.nii"))
        assert len(files) == 1, (files, proc.stdout)
        return nib.load(str(files[0]))

    return convert


@pytest.fixture(scope="session")
def dciodvfy():
    """``dciodvfy(file)`` -> the list of ``Error`` lines dciodvfy reports for it."""
    exe = find_tool("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy is not installed (apt-get install dicom3tools)")

    def check(path: Path) -> list[str]:
        proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
        return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]

    return check


def _same_grid(img_a, img_b, atol: float = 1e-3) -> None:
    """Assert two NIfTI images describe the same voxels in world space with equal values.

    Both are reoriented to the closest canonical (RAS) axis order, which only permutes
    and flips axes, so any difference in axis conventions (dcm2niix flips rows, orders
    slices its own way) disappears; what remains must agree: the 4x4 voxel->world
    matrices within ``atol`` mm, and the voxel values.
    """
    import nibabel as nib

    a, b = nib.as_closest_canonical(img_a), nib.as_closest_canonical(img_b)
    assert a.shape[:3] == b.shape[:3]
    np.testing.assert_allclose(a.affine, b.affine, atol=atol)
    np.testing.assert_allclose(np.asarray(a.get_fdata()).reshape(a.shape[:3]),
                               np.asarray(b.get_fdata()).reshape(b.shape[:3]), atol=1e-3)


@pytest.fixture(scope="session")
def same_grid():
    """The :func:`_same_grid` assertion (dcm2niix vs d3ip, any axis convention)."""
    return _same_grid


@pytest.fixture
def make_ct_series(testdata):
    """Build a multi-file CT series from the real slice ``CT_small.dcm`` with pydicom.

    ``make_ct_series(folder, n=6, spacing=2.5, iop=None, positions=None, series_uid=None,
    shuffle=True, description=..., prefix="slice")`` writes ``n`` files under shuffled names, each a copy of the real
    slice with ImagePositionPatient stepped along the slice normal (or the given
    ``positions``, in mm along it), a new SOPInstanceUID, InstanceNumber in position
    order and slice ``k``'s stored pixels raised by ``10 k`` so the order can be checked.
    Returns ``(folder, expected HU array [n, H, W] in position order)``.
    """
    import pydicom
    from pydicom.uid import generate_uid

    def make(folder: Path, n: int = 6, spacing: float = 2.5, iop=None, positions=None,
             series_uid: str | None = None, shuffle: bool = True, description: str = "pydicom-built series",
             prefix: str = "slice"):
        folder.mkdir(parents=True, exist_ok=True)
        src = pydicom.dcmread(testdata("CT_small.dcm"))
        iop = np.asarray(iop if iop is not None else [float(x) for x in src.ImageOrientationPatient])
        normal = np.cross(iop[:3], iop[3:])
        p0 = np.array([float(x) for x in src.ImagePositionPatient])
        pos = list(positions) if positions is not None else [k * spacing for k in range(n)]
        series_uid = series_uid or generate_uid(entropy_srcs=["test-series", str(folder), description])
        base = src.pixel_array.astype(np.int32)
        slope, intercept = float(src.RescaleSlope), float(src.RescaleIntercept)
        names = [f"{prefix}_{i:03d}.dcm" for i in range(len(pos))]
        if shuffle:
            rng = np.random.default_rng(7)
            names = list(rng.permutation(names))
        expected = []
        for k, s in enumerate(pos):
            ds = pydicom.dcmread(testdata("CT_small.dcm"))
            ds.SeriesInstanceUID = series_uid
            ds.SeriesDescription = description
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(k)])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = k + 1
            ds.ImageOrientationPatient = [f"{x:.6f}" for x in iop]
            ds.ImagePositionPatient = [f"{x:.4f}" for x in p0 + s * normal]
            ds.SliceLocation = f"{s:.4f}"
            stored = np.clip(base + 10 * k, -32768, 32767).astype(src.pixel_array.dtype)
            ds.PixelData = stored.tobytes()
            ds.save_as(folder / names[k], enforce_file_format=True)
            expected.append(stored.astype(np.float64) * slope + intercept)
        return folder, np.stack(expected).astype(np.float32)

    return make
