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
    torch.nn.init.normal_(net.out_conv.weight, std=0.1)  # a head that says something (it starts at zero)
    abar = schedule.alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(4, 1, 16, 16, generator=g) * 2 - 1, torch.randn(4, 1, 16, 16, generator=g)
    t = torch.tensor([0, 300, 700, 999])
    xt = schedule.q_sample(x0, t, noise, abar).float()
    v = net.target(x0, noise, t)
    sa, s1 = abar[t].float().sqrt().view(-1, 1, 1, 1), (1 - abar[t].float()).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(s1 * xt + sa * v, noise, atol=1e-5)
    with torch.no_grad():
        raw, eps = net(xt, t, raw=True), net(xt, t)
    assert raw.abs().mean() > 1e-3
    assert torch.allclose(eps, s1 * xt + sa * raw, atol=1e-6)
    # the sampler's x̂0 from this ε̂ is √ᾱ x_t − √(1-ᾱ) v̂: bounded at t = 999, where an ε head's is x_t / √ᾱ
    x0_hat = (xt - s1 * eps) / sa
    assert torch.allclose(x0_hat, sa * xt - s1 * raw, atol=2e-3)
    # timesteps off the schedule are refused
    for bad in (torch.tensor([1000]), torch.tensor([-1]), torch.tensor([10.5])):
        with pytest.raises(ValueError, match="whole timesteps"):
            net(xt[:1], bad)
    # the schedule is no state: not saved, and not rounded by .half()
    assert not any("abar" in k for k in net.state_dict()) and net.half()._abar.dtype == torch.float32


def test_eps_head_target_is_the_noise_and_unknown_head_refused():
    net = UNet(TINY)
    noise = torch.randn(2, 1, 16, 16)
    assert torch.equal(net.target(torch.zeros_like(noise), noise, torch.tensor([1, 2])), noise)
    assert UNetConfig.from_dict({}).prediction == "eps"  # priors written before the field existed
    with pytest.raises(ValueError, match="prediction"):
        UNetConfig.from_dict({"prediction": "x0"})
