"""`d3ip reconstruct` with classical methods, end to end on real anatomy and real raw-data files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from d3ip_cli.io.volumes import read_volume


@pytest.fixture
def anatomy(tmp_path):
    import nibabel

    src = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")
    return shutil.copy(src, tmp_path / "anatomical.nii")


@pytest.fixture
def ct_slice(tmp_path):
    import pydicom.data

    return shutil.copy(pydicom.data.get_testdata_file("CT_small.dcm"), tmp_path / "CT_small.dcm")


def _run(cli, args):
    r = cli(["reconstruct", *args, "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)  # exactly one JSON object on stdout
    for key in ("method", "task", "output", "wall_time_s", "seed", "device", "prior_sha256", "metrics"):
        assert key in doc
    return doc


@pytest.mark.parametrize("method", ["tv", "fbp", "cgls"])
def test_ct_sparse_view_on_real_ct(cli, ct_slice, tmp_path, method):
    out = tmp_path / f"{method}.nii.gz"
    doc = _run(cli, [ct_slice, "--task", "sparse-view", "--views", "30", "--method", method, "--grid", "64",
                     "-o", out])
    assert doc["method"] == method and doc["prior_sha256"] is None
    m = doc["metrics"]
    assert m["psnr"] > {"fbp": 15, "cgls": 22, "tv": 22}[method] and 0 < m["ssim"] <= 1 and m["data_range"] > 0
    vol = read_volume(out)
    assert vol.shape == (1, 64, 64) and vol.meta["units"] == "HU" or vol.shape == (1, 64, 64)
    side = json.loads((tmp_path / f"{method}.nii.gz.json").read_text())
    assert side["intensity"]["kind"] == "ct-attenuation" and side["metrics"] == m


def test_threads_are_set_recorded_and_checked(cli, anatomy, tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        doc = _run(cli, [anatomy, "--task", "cs-mri", "--method", "zero-filled", "--slices", "8:10", "--threads", "1",
                         "-o", tmp_path / "zf.nii.gz"])
        assert doc["threads"] == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    r = cli(["reconstruct", anatomy, "--task", "cs-mri", "--method", "zero-filled", "--threads", "0",
             "-o", tmp_path / "zf0.nii.gz"])
    assert r.exit_code == 2 and "--threads must be at least 1" in r.output
    assert not (tmp_path / "zf0.nii.gz").exists()
    assert torch.get_num_threads() == before


def test_fbp_filter_and_tv_through_slice_weight_options(cli, ct_slice, anatomy, tmp_path):
    ram = _run(cli, [ct_slice, "--task", "sparse-view", "--method", "fbp", "--grid", "64", "-o", tmp_path / "r.npy"])
    hann = _run(cli, [ct_slice, "--task", "sparse-view", "--method", "fbp", "--filter", "Hann", "--grid", "64",
                      "-o", tmp_path / "h.npy"])
    assert hann["config"]["filter"] == "hann" and ram["config"]["filter"] is None
    assert not np.allclose(read_volume(tmp_path / "r.npy").data, read_volume(tmp_path / "h.npy").data)
    base = [anatomy, "--task", "cs-mri", "--method", "tv", "--slices", "8:12", "--weight", "1e-3"]
    coupled = _run(cli, [*base, "-o", tmp_path / "c.npy"])
    apart = _run(cli, [*base, "--weight-z", "0", "-o", tmp_path / "a.npy"])  # slice by slice
    assert apart["config"]["weight_z"] == 0 and coupled["metrics"]["psnr"] != apart["metrics"]["psnr"]
    for extra, text in ((["--method", "fbp", "--filter", "bogus"], "--filter bogus: not an FBP filter"),
                        (["--method", "tv", "--filter", "hann"], "--filter does not apply to method tv"),
                        (["--method", "fbp", "--weight-z", "0.1"], "--weight-z does not apply to method fbp")):
        r = cli(["reconstruct", ct_slice, "--task", "sparse-view", *extra, "-o", tmp_path / "bad.npy"])
        assert r.exit_code == 2 and text in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
        assert not (tmp_path / "bad.npy").exists()


def test_limited_angle_tv_on_mr_volume_with_slab(cli, anatomy, tmp_path):
    doc = _run(cli, [anatomy, "--task", "limited-angle", "--arc", "120", "--method", "tv", "--slices", "10:13",
                     "-o", tmp_path / "la.npy"])
    assert doc["metrics"]["z_rel_l2"] is not None
    assert read_volume(tmp_path / "la.npy").shape == (3, 41, 33)


@pytest.mark.parametrize("method", ["zero-filled", "l1-wavelet"])
def test_cs_mri_on_real_anatomy(cli, anatomy, tmp_path, method):
    doc = _run(cli, [anatomy, "--task", "cs-mri", "--coils", "4", "--method", method, "--slices", "8:12",
                     "-o", tmp_path / f"{method}.nii.gz"])
    assert doc["task"] == "cs-mri" and doc["metrics"]["psnr"] > 17


def test_default_output_beside_the_input(cli, anatomy, tmp_path):
    r = cli(["reconstruct", anatomy, "--task", "cs-mri", "--method", "zero-filled", "--slices", "0:2"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "anatomical_zero-filled_cs-mri.nii").exists()
    assert (tmp_path / "anatomical_zero-filled_cs-mri.nii.json").exists()


def test_simulate_then_reconstruct_with_reference_and_report(cli, anatomy, tmp_path):
    meas = tmp_path / "k.h5"
    assert cli(["simulate", anatomy, "-o", meas, "--task", "cs-mri", "--coils", "3", "--slices", "4:8"]).exit_code == 0
    ref = tmp_path / "ref.npy"
    np.save(ref, read_volume(anatomy).data[4:8])
    doc = _run(cli, [meas, "--method", "tv", "--reference", ref, "--report", tmp_path / "r.png"])
    assert doc["task"] == "cs-mri" and doc["metrics"]["psnr"] > 20
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert doc["output"].endswith("k_tv_cs-mri.nii.gz")


def test_the_whole_source_volume_serves_as_reference_of_a_simulated_slab(cli, anatomy, tmp_path):
    """`simulate --slices --grid` records its cut; `reconstruct MEAS --reference SOURCE` applies it
    (and a further --slices), where it used to refuse the shapes as different."""
    meas = tmp_path / "k.h5"
    assert cli(["simulate", anatomy, "-o", meas, "--task", "cs-mri", "--slices", "4:8", "--grid", "32"]).exit_code == 0
    doc = _run(cli, [meas, "--method", "zero-filled", "--reference", anatomy, "-o", tmp_path / "a.nii.gz"])
    assert doc["metrics"]["psnr"] > 17
    sub = _run(cli, [meas, "--method", "zero-filled", "--reference", anatomy, "--slices", "1:3",
                     "-o", tmp_path / "b.nii.gz"])
    assert sub["metrics"]["psnr"] > 17 and read_volume(tmp_path / "b.nii.gz").shape[0] == 2
    from d3ip_cli.io.volumes import write_volume

    slab = read_volume(anatomy)
    slab = slab.replace(data=slab.data[4:8], affine=slab.affine.copy())
    slab.affine[:3, 3] += slab.affine[:3, 0] * 4  # the slab's true position
    assert cli(["simulate", anatomy, "-o", tmp_path / "k2.h5", "--task", "cs-mri", "--slices", "4:8"]).exit_code == 0
    right = write_volume(slab, tmp_path / "right.nii.gz")
    assert _run(cli, [tmp_path / "k2.h5", "--method", "zero-filled", "--reference", right,
                      "-o", tmp_path / "r1.nii.gz"])["metrics"]["psnr"] > 17
    moved = slab.replace(affine=slab.affine.copy())
    moved.affine[:3, 3] += 20.0  # the same array 20 mm away: the metrics would be meaningless
    moved = write_volume(moved, tmp_path / "moved.nii.gz")
    r = cli(["reconstruct", tmp_path / "k2.h5", "--method", "zero-filled", "--reference", moved, "-o", tmp_path / "r2.nii.gz"])
    assert r.exit_code == 3 and "another grid in space" in r.stderr and not (tmp_path / "r2.nii.gz").exists()
    other = tmp_path / "other.npy"
    np.save(other, read_volume(anatomy).data[:3])  # neither the slab nor the source: still refused
    r = cli(["reconstruct", meas, "--method", "zero-filled", "--reference", other, "-o", tmp_path / "c.nii.gz"])
    assert r.exit_code == 3 and "--reference" in r.stderr and not (tmp_path / "c.nii.gz").exists()


def test_fastmri_style_file(cli, anatomy, tmp_path):
    from d3ip_cli.physics.mri import fft2c
    import torch

    img = read_volume(anatomy).data[5:8].astype(np.complex64)
    k = fft2c(torch.from_numpy(img)).numpy()
    k[..., 1::3] = 0  # undersample columns
    path = tmp_path / "fastmri.h5"
    with h5py.File(path, "w") as f:
        f["kspace"] = k  # [slices, ky, kx]: single coil
    doc = _run(cli, [path, "--method", "zero-filled", "-o", tmp_path / "fm.nii.gz"])
    assert doc["metrics"] is None and doc["task"] == "cs-mri"
    assert any("intensity scale" in w for w in doc["warnings"])
    assert read_volume(tmp_path / "fm.nii.gz").shape == (3, 41, 33)


@pytest.mark.skipif(shutil.which("ismrmrd_generate_cartesian_shepp_logan") is None,
                    reason="ismrmrd-tools not installed")
def test_ismrmrd_file(cli, tmp_path):
    path = tmp_path / "raw.h5"
    subprocess.run(["ismrmrd_generate_cartesian_shepp_logan", "-m", "48", "-c", "4", "-a", "2", "-w", "16",
                    "-o", str(path)], check=True, capture_output=True)
    # with -a 2 the generator writes 2 repetitions (the undersampling shifted between them)
    doc = _run(cli, [path, "--method", "zero-filled", "--frame", "0", "-o", tmp_path / "sl.nii.gz"])
    vol = read_volume(tmp_path / "sl.nii.gz")
    assert vol.shape == (1, 48, 48) and doc["task"] == "cs-mri"
    centre = vol.data[0, 12:36, 12:36]
    assert centre.mean() > 2 * vol.data[0, :4, :4].mean()  # the phantom is there, ESPIRiT-combined
    reps = tmp_path / "reps.h5"  # several repetitions: one is chosen with --frame, as a 4D NIfTI's frame
    subprocess.run(["ismrmrd_generate_cartesian_shepp_logan", "-m", "32", "-c", "2", "-r", "3", "-o", str(reps)],
                   check=True, capture_output=True)
    r = cli(["reconstruct", reps, "--method", "zero-filled", "-o", tmp_path / "r.nii.gz"])
    assert r.exit_code == 2 and "holds 3 repetitions: choose one with --frame N (0..2)" in r.stderr, r.output
    assert not (tmp_path / "r.nii.gz").exists()
    info = cli(["info", reps, "--json"])
    assert info.exit_code == 0 and json.loads(info.stdout)["frames"] == 3, info.output
    assert "repetitions" in cli(["info", reps]).stdout
    _run(cli, [reps, "--method", "zero-filled", "--frame", "2", "-o", tmp_path / "r2.nii.gz"])


@pytest.mark.skipif(shutil.which("ismrmrd_generate_cartesian_shepp_logan") is None,
                    reason="ismrmrd-tools not installed")
def test_ismrmrd_noise_calibration_sets_the_noise_level(cli, prior, tmp_path):
    """The noise-adjust acquisitions of an ISMRMRD file give the data's noise level (checked against
    the noise measured independently, from the difference of two repetitions of the same k-space);
    d3ip's --fit noise then fits down to it, and a file without them falls back to the fixed steps."""
    import ismrmrd

    from d3ip_cli.io.measurement import read_measurement

    path = tmp_path / "cal.h5"
    subprocess.run(["ismrmrd_generate_cartesian_shepp_logan", "-m", "32", "-c", "4", "-r", "2", "-n", "0.05", "-C",
                    "-o", str(path)], check=True, capture_output=True)
    dset = ismrmrd.Dataset(str(path), "dataset", create_if_needed=False)
    reps: dict[int, dict[int, np.ndarray]] = {0: {}, 1: {}}
    for i in range(dset.number_of_acquisitions()):
        acq = dset.read_acquisition(i)
        if not acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            reps[acq.idx.repetition][acq.idx.kspace_encode_step_1] = acq.data
    dset.close()
    diff = np.stack([reps[0][line] - reps[1][line] for line in reps[0]])
    measured = float(np.sqrt(np.mean(np.abs(diff) ** 2) / 2))
    noise = read_measurement(path, frame=0).provenance["noise"]
    assert noise["model"] == "gaussian" and abs(noise["sigma_absolute"] / measured - 1) < 0.1
    doc = _run(cli, [path, "--frame", "0", "--method", "dds", "--prior", prior, "--steps", "3", "-o",
                     tmp_path / "d.nii.gz"])
    assert doc["engine"]["data_fit"]["fit"] == "noise" and doc["engine"]["data_fit"]["noise"] == "gaussian"
    plain = tmp_path / "plain.h5"
    subprocess.run(["ismrmrd_generate_cartesian_shepp_logan", "-m", "32", "-c", "4", "-o", str(plain)],
                   check=True, capture_output=True)
    assert "noise" not in read_measurement(plain).provenance
    doc = _run(cli, [plain, "--method", "dds", "--prior", prior, "--steps", "3", "-o", tmp_path / "p.nii.gz"])
    assert doc["engine"]["data_fit"]["fit"] == "steps"
    assert any("do not record their noise level" in w for w in doc["warnings"])


def test_bad_inputs_are_one_line_errors(cli, anatomy, tmp_path):
    meas, good = tmp_path / "k.h5", tmp_path / "good.h5"
    assert cli(["simulate", anatomy, "-o", meas, "--task", "cs-mri", "--slices", "0:2"]).exit_code == 0
    shutil.copy(meas, good)
    with h5py.File(meas, "a") as f:
        k = f["kspace"][()]
        k[0, 0, 0, 0] = np.nan
        del f["kspace"]
        f["kspace"] = k
    sino = tmp_path / "s.h5"
    assert cli(["simulate", anatomy, "-o", sino, "--task", "sparse-view", "--views", "9", "--slices", "0:1"]).exit_code == 0
    with h5py.File(sino, "a") as f:
        s = f["sinogram"][()]
        del f["sinogram"]
        f["sinogram"] = s[:, :, :-2]
    cases = [
        ([sino, "--method", "fbp"], 3, "contradicts its operator spec"),
        ([anatomy, "--task", "sparse-view", "--views", "0", "--method", "fbp"], 2, "--views"),
        ([anatomy, "--task", "limited-angle", "--arc", "200", "--method", "fbp"], 2, "--arc"),
        ([anatomy, "--task", "cs-mri", "--acceleration", "0", "--method", "zero-filled"], 2, "--acceleration"),
        ([anatomy, "--task", "sparse-view", "--backend", "warp", "--method", "fbp"], 2, "--backend"),
        ([anatomy, "--method", "fbp"], 2, "--task"),
        ([anatomy, "--task", "cs-mri", "--method", "fbp"], 2, "does not apply"),
        ([anatomy, "--task", "sparse-view", "--method", "fbp", "--weight", "0.1"], 2, "--weight"),
        ([anatomy, "--task", "sparse-view", "--method", "magic"], 2, "unknown method"),
        ([meas, "--method", "zero-filled"], 3, "non-finite"),
        ([good, "--task", "sparse-view", "--method", "fbp"], 2, "contradicts"),
    ]
    for args, code, text in cases:
        r = cli(["reconstruct", *args, "-o", tmp_path / "o.nii.gz"])
        assert r.exit_code == code, (args, r.output)
        assert text in r.stderr and "Traceback" not in r.output, (args, r.stderr)
        assert not (tmp_path / "o.nii.gz").exists()


def test_missing_backend_exits_6(cli, anatomy, tmp_path, monkeypatch):
    import d3ip_cli.physics.registry as reg

    status = {"native": None, "astra": "astra-toolbox is not importable (ModuleNotFoundError)",
              "torch-radon": "torch-radon is not importable (ModuleNotFoundError)"}
    monkeypatch.setattr(reg, "backend_status", lambda: status)
    for be in ("astra", "torch-radon"):
        r = cli(["reconstruct", anatomy, "--task", "sparse-view", "--backend", be, "--method", "fbp",
                 "-o", tmp_path / "o.nii.gz"])
        assert r.exit_code == 6, r.output
        assert be in r.stderr and len(r.stderr.strip().splitlines()) <= 2


def test_planned_diffusion_method_is_not_pretended(cli, anatomy, tmp_path, monkeypatch):
    import d3ip_cli.engine.methods as M

    monkeypatch.setattr(M, "METHODS", {k: v for k, v in M.METHODS.items() if v.classical})
    monkeypatch.setattr(M, "METHOD_MODULES", [])
    r = cli(["reconstruct", anatomy, "--task", "sparse-view", "-o", tmp_path / "o.nii.gz"])
    assert r.exit_code == 6 and "not available" in r.stderr


def test_overwrite_never_deletes_a_users_folder(cli, ct_slice, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("important")
    r = cli(["reconstruct", ct_slice, "--task", "sparse-view", "--method", "fbp", "-o", folder, "--overwrite"])
    assert r.exit_code == 4 and "did not write (notes.txt)" in r.output
    assert (folder / "notes.txt").read_text() == "important"
    # a scanner's DICOM file (or anything named .dcm that d3ip did not write) is not replaced either
    (folder / "notes.txt").unlink()
    shutil.copy(ct_slice, folder / "IM00001.dcm")
    (folder / "IM00002.dcm").write_bytes(b"x")
    r = cli(["reconstruct", ct_slice, "--task", "sparse-view", "--method", "fbp", "-o", folder, "--overwrite",
             "--format", "dicom"])
    assert r.exit_code == 4 and "did not write (IM00001.dcm, IM00002.dcm)" in r.output, r.output
    assert (folder / "IM00001.dcm").read_bytes() == open(ct_slice, "rb").read()
    # a DICOM series d3ip wrote is replaced, file-browser litter beside it or not
    series = tmp_path / "series"
    args = ["reconstruct", ct_slice, "--task", "sparse-view", "--method", "fbp", "-o", series, "--format", "dicom"]
    assert cli(args).exit_code == 0
    (series / ".DS_Store").write_bytes(b"x")
    assert cli([*args, "--overwrite"]).exit_code == 0 and any(series.glob("*.dcm"))


def test_an_input_is_never_replaced(cli, ct_slice, anatomy, tmp_path):
    before = open(anatomy, "rb").read()
    r = cli(["reconstruct", anatomy, "--task", "sparse-view", "--method", "fbp", "-o", anatomy, "--overwrite"])
    assert r.exit_code == 4 and "would replace the input" in r.output, r.output
    assert open(anatomy, "rb").read() == before
    series = tmp_path / "scanner"
    series.mkdir()
    shutil.copy(ct_slice, series / "CT_small.dcm")
    for cmd in (["reconstruct", series, "--task", "sparse-view", "--method", "fbp"], ["convert", series]):
        r = cli([*cmd, "-o", series, "--overwrite"])
        assert r.exit_code == 4 and "would replace the input" in r.output, r.output
    assert (series / "CT_small.dcm").exists()


def test_file_names_are_printed_verbatim(cli, anatomy, tmp_path):
    """Brackets in a file name are not rich markup: messages name the real files."""
    odd = tmp_path / "vol[v2]"
    odd.mkdir()
    src = shutil.copy(anatomy, odd / "scan[final].nii")
    r = cli(["reconstruct", src, "--task", "sparse-view", "--method", "fbp", "--slices", "0:1"])
    assert r.exit_code == 0, r.output
    assert "scan[final]_fbp_sparse-view.nii" in r.output and (odd / "scan[final]_fbp_sparse-view.nii").exists()
    r = cli(["info", tmp_path / "x[/red]" / "missing[v].nii.gz"])
    assert r.exit_code == 3 and "x[/red]/missing[v].nii.gz" in r.output, r.output


def test_the_default_output_follows_format_and_stays_out_of_a_series(cli, anatomy, ct_slice, tmp_path):
    r = cli(["reconstruct", anatomy, "--task", "sparse-view", "--method", "fbp", "--slices", "0:1", "--format", "npy"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "anatomical_fbp_sparse-view.npy").exists()
    series = tmp_path / "ser"
    series.mkdir()
    one = shutil.copy(ct_slice, series / "IM00005.dcm")
    r = cli(["reconstruct", one, "--task", "sparse-view", "--method", "fbp"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in series.iterdir()) == ["IM00005.dcm"]  # the series folder is left alone
    assert any((tmp_path / "ser_IM00005_fbp_sparse-view").glob("*.dcm"))


@pytest.mark.parametrize("extra, code, text", [
    (["--format", "jpeg"], 2, "--format"),
    (["-o", "{tmp}/b.jpg"], 2, "unsupported volume format"),
    (["--report", "{tmp}/r.jpg"], 2, "PNG"),
    (["-o", "/proc/x.nii.gz"], 4, "cannot write in output folder"),
    (["-o", "{tmp}/CT_small.dcm/x.nii.gz"], 4, "is a file, not a folder"),
    (["-o", "{tmp}/out.dcm"], 2, "written as a directory"),
    (["-o", "{tmp}/out", "--format", "nifti"], 2, "ending in .nii.gz"),
    (["-o", "{tmp}/out", "--format", "npy"], 2, "ending in .npy"),
])
def test_bad_outputs_fail_before_the_reconstruction(cli, ct_slice, tmp_path, extra, code, text):
    extra = [str(e).format(tmp=tmp_path) for e in extra]
    r = cli(["reconstruct", ct_slice, "--task", "sparse-view", "--method", "fbp", *extra])
    assert r.exit_code == code, r.output
    assert text in r.output and "fbp:" not in r.output  # no progress: nothing was reconstructed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CT_small.dcm"]


def test_a_failed_write_leaves_nothing(cli, ct_slice, tmp_path, monkeypatch):
    import d3ip_cli.io.volumes as volumes
    from d3ip_cli.core.errors import OutputError

    def fail(*a, **k):
        raise OutputError("cannot write: disk full (simulated)")

    monkeypatch.setattr(volumes, "write_volume", fail)
    out, report = tmp_path / "r.nii.gz", tmp_path / "r.png"
    r = cli(["reconstruct", ct_slice, "--task", "sparse-view", "--method", "fbp", "-o", out, "--report", report])
    assert r.exit_code == 4, r.output
    assert not out.exists() and not report.exists()  # the report written first was removed again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CT_small.dcm"]


def test_a_text_file_named_h5_is_an_unreadable_measurement(cli, tmp_path):
    fake = tmp_path / "fake.h5"
    fake.write_text("hello")
    for extra in ([], ["--task", "sparse-view", "--method", "fbp"]):
        r = cli(["reconstruct", fake, *extra])
        assert r.exit_code == 3 and "not a readable HDF5 file" in r.output, r.output


def test_acquisition_options_on_a_measurement_file_are_refused(cli, ct_slice, tmp_path):
    meas = tmp_path / "m.h5"
    assert cli(["simulate", ct_slice, "-o", meas, "--task", "sparse-view", "--views", "30"]).exit_code == 0
    for extra, named in ((["--views", "90"], "--views does"), (["--noise", "gaussian", "--i0", "1e4"], "--noise, --i0 do"),
                         (["--acceleration", "8"], "--acceleration does")):
        r = cli(["reconstruct", meas, "--method", "cgls", *extra, "-o", tmp_path / "r.nii.gz"])
        assert r.exit_code == 2 and f"{named} not apply to m.h5: a measurement file fixes the acquisition" in r.stderr
        assert not (tmp_path / "r.nii.gz").exists()
    r = cli(["reconstruct", meas, "--method", "cgls", "--series", "1.2", "-o", tmp_path / "r.nii.gz"])
    assert r.exit_code == 2 and "--series picks one series of a DICOM folder; m.h5 is a measurement file" in r.stderr
    r = cli(["reconstruct", meas, "--method", "cgls", "--frame", "1", "-o", tmp_path / "r.nii.gz"])
    assert r.exit_code == 2 and "--frame 1: " in r.stderr and "holds one volume" in r.stderr
    # --slices and --grid apply to measurement files too
    doc = _run(cli, [meas, "--method", "cgls", "--grid", "64", "-o", tmp_path / "r3.nii.gz"])
    assert doc["warnings"] == []
    # --backend applies to a CT file, not to k-space
    assert cli(["reconstruct", meas, "--method", "cgls", "--backend", "native", "-o", tmp_path / "r4.nii.gz"]).exit_code == 0
    kspace = tmp_path / "k.h5"
    assert cli(["simulate", ct_slice, "-o", kspace, "--task", "cs-mri"]).exit_code == 0
    r = cli(["reconstruct", kspace, "--method", "zero-filled", "--backend", "native", "-o", tmp_path / "r5.nii.gz"])
    assert r.exit_code == 2 and "--backend picks the CT projector; k.h5 holds MRI (cs-mri) data" in r.stderr, r.output


def test_warnings_reach_stderr_with_json_and_values_are_echoed_literally(cli, anatomy, tmp_path):
    from d3ip_cli.bench.runner import example_path

    r = cli(["reconstruct", example_path(), "--task", "sparse-view", "--views", "30", "--method", "fbp", "--slices",
             "6:8", "--grid", "64", "-o", tmp_path / "j.nii.gz", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["warnings"] and all(f"warning: {w}" in " ".join(r.stderr.split()) for w in doc["warnings"])
    # ":100:" is not an emoji code, and "[x]" is not markup: what the user typed comes back as typed
    r = cli(["reconstruct", anatomy, "--task", "sparse-view", "--method", "fbp", "--slices", "0:100", "-o",
             tmp_path / "x[1]:fire:.nii.gz"])
    assert r.exit_code == 2 and "--slices 0:100" in r.stderr, r.stderr


def test_resume_with_a_classical_method_is_refused(cli, anatomy, tmp_path):
    """Refused for the method first: with or without --checkpoint-dir, the user is not sent to make
    a folder that would then be refused too."""
    (tmp_path / "ck").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    for extra in (["--checkpoint-dir", tmp_path / "ck"], []):
        r = cli(["reconstruct", anatomy, "--task", "sparse-view", "--method", "tv", "--resume", *extra,
                 "-o", tmp_path / "c.nii.gz"])
        assert r.exit_code == 2 and "--resume continues an interrupted diffusion run; tv runs in one go" in r.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == before and not any((tmp_path / "ck").iterdir())


def test_a_ct_nifti_written_by_dcm2niix_is_read_in_hu(cli, ct_slice, tmp_path):
    """dcm2niix's NIfTI keeps the scanner's HU but not the words "CT" or "HU": the values (air and the
    -3024 padding outside the field of view) say it, as they do for `d3ip convert`."""
    exe = shutil.which("dcm2niix") or str(Path(sys.executable).with_name("dcm2niix"))
    proc = subprocess.run([exe, "-b", "n", "-z", "n", "-f", "d2n", "-o", str(tmp_path), str(ct_slice)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = _run(cli, [tmp_path / "d2n.nii", "--task", "sparse-view", "--method", "fbp", "-o", tmp_path / "r.nii.gz"])
    assert doc["intensity"]["kind"] == "ct-attenuation" and doc["intensity"]["units"] == "HU"
    assert any("read as CT in HU" in w for w in doc["warnings"])
    vol = read_volume(tmp_path / "r.nii.gz")
    assert (vol.modality, vol.meta["units"]) == ("CT", "HU")
    # for an MRI task the same file keeps its robust-max scale: HU are not inferred there
    doc = _run(cli, [tmp_path / "d2n.nii", "--task", "cs-mri", "--method", "zero-filled", "-o", tmp_path / "m.nii.gz"])
    assert doc["intensity"]["kind"] == "robust-max" and not any("read as CT" in w for w in doc["warnings"])


def test_a_constant_volume(cli, tmp_path):
    ones = tmp_path / "ones.npy"
    np.save(ones, np.ones((3, 32, 32), np.float32))
    # as the input: reconstructed, with a warning instead of metrics
    doc = _run(cli, [ones, "--task", "sparse-view", "--method", "fbp", "-o", tmp_path / "a.nii.gz"])
    assert doc["metrics"] is None and any("constant" in w for w in doc["warnings"])
    # as an explicit --reference: refused before the reconstruction runs
    r = cli(["reconstruct", ones, "--task", "sparse-view", "--method", "fbp", "--reference", ones,
             "-o", tmp_path / "b.nii.gz"])
    assert r.exit_code == 3 and "is constant" in r.output and "fbp:" not in r.output
    assert not (tmp_path / "b.nii.gz").exists()


def test_resume_needs_a_checkpoint_dir(cli, ct_slice, tmp_path):
    r = cli(["reconstruct", ct_slice, "--task", "sparse-view", "--method", "dds", "--resume", "-o", tmp_path / "r.nii.gz"])
    assert r.exit_code == 2 and "--resume continues from --checkpoint-dir DIR" in r.stderr, r.output


def test_a_modality_mismatch_is_noted(cli, ct_slice, tmp_path):
    doc = _run(cli, [ct_slice, "--task", "cs-mri", "--method", "zero-filled", "-o", tmp_path / "a.nii.gz"])
    assert any("the input is a CT image" in w for w in doc["warnings"])
    doc = _run(cli, [ct_slice, "--task", "sparse-view", "--method", "fbp", "-o", tmp_path / "b.nii.gz"])
    assert not any("synthetic study" in w for w in doc["warnings"])


@pytest.mark.parametrize("args, flag", [
    (["--task", "limited-angle", "--views", "30"], "--views"),
    (["--task", "sparse-view", "--arc", "45"], "--arc"),
    (["--task", "sparse-view", "--coils", "8"], "--coils"),
    (["--task", "cs-mri", "--views", "30"], "--views"),
    (["--task", "sparse-view", "--noise", "poisson", "--sigma", "0.5"], "--sigma"),
    (["--task", "sparse-view", "--i0", "1e4"], "--i0"),
    (["--task", "cs-mri", "--backend", "native"], "--backend"),
])
def test_options_of_another_task_are_refused_not_ignored(cli, anatomy, tmp_path, args, flag):
    for command, out in (("reconstruct", tmp_path / "o.npy"), ("simulate", tmp_path / "o.h5")):
        extra = ["--method", "fbp" if "cs-mri" not in args else "zero-filled"] if command == "reconstruct" else []
        r = cli([command, anatomy, *args, *extra, "--slices", "10:12", "-o", out])
        assert r.exit_code == 2, (command, r.output)
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {flag} does not apply")
        assert ("--noise" in last) == (flag in ("--sigma", "--i0")), last  # names what it does not apply to
        assert not out.exists()


@pytest.mark.parametrize("flag, value", [("--t-start", "100"), ("--steps", "10")])
def test_diffusion_options_are_refused_by_classical_methods(cli, anatomy, tmp_path, flag, value):
    r = cli(["reconstruct", anatomy, "--task", "sparse-view", "--method", "tv", flag, value, "--slices", "10:12",
             "-o", tmp_path / "o.npy"])
    assert r.exit_code == 2 and f"{flag} does not apply to method tv" in r.stderr, r.output
    assert not (tmp_path / "o.npy").exists()


def test_options_of_the_task_are_accepted(cli, anatomy, tmp_path):
    _run(cli, [anatomy, "--task", "sparse-view", "--views", "20", "--noise", "poisson", "--i0", "1e5",
               "--method", "fbp", "--slices", "10:12", "-o", tmp_path / "sv.npy"])


def test_a_reference_padded_below_air_is_scored_as_the_simulation_saw_it(cli, tmp_path):
    """A CT padded with -3024 HU outside the field of view (as real head CTs are) is clipped to
    -1024 HU before its data are simulated; the same file given as --reference (to a measurement
    file or to a retrospective run) and as the reference of `d3ip metrics` is clipped the same way,
    with a warning, so the three scores agree (unclipped, this scan scored ~14 dB lower)."""
    import pydicom
    import pydicom.data

    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    px = ds.pixel_array.copy()
    yy, xx = np.mgrid[: px.shape[0], : px.shape[1]]
    px[(yy - 64) ** 2 + (xx - 64) ** 2 > 60 ** 2] = -3024 + 1024  # stored value of -3024 HU (intercept -1024)
    ds.PixelData = px.astype(np.int16).tobytes()
    padded = tmp_path / "padded.dcm"
    ds.save_as(padded)
    meas = tmp_path / "sv.h5"
    r = cli(["simulate", padded, "-o", meas, "--task", "sparse-view", "--views", "30"])
    assert r.exit_code == 0 and "values below -1024 HU were clipped" in r.stderr, r.output
    retro = cli(["reconstruct", padded, "--task", "sparse-view", "--views", "30", "--method", "fbp",
                 "-o", tmp_path / "retro.nii.gz", "--json"])
    from_file = cli(["reconstruct", meas, "--method", "fbp", "--reference", padded, "-o", tmp_path / "file.nii.gz",
                     "--json"])
    assert retro.exit_code == 0 and from_file.exit_code == 0, from_file.output
    assert "--reference values below -1024 HU were clipped" in from_file.stderr
    a, b = json.loads(retro.stdout)["metrics"], json.loads(from_file.stdout)["metrics"]
    assert b["psnr"] == pytest.approx(a["psnr"], abs=1e-3) and b["data_range"] == pytest.approx(a["data_range"])
    m = cli(["metrics", tmp_path / "file.nii.gz", padded, "--json"])
    assert m.exit_code == 0 and "reference values below -1024 HU were clipped" in m.stderr
    assert json.loads(m.stdout)["psnr"] == pytest.approx(a["psnr"], abs=1e-3)
    # the same reference as a NIfTI that records no units (as dcm2niix writes one): its values tell
    import nibabel as nib

    from d3ip_cli.io.volumes import read_volume

    ref = read_volume(padded)
    plain = tmp_path / "plain.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(ref.data, (2, 1, 0)), np.diag([1.0, 1.0, 1.0, 1.0])), plain)
    plain_out = cli(["convert", tmp_path / "file.nii.gz", "-o", tmp_path / "file.npy"])  # any CT-in-HU recon
    assert plain_out.exit_code == 0, plain_out.output
    m = cli(["metrics", tmp_path / "file.npy", plain, "--json"])
    assert m.exit_code == 0 and "reference values below -1024 HU were clipped" in m.stderr, m.output


@pytest.mark.parametrize("fmt", ["nifti", "npy", "dicom"])
def test_an_interrupt_while_the_output_is_hashed_leaves_nothing(cli, anatomy, tmp_path, monkeypatch, fmt):
    """Ctrl-C after the volume is in place but before its run record is: exit 130 and no output
    without its record (a tester hit this window with `convert` of a large series)."""
    import d3ip_cli.core.record as R

    real = R.sha256_path

    src = Path(shutil.copy(anatomy, tmp_path / "inp.nii"))

    def interrupted(path):
        if Path(path).resolve() != src.resolve():  # the input's hash goes through; the output's is interrupted
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(R, "sha256_path", interrupted)
    out = tmp_path / "out"
    out.mkdir()
    name = {"nifti": "r.nii.gz", "npy": "r.npy", "dicom": "r"}[fmt]
    for cmd in (["convert", src], ["reconstruct", src, "--task", "sparse-view", "--method", "fbp"]):
        r = cli([*cmd, "-o", out / name, "--format", fmt])
        assert r.exit_code == 130 and r.stderr.strip().endswith("error: interrupted"), r.output
        assert sorted(p.name for p in out.iterdir()) == [], (cmd[0], sorted(p.name for p in out.iterdir()))


def test_warnings_known_from_the_input_come_before_the_run(cli, tmp_path):
    """A long run should not say only at its end that its input is an MR image given to a CT task."""
    example = Path(__file__).resolve().parents[2] / "examples" / "mni_t1.nii.gz"
    r = cli(["reconstruct", example, "--task", "sparse-view", "--slices", "8:10", "--grid", "32", "--method", "fbp",
             "--prior", "x.safetensors", "-o", tmp_path / "r.nii.gz"])
    assert r.exit_code == 0, r.output
    lines = r.stderr.strip().splitlines()
    mr = [i for i, line in enumerate(lines) if "the input is an MR image" in line]
    run = [i for i, line in enumerate(lines) if line.startswith("fbp:")]
    assert len(mr) == 1 and run and mr[0] < run[0], lines  # said once, before the progress
    assert lines[-1].startswith("wrote ") and any("--prior is ignored" in line for line in lines)


def test_checkpoint_every_without_a_checkpoint_folder_is_refused(cli, anatomy, tmp_path):
    r = cli(["reconstruct", anatomy, "--task", "sparse-view", "--checkpoint-every", "2", "-o", tmp_path / "o.nii.gz"])
    assert r.exit_code == 2 and "give --checkpoint-dir too" in r.stderr and not (tmp_path / "o.nii.gz").exists()
