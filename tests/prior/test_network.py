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


def test_v_head_predicts_eps():
    """A v-head net returns ε̂ = √(1-ᾱ)x_t + √ᾱ v̂; fed its own target it returns the exact noise."""
    net = UNet(UNetConfig(**{**TINY.__dict__, "prediction": "v"}))
    abar = schedule.alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(4, 1, 16, 16, generator=g) * 2 - 1, torch.randn(4, 1, 16, 16, generator=g)
    t = torch.tensor([0, 300, 700, 999])
    xt = schedule.q_sample(x0, t, noise, abar)
    v = net.target(x0, noise, t)
    a = abar[t].float().view(-1, 1, 1, 1)
    assert torch.allclose((1 - a).sqrt() * xt + a.sqrt() * v, noise, atol=1e-5)
    # forward = that combination of the head's raw output
    with torch.no_grad():
        raw, eps = net(xt, t, raw=True), net(xt, t)
    assert torch.allclose(eps, (1 - a).sqrt() * xt + a.sqrt() * raw, atol=1e-6)
    # at the start the head outputs zero, so x̂0 = √ᾱ x_t: bounded even at t = 999 (an ε head's x̂0 is x_t/√ᾱ there)
    x0_hat = (xt - (1 - a).sqrt() * eps) / a.sqrt()
    assert x0_hat.abs().max() < 5


def test_eps_head_target_is_the_noise_and_unknown_head_refused():
    net = UNet(TINY)
    noise = torch.randn(2, 1, 16, 16)
    assert torch.equal(net.target(torch.zeros_like(noise), noise, torch.tensor([1, 2])), noise)
    assert UNetConfig.from_dict({}).prediction == "eps"  # priors written before the field existed
    with pytest.raises(ValueError, match="prediction"):
        UNetConfig.from_dict({"prediction": "x0"})
