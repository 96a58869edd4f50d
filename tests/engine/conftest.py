import pytest
import torch


@pytest.fixture(scope="session")
def tiny_prior(tmp_path_factory):
    """A `tiny` prior trained in the test session (a few steps: machinery, not quality)."""
    from d3ip_cli.prior import pretrain as pt
    from d3ip_cli.prior.checkpoint import load_prior

    path = tmp_path_factory.mktemp("prior") / "tiny.safetensors"
    pt.train(pt.PretrainConfig.from_preset("tiny", steps=6), path)
    model, meta = load_prior(path)
    return path, model, meta


@pytest.fixture
def ct_case():
    from d3ip_cli.physics.registry import make_operator
    from d3ip_cli.prior.phantoms import ellipsoid_volume

    x = ellipsoid_volume(4, 32, generator=torch.Generator().manual_seed(0))
    op = make_operator("sparse-view", tuple(x.shape), views=16)
    y = op.A(x)
    return x, op, y, op.pinv(y)
