"""`d3ip metrics`: PSNR/SSIM with an explicit data range, through-slice error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from d3ip_cli.bench.metrics import volume_metrics


def _npy(path, arr):
    np.save(path, arr.astype(np.float32))
    return path


def test_metrics_json(cli, tmp_path):
    rng = np.random.default_rng(0)
    ref = rng.random((4, 23, 19))
    rec = ref + 0.01 * rng.standard_normal(ref.shape)
    r = cli(["metrics", _npy(tmp_path / "rec.npy", rec), _npy(tmp_path / "ref.npy", ref), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    mse = np.mean((rec.astype(np.float32) - ref.astype(np.float32)) ** 2)
    rng_ = float(ref.astype(np.float32).max() - ref.astype(np.float32).min())
    assert doc["psnr"] == pytest.approx(10 * np.log10(rng_ ** 2 / mse), abs=1e-3)
    assert 0 < doc["ssim"] < 1 and doc["data_range"] == pytest.approx(rng_)
    assert doc["z_rel_l2"] is not None and doc["z_rel_l2"] > 0
    r = cli(["metrics", tmp_path / "rec.npy", tmp_path / "ref.npy", "--data-range", "2"])
    assert r.exit_code == 0 and "psnr" in r.stdout


def test_identical_and_mismatched(cli, tmp_path):
    a = _npy(tmp_path / "a.npy", np.arange(60.0).reshape(3, 4, 5))
    r = cli(["metrics", a, a, "--json"])
    doc = json.loads(r.stdout)
    assert doc["psnr"] is None and doc["identical"] and doc["ssim"] == pytest.approx(1.0)
    r = cli(["metrics", a, a])  # the table says what null means
    assert r.exit_code == 0 and "psnr       inf (the volumes are identical)" in r.stdout, r.output
    b = _npy(tmp_path / "b.npy", np.zeros((2, 4, 5)))
    r = cli(["metrics", a, b])
    assert r.exit_code == 3 and "shape" in r.stderr and "the same --slices A:B and --grid N" in r.stderr


def test_a_4d_file_says_how_to_take_a_frame(cli, tmp_path):
    a = _npy(tmp_path / "a.npy", np.arange(60.0).reshape(3, 4, 5))
    four = _npy(tmp_path / "four.npy", np.zeros((2, 3, 4, 5)))
    r = cli(["metrics", a, four])
    assert r.exit_code == 2 and "REFERENCE" in r.stderr and f"d3ip convert {four} --frame 0" in r.stderr, r.output
    r = cli(["reconstruct", a, "--task", "cs-mri", "--method", "zero-filled", "--reference", four,
             "-o", tmp_path / "o.npy"])
    assert r.exit_code == 2 and "--frame picks a frame of the input only" in r.stderr, r.output
    assert not (tmp_path / "o.npy").exists()


def test_through_slice_error_sees_z_artefacts():
    ref = np.tile(np.linspace(0, 1, 10)[:, None, None], (1, 8, 8))
    flicker = ref + 0.05 * (np.arange(10) % 2)[:, None, None]
    assert volume_metrics(flicker, ref)["z_rel_l2"] > volume_metrics(ref + 0.05, ref)["z_rel_l2"]


def test_volumes_elsewhere_in_space_are_refused(cli, tmp_path):
    """Metrics compare voxel arrays: a copy shifted 50 mm, or stored in another orientation,
    must not score as identical (or as garbage); arrays without a geometry are compared as they are."""
    import nibabel as nib
    data = np.arange(4 * 6 * 5, dtype=np.float32).reshape(5, 6, 4)
    base = np.diag([1.0, 1.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(data, base), tmp_path / "a.nii.gz")
    shifted = base.copy()
    shifted[:3, 3] += 50
    nib.save(nib.Nifti1Image(data, shifted), tmp_path / "b.nii.gz")
    flipped = base @ np.diag([-1.0, 1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(data, flipped), tmp_path / "c.nii.gz")
    r = cli(["metrics", tmp_path / "a.nii.gz", tmp_path / "a.nii.gz"])
    assert r.exit_code == 0, r.output
    for other in ("b.nii.gz", "c.nii.gz"):
        r = cli(["metrics", tmp_path / other, tmp_path / "a.nii.gz"])
        assert r.exit_code == 3 and "another grid in space" in r.stderr, r.output


def test_the_same_grid_in_another_axis_order_is_compared_voxel_for_voxel(cli, tmp_path):
    """dcm2niix stores the example's DICOM series with its rows flipped (NIfTI's convention), and a DICOM
    series written from a NIfTI reads back in its own order: no resampling is needed, so metrics and
    --reference reorient (permute and flip axes) instead of refusing. A truly different grid is still refused."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from d3ip_cli.bench.runner import example_path

    series = Path(example_path()).with_suffix("").with_suffix("")  # examples/mni_t1, the DICOM series
    exe = shutil.which("dcm2niix") or str(Path(sys.executable).with_name("dcm2niix"))
    proc = subprocess.run([exe, "-b", "n", "-z", "n", "-f", "ref", "-o", str(tmp_path), str(series)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ref = tmp_path / "ref.nii"
    import nibabel as nib

    from d3ip_cli.io.volumes import read_volume

    assert not np.allclose(read_volume(ref).affine, read_volume(series).affine)  # stored differently
    r = cli(["metrics", series, ref, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["nrmse"] < 1e-6  # the same voxels
    docs = []
    for reference in (series, ref):
        r = cli(["reconstruct", series, "--task", "sparse-view", "--method", "fbp", "--slices", "4:8", "--grid", "64",
                 "--reference", reference, "-o", tmp_path / f"r{len(docs)}.nii.gz", "--json"])
        assert r.exit_code == 0, r.output
        docs.append(json.loads(r.stdout)["metrics"])
    assert docs[0] == docs[1]
    shifted = nib.load(ref)
    moved = nib.Nifti1Image(np.asanyarray(shifted.dataobj), shifted.affine @ np.diag([1, 1, 1, 1]) + np.array(
        [[0, 0, 0, 3.0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))
    nib.save(moved, tmp_path / "moved.nii")
    r = cli(["metrics", series, tmp_path / "moved.nii"])
    assert r.exit_code == 3 and "another grid in space" in r.stderr


def test_a_runs_own_scores_are_recomputed_with_its_slices_and_grid(cli, tmp_path):
    """reconstruct --slices --grid scores against the cut input; metrics with the same options
    gives the same numbers from the files (without them the shapes differ: exit 3)."""
    example = Path(__file__).resolve().parents[2] / "examples" / "mni_t1.nii.gz"
    out = tmp_path / "r.nii.gz"
    r = cli(["reconstruct", example, "--task", "sparse-view", "--slices", "8:11", "--grid", "48", "--method", "fbp",
             "-o", out, "--json"])
    assert r.exit_code == 0, r.output
    ran = json.loads(r.stdout)["metrics"]
    m = cli(["metrics", out, example, "--slices", "8:11", "--grid", "48", "--json"])
    assert m.exit_code == 0, m.output
    doc = json.loads(m.stdout)
    assert doc["psnr"] == pytest.approx(ran["psnr"], abs=0.01) and doc["ssim"] == pytest.approx(ran["ssim"], abs=1e-3)
    assert cli(["metrics", out, example]).exit_code == 3
    import nibabel as nib  # the reference stored in the other slice order: reoriented first, then cut

    img = nib.load(str(example))
    flipped = nib.Nifti1Image(np.asarray(img.dataobj)[:, :, ::-1],
                              img.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, img.shape[2] - 1],
                                                     [0, 0, 0, 1]]))
    nib.save(flipped, str(tmp_path / "flipped.nii.gz"))
    f = cli(["metrics", out, tmp_path / "flipped.nii.gz", "--slices", "8:11", "--grid", "48", "--json"])
    assert f.exit_code == 0, f.output
    assert json.loads(f.stdout)["psnr"] == pytest.approx(doc["psnr"], abs=1e-6)
    bad = cli(["metrics", out, example, "--slices", "8-11"])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: --slices")
    assert cli(["metrics", out, example, "--grid", "4"]).exit_code == 2
