"""LoRA adapters for the prior's U-Net (D3IP's adapted parameter set).

:func:`inject_lora` wraps every ``nn.Conv2d`` and ``nn.Linear`` inside the U-Net's
residual and attention blocks (timestep-embedding projections included) with

.. math::  W x + b \\;\\to\\; W x + b + s\\, U(D x),

where the down-projection ``D`` has rank ``r`` output channels and the *same kernel,
stride and padding* as the base layer, the up-projection ``U`` is a 1x1 map initialised
to zero (so the adapted network starts exactly at the prior), and ``s = 1``. The base
weights are frozen and never modified; optionally the biases of the adapted blocks are
trained too (as the reference implementation does).

Since ``U`` is 1x1, ``W x + s U(D x) = (W + s U D) x``: every forward pass, with or without
gradients, is one convolution (or matrix product) with the merged kernel, and autograd
takes the kernel's gradient back to ``U`` and ``D``. This is exact and, on a CPU, 1.2-1.8x
faster for an adaptation step than running ``D`` and ``U`` as two extra convolutions
(``scripts/bench_lora.py``): a convolution with ``r`` output channels is nearly as slow as
the base one.

The adapted parameters form a small state dict (:func:`adapter_state`) that is saved
and loaded as safetensors without any copy of the base weights.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from d3ip_cli.core.errors import InputDataError


class LoRAConv2d(nn.Module):
    """``base(x) + scale * up(down(x))`` for a frozen ``nn.Conv2d``."""

    def __init__(self, base: nn.Conv2d, rank: int, scale: float = 1.0) -> None:
        super().__init__()
        self.base = base
        self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, stride=base.stride, padding=base.padding,
                              dilation=base.dilation, groups=1, bias=False)
        self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.scale = scale

    def merged_weight(self) -> torch.Tensor:
        r""":math:`W + s\,U D` as one kernel (the 1x1 up-projection composes exactly with ``D``)."""
        return self.base.weight + self.scale * torch.einsum("or,rikl->oikl", self.up.weight[:, :, 0, 0], self.down.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # one convolution with the merged kernel
        return F.conv2d(x, self.merged_weight(), self.base.bias, self.base.stride, self.base.padding,
                        self.base.dilation, self.base.groups)


class LoRALinear(nn.Module):
    """``base(x) + scale * up(down(x))`` for a frozen ``nn.Linear``."""

    def __init__(self, base: nn.Linear, rank: int, scale: float = 1.0) -> None:
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.base.weight + self.scale * self.up.weight @ self.down.weight, self.base.bias)


def _target_blocks(model: nn.Module) -> list[nn.Module]:
    from d3ip_cli.prior.network import AttentionBlock, ResBlock

    return [m for m in model.modules() if isinstance(m, (ResBlock, AttentionBlock))]


def inject_lora(model: nn.Module, rank: int = 4, *, train_bias: bool = False, scale: float = 1.0,
                generator: torch.Generator | None = None) -> list[nn.Parameter]:
    """Wrap the conv/linear layers of residual and attention blocks with LoRA; freeze the rest.

    Args:
        model: the prior's U-Net (modified in place).
        rank: adapter rank ``r``.
        train_bias: also train the biases of the adapted blocks (reference behaviour).
        scale: the LoRA scale ``s``.
        generator: seeds the down-projection initialisation (reproducible runs).

    Returns:
        The trainable parameters, in a fixed order.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        if generator is not None:
            # the CPU generator alone (the new layers are built on the CPU): torch.manual_seed would
            # also reseed the CUDA generators, which fork_rng(devices=[]) does not restore
            torch.default_generator.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device)))
        for block in _target_blocks(model):
            for name, child in list(block.named_children()):
                if isinstance(child, nn.Conv2d):
                    setattr(block, name, LoRAConv2d(child, rank, scale))
                elif isinstance(child, nn.Linear):
                    setattr(block, name, LoRALinear(child, rank, scale))
    device = next(model.parameters()).device
    model.to(device)
    params = adapter_parameters(model, train_bias=train_bias)
    for p in params:
        p.requires_grad_(True)
    model.__dict__["_lora"] = {"rank": rank, "train_bias": train_bias, "scale": scale}
    return params


def _adapter_named(model: nn.Module, train_bias: bool) -> list[tuple[str, nn.Parameter]]:
    out = []
    for name, p in model.named_parameters():
        if ".down.weight" in name or ".up.weight" in name:
            out.append((name, p))
    if train_bias:
        blocks = {id(b) for b in _target_blocks(model)}
        for mname, module in model.named_modules():
            if id(module) in blocks:
                for pname, p in module.named_parameters():
                    if pname.endswith("bias") and ".down." not in pname and ".up." not in pname:
                        out.append((f"{mname}.{pname}", p))
    return out


def adapter_parameters(model: nn.Module, train_bias: bool | None = None) -> list[nn.Parameter]:
    tb = model.__dict__.get("_lora", {}).get("train_bias", False) if train_bias is None else train_bias
    return [p for _, p in _adapter_named(model, tb)]


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the adapted parameters (name -> tensor)."""
    tb = model.__dict__.get("_lora", {}).get("train_bias", False)
    return {n: p.detach().clone() for n, p in _adapter_named(model, tb)}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's adapted parameters in place (names must match exactly)."""
    tb = model.__dict__.get("_lora", {}).get("train_bias", False)
    named = dict(_adapter_named(model, tb))
    if set(named) != set(state):
        missing, extra = set(named) - set(state), set(state) - set(named)
        raise InputDataError(f"adapter does not fit this prior/settings ({len(missing)} missing, {len(extra)} unexpected "
                             f"tensors; e.g. {sorted(missing or extra)[0]})")
    with torch.no_grad():
        for n, p in named.items():
            if p.shape != state[n].shape:
                raise InputDataError(f"adapter tensor {n} has shape {list(state[n].shape)}, the prior needs {list(p.shape)}")
            p.copy_(state[n].to(p.device, p.dtype))


def save_adapter(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write the adapter (only the adapted tensors) as safetensors with a d3ip header."""
    from d3ip_cli.prior.checkpoint import save_tensors

    info = model.__dict__.get("_lora", {})
    save_tensors(path, adapter_state(model), dict(meta, format="d3ip-adapter", **info))


def read_adapter(path: str | os.PathLike, prior_meta: dict[str, Any] | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An adapter file's tensors and header; refuses other files and, given the prior's header,
    adapters made for another architecture."""
    from d3ip_cli.prior.checkpoint import load_tensors

    tensors, meta = load_tensors(path, what="adapter")
    if meta.get("format") != "d3ip-adapter":
        raise InputDataError(f"{path} is not a d3ip adapter (format {meta.get('format')!r})")
    if prior_meta is not None and meta.get("architecture") != prior_meta.get("architecture"):
        raise InputDataError(f"adapter {path} was made for another prior architecture")
    return tensors, meta


def load_adapter(path: str | os.PathLike, model: nn.Module, prior_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load an adapter file into a LoRA-injected model (:func:`read_adapter`'s checks)."""
    tensors, meta = read_adapter(path, prior_meta)
    load_adapter_state(model, tensors)
    return meta


def zero_adapter(model: nn.Module, params: Iterable[nn.Parameter] | None = None) -> None:
    """Reset every up-projection to zero (the adapted net equals the prior again)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".up.weight" in name:
                p.zero_()
