import pytest
import torch

from d3ip_cli.prior import schedule
from d3ip_cli.prior.network import AttentionBlock, ResBlock, UNet, UNetConfig

TINY = UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2, num_groups=4)


def test_shapes_and_fully_convolutional():
    net = UNet(TINY)
    for h, w in [(16, 16), (24, 40)]:
        x = torch.randn(2, 1, h, w)
        assert net(x, torch.tensor([3, 900])).shape == x.shape


def test_not_divisible_is_refused():
    net = UNet(TINY)
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(1, 1, 15, 16), torch.tensor([1]))


def test_lora_targets_are_plain_layers():
    net = UNet(TINY)
    blocks = [m for m in net.modules() if isinstance(m, (ResBlock, AttentionBlock))]
    assert blocks
    for b in blocks:
        for m in b.modules():
            if m is not b and len(list(m.children())) == 0 and any(True for _ in m.parameters()):
                assert type(m) in (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm)


def test_schedule():
    abar = schedule.alphas_cumprod()
    assert abar.shape == (1000,)
    assert abs(float(schedule.linear_betas()[0]) - 1e-4) < 1e-12 and abs(float(schedule.linear_betas()[-1]) - 0.02) < 1e-12
    assert (abar[1:] < abar[:-1]).all()
    ts = schedule.ddim_timesteps(50)
    assert len(ts) == 50 and ts[0] == 980 and ts[-1] == 0
