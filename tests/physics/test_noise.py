"""Noise models: seeded, unbiased where they should be, mask-aware for MRI."""

from __future__ import annotations

import math

import torch

from d3ip_cli.physics.noise import complex_gaussian, ct_poisson, gaussian, relative_sigma


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
