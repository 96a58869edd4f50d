"""The derived DICOM series writer: round trips, validity (dciodvfy), agreement with dcm2niix."""

from __future__ import annotations

import warnings

import numpy as np
import pydicom
import pytest

from d3ip_cli.core.errors import OutputError
from d3ip_cli.core.types import Volume
from d3ip_cli.io.dicom import quantise
from d3ip_cli.io.nifti import nifti_image
from d3ip_cli.io.volumes import D3ipWarning, read_volume, write_volume


@pytest.fixture
def ct_series(make_ct_series, tmp_path):
    """A 5-slice CT series built by pydicom from the real ``CT_small.dcm`` slice, read by d3ip."""
    folder, _ = make_ct_series(tmp_path / "source", n=5, spacing=5.0)
    return folder, read_volume(folder)


def _datasets(folder):
    return [pydicom.dcmread(f) for f in sorted(folder.iterdir())]


def test_dicom_to_nifti_and_back_keeps_values_and_affine(ct_series, tmp_path):
    _, vol = ct_series
    nii = write_volume(vol, tmp_path / "ct.nii.gz")
    back = read_volume(nii)
    np.testing.assert_array_equal(back.data, vol.data)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)
    assert back.meta["modality"] == "CT" and back.meta["units"] == "HU"
    again = read_volume(write_volume(back, tmp_path / "again"))
    np.testing.assert_array_equal(again.data, vol.data)
    np.testing.assert_allclose(again.affine, vol.affine, atol=1e-4)


def test_dicom_to_dicom_keeps_values_affine_and_identity(ct_series, tmp_path):
    src_folder, vol = ct_series
    out = write_volume(vol, tmp_path / "derived", description="d3ip sparse-view d3ip", uid_seed="run-1")
    back = read_volume(out)
    np.testing.assert_array_equal(back.data, vol.data)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)

    src = pydicom.dcmread(next(src_folder.iterdir()))
    files = _datasets(out)
    assert len(files) == vol.shape[0]
    for k, ds in enumerate(sorted(files, key=lambda d: int(d.InstanceNumber))):
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage, not Secondary Capture
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert "research use" in ds.SeriesDescription and "d3ip sparse-view" in ds.SeriesDescription
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID
        for key in ("StudyInstanceUID", "FrameOfReferenceUID", "PatientID", "PatientName", "StudyDate"):
            assert ds.get(key) == src.get(key), key
        assert ds.PixelRepresentation == 1 and ds.BitsAllocated == 16
        assert float(ds.WindowWidth) > 0
        ipp = np.diag([-1, -1, 1]) @ (vol.affine[:3, :3] @ [k, 0, 0] + vol.affine[:3, 3])
        np.testing.assert_allclose([float(x) for x in ds.ImagePositionPatient], ipp, atol=1e-4)
        assert float(ds.SliceThickness) == pytest.approx(5.0) and float(ds.SpacingBetweenSlices) == pytest.approx(5.0)
        np.testing.assert_allclose([float(x) for x in ds.PixelSpacing], vol.spacing[1:], atol=1e-6)
    assert len({ds.SOPInstanceUID for ds in files}) == len(files)


def test_uids_are_reproducible_and_depend_on_seed_and_content(ct_series, tmp_path):
    _, vol = ct_series
    uids = {}
    for name, seed, data in [("a", "s1", vol.data), ("b", "s1", vol.data), ("c", "s2", vol.data),
                             ("d", "s1", vol.data + 1)]:
        out = write_volume(vol.replace(data=data), tmp_path / name, uid_seed=seed)
        uids[name] = [(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in _datasets(out)]
    assert uids["a"] == uids["b"]
    assert uids["a"][0][0] != uids["c"][0][0] and uids["a"][0][0] != uids["d"][0][0]


def test_a_second_derived_series_takes_another_series_number(ct_series, tmp_path):
    """The uncertainty map of a run is a second series from the same source: viewers must list it apart."""
    src_folder, vol = ct_series
    src_number = int(pydicom.dcmread(next(src_folder.iterdir())).SeriesNumber)
    main = {int(ds.SeriesNumber) for ds in _datasets(write_volume(vol, tmp_path / "main"))}
    std = {int(ds.SeriesNumber) for ds in _datasets(write_volume(vol, tmp_path / "std", series_base=2000))}
    assert main == {1000 + src_number} and std == {2000 + src_number}


def test_written_ct_series_passes_dciodvfy_and_matches_dcm2niix(ct_series, dciodvfy, dcm2niix, same_grid, tmp_path):
    source, vol = ct_series
    out = write_volume(vol, tmp_path / "ct_out", description="d3ip convert")
    for f in sorted(out.iterdir()):
        assert dciodvfy(f) == [], f
    ours = nifti_image(read_volume(out))
    same_grid(dcm2niix(out, tmp_path / "d2n_out"), ours, atol=1e-3)
    same_grid(dcm2niix(source, tmp_path / "d2n_source"), ours, atol=1e-3)  # and the source series, too


def test_mr_from_nifti_gets_new_study_passes_dciodvfy_and_matches_dcm2niix(dciodvfy, dcm2niix, same_grid, tmp_path):
    """Float MR values (quantised with a slope) on an oblique grid, from NIfTI (no DICOM source)."""
    rng = np.random.default_rng(0)
    data = rng.normal(100.0, 30.0, size=(7, 24, 20)).astype(np.float32)
    a, b = 0.2, 0.35
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    axes = np.array([[0, 0, 1.0], [0, -1.0, 0], [-1.0, 0, 0]]).T  # z -> S, rows -> P, columns -> L
    affine = np.eye(4)
    affine[:3, :3] = rx @ rz @ axes @ np.diag([3.0, 1.1, 0.9])
    affine[:3, 3] = [-12.5, 30.25, 8.0]
    src = write_volume(Volume(data, affine, {"modality": "MR"}), tmp_path / "in.nii.gz")
    vol = read_volume(src)
    out = write_volume(vol, tmp_path / "mr_series", description="d3ip test")
    files = _datasets(out)
    assert {ds.SOPClassUID for ds in files} == {"1.2.840.10008.5.1.4.1.1.4"}  # MR Image Storage
    assert len({ds.StudyInstanceUID for ds in files}) == 1 and files[0].FrameOfReferenceUID
    second = write_volume(vol, tmp_path / "mr_series2", description="another method")
    assert _datasets(second)[0].StudyInstanceUID == files[0].StudyInstanceUID  # same input -> same study
    assert _datasets(second)[0].SeriesInstanceUID != files[0].SeriesInstanceUID
    for f in sorted(out.iterdir()):
        assert dciodvfy(f) == [], f
    back = read_volume(out)
    slope = float(files[0].RescaleSlope)
    assert np.max(np.abs(back.data - vol.data)) <= slope / 2 + 1e-4
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)
    theirs = dcm2niix(out, tmp_path / "d2n")
    ours = nifti_image(back)
    same_grid(theirs, ours, atol=1e-3)


def test_example_series_matches_dcm2niix_and_passes_dciodvfy(dcm2niix, dciodvfy, same_grid, tmp_path):
    from pathlib import Path

    series = Path(__file__).resolve().parents[2] / "examples" / "mni_t1"
    vol = read_volume(series)
    assert vol.shape == (20, 128, 128) and vol.meta["modality"] == "MR"
    same_grid(dcm2niix(series, tmp_path / "d2n"), nifti_image(vol), atol=1e-3)
    nii = read_volume(series.parent / "mni_t1.nii.gz")
    np.testing.assert_array_equal(nii.data, vol.data)
    np.testing.assert_allclose(nii.affine, vol.affine, atol=1e-4)
    files = sorted(series.iterdir())
    assert dciodvfy(files[0]) == [] and dciodvfy(files[-1]) == []


def test_unknown_modality_is_chosen_and_said(tmp_path):
    data = np.linspace(-1000, 500, 2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = write_volume(Volume(data, np.eye(4), {}), tmp_path / "s")
    assert any(issubclass(w.category, D3ipWarning) and "CT Image Storage" in str(w.message) for w in caught)
    assert pydicom.dcmread(next(out.iterdir())).Modality == "CT"


def test_existing_series_is_not_overwritten(ct_series, tmp_path):
    _, vol = ct_series
    out = write_volume(vol, tmp_path / "s")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(OutputError, match="exists"):
        write_volume(vol.replace(data=vol.data + 1), out)
    assert sorted(p.name for p in out.iterdir()) == before
    write_volume(vol.replace(data=vol.data + 1), out, overwrite=True)
    np.testing.assert_array_equal(read_volume(out).data, vol.data + 1)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".d3ip")] == []


@pytest.mark.parametrize("values", [
    np.array([-1024.0, 0.0, 3071.0]),           # CT HU: int16 exact
    np.array([0.0, 40000.0, 65535.0]),          # uint16 exact
    np.array([-70000.0, -10000.0]),             # integers beyond int16 range, span fits: offset
    np.array([0.0, 0.123456, 1.0]),             # normalised floats
    np.array([-3.5e6, 2.25e7, 1.0]),            # large floats
    np.array([7.25, 7.25]),                     # constant
])
def test_quantise_error_bound(values):
    q, slope, intercept = quantise(values.astype(np.float32))
    assert q.dtype in (np.int16, np.uint16) and slope > 0
    error = np.max(np.abs(q * slope + intercept - values.astype(np.float32)))
    assert error <= slope / 2 + 1e-6 * max(1.0, float(np.max(np.abs(values))))


S, A, R = [0, 0, 1.0], [0, 1.0, 0], [1.0, 0, 0]


@pytest.mark.parametrize("axes", [
    (S, A, R),  # RAS storage: rows -> anterior, columns -> right (as stored it would show rotated 180 deg)
    (S, R, A),  # and with the in-plane axes transposed
    ([0, 0, -1.0], [0, -1.0, 0], R),  # slices running downwards, rows -> posterior, columns -> right
])
def test_nifti_stored_grid_is_written_in_display_orientation(axes, dcm2niix, same_grid, tmp_path):
    """A NIfTI grid whose rows/columns run against the DICOM display convention is written
    with rows anterior->posterior and columns right->left (IOP [1,0,0,0,1,0]), the same voxels
    at the same places (checked against dcm2niix and our own reader in world space)."""
    data = np.arange(3 * 6 * 5, dtype=np.float32).reshape(3, 6, 5)
    affine = np.eye(4)
    affine[:3, :3] = np.column_stack(axes) * [2.0, 1.5, 1.0]
    affine[:3, 3] = [-10.0, 20.0, 5.0]
    vol = Volume(data, affine, {"modality": "MR"})
    out = write_volume(vol, tmp_path / "series")
    ds = _datasets(out)[0]
    np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient], [1, 0, 0, 0, 1, 0], atol=1e-9)
    back = read_volume(out)
    same_grid(nifti_image(back), nifti_image(vol), atol=1e-4)
    same_grid(dcm2niix(out, tmp_path / "d2n"), nifti_image(vol), atol=1e-3)


def test_the_source_slice_thickness_is_kept_apart_from_the_spacing(make_ct_series, tmp_path):
    """5 mm slices every 2.5 mm (overlapping, as scanners reconstruct them): a derived series keeps
    SliceThickness 5 and writes SpacingBetweenSlices 2.5; a volume with no DICOM source (NIfTI)
    gets the spacing as its thickness."""
    folder, _ = make_ct_series(tmp_path / "overlap", n=4, spacing=2.5)
    assert float(pydicom.dcmread(next(folder.iterdir())).SliceThickness) == pytest.approx(5.0)
    vol = read_volume(folder)
    out = write_volume(vol, tmp_path / "derived")
    for ds in _datasets(out):
        assert float(ds.SliceThickness) == pytest.approx(5.0) and float(ds.SpacingBetweenSlices) == pytest.approx(2.5)
    via_nifti = write_volume(read_volume(write_volume(vol, tmp_path / "v.nii.gz")), tmp_path / "from_nifti")
    assert all(float(ds.SliceThickness) == pytest.approx(2.5) for ds in _datasets(via_nifti))


def test_the_window_of_a_padded_ct_ignores_the_padding(tmp_path):
    """A head CT padded with -3024 HU outside the field of view (as 693_UNCR.dcm is), written from a
    NIfTI with no window of its own: the window spans the tissue, not the padding."""
    rng = np.random.default_rng(0)
    data = np.full((2, 64, 64), -3024.0, np.float32)
    yy, xx = np.mgrid[:64, :64]
    inside = (yy - 32) ** 2 + (xx - 32) ** 2 < 28 ** 2
    data[:, inside] = rng.uniform(-1000.0, 80.0, size=(2, int(inside.sum())))
    vol = Volume(data, np.diag([0.5, 0.5, 2.0, 1.0]), {"modality": "CT", "units": "HU"})
    out = write_volume(vol, tmp_path / "padded")
    ds = _datasets(out)[0]
    lo = float(ds.WindowCenter) - float(ds.WindowWidth) / 2
    assert -1024.0 <= lo < -900.0 and float(ds.WindowWidth) < 1300.0, (ds.WindowCenter, ds.WindowWidth)
