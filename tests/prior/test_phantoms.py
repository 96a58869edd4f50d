import torch

from d3ip_cli.prior import phantoms


def test_ellipses_statistics():
    g = torch.Generator().manual_seed(0)
    x = phantoms.ellipses_2d(32, 64, generator=g)
    assert x.shape == (32, 64, 64)
    assert float(x.min()) == 0.0 and abs(float(x.max()) - 1.0) < 1e-6
    per_image = x.flatten(1)
    # every image is normalised to exactly [0, 1] and has structure (not constant)
    assert torch.allclose(per_image.min(1).values, torch.zeros(32))
    assert torch.allclose(per_image.max(1).values, torch.ones(32))
    assert (per_image.std(1) > 0.03).all()
    # coverage: ellipses cover most of the central disk
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    disk = (xx**2 + yy**2) < 0.5**2
    background = x.flatten(1).mode(1).values.view(-1, 1, 1)
    covered = ((x - background).abs() > 1e-4)[:, disk].float().mean()
    assert covered > 0.5


def test_seed_reproducible_and_different():
    a = phantoms.ellipses_2d(4, 32, generator=torch.Generator().manual_seed(7))
    b = phantoms.ellipses_2d(4, 32, generator=torch.Generator().manual_seed(7))
    c = phantoms.ellipses_2d(4, 32, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_count_parameter_changes_density():
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    few = phantoms.ellipses_2d(16, 48, generator=g1, mean_count=5)
    many = phantoms.ellipses_2d(16, 48, generator=g2, mean_count=200)
    edges = lambda x: (x[:, 1:] - x[:, :-1]).abs().gt(1e-3).float().mean()  # noqa: E731
    assert edges(many) > 2 * edges(few)


def test_ellipsoid_volume_neighbouring_slices_consistent():
    v = phantoms.ellipsoid_volume(12, 48, generator=torch.Generator().manual_seed(3))
    assert v.shape == (12, 48, 48)
    assert 0.0 <= float(v.min()) and float(v.max()) <= 1.0
    dz = (v[1:] - v[:-1]).abs().mean()
    far = (v[:6] - v[6:]).abs().mean()
    assert dz < far


def test_training_batch_crop():
    b = phantoms.training_batch(6, 64, generator=torch.Generator().manual_seed(0), recipe={"crop": 32, "frac_3d": 0.5})
    assert b.shape == (6, 1, 32, 32)
    assert float(b.min()) >= 0 and float(b.max()) <= 1
