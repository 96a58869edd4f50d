"""Format detection, NIfTI and NumPy readers/writers, value checks (io/volumes.py)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from d3ip_cli import __version__
from d3ip_cli.core.errors import InputDataError, OutputError, UsageError
from d3ip_cli.core.types import Volume
from d3ip_cli.io.atomic import sidecar_path
from d3ip_cli.io.volumes import detect_format, is_volume_path, read_volume, write_volume


def _volume(shape=(5, 7, 6), modality="MR", integer=False) -> Volume:
    """An odd-sized volume with an oblique affine, so axis mix-ups show."""
    rng = np.random.default_rng(3)
    data = rng.normal(50, 20, size=shape).astype(np.float32)
    if integer:
        data = np.rint(data)
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.array([[0.0, c * 0.8, -s * 0.7, 10.0],
                       [0.0, s * 0.8, c * 0.7, -20.5],
                       [2.5, 0.0, 0.0, 33.25],
                       [0, 0, 0, 1]])
    return Volume(data, affine, {"modality": modality, "units": "HU" if modality == "CT" else "a.u."})


@pytest.mark.parametrize("path,fmt", [
    ("a.nii", "nifti"), ("a.NII.GZ", "nifti"), ("x/y.npy", "npy"), ("s.dcm", "dicom"), ("series_out", "dicom"),
    ("out/", "dicom"),
])
def test_detect_format_by_suffix(path, fmt):
    assert detect_format(path) == fmt


def test_detect_format_option_and_errors(tmp_path):
    assert detect_format(tmp_path / "x", "dicom") == "dicom"
    assert detect_format(tmp_path / "x", "NIfTI") == "nifti"
    with pytest.raises(UsageError):
        detect_format("scan.png")
    with pytest.raises(UsageError, match="measurement"):
        detect_format("meas.h5")
    with pytest.raises(UsageError, match="contradicts"):
        detect_format("a.nii.gz", "dicom")
    with pytest.raises(UsageError):
        detect_format("a", "tiff")


def test_is_volume_path(tmp_path, testdata):
    assert is_volume_path("a.nii.gz") and is_volume_path("b.npy") and is_volume_path(testdata("CT_small.dcm"))
    assert is_volume_path(tmp_path)
    assert not is_volume_path("meas.h5") and not is_volume_path("kspace.hdf5")
    (tmp_path / "notes").write_text("hello")
    assert not is_volume_path(tmp_path / "notes")


def test_nifti_round_trip_header_and_axes(tmp_path):
    vol = _volume()
    out = write_volume(vol, tmp_path / "v.nii.gz", description="unit test")
    img = nib.load(str(out))
    hdr = img.header
    assert img.shape == (6, 7, 5)  # [W, H, Z] on disk
    np.testing.assert_allclose(np.asarray(img.dataobj).transpose(2, 1, 0), vol.data, atol=1e-6)
    assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1
    np.testing.assert_allclose(hdr.get_sform(), vol.affine[:, [2, 1, 0, 3]], atol=1e-5)
    np.testing.assert_allclose(hdr.get_qform(), vol.affine[:, [2, 1, 0, 3]], atol=1e-4)
    assert hdr.get_xyzt_units() == ("mm", "sec")
    assert hdr["descrip"].item().decode().startswith(f"d3ip {__version__}")
    back = read_volume(out)
    np.testing.assert_array_equal(back.data, vol.data)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
    assert back.meta["modality"] == "MR" and back.meta["source_format"] == "nifti"
    assert back.meta["series_description"] == "unit test"


def test_integer_volume_is_stored_as_int16(tmp_path):
    vol = _volume(integer=True, modality="CT")
    out = write_volume(vol, tmp_path / "ct.nii")
    assert nib.load(str(out)).get_data_dtype() == np.int16
    back = read_volume(out)
    np.testing.assert_array_equal(back.data, vol.data)
    assert back.meta["modality"] == "CT" and back.meta["units"] == "HU"


def test_nifti_4d_needs_frame_and_metres_are_scaled(tmp_path):
    data = np.arange(4 * 3 * 2 * 3, dtype=np.float32).reshape(4, 3, 2, 3)
    img = nib.Nifti1Image(data, np.diag([0.002, 0.002, 0.004, 1.0]))
    img.header.set_xyzt_units("meter", "sec")
    path = tmp_path / "four.nii"
    nib.save(img, str(path))
    with pytest.raises(UsageError, match="--frame"):
        read_volume(path)
    with pytest.raises(UsageError, match="frames 0..2"):
        read_volume(path, frame=3)
    vol = read_volume(path, frame=1)
    np.testing.assert_array_equal(vol.data, data[..., 1].transpose(2, 1, 0))
    assert vol.spacing == pytest.approx((4.0, 2.0, 2.0))  # metres -> mm


def test_nan_volumes(tmp_path):
    nan = np.full((3, 4, 5), np.nan, dtype=np.float32)
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(InputDataError, match="no finite voxel"):
        read_volume(tmp_path / "nan.nii.gz")
    some = np.ones((3, 4, 5), dtype=np.float32)
    some[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(some, np.eye(4)), str(tmp_path / "some.nii.gz"))
    vol = read_volume(tmp_path / "some.nii.gz")
    assert np.isfinite(vol.data).all() and any("non-finite" in p for p in vol.meta["problems"])


def test_npy_round_trip_uses_the_sidecar(tmp_path):
    vol = _volume()
    vol.meta["dicom"] = {"StudyInstanceUID": "1.2.3", "PatientID": "P1"}
    out = write_volume(vol, tmp_path / "v.npy")
    assert np.load(out).dtype == np.float32
    side = json.loads(sidecar_path(out).read_text())
    assert side["volume"]["shape"] == [5, 7, 6]
    back = read_volume(out)
    np.testing.assert_array_equal(back.data, vol.data)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-12)
    assert back.meta["dicom"]["StudyInstanceUID"] == "1.2.3" and back.meta["problems"] == []


def test_bare_npy_is_read_as_axial_slices_with_a_problem(tmp_path):
    from d3ip_cli.io.volumes import volume_summary

    np.save(tmp_path / "bare.npy", np.zeros((2, 3, 4), dtype=np.int16))
    vol = read_volume(tmp_path / "bare.npy")
    assert volume_summary(vol)["orientation"] == "SPL"  # slices superior, rows posterior, columns to the left
    assert volume_summary(vol)["spacing_mm"] == [1.0, 1.0, 1.0]
    assert vol.data.dtype == np.float32
    assert any("axial slices of 1 mm voxels assumed" in p for p in vol.meta["problems"])
    np.save(tmp_path / "flat.npy", np.zeros(7))
    with pytest.raises(InputDataError, match="expected a"):
        read_volume(tmp_path / "flat.npy")
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(InputDataError, match="not a readable"):
        read_volume(tmp_path / "bad.npy")


def test_record_keeps_npy_geometry(tmp_path):
    """A command's run record replacing the npy sidecar keeps the geometry (RunRecord.add_output)."""
    from d3ip_cli.core.record import RunRecord
    from d3ip_cli.io.atomic import write_json

    vol = _volume()
    out = write_volume(vol, tmp_path / "r.npy")
    record = RunRecord("test", argv=[])
    record.add_output(out)
    write_json(sidecar_path(out), record.finish())
    np.testing.assert_allclose(read_volume(out).affine, vol.affine)


def test_read_errors(tmp_path):
    with pytest.raises(InputDataError, match="does not exist"):
        read_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match="empty directory"):
        read_volume(tmp_path / "empty")
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(InputDataError):
        read_volume(tmp_path / "broken.nii.gz")
    vol = _volume()
    good = write_volume(vol, tmp_path / "good.nii.gz")
    (tmp_path / "cut.nii.gz").write_bytes(good.read_bytes()[:300])
    with pytest.raises(InputDataError):
        read_volume(tmp_path / "cut.nii.gz")
    with pytest.raises(UsageError, match="--series"):
        read_volume(good, series="1.2")


def test_writers_refuse_existing_and_leave_nothing_on_failure(tmp_path):
    vol = _volume()
    for name in ("a.nii.gz", "a.npy", "a_series"):
        out = write_volume(vol, tmp_path / name)
        with pytest.raises(OutputError, match="exists"):
            write_volume(vol, out)
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for name in ("o.nii.gz", "o.npy", "series"):
        with pytest.raises(OutputError):
            write_volume(vol, blocker / name)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".d3ip")]


def test_a_text_file_named_npy_is_not_called_a_pickle(tmp_path):
    bad = tmp_path / "t.npy"
    bad.write_text("hello")
    with pytest.raises(InputDataError, match="not a NumPy .npy file"):
        read_volume(bad)


def test_a_nifti_descrip_ends_at_its_first_nul(tmp_path):
    """FSL writes "FSL3.3\\0" and leaves bytes after it: `info` must not print a raw NUL."""
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    img.header["descrip"] = b"FSL3.3\x00v2.25 NIfTI-1"
    nib.save(img, str(tmp_path / "fsl.nii"))
    vol = read_volume(tmp_path / "fsl.nii")
    assert vol.meta["nifti"]["descrip"] == "FSL3.3" and vol.meta["series_description"] == "FSL3.3"
