"""``d3ip info``: the table, the JSON object, and problems reported before failing."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from d3ip_cli.core.types import Volume
from d3ip_cli.io.volumes import read_volume, write_volume

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mni_t1"


def _ct_series(root: Path, name: str, n: int = 5, seed: str = "") -> Path:
    from pydicom.data import get_testdata_file

    one = read_volume(get_testdata_file("CT_small.dcm"))
    data = np.stack([one.data[0] + 10 * k for k in range(n)])
    return write_volume(Volume(data, one.affine, dict(one.meta)), root / name, uid_seed=seed)


def test_info_table_on_stdout(cli):
    result = cli(["info", EXAMPLE])
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    for text in ("20 x 128 x 128", "5 x 1.6 x 1.6", "SPL", "MR (a.u.)", "MNI152 2009a T1", "problems",
                 "affine (RAS+ mm)", "value range", "series UID"):
        assert text in out, text
    assert result.stderr == ""


def test_info_json_is_one_object(cli):
    result = cli(["info", EXAMPLE, "--json"])
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    vol = read_volume(EXAMPLE)
    assert doc["shape"] == [20, 128, 128] and doc["slice_count"] == 20 and doc["format"] == "dicom"
    assert doc["spacing_mm"] == [5.0, 1.6, 1.6] and doc["orientation"] == "SPL"
    np.testing.assert_allclose(doc["affine"], vol.affine)
    assert doc["modality"] == "MR" and doc["units"] == "a.u."
    assert doc["value_range"] == [float(vol.data.min()), float(vol.data.max())]
    assert doc["series_uid"] == vol.meta["series_uid"] and doc["problems"] == [] and doc["ok"] is True


def test_info_reports_a_gap_then_fails(cli, tmp_path):
    series = _ct_series(tmp_path, "gap", n=6)
    sorted(series.iterdir())[3].unlink()
    result = cli(["info", series, "--json"])
    assert result.exit_code == 3
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["shape"] == [5, 128, 128]
    assert any("missing slices: 1 slice(s)" in p for p in doc["problems"])
    assert result.stderr.strip().startswith("error:") and "missing slices" in result.stderr
    table = cli(["info", series])
    assert table.exit_code == 3 and "missing slices" in table.stdout


def test_info_lists_several_series_then_fails(cli, tmp_path):
    root = tmp_path / "two"
    a = _ct_series(root, "a", n=3, seed="a")
    _ct_series(root, "b", n=4, seed="b")
    result = cli(["info", root, "--json"])
    assert result.exit_code == 3
    doc = json.loads(result.stdout)
    assert sorted(s["files"] for s in doc["series"]) == [3, 4] and doc["ok"] is False
    assert "mixed series" in doc["problems"][0]
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "--series" in result.stderr
    uid = read_volume(a).meta["series_uid"]
    chosen = cli(["info", root, "--series", uid, "--json"])
    assert chosen.exit_code == 0 and json.loads(chosen.stdout)["slice_count"] == 3


def test_info_on_real_enhanced_mr_reports_assumed_geometry(cli):
    from pydicom.data import get_testdata_file

    result = cli(["info", get_testdata_file("emri_small.dcm"), "--json"])
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["shape"] == [10, 64, 64] and doc["modality"] == "MR"
    assert any("no patient geometry" in p for p in doc["problems"])


def test_info_frame_of_4d_nifti(cli, tmp_path):
    data = np.stack([np.full((4, 3, 2), k, np.float32) for k in range(3)], axis=-1)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "t.nii.gz"))
    whole = cli(["info", tmp_path / "t.nii.gz", "--json"])  # described (frame 0), with the frame count
    assert whole.exit_code == 0, whole.output
    doc = json.loads(whole.stdout)
    assert doc["frames"] == 3 and doc["value_range"] == [0.0, 0.0] and "--frame N (0..2)" in doc["problems"][0]
    table = cli(["info", tmp_path / "t.nii.gz"])
    assert table.exit_code == 0 and "frames (4D)" in table.stdout and "3 (shown: frame 0)" in table.stdout
    result = cli(["info", tmp_path / "t.nii.gz", "--frame", "2", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["value_range"] == [2.0, 2.0]
    assert "frames" not in json.loads(result.stdout)
    r = cli(["convert", tmp_path / "t.nii.gz", "-o", tmp_path / "o.nii.gz"])  # other commands still need it
    assert r.exit_code == 2 and "choose one with --frame N (0..2)" in r.stderr
    np.save(tmp_path / "t.npy", np.zeros((2, 3, 4, 5), np.float32))
    npy = cli(["info", tmp_path / "t.npy", "--json"])
    assert npy.exit_code == 0 and json.loads(npy.stdout)["frames"] == 2


def test_info_bad_inputs(cli, tmp_path):
    missing = cli(["info", tmp_path / "nothing.nii"])
    assert missing.exit_code == 3 and missing.stdout == "" and missing.stderr.startswith("error:")
    np.save(tmp_path / "bare.npy", np.zeros((2, 2, 2)))
    bare = cli(["info", tmp_path / "bare.npy", "--json"])
    assert bare.exit_code == 0 and "axial slices" in json.loads(bare.stdout)["problems"][0]


def test_info_describes_a_measurement_file(cli, tmp_path):
    import json as _json

    import pydicom.data

    meas = tmp_path / "m.h5"
    ct = pydicom.data.get_testdata_file("CT_small.dcm")
    assert cli(["simulate", ct, "-o", meas, "--task", "sparse-view", "--views", "30"]).exit_code == 0
    r = cli(["info", meas, "--json"])
    assert r.exit_code == 0, r.output
    doc = _json.loads(r.stdout)
    assert doc["task"] == "sparse-view" and doc["kind"] == "sinogram" and doc["data_shape"][1] == 30
    assert doc["retrospective"] is True and doc["operator"]["options"] == {"views": 30}
    r = cli(["info", meas])
    assert r.exit_code == 0 and "sinogram (Z, views, detectors)" in r.stdout


def test_info_describes_a_prior_and_its_training_state(cli, prior, tmp_path):
    from safetensors.torch import save_file

    from d3ip_cli.prior import checkpoint as ckpt
    from d3ip_cli.prior.pretrain import state_path

    r = cli(["info", prior, "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["format"] == "diffusion prior (d3ip)" and doc["weights"]["resolution"] == "32 x 32"
    assert doc["weights"]["sha256"] == ckpt.file_sha256(prior) and doc["header"]["steps"] == 6
    assert doc["weights"]["trained"].startswith("6 steps, 48 phantom images")
    table = cli(["info", prior]).stdout
    assert "U-Net 16 channels x (1, 2)" in table and "no (synthetic phantoms only)" in table
    r = cli(["info", state_path(prior)])
    assert r.exit_code == 0 and "training state of pretrain-phantom" in r.stdout and "steps done     6 of 6" in r.stdout
    plain = tmp_path / "other.safetensors"  # a safetensors file another program wrote
    save_file({"w": __import__("torch").zeros(2)}, str(plain))
    r = cli(["info", plain])
    assert r.exit_code == 3 and "no d3ip metadata header" in r.stderr and r.stdout == ""


def test_info_says_how_a_multicoil_file_without_maps_gets_them(cli, tmp_path):
    import h5py

    rng = np.random.default_rng(0)
    k = (rng.standard_normal((2, 4, 32, 32)) + 1j * rng.standard_normal((2, 4, 32, 32))).astype(np.complex64)
    cols = np.zeros(32, bool)
    cols[::3] = True
    sparse = k * cols  # [slices, coils, ky, kx]: every third column, no fully sampled centre
    cols[12:22] = True
    centred = k * cols
    for name, data in (("centred", centred), ("sparse", sparse)):
        with h5py.File(tmp_path / f"{name}.h5", "w") as f:
            f["kspace"] = data
    r = cli(["info", tmp_path / "centred.h5", "--json"])
    assert r.exit_code == 0, r.output
    assert any("4-coil k-space without coil maps: reconstruct estimates them with ESPIRiT" in p
               for p in json.loads(r.stdout)["problems"])
    r = cli(["info", tmp_path / "sparse.h5"])
    assert r.exit_code == 3 and "cannot be reconstructed" in r.stdout and r.stderr.startswith("error:"), r.output
