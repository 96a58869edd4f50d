"""DICOM reading: real files written by other software, series assembly, refusals."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest

from d3ip_cli.core.errors import InputDataError, MissingComponentError, UsageError
from d3ip_cli.io import dicom
from d3ip_cli.io.nifti import nifti_image
from d3ip_cli.io.volumes import read_volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def _expected_affine(ds, slice_step_lps):
    """The RAS affine of one classic slice, written out from the standard's definitions."""
    r = np.array([float(x) for x in ds.ImageOrientationPatient[:3]])
    c = np.array([float(x) for x in ds.ImageOrientationPatient[3:]])
    d_row, d_col = (float(x) for x in ds.PixelSpacing)
    A = np.eye(4)
    A[:3, 0] = LPS_TO_RAS @ slice_step_lps
    A[:3, 1] = LPS_TO_RAS @ (c * d_row)
    A[:3, 2] = LPS_TO_RAS @ (r * d_col)
    A[:3, 3] = LPS_TO_RAS @ np.array([float(x) for x in ds.ImagePositionPatient])
    return A


def test_ct_small_values_in_hu_and_geometry(testdata):
    path = testdata("CT_small.dcm")
    ds = pydicom.dcmread(path)
    vol = read_volume(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert vol.shape == (1, 128, 128) and vol.data.dtype == np.float32
    np.testing.assert_array_equal(vol.data[0], hu)
    assert vol.meta["modality"] == "CT" and vol.meta["units"] == "HU"
    np.testing.assert_allclose(vol.affine, _expected_affine(ds, np.array([0, 0, 5.0])), atol=1e-9)
    assert vol.meta["series_uid"] == ds.SeriesInstanceUID
    assert vol.meta["dicom"]["StudyInstanceUID"] == ds.StudyInstanceUID
    assert vol.meta["dicom"]["PatientName"] == str(ds.PatientName)
    assert vol.meta["source_format"] == "dicom" and vol.meta["problems"] == []


@pytest.mark.parametrize("variant", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm"])
def test_mr_small_compressed_variants_equal_uncompressed(testdata, variant):
    ref = read_volume(testdata("MR_small.dcm"))
    vol = read_volume(testdata(variant))
    assert ref.meta["modality"] == "MR" and ref.meta["units"] == "a.u."
    np.testing.assert_array_equal(vol.data, ref.data)
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-6)
    np.testing.assert_array_equal(ref.data[0], pydicom.dcmread(testdata("MR_small.dcm")).pixel_array)


def test_jpeg2000_head_ct_matches_uncompressed(testdata):
    vol = read_volume(testdata("693_J2KR.dcm"))
    ref = read_volume(testdata("693_UNCR.dcm"))
    assert vol.shape == (1, 512, 512) and vol.meta["units"] == "HU"
    np.testing.assert_array_equal(vol.data, ref.data)
    assert vol.data.min() == -3024  # outside the field of view, as stored by the scanner


def test_a_modality_other_than_ct_or_mr_is_named_as_the_file_gives_it(testdata):
    from d3ip_cli.io.volumes import volume_summary

    vol = read_volume(testdata("JPEG2000.dcm"))  # a nuclear-medicine image (Modality NM)
    assert vol.modality == "OT" and vol.meta["source_modality"] == "NM"
    assert volume_summary(vol)["source_modality"] == "NM"
    assert any("Modality NM is neither CT nor MR" in p for p in vol.meta["problems"])
    assert "source_modality" not in read_volume(testdata("CT_small.dcm")).meta


def test_enhanced_mr_multiframe_without_geometry(testdata):
    path = testdata("emri_small.dcm")
    vol = read_volume(path)
    frames = pydicom.dcmread(path).pixel_array
    assert vol.shape == (10, 64, 64)
    np.testing.assert_array_equal(vol.data, frames)
    assert vol.meta["modality"] == "MR"
    assert any("no patient geometry" in p for p in vol.meta["problems"])
    assert vol.spacing == pytest.approx((1.2, 1.0, 1.0))  # SpacingBetweenSlices, assumed pixels
    same = read_volume(testdata("emri_small_jpeg_2k_lossless.dcm"))
    np.testing.assert_array_equal(same.data, vol.data)


def test_enhanced_ct_per_frame_geometry_and_rescale(testdata):
    path = testdata("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    vol = read_volume(path)
    assert vol.shape == (2, 512, 512) and vol.meta["modality"] == "CT" and vol.meta["units"] == "HU"
    ipp = [np.array([float(x) for x in f.PlanePositionSequence[0].ImagePositionPatient])
           for f in ds.PerFrameFunctionalGroupsSequence]
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = np.array([float(x) for x in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    n = np.cross(iop[:3], iop[3:])
    order = np.argsort([p @ n for p in ipp])
    np.testing.assert_allclose(vol.affine[:3, 3], LPS_TO_RAS @ ipp[order[0]], atol=1e-6)
    np.testing.assert_allclose(vol.affine[:3, 0], LPS_TO_RAS @ (ipp[order[1]] - ipp[order[0]]), atol=1e-6)
    stored = ds.pixel_array
    np.testing.assert_array_equal(vol.data, stored[order] * 1.0 - 1024.0)


def test_pydicom_built_series_order_and_affine_match_dcm2niix(make_ct_series, dcm2niix, same_grid, tmp_path):
    """A series written by pydicom (not by d3ip) from a real CT slice, oblique, shuffled names."""
    a = np.radians(20.0)
    iop = [np.cos(a), np.sin(a), 0.0, 0.0, np.cos(0.3), -np.sin(0.3)]
    iop[3:] = list(np.array(iop[3:]) - np.dot(iop[3:], iop[:3]) * np.array(iop[:3]))
    iop[3:] = list(np.array(iop[3:]) / np.linalg.norm(iop[3:]))
    folder, expected = make_ct_series(tmp_path / "series", n=6, spacing=2.5, iop=iop)
    vol = read_volume(folder)
    assert vol.shape == (6, 128, 128)
    np.testing.assert_array_equal(vol.data, expected)  # sorted along the normal, HU
    assert vol.spacing[0] == pytest.approx(2.5, abs=1e-3)
    assert vol.meta["problems"] == []
    same_grid(dcm2niix(folder, tmp_path / "d2n"), nifti_image(vol), atol=1e-3)


def test_slice_order_follows_instance_numbers_when_they_run_backwards(make_ct_series, tmp_path):
    folder, expected = make_ct_series(tmp_path / "s", n=4, spacing=3.0)
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = 5 - int(ds.InstanceNumber)
        ds.save_as(f)
    vol = read_volume(folder)
    np.testing.assert_array_equal(vol.data, expected[::-1])
    assert vol.affine[2, 0] == pytest.approx(-3.0, abs=1e-3)  # steps inferior, as numbered


def test_missing_slice_is_refused_and_reported(make_ct_series, tmp_path):
    folder, _ = make_ct_series(tmp_path / "gap", n=6, spacing=2.5, positions=[0, 2.5, 5, 10, 12.5, 15])
    with pytest.raises(InputDataError, match="missing slices: 1 slice"):
        read_volume(folder)
    lenient = read_volume(folder, strict=False)
    assert lenient.shape == (6, 128, 128)
    assert any("missing slices" in p for p in lenient.meta["fatal_problems"])


def test_uneven_spacing_is_refused(make_ct_series, tmp_path):
    folder, _ = make_ct_series(tmp_path / "uneven", positions=[0, 2.5, 5.5, 8.0, 10.5])
    with pytest.raises(InputDataError, match="uneven slice spacing"):
        read_volume(folder)


def test_duplicate_positions_are_a_mixed_series(make_ct_series, tmp_path):
    folder, _ = make_ct_series(tmp_path / "dup", positions=[0, 2.5, 2.5, 5.0])
    with pytest.raises(InputDataError, match="share a position"):
        read_volume(folder)


def test_a_copied_file_is_named_as_a_copy_not_a_mixed_series(make_ct_series, tmp_path):
    import shutil

    folder, _ = make_ct_series(tmp_path / "copy", n=4)
    first = sorted(folder.glob("*.dcm"))[1]
    shutil.copy(first, folder / "copy of it.dcm")
    with pytest.raises(InputDataError, match=r"1 file\(s\) are copies of another \(the same SOPInstanceUID.*remove the copies"):
        read_volume(folder)


def test_a_copy_beside_a_second_acquisition_is_still_a_mixed_series(make_ct_series, tmp_path):
    """Only when every shared position is a copy does the message say 'remove the copies'; a real
    second acquisition at one position is a mixed series, and the copies are counted in it."""
    import shutil

    folder, _ = make_ct_series(tmp_path / "mixed", positions=[0.0, 2.5, 5.0, 5.0], shuffle=False)
    shutil.copy(sorted(folder.glob("*.dcm"))[0], folder / "copy of it.dcm")
    with pytest.raises(InputDataError, match=r"mixed series: 2 slice\(s\) share a position with another \(1 of them copies"):
        read_volume(folder)


def test_two_series_need_series_option(make_ct_series, tmp_path):
    root = tmp_path / "two"
    _, first = make_ct_series(root / "a", n=3, series_uid="1.2.3.4.100", description="first")
    _, second = make_ct_series(root / "b", n=4, series_uid="1.2.3.4.200", description="second")
    with pytest.raises(dicom.MultipleSeriesError, match="2 series") as info:
        read_volume(root)
    assert {s["series_uid"] for s in info.value.series} == {"1.2.3.4.100", "1.2.3.4.200"}
    np.testing.assert_array_equal(read_volume(root, series="1.2.3.4.200").data, second)
    np.testing.assert_array_equal(read_volume(root, series="1.2.3.4.1").data, first)  # unique prefix
    with pytest.raises(UsageError, match="matches no"):
        read_volume(root, series="9.9")


def test_mixed_orientations_in_one_series_are_refused(make_ct_series, tmp_path):
    folder, _ = make_ct_series(tmp_path / "mixed", n=3, series_uid="1.2.3.9")
    make_ct_series(folder, n=1, series_uid="1.2.3.9", iop=[0, 1, 0, 0, 0, -1], prefix="localizer")
    with pytest.raises(InputDataError, match="mixed series: 2 different slice orientations"):
        read_volume(folder)


def test_non_dicom_files_are_ignored_and_counted(make_ct_series, tmp_path):
    folder, expected = make_ct_series(tmp_path / "s", n=3)
    (folder / "README.txt").write_text("not dicom")
    vol = read_volume(folder)
    np.testing.assert_array_equal(vol.data, expected)
    assert vol.meta["problems"] == ["1 non-DICOM file(s) ignored"]


def test_truncated_files(testdata, tmp_path):
    with pytest.raises(InputDataError, match="truncated or corrupt"):
        read_volume(testdata("MR_truncated.dcm"))
    raw = open(testdata("CT_small.dcm"), "rb").read()
    (tmp_path / "cut.dcm").write_bytes(raw[:800])
    with pytest.raises(InputDataError):
        read_volume(tmp_path / "cut.dcm")


def test_truncated_file_inside_a_series_is_refused(make_ct_series, tmp_path):
    folder, _ = make_ct_series(tmp_path / "s", n=4, shuffle=False)
    victim = sorted(folder.iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:300])
    with pytest.raises(InputDataError):
        read_volume(folder)


def test_missing_codec_names_the_extra(testdata, monkeypatch):
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000Lossless

    monkeypatch.setattr(get_decoder(JPEG2000Lossless), "_available", {})
    with pytest.raises(MissingComponentError, match=r"pip install 'd3ip\[codecs\]'"):
        read_volume(testdata("MR_small_jp2klossless.dcm"))


def test_dicom_without_suffix_is_detected(testdata, tmp_path):
    target = tmp_path / "IMG0001"
    shutil.copy(testdata("CT_small.dcm"), target)
    assert read_volume(target).shape == (1, 128, 128)


def test_files_without_preamble_or_meta_header_are_read(testdata, tmp_path):
    ds = pydicom.dcmread(testdata("CT_small.dcm"))
    ds.preamble = None
    del ds.file_meta
    folder = tmp_path / "old_export"
    folder.mkdir()
    ds.save_as(folder / "IMG1", implicit_vr=True, little_endian=True)
    (folder / "notes.txt").write_text("not dicom")
    ref = read_volume(testdata("CT_small.dcm"))
    for path in (folder, folder / "IMG1"):
        vol = read_volume(path)
        np.testing.assert_array_equal(vol.data, ref.data)
        np.testing.assert_allclose(vol.affine, ref.affine)
