"""LoRA: adapter-only training, exact start at the prior, safetensors round trip, refusal of foreign adapters."""

import pytest
import torch

from d3ip_cli.core.errors import InputDataError
from d3ip_cli.engine import lora
from d3ip_cli.prior.network import UNet, UNetConfig

CFG = UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2, num_groups=4)


def _net(cfg=CFG):
    torch.manual_seed(0)
    net = UNet(cfg)
    with torch.no_grad():  # non-zero output layers so adapters change the output
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return net


def test_injection_starts_at_prior_and_trains_only_adapters():
    net = _net()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 500])
    before = net(x, t).detach()
    base = {k: v.clone() for k, v in net.state_dict().items()}
    params = lora.inject_lora(net, rank=4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(net(x, t), before, atol=1e-6)
    n_adapted = sum(isinstance(m, (lora.LoRAConv2d, lora.LoRALinear)) for m in net.modules())
    assert n_adapted >= 8  # convs and linears (incl. timestep projections) of res/attention blocks
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        loss = net(x, t).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.allclose(net(x, t), before, atol=1e-4)
    after = net.state_dict()
    for k, v in base.items():  # every base tensor bit-identical (names moved under .base)
        k2 = k if k in after else k.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        assert torch.equal(after[k2], v), k
    assert all(p.requires_grad for p in params)
    frozen = [n for n, p in net.named_parameters() if p.requires_grad and ".down." not in n and ".up." not in n]
    assert frozen == []


def test_train_bias_option_adds_block_biases():
    n0 = len(lora.inject_lora(_net(), rank=2))
    n1 = len(lora.inject_lora(_net(), rank=2, train_bias=True))
    assert n1 > n0


def test_adapter_round_trip(tmp_path):
    net = _net()
    params = lora.inject_lora(net, rank=4)
    with torch.no_grad():
        for p in params:
            p.add_(0.1)
    path = tmp_path / "a.safetensors"
    lora.save_adapter(path, net, {"architecture": CFG.to_dict()})
    from safetensors.torch import load_file

    stored = load_file(str(path))
    assert all(".down." in k or ".up." in k for k in stored)  # no copies of base weights
    other = _net()
    lora.inject_lora(other, rank=4)
    lora.load_adapter(path, other, {"architecture": CFG.to_dict()})
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([100])
    assert torch.allclose(other(x, t), net(x, t), atol=1e-6)


def test_foreign_adapter_refused(tmp_path):
    net = _net()
    lora.inject_lora(net, rank=4)
    path = tmp_path / "a.safetensors"
    lora.save_adapter(path, net, {"architecture": CFG.to_dict()})
    cfg2 = UNetConfig(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(), num_heads=2, num_groups=4)
    other = UNet(cfg2)
    lora.inject_lora(other, rank=4)
    with pytest.raises(InputDataError):
        lora.load_adapter(path, other, {"architecture": cfg2.to_dict()})
    third = _net()
    lora.inject_lora(third, rank=2)
    with pytest.raises(InputDataError):
        lora.load_adapter(path, third)


def test_the_merged_kernel_equals_the_two_path_form_in_values_and_gradients(monkeypatch):
    """Each adapted layer runs ``(W + s U D) x`` as one kernel; it must equal ``W x + s U(D x)``
    (the form of the reference) in the output and in the adapter's gradients."""
    net = _net()
    params = lora.inject_lora(net, rank=3)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 700])

    def out_and_grads():
        for p in params:
            p.grad = None
        out = net(x, t)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in params]

    merged, g_merged = out_and_grads()
    with torch.no_grad():
        assert torch.equal(net(x, t), merged)  # inference takes the same path
    monkeypatch.setattr(lora.LoRAConv2d, "forward", lambda self, v: self.base(v) + self.scale * self.up(self.down(v)))
    monkeypatch.setattr(lora.LoRALinear, "forward", lambda self, v: self.base(v) + self.scale * self.up(self.down(v)))
    two_path, g_two = out_and_grads()
    assert torch.allclose(two_path, merged, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_merged, g_two):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))
    assert any(float(g.abs().max()) > 0 for g in g_two)
