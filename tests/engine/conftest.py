import pytest
import torch


@pytest.fixture(scope="session")
def tiny_prior(prior):
    """The session's `tiny` prior, loaded: ``(path, model, meta)``."""
    from d3ip_cli.prior.checkpoint import load_prior

    model, meta = load_prior(prior)
    return prior, model, meta


@pytest.fixture
def ct_case():
    from d3ip_cli.physics.registry import make_operator
    from d3ip_cli.prior.phantoms import ellipsoid_volume

    x = ellipsoid_volume(4, 32, generator=torch.Generator().manual_seed(0))
    op = make_operator("sparse-view", tuple(x.shape), views=16)
    y = op.A(x)
    return x, op, y, op.pinv(y)
