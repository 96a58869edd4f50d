"""Parallel-beam CT: agreement with astra-toolbox, physical scaling, FBP quality, options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from d3ip_cli.core.errors import MissingComponentError, UsageError
from d3ip_cli.physics.checks import phantom
from d3ip_cli.physics.ct import FBP_FILTERS, NativeParallelBeam
from d3ip_cli.physics.geometry import ParallelBeamGeometry, limited_angle_angles, sparse_view_angles
from d3ip_cli.physics.registry import backend_status, make_operator, resolve_backend

needs_astra = pytest.mark.skipif(backend_status()["astra"] is not None, reason="astra-toolbox not installed")


def _psnr(ref: np.ndarray, x: np.ndarray) -> float:
    return 10 * math.log10((ref.max() - ref.min()) ** 2 / np.mean((ref - x) ** 2))


@needs_astra
@pytest.mark.parametrize("pixel", [1.0, 0.5])
def test_native_agrees_with_astra_linear_projector(pixel):
    """astra's CPU ``linear`` projector with a volume window in mm, same detector: within 1% (here ~1e-6)."""
    import astra

    n, views, det, ds = 64, 45, 97, 0.9 * pixel
    img = phantom(n)
    angles = sparse_view_angles(views)
    geom = ParallelBeamGeometry((n, n), tuple(angles), det, ds, (pixel, pixel))
    ours = NativeParallelBeam(geom, 1).A(torch.from_numpy(img[None]))[0].numpy()
    vol = astra.create_vol_geom(n, n, -n * pixel / 2, n * pixel / 2, -n * pixel / 2, n * pixel / 2)
    proj = astra.create_proj_geom("parallel", ds, det, angles)
    pid = astra.create_projector("linear", proj, vol)
    try:
        sid, ref = astra.create_sino(img.astype(np.float32), pid)
        astra.data2d.delete(sid)
    finally:
        astra.projector.delete(pid)
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-2


def test_line_integrals_are_in_mm():
    """A disk of attenuation 1/mm and radius r: the central ray integrates to 2r mm at any pixel size."""
    for pixel in (1.0, 0.25):
        n = 64
        r_mm = 0.3 * n * pixel
        c = (np.arange(n) - (n - 1) / 2) * pixel
        disk = ((c[:, None] ** 2 + c[None, :] ** 2) <= r_mm ** 2).astype(np.float64)
        op = make_operator("sparse-view", (1, n, n), views=4, pixel_size=(pixel, pixel), det_count=65)
        y = op.A(torch.from_numpy(disk[None]))[0]
        assert abs(float(y[:, 32].mean()) - 2 * r_mm) / (2 * r_mm) < 0.02


def test_fbp_180_views_shepp_logan_30db():
    img = phantom(128)
    op = make_operator("sparse-view", (1, 128, 128), views=180)
    rec = op.fbp(op.A(torch.from_numpy(img[None])))[0].numpy()
    assert _psnr(img, rec) >= 30.0


@pytest.mark.parametrize("name", FBP_FILTERS)
def test_fbp_filters_recover_scale(name):
    """Every filter reconstructs a uniform disk's value (physical scaling, anisotropic detector spacing)."""
    n, pixel = 48, 0.7
    c = (np.arange(n) - (n - 1) / 2)
    disk = ((c[:, None] ** 2 + c[None, :] ** 2) <= (0.35 * n) ** 2).astype(np.float64) * 0.02
    op = make_operator("sparse-view", (1, n, n), views=90, pixel_size=(pixel, pixel), det_spacing=0.8 * pixel)
    rec = op.fbp(op.A(torch.from_numpy(disk[None])), name)[0].numpy()
    inner = (c[:, None] ** 2 + c[None, :] ** 2) <= (0.25 * n) ** 2
    assert abs(rec[inner].mean() - 0.02) < 0.02 * 0.03


def test_fbp_rejects_unknown_filter():
    op = make_operator("sparse-view", (1, 16, 16), views=5)
    with pytest.raises(UsageError, match="filter"):
        op.fbp(torch.zeros(op.out_shape), "butterworth")


def test_task_geometries():
    assert len(sparse_view_angles(60)) == 60 and sparse_view_angles(60)[-1] < math.pi
    la = limited_angle_angles(90)
    assert len(la) == 90 and math.isclose(math.degrees(la[1] - la[0]), 1.0)
    op = make_operator("limited-angle", (2, 21, 21), arc=45)
    assert op.out_shape[1] == 45
    for bad in (dict(views=0), dict(views=-3)):
        with pytest.raises(UsageError, match="views"):
            make_operator("sparse-view", (1, 8, 8), **bad)
    for arc in (0, -5, 180.5):
        with pytest.raises(UsageError, match="arc"):
            make_operator("limited-angle", (1, 8, 8), arc=arc)


def test_backends_resolve_and_fail_clearly(monkeypatch):
    assert resolve_backend("auto", "cpu") == "native"
    with pytest.raises(UsageError, match="--backend"):
        resolve_backend("bogus")
    if backend_status()["torch-radon"] is not None:
        with pytest.raises(MissingComponentError, match="torch-radon"):
            make_operator("sparse-view", (1, 32, 32), views=5, backend="torch-radon")
    import d3ip_cli.physics.registry as reg

    monkeypatch.setattr(reg, "backend_status", lambda: {"native": None, "astra": "astra-toolbox is not importable",
                                                         "torch-radon": "x"})
    with pytest.raises(MissingComponentError, match="astra"):
        make_operator("sparse-view", (1, 32, 32), views=5, backend="astra")


def test_native_matrix_is_cached_and_shared_by_selections():
    op = make_operator("sparse-view", (4, 24, 24), views=9)
    x = torch.rand(op.in_shape)
    op.A(x)
    sub = op.select(slice(1, 3))
    assert sub._cache is op._cache and sub.in_shape == (2, 24, 24)
    torch.testing.assert_close(sub.A(x[1:3]), op.A(x)[1:3])


def test_complex_input_is_split_into_real_and_imaginary():
    op = make_operator("sparse-view", (1, 16, 16), views=5)
    x = torch.complex(torch.rand(op.in_shape, dtype=torch.float64), torch.rand(op.in_shape, dtype=torch.float64))
    y = op.A(x)
    torch.testing.assert_close(y.real, op.A(x.real))
    torch.testing.assert_close(y.imag, op.A(x.imag))
