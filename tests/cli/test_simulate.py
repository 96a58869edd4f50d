"""`d3ip simulate`: real anatomy -> measurement file; bad options give one line and exit 2/3/4."""

from __future__ import annotations

import json
import os
import shutil

import h5py
import pytest

from d3ip_cli.io.measurement import read_measurement


@pytest.fixture
def anatomy(tmp_path):
    import nibabel

    src = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")
    return shutil.copy(src, tmp_path / "anatomical.nii")


@pytest.fixture
def ct_slice(tmp_path):
    import pydicom.data

    return shutil.copy(pydicom.data.get_testdata_file("CT_small.dcm"), tmp_path / "CT_small.dcm")


def test_simulate_ct_sinogram(cli, ct_slice, tmp_path):
    out = tmp_path / "sv.h5"
    r = cli(["simulate", ct_slice, "-o", out, "--task", "sparse-view", "--views", "31", "--noise", "poisson",
             "--i0", "5e4", "--grid", "64", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["task"] == "sparse-view" and doc["measurement"]["shape"][1] == 31
    m = read_measurement(out)
    assert m.data.shape[:2] == (1, 31) and m.grid["shape"] == [1, 64, 64]
    assert m.intensity["kind"] == "ct-attenuation" and m.provenance["noise"]["i0"] == 5e4
    assert (tmp_path / "sv.h5.json").exists()
    with h5py.File(out) as f:
        assert f.attrs["format"] == "d3ip-measurement" and "sinogram" in f


def test_simulate_multicoil_kspace(cli, anatomy, tmp_path):
    out = tmp_path / "k.h5"
    r = cli(["simulate", anatomy, "-o", out, "--task", "cs-mri", "--coils", "4", "--mask", "gaussian1d",
             "--slices", "8:12", "--noise", "gaussian", "--sigma", "0.02", "--seed", "3"])
    assert r.exit_code == 0, r.output
    m = read_measurement(out)
    assert m.data.shape == (4, 4, 41, 33) and m.arrays["coil_maps"].shape == (4, 4, 41, 33)
    assert m.spec["options"]["mask"] == "gaussian1d" and m.provenance["seed"] == 3


@pytest.mark.parametrize("args,code,text", [
    (["--task", "sparse-view", "--views", "0"], 2, "--views"),
    (["--task", "sparse-view", "--views", "-4"], 2, "--views"),
    (["--task", "limited-angle", "--arc", "181"], 2, "--arc"),
    (["--task", "cs-mri", "--acceleration", "0.5"], 2, "--acceleration"),
    (["--task", "sparse-view", "--backend", "gpu-magic"], 2, "--backend"),
    (["--task", "x-ray"], 2, "--task"),
    (["--task", "cs-mri", "--noise", "poisson"], 2, "poisson"),
    (["--task", "sparse-view", "--slices", "30:40"], 2, "--slices"),
])
def test_bad_options_are_one_line_errors(cli, anatomy, tmp_path, args, code, text):
    r = cli(["simulate", anatomy, "-o", tmp_path / "m.h5", *args])
    assert r.exit_code == code, r.output
    assert text in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "m.h5").exists()


def test_missing_input_and_existing_output(cli, anatomy, tmp_path):
    r = cli(["simulate", tmp_path / "nope.nii", "-o", tmp_path / "m.h5", "--task", "sparse-view"])
    assert r.exit_code == 3 and "does not exist" in r.stderr
    (tmp_path / "m.h5").write_text("x")
    r = cli(["simulate", anatomy, "-o", tmp_path / "m.h5", "--task", "sparse-view"])
    assert r.exit_code == 4 and "--overwrite" in r.stderr


def test_output_must_be_named_as_hdf5(cli, anatomy, tmp_path):
    r = cli(["simulate", anatomy, "-o", tmp_path / "m.nii.gz", "--task", "cs-mri"])
    assert r.exit_code == 2 and ".h5" in r.stderr
    assert not (tmp_path / "m.nii.gz").exists()


def test_an_unreachable_acceleration_is_reported(cli, anatomy, tmp_path):
    r = cli(["simulate", anatomy, "-o", tmp_path / "m.h5", "--task", "cs-mri", "--acceleration", "1000", "--json"])
    assert r.exit_code == 0, r.output
    import json

    doc = json.loads(r.stdout)
    assert any("--acceleration 1000 cannot be reached" in w for w in doc["warnings"])
    r = cli(["simulate", anatomy, "-o", tmp_path / "m4.h5", "--task", "cs-mri", "--acceleration", "4", "--json"])
    assert not any("cannot be reached" in w for w in json.loads(r.stdout)["warnings"])


def test_a_single_multicoil_slice_simulates_with_writable_maps_and_masks(cli, anatomy, tmp_path):
    from d3ip_cli.physics.masks import make_mask
    from d3ip_cli.physics.mri import birdcage_maps

    # a read-only broadcast array handed to torch made it warn (once per process) for one slice
    assert birdcage_maps((1, 4, 16, 16)).flags.writeable
    assert make_mask("uniform1d", (1, 16, 16)).numpy().flags.writeable
    r = cli(["simulate", anatomy, "-o", tmp_path / "z.h5", "--task", "cs-mri", "--coils", "4", "--slices", "5:6"])
    assert r.exit_code == 0, r.output
    assert read_measurement(tmp_path / "z.h5").data.shape[:2] == (1, 4)


def test_a_ct_image_simulated_as_mri_is_said_to_be_a_synthetic_study(cli, ct_slice, tmp_path):
    """As reconstruct says it of its retrospective studies: a CT image given to an MRI task (or the reverse)
    makes a synthetic study, not the scan's acquisition; a CT task on it says nothing of the kind."""
    r = cli(["simulate", ct_slice, "-o", tmp_path / "k.h5", "--task", "cs-mri", "--grid", "64", "--json"])
    assert r.exit_code == 0, r.output
    note = "the input is a CT image; --task cs-mri simulates MR data from it"
    assert any(w.startswith(note) for w in json.loads(r.stdout)["warnings"]) and note in r.stderr
    r = cli(["simulate", ct_slice, "-o", tmp_path / "s.h5", "--task", "sparse-view", "--grid", "64", "--json"])
    assert r.exit_code == 0 and not any("simulates" in w for w in json.loads(r.stdout)["warnings"]), r.output
