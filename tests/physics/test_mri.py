"""Cartesian MRI operators against sigpy, masks and coil maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from d3ip_cli.core.errors import UsageError
from d3ip_cli.physics.masks import acceleration_of, calibration_width, make_mask
from d3ip_cli.physics.mri import birdcage_maps, espirit_maps, fft2c, ifft2c, sense


@pytest.mark.parametrize("coils", [1, 5])
@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64])
def test_agrees_with_sigpy_sense(coils, dtype, gen):
    import sigpy.mri.linop

    z, h, w = 3, 37, 31
    mask = make_mask("uniform1d", (z, h, w), 3.0, 0.1, gen)
    maps = None if coils == 1 else torch.from_numpy(birdcage_maps((z, coils, h, w)))
    op = sense(mask, maps)
    x = torch.complex(torch.randn(z, h, w, generator=gen, dtype=torch.float64),
                      torch.randn(z, h, w, generator=gen, dtype=torch.float64)).to(dtype)
    y = op.A(x)
    k = torch.complex(torch.randn(op.out_shape, generator=gen, dtype=torch.float64),
                      torch.randn(op.out_shape, generator=gen, dtype=torch.float64)).to(dtype)
    xa = op.A_adjoint(k)
    tol = 1e-5
    for i in range(z):
        mps = np.ones((1, h, w), np.complex128) if maps is None else maps[i].numpy().astype(np.complex128)
        S = sigpy.mri.linop.Sense(mps, weights=mask[i].numpy().astype(np.float64))
        ref = S * x[i].numpy().astype(np.complex128)
        assert np.linalg.norm(y[i].numpy() - ref) / np.linalg.norm(ref) < tol
        ref_a = S.H * (k[i].numpy().astype(np.complex128) * mask[i].numpy())
        assert np.linalg.norm(xa[i].numpy() - ref_a) / np.linalg.norm(ref_a) < tol


def test_real_input_and_precision_follow_input(gen):
    op = sense(make_mask("gaussian1d", (2, 16, 12), 2.0, 0.1, gen))
    assert op.A(torch.rand(2, 16, 12)).dtype == torch.complex64
    assert op.A(torch.rand(2, 16, 12, dtype=torch.float64)).dtype == torch.complex128


def test_fft_is_centred_and_unitary(gen):
    x = torch.randn(2, 9, 8, dtype=torch.complex128, generator=gen)
    k = fft2c(x)
    torch.testing.assert_close(ifft2c(k), x)
    assert abs(float(k.norm() / x.norm()) - 1) < 1e-12
    dc = fft2c(torch.ones(1, 9, 8, dtype=torch.complex128))
    assert abs(dc[0, 9 // 2, 8 // 2]) == pytest.approx((9 * 8) ** 0.5)


@pytest.mark.parametrize("kind", ["uniform1d", "gaussian1d", "poisson2d"])
def test_masks_are_seeded_per_slice_with_a_sampled_centre(kind):
    shape = (4, 48, 40)
    m1 = make_mask(kind, shape, 4.0, 0.08, torch.Generator().manual_seed(1))
    m2 = make_mask(kind, shape, 4.0, 0.08, torch.Generator().manual_seed(1))
    assert torch.equal(m1, m2)
    assert 2.5 < acceleration_of(m1) < 5.5
    assert calibration_width(m1) >= 3
    assert set(torch.unique(m1).tolist()) <= {0.0, 1.0}
    if kind != "uniform1d":
        assert not torch.equal(m1[0], m1[1])  # a different draw per slice


def test_mask_options_are_validated():
    with pytest.raises(UsageError, match="acceleration"):
        make_mask("uniform1d", (1, 8, 8), 0.5)
    with pytest.raises(UsageError, match="mask"):
        make_mask("radial", (1, 8, 8), 2.0)
    assert acceleration_of(make_mask("uniform1d", (1, 8, 8), 1.0)) == 1.0


def test_birdcage_maps_are_normalised():
    maps = birdcage_maps((2, 6, 20, 18))
    rss = np.sqrt((np.abs(maps) ** 2).sum(1))
    np.testing.assert_allclose(rss, 1.0, rtol=1e-5)


def test_zero_filled_is_exact_for_full_sampling(gen):
    x = torch.rand(2, 20, 18, dtype=torch.float64, generator=gen)
    op = sense(torch.ones(2, 20, 18), torch.from_numpy(birdcage_maps((2, 4, 20, 18))).to(torch.complex128))
    torch.testing.assert_close(op.pinv(op.A(x)).real, x)


def test_espirit_recovers_simulated_maps(gen):
    """ESPIRiT maps from fully sampled multi-coil data combine coils like the true maps (up to a phase)."""
    z, c, h, w = 1, 4, 32, 32
    yy, xx = np.mgrid[:h, :w]
    img = ((yy - 16) ** 2 / 12 ** 2 + (xx - 16) ** 2 / 10 ** 2 < 1).astype(np.complex128)
    true = birdcage_maps((z, c, h, w)).astype(np.complex128)
    k = fft2c(torch.from_numpy(true * img[None, None])).numpy()
    est = espirit_maps(k, calib_width=16)
    inside = np.abs(img) > 0
    corr = np.abs((np.conj(est[0]) * true[0]).sum(0))[inside]
    assert np.median(corr) > 0.95
