"""Library wiring of classical reconstructions: volume/measurement -> problem -> method -> volume."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import torch

from d3ip_cli.core.config import ReconConfig
from d3ip_cli.core.errors import InputDataError, MissingComponentError, UsageError
from d3ip_cli.core.types import Volume
from d3ip_cli.engine import methods as M
from d3ip_cli.engine import recon as R
from d3ip_cli.engine.intensity import IntensityScale, scale_for_volume
from d3ip_cli.io.measurement import read_measurement, write_measurement


def _ct_volume(z: int = 3, n: int = 32) -> Volume:
    from d3ip_cli.physics.checks import phantom

    hu = phantom(n) * 1400.0 - 1000.0
    data = np.stack([np.roll(hu, k, 0) for k in range(z)]).astype(np.float32)
    aff = np.diag([2.5, 0.8, 0.8, 1.0])
    aff[:3, 3] = [-10.0, 5.0, 7.0]
    return Volume(data=data, affine=aff, meta={"modality": "CT", "units": "HU"})


def _mr_volume() -> Volume:
    import nibabel

    from d3ip_cli.io.volumes import read_volume

    return read_volume(os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii"))


@pytest.mark.parametrize("method,task", [("fbp", "sparse-view"), ("cgls", "limited-angle"), ("tv", "sparse-view")])
def test_ct_methods_end_to_end(method, task):
    vol = _ct_volume()
    cfg = ReconConfig(task=task, views=24, arc=120, method=method)
    problem = R.problem_from_volume(vol, cfg)
    assert problem.retrospective and problem.scale.kind == "ct-attenuation"
    x, x0 = R.run_method(problem, cfg)
    out = R.to_volume(x, problem, "test")
    assert out.shape == vol.shape and out.meta["units"] == "HU"
    np.testing.assert_allclose(out.affine, vol.affine)
    from d3ip_cli.bench.metrics import volume_metrics

    m = volume_metrics(out.data, problem.reference)
    assert m["psnr"] > 18 and m["ssim"] > 0.4


@pytest.mark.parametrize("method", ["zero-filled", "l1-wavelet", "tv", "cgls"])
def test_mri_methods_on_real_anatomy(method):
    vol = R.select_slab(_mr_volume(), "10:13")
    cfg = ReconConfig(task="cs-mri", coils=4, acceleration=3, method=method)
    problem = R.problem_from_volume(vol, cfg)
    x, _ = R.run_method(problem, cfg)
    out = R.to_volume(x, problem, "test")
    from d3ip_cli.bench.metrics import volume_metrics

    floor = {"zero-filled": 17.0}.get(method, 20.0)
    assert volume_metrics(out.data, problem.reference)["psnr"] > floor


def test_simulate_write_read_gives_the_same_problem(tmp_path):
    vol = _ct_volume()
    cfg = ReconConfig(task="sparse-view", views=11, noise="poisson", i0=1e4, method="fbp", seed=5)
    meas, op, _ = R.simulate_measurement(vol, cfg, cfg, seed=5)
    path = write_measurement(meas, tmp_path / "m.h5")
    back = read_measurement(path)
    np.testing.assert_array_equal(back.data, meas.data)
    assert back.spec["det_count"] == op.out_shape[2] and len(back.spec["angles_deg"]) == 11
    p_file = R.problem_from_measurement(back, cfg)
    p_vol = R.problem_from_volume(vol, cfg)
    torch.testing.assert_close(p_file.y, p_vol.y)  # same seed -> same data, on or off disk
    x1, _ = R.run_method(p_file, cfg)
    x2, _ = R.run_method(p_vol, cfg)
    torch.testing.assert_close(x1, x2)


def test_mri_measurement_keeps_mask_and_maps(tmp_path):
    vol = R.select_slab(_mr_volume(), "5:7")
    cfg = ReconConfig(task="cs-mri", coils=3, mask="poisson2d", acceleration=2.5, noise="gaussian", sigma=0.02)
    meas, op, _ = R.simulate_measurement(vol, cfg, cfg, seed=1)
    back = read_measurement(write_measurement(meas, tmp_path / "k.h5"))
    assert back.data.shape == (2, 3) + vol.shape[1:] and back.spec["coil_maps"] == "stored"
    np.testing.assert_array_equal(back.arrays["mask"], op.mask.numpy().astype(np.uint8))
    assert back.intensity["kind"] == "robust-max"


def test_contradictory_or_corrupt_measurements_are_refused(tmp_path):
    vol = _ct_volume()
    cfg = ReconConfig(task="sparse-view", views=9, method="fbp")
    meas, _, _ = R.simulate_measurement(vol, cfg, cfg)
    path = write_measurement(meas, tmp_path / "m.h5")
    with h5py.File(path, "a") as f:
        data = f["sinogram"][()]
        del f["sinogram"]
        f["sinogram"] = data[:, :-1]
    with pytest.raises(InputDataError, match="contradicts"):
        read_measurement(path)
    mr = ReconConfig(task="cs-mri", coils=2, method="zero-filled")
    meas, _, _ = R.simulate_measurement(R.select_slab(_mr_volume(), "0:2"), mr, mr)
    meas.data[0, 0, 3, 3] = np.nan
    with pytest.raises(InputDataError, match="non-finite"):
        meas.validate()


def test_slab_and_grid_move_the_affine():
    vol = _ct_volume(z=5, n=32)
    slab = R.select_slab(vol, "2:4")
    np.testing.assert_allclose(slab.affine[:3, 3], vol.affine[:3, 3] + 2 * vol.affine[:3, 0])
    data, aff = R.resample_inplane(slab.data, slab.affine, 16)
    assert data.shape == (2, 16, 16)
    corner_old = vol.affine[:3, :3] @ np.array([0, -0.5, -0.5]) + slab.affine[:3, 3]
    corner_new = aff[:3, :3] @ np.array([0, -0.5, -0.5]) + aff[:3, 3]
    np.testing.assert_allclose(corner_new, corner_old)  # the field of view is kept
    with pytest.raises(UsageError, match="slices"):
        R.select_slab(vol, "3:9")


def test_intensity_scales_round_trip():
    vol = _ct_volume()
    s = scale_for_volume(vol.data, "CT", "HU", "CT")
    x = s.normalise(vol.data)
    assert 0 <= x.min() and x.max() <= 1.01
    np.testing.assert_allclose(s.denormalise(x), vol.data, atol=1e-2)
    again = IntensityScale.from_dict(s.to_dict())
    assert again == s
    mr = scale_for_volume(np.linspace(0, 500, 1000).reshape(10, 10, 10), "MR", "a.u.", "MR")
    assert mr.kind == "robust-max" and abs(mr.scale - np.percentile(np.linspace(0, 500, 1000), 99.5)) < 1e-6


def test_default_output_paths(tmp_path):
    assert R.default_output_path(tmp_path / "scan.nii.gz", "tv", "sparse-view") == (
        tmp_path / "scan_tv_sparse-view.nii.gz", "nifti")
    assert R.default_output_path(tmp_path / "v.npy", "fbp", "limited-angle")[0].name == "v_fbp_limited-angle.npy"
    (tmp_path / "series").mkdir()
    assert R.default_output_path(tmp_path / "series", "d3ip", "sparse-view") == (
        tmp_path / "series_d3ip_sparse-view", "dicom")
    assert R.default_output_path(tmp_path / "m.h5", "tv", "cs-mri")[0].name == "m_tv_cs-mri.nii.gz"


def test_method_registry(monkeypatch):
    assert {"fbp", "cgls", "tv", "zero-filled", "l1-wavelet"} <= set(M.available_methods())
    assert "fbp" not in M.available_methods("cs-mri")
    with pytest.raises(UsageError, match="unknown method"):
        M.get_method("nope")
    with pytest.raises(UsageError, match="does not apply"):
        M.get_method("fbp", "cs-mri")
    with pytest.raises(UsageError, match="--weight"):
        M.check_params(M.get_method("fbp"), {"weight": 1.0})
    monkeypatch.setattr(M, "METHODS", {k: v for k, v in M.METHODS.items() if k != "d3ip"})
    monkeypatch.setattr(M, "METHOD_MODULES", [])
    with pytest.raises(MissingComponentError, match="not available"):
        M.get_method("d3ip", "sparse-view")
    seen = {}

    def fake(op, y, x_init, ctx):
        seen["ctx"] = ctx
        return x_init

    M.register_method("echo-test", fake, {"sparse-view"}, needs_prior=False, defaults={"weight": 1.0})
    try:
        vol = _ct_volume()
        cfg = ReconConfig(task="sparse-view", views=8, method="echo-test", weight=2.0, seed=7)
        x, x0 = R.run_method(R.problem_from_volume(vol, cfg), cfg)
        assert torch.equal(x, x0) and seen["ctx"].params == {"weight": 2.0} and seen["ctx"].seed == 7
    finally:
        M.METHODS.pop("echo-test", None)


@pytest.mark.parametrize("superior_first", [False, True])
def test_report_views_put_the_head_at_the_top_whatever_the_storage_order(superior_first):
    """The report's coronal/sagittal cuts show superior at the top, axial anterior at the top and
    the patient's left on the right, for a RAS-stored volume (the bundled example) and its flip."""
    from d3ip_cli.engine.recon import report_orientation

    z, h, w = 6, 8, 10
    v = np.zeros((z, h, w), np.float32)
    A = np.eye(4)
    A[:3, :3] = [[0, 0, 1], [0, 1, 0], [1, 0, 0]]  # index (k, i, j) -> RAS (j, i, k): slices towards superior
    v[z - 1] = 1.0  # the most superior slice
    v[:, h - 1, :] += 2.0  # the most anterior row
    v[:, :, w - 1] += 4.0  # the patient's rightmost column
    if superior_first:  # the same anatomy stored from superior to inferior
        v = v[::-1].copy()
        A[:3, 3] = A[:3, 0] * (z - 1)
        A[:3, 0] = -A[:3, 0]
    out = report_orientation(v, A)
    coronal = out[:, h // 2, :]
    assert (coronal[0] % 2 == 1).all() and (coronal[1:] % 2 == 0).all()  # superior slice on the top row
    axial = out[z // 2]
    assert (axial[0] // 2 % 2 == 1).all() and (axial[1:] // 2 % 2 == 0).all()  # anterior at the top
    assert (axial[:, 0] >= 4).all() and (axial[:, 1:] < 4).all()  # the patient's right on the left


def test_report_stretches_only_a_slab_too_thin_to_see_along_z():
    from d3ip_cli.engine.recon import report_stretch

    assert report_stretch((64, 128, 128), (1.0, 1.0, 1.0)) == {"axial": 1, "coronal": 1, "sagittal": 1}
    thin = report_stretch((2, 128, 96), (1.0, 1.0, 1.0))  # 2 rows of 96 or 128: drawn at least a quarter as tall
    assert thin == {"axial": 1, "coronal": 12, "sagittal": 16}
    assert report_stretch((4, 128, 128), (8.0, 1.0, 1.0)) == {"axial": 1, "coronal": 1, "sagittal": 1}  # 32 mm of z
