"""``d3ip convert``: every format pair, the run record, and failures that leave nothing behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from d3ip_cli.core.types import Volume
from d3ip_cli.io.atomic import sidecar_path
from d3ip_cli.io.volumes import read_volume, write_volume

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mni_t1"
SUFFIX = {"nifti": ".nii.gz", "npy": ".npy", "dicom": ""}


def _ct_volume() -> Volume:
    from pydicom.data import get_testdata_file

    one = read_volume(get_testdata_file("CT_small.dcm"))
    data = np.stack([one.data[0] + 10 * k for k in range(5)])
    return Volume(data, one.affine, dict(one.meta))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The bundled DICOM example plus NIfTI and NumPy copies written by d3ip."""
    root = tmp_path_factory.mktemp("sources")
    vol = read_volume(EXAMPLE)
    return {"dicom": EXAMPLE, "nifti": write_volume(vol, root / "mni.nii.gz"),
            "npy": write_volume(vol, root / "mni.npy"), "volume": vol}


@pytest.mark.parametrize("src_fmt", ["dicom", "nifti", "npy"])
@pytest.mark.parametrize("dst_fmt", ["dicom", "nifti", "npy"])
def test_convert_between_every_format(cli, sources, tmp_path, src_fmt, dst_fmt):
    out = tmp_path / f"out{SUFFIX[dst_fmt]}"
    result = cli(["convert", sources[src_fmt], "-o", out])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""  # without --json, stdout stays empty
    back = read_volume(out)
    ref = sources["volume"]
    np.testing.assert_array_equal(back.data, ref.data)
    np.testing.assert_allclose(back.affine, ref.affine, atol=1e-4)
    assert back.meta["modality"] == "MR"
    record = json.loads(sidecar_path(out).read_text())
    assert record["command"] == "convert" and record["method"] == "convert"
    assert record["output"] == str(out.resolve())
    assert record["inputs"][0]["sha256"] and record["outputs"][0]["sha256"]
    assert record["volume"]["shape"] == [20, 128, 128]
    np.testing.assert_allclose(record["volume"]["affine"], ref.affine, atol=1e-4)
    for key in ("wall_time_s", "seed", "device", "prior_sha256", "metrics", "version"):
        assert key in record


def test_convert_json_prints_only_the_run_record(cli, tmp_path):
    out = tmp_path / "series"
    result = cli(["convert", EXAMPLE, "-o", out, "--format", "dicom", "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)  # exactly one JSON document
    assert doc == json.loads(sidecar_path(out).read_text())
    assert doc["config"]["format"] == "dicom" and out.is_dir() and len(list(out.iterdir())) == 20


def test_convert_ct_to_dicom_is_ct_in_hu(cli, tmp_path):
    import pydicom

    src = write_volume(_ct_volume(), tmp_path / "ct.nii.gz")
    out = tmp_path / "ct_series"
    assert cli(["convert", src, "-o", out]).exit_code == 0
    ds = pydicom.dcmread(sorted(out.iterdir())[0])
    assert ds.Modality == "CT" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    np.testing.assert_array_equal(read_volume(out).data, _ct_volume().data)


def test_json_files_name_no_patient_but_a_derived_series_keeps_them(cli, tmp_path):
    """Run records and .npy geometry sidecars leave out the patient's name, ID and birth date (as
    dcm2niix's anonymised BIDS sidecars do): NIfTI files are often made to share data. A DICOM
    series derived from the DICOM keeps them, so that it joins the patient's study."""
    import pydicom
    from pydicom.data import get_testdata_file

    src = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(src)
    assert str(ds.PatientName) and ds.PatientID  # the test file names a patient
    for name in ("c.nii.gz", "c.npy"):
        assert cli(["convert", src, "-o", tmp_path / name]).exit_code == 0
        text = sidecar_path(tmp_path / name).read_text()
        for value in (str(ds.PatientName), ds.PatientID, '"StudyDate"'):  # (its StudyID equals its PatientID)
            assert value not in text, (name, value)
        assert ds.StudyInstanceUID in text  # the study link stays
    assert cli(["convert", tmp_path / "c.npy", "-o", tmp_path / "from_npy", "--format", "dicom"]).exit_code == 0
    assert cli(["convert", src, "-o", tmp_path / "series", "--format", "dicom"]).exit_code == 0
    derived = pydicom.dcmread(next((tmp_path / "series").glob("*.dcm")))
    assert derived.PatientName == ds.PatientName and derived.PatientID == ds.PatientID
    assert derived.StudyInstanceUID == ds.StudyInstanceUID and derived.StudyDate == ds.StudyDate
    again = pydicom.dcmread(next((tmp_path / "from_npy").glob("*.dcm")))
    assert again.StudyInstanceUID == ds.StudyInstanceUID and not str(again.PatientName)


def test_an_mr_volume_with_a_few_undershoots_below_minus_500_is_not_written_as_ct(cli, tmp_path):
    """nibabel's anatomical.nii (a T1, -610 .. 30393, 0.009 % of voxels <= -500) is MR; CT_small's
    values (21 % of voxels <= -500) are HU. The same 1 % rule reads an unlabelled CT task input."""
    import os

    import pydicom

    from d3ip_cli.core.types import reaches_hu_air

    src = os.path.join(os.path.dirname(nib.__file__), "tests", "data", "anatomical.nii")
    r = cli(["convert", src, "-o", tmp_path / "t1", "--format", "dicom"])
    assert r.exit_code == 0 and "writing MR Image Storage" in r.stderr, r.output
    assert pydicom.dcmread(next((tmp_path / "t1").glob("*.dcm"))).Modality == "MR"
    ct = _ct_volume().data
    assert reaches_hu_air(ct) and not reaches_hu_air(nib.load(src).get_fdata())
    few = np.full((10, 10, 10), 100.0)
    few.flat[:9] = -1000  # 0.9 % of the voxels
    assert not reaches_hu_air(few)
    few.flat[:10] = -1000  # 1 %
    assert reaches_hu_air(few)


def test_convert_overwrite(cli, sources, tmp_path):
    out = tmp_path / "x.nii.gz"
    assert cli(["convert", sources["nifti"], "-o", out]).exit_code == 0
    before = out.read_bytes()
    result = cli(["convert", sources["npy"], "-o", out])
    assert result.exit_code == 4 and "--overwrite" in result.stderr
    assert out.read_bytes() == before
    assert cli(["convert", sources["npy"], "-o", out, "--overwrite"]).exit_code == 0


def test_convert_notes_problems_as_warnings(cli, tmp_path):
    np.save(tmp_path / "bare.npy", np.ones((2, 3, 4), dtype=np.float32))
    result = cli(["convert", tmp_path / "bare.npy", "-o", tmp_path / "bare.nii"])
    assert result.exit_code == 0
    assert "axial slices of 1 mm voxels assumed" in result.stderr and "modality" not in result.stdout
    record = json.loads(sidecar_path(tmp_path / "bare.nii").read_text())
    assert any("axial slices" in w for w in record["warnings"])
    result = cli(["convert", tmp_path / "bare.npy", "-o", tmp_path / "bare_series"])
    assert result.exit_code == 0 and "MR Image Storage" in result.stderr  # unknown modality: says what it chose
    import pydicom

    first = pydicom.dcmread(sorted((tmp_path / "bare_series").iterdir())[0])
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]  # axial, as a scanner writes it


# ----------------------------------------------------------------------------- failures


def _series_with_gap(root: Path) -> Path:
    series = write_volume(_ct_volume(), root / "gap_series")
    sorted(series.iterdir())[2].unlink()
    return series


def _two_series(root: Path) -> Path:
    both = root / "two"
    write_volume(_ct_volume(), both / "a", uid_seed="a")
    write_volume(_ct_volume().replace(data=_ct_volume().data[:3]), both / "b", uid_seed="b")
    return both


def _make_input(kind: str, root: Path) -> list[str]:
    """Command-line arguments (before -o) for each bad-input case."""
    from pydicom.data import get_testdata_file

    if kind == "missing":
        return [str(root / "no_such_scan.nii.gz")]
    if kind == "empty_dir":
        (root / "empty").mkdir()
        return [str(root / "empty")]
    if kind == "not_dicom_dir":
        (root / "docs").mkdir()
        (root / "docs" / "a.txt").write_text("hello")
        (root / "docs" / "b.dcm").write_bytes(b"\x00" * 200)
        return [str(root / "docs")]
    if kind == "truncated":
        raw = Path(get_testdata_file("CT_small.dcm")).read_bytes()
        (root / "cut.dcm").write_bytes(raw[: len(raw) // 2])
        return [str(root / "cut.dcm")]
    if kind == "gap":
        return [str(_series_with_gap(root))]
    if kind == "two_series":
        return [str(_two_series(root))]
    if kind == "nan_nifti":
        nib.save(nib.Nifti1Image(np.full((4, 4, 3), np.nan, np.float32), np.eye(4)), str(root / "nan.nii.gz"))
        return [str(root / "nan.nii.gz")]
    if kind == "4d_without_frame":
        nib.save(nib.Nifti1Image(np.ones((4, 4, 3, 2), np.float32), np.eye(4)), str(root / "4d.nii.gz"))
        return [str(root / "4d.nii.gz")]
    raise AssertionError(kind)


BAD_INPUTS = [
    ("missing", 3, "does not exist"),
    ("empty_dir", 3, "empty directory"),
    ("not_dicom_dir", 3, "no DICOM images"),
    ("truncated", 3, "truncated"),
    ("gap", 3, "missing slices"),
    ("two_series", 3, "--series"),
    ("nan_nifti", 3, "no finite voxel"),
    ("4d_without_frame", 2, "--frame"),
]


def _assert_clean_failure(result, code: int, fragment: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""


@pytest.mark.parametrize("kind,code,fragment", BAD_INPUTS)
def test_bad_input_fails_cleanly_and_writes_nothing(cli, tmp_path, kind, code, fragment):
    inputs = tmp_path / "in"
    inputs.mkdir()
    args = _make_input(kind, inputs)
    outdir = tmp_path / "out"
    outdir.mkdir()
    for target in ("scan.nii.gz", "scan.npy", "scan_series"):
        result = cli(["convert", *args, "-o", outdir / target])
        _assert_clean_failure(result, code, fragment)
        assert list(outdir.iterdir()) == []


@pytest.mark.parametrize("target", ["somefile.txt/out.nii.gz", "somefile.txt/out_series", "/proc/d3ip_out.nii.gz",
                                    "/proc/d3ip_series"])
def test_unwritable_output_fails_cleanly(cli, tmp_path, target):
    (tmp_path / "somefile.txt").write_text("a regular file, not a folder")
    out = Path(target) if target.startswith("/") else tmp_path / target
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli(["convert", EXAMPLE, "-o", out])
    assert result.exit_code == 4, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not out.exists()


def test_existing_output_without_overwrite(cli, tmp_path):
    out = tmp_path / "exists.nii.gz"
    out.write_bytes(b"precious")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli(["convert", EXAMPLE, "-o", out])
    _assert_clean_failure(result, 4, "exists")
    assert out.read_bytes() == b"precious" and sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("args,fragment", [
    (["--format", "tiff"], "--format"),
    (["--series", "1.2.3"], "--series"),
])
def test_usage_errors_exit_2(cli, sources, tmp_path, args, fragment):
    result = cli(["convert", sources["nifti"], "-o", tmp_path / "o.nii.gz", *args])
    _assert_clean_failure(result, 2, fragment)
    assert list(tmp_path.iterdir()) == []


def test_measurement_output_suffix_is_a_usage_error(cli, sources, tmp_path):
    _assert_clean_failure(cli(["convert", sources["nifti"], "-o", tmp_path / "m.h5"]), 2, "measurement")


def _d3ip() -> str:
    exe = Path(sys.executable).parent / "d3ip"
    return str(exe) if exe.exists() else (shutil.which("d3ip") or "d3ip")


def test_installed_command_end_to_end(tmp_path):
    """The real console script: JSON on stdout only; a failure is one stderr line, no traceback."""
    out = tmp_path / "mni.nii.gz"
    proc = subprocess.run([_d3ip(), "convert", str(EXAMPLE), "-o", str(out), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["output"] == str(out.resolve()) and out.is_file()
    proc = subprocess.run([_d3ip(), "convert", str(tmp_path / "nope"), "-o", str(tmp_path / "x.nii.gz")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and proc.stdout == ""
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
