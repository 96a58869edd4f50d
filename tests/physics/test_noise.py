"""Noise models: seeded, unbiased where they should be, mask-aware for MRI."""

from __future__ import annotations

import math

import torch

from d3ip_cli.physics.noise import NoiseLevel, complex_gaussian, ct_poisson, gaussian, noise_energy, noise_level, relative_sigma


def test_gaussian_is_seeded():
    y = torch.zeros(2, 5, 7)
    a = gaussian(y, 0.1, torch.Generator().manual_seed(3))
    b = gaussian(y, 0.1, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and abs(float(a.std()) - 0.1) < 0.03


def test_ct_poisson_log_transform():
    p = torch.full((1, 200, 100), 10.0)  # 10 mm x 1 unit
    mu = 0.04
    noisy = ct_poisson(p, 1e5, mu, torch.Generator().manual_seed(0))
    assert abs(float(noisy.mean()) - 10.0) < 0.05
    expected_std = math.sqrt(1 / (1e5 * math.exp(-mu * 10))) / mu
    assert abs(float(noisy.std()) / expected_std - 1) < 0.1


def test_complex_gaussian_only_where_sampled():
    y = torch.zeros(2, 3, 8, 6, dtype=torch.complex64)
    mask = torch.zeros(2, 8, 6)
    mask[:, :, ::2] = 1
    n = complex_gaussian(y, 1.0, mask, torch.Generator().manual_seed(0))
    assert float(n[..., 1::2].abs().max()) == 0.0
    assert abs(float((n[..., ::2].abs() ** 2).mean()) - 1.0) < 0.3
    assert abs(relative_sigma(torch.ones(2, 3, 8, 6), 0.1, mask) - 0.1) < 1e-9


def test_noise_energy_matches_the_drawn_noise():
    """The expected per-slice noise energy from a noise record agrees with the noise actually drawn
    (Gaussian CT, masked multi-coil MRI, CT photon counts), is zero for noiseless data and None
    when the record is missing."""
    gen = torch.Generator().manual_seed(1)
    y = torch.ones(2, 60, 50)
    noisy = gaussian(y, 0.2, gen)
    e = noise_energy(noisy, {"model": "gaussian", "sigma_absolute": 0.2})
    drawn = ((noisy - y) ** 2).reshape(2, -1).sum(1).double()
    assert torch.allclose(e, drawn, rtol=0.06)
    k = torch.ones(2, 4, 32, 32, dtype=torch.complex64)
    mask = (torch.rand(2, 32, 32, generator=gen) < 0.3).float()
    kn = complex_gaussian(k * mask[:, None], 0.1, mask, gen)
    e = noise_energy(kn, {"model": "gaussian", "sigma_absolute": 0.1}, mask)
    drawn = ((kn - k * mask[:, None]).abs() ** 2).reshape(2, -1).sum(1).double()
    assert torch.allclose(e, drawn, rtol=0.1)
    p = torch.full((2, 90, 80), 10.0)
    pn = ct_poisson(p, 1e4, 0.04, gen)
    e = noise_energy(pn, {"model": "poisson", "i0": 1e4, "mu_per_unit": 0.04})
    drawn = ((pn - p) ** 2).reshape(2, -1).sum(1).double()
    assert torch.allclose(e, drawn, rtol=0.06)
    assert torch.equal(noise_energy(y, {"model": "none"}), torch.zeros(2, dtype=torch.float64))
    assert noise_energy(y, None) is None and noise_energy(y, {"model": "gaussian"}) is None


def test_noise_target_leaves_the_noise_outside_the_range():
    """Over-determined data (8 coils at 4x: twice as many measurements as unknowns): least squares
    can fit only half of the noise, so the target keeps the other half; under-determined data (a
    sparse-view sinogram) can be fitted to any residual, and the target is tau^2 of the noise."""
    level = NoiseLevel(energy=torch.tensor([2.0, 2.0], dtype=torch.float64),
                       measured=torch.tensor([200.0, 50.0], dtype=torch.float64))
    t = level.target(unknowns=100, tau=0.5)
    torch.testing.assert_close(t, torch.tensor([2.0 * (0.5 + 0.25 * 0.5), 2.0 * 0.25], dtype=torch.float64))
    torch.testing.assert_close(level.target(100, 1.0), level.energy)


def test_least_squares_residual_of_overdetermined_data_is_the_noise_outside_the_range():
    """The premise of the target above, checked on a real operator: 8-coil Cartesian MRI at 4x with
    complex noise; the least-squares residual holds (1 - n/m) of the noise energy."""
    from d3ip_cli.physics.registry import make_operator
    from d3ip_cli.physics.solvers import cgls

    gen = torch.Generator().manual_seed(2)
    op = make_operator("cs-mri", (1, 32, 32), acceleration=4.0, coils=8, generator=gen)
    x = torch.randn(1, 32, 32, generator=gen, dtype=torch.float64).to(torch.complex128)
    y = complex_gaussian(op.A(x), 0.05, op.mask, gen)
    level = noise_level(y, {"model": "gaussian", "sigma_absolute": 0.05}, op.mask)
    ls = cgls(op, y, n_iter=300)
    res = float((op.A(ls) - y).abs().pow(2).sum())
    expected = float(level.target(32 * 32, 0.0))
    assert abs(res / expected - 1) < 0.15
