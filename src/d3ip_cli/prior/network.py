"""The U-Net of the phantom prior, in the style of guided-diffusion (Dhariwal & Nichol 2021).

Residual blocks with a timestep embedding applied as scale-shift normalisation,
GroupNorm, self-attention at low resolutions, configurable width, depth and channel
multipliers. It predicts the noise :math:`\\epsilon` and is fully convolutional, so it
runs on grids other than the training size (any side divisible by
``2 ** (len(channel_mult) - 1)``).

Output parameterisation (``prediction``): ``"eps"`` returns the head's output as ε̂;
``"v"`` (Salimans & Ho 2022) has the head predict
:math:`v = \\sqrt{\\bar\\alpha_t}\\,\\epsilon - \\sqrt{1-\\bar\\alpha_t}\\,x_0` and returns
:math:`\\hat\\epsilon = \\sqrt{1-\\bar\\alpha_t}\\,x_t + \\sqrt{\\bar\\alpha_t}\\,\\hat v`. Either way
``forward`` predicts ε, so samplers and adapters never see the difference; ``"v"`` carries
the input through to the output, so at high noise (ᾱ ≈ 4e-5 at t = 999, where x̂0
multiplies any error in ε̂ by 1/√ᾱ ≈ 160) ε̂ is exact up to the head's small share, and its training loss
(on v) keeps weight on the high-noise steps that decide a sample's layout.

Every learnable map inside :class:`ResBlock` and :class:`AttentionBlock` is a plain
``nn.Conv2d`` or ``nn.Linear`` so that the engine can inject LoRA adapters into them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


PREDICTIONS = ("eps", "v")


@dataclass
class UNetConfig:
    """Architecture hyper-parameters (stored in every checkpoint's metadata)."""

    in_channels: int = 1
    out_channels: int = 1
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 1
    attention_levels: tuple[int, ...] = (3,)
    num_heads: int = 4
    num_groups: int = 8
    dropout: float = 0.0
    prediction: str = "eps"

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r} (expected one of {', '.join(PREDICTIONS)})")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_levels"] = list(self.attention_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        d = dict(d)
        d["channel_mult"] = tuple(d.get("channel_mult", (1, 2, 2, 2)))
        d["attention_levels"] = tuple(d.get("attention_levels", ()))
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[B, dim]`` of (possibly fractional) timesteps ``t [B]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GN-SiLU-conv, scale-shift by the timestep embedding, GN-SiLU-dropout-conv, plus skip."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, 2 * out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(channels, out_channels, 1) if channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over spatial positions, with 1x1-conv projections."""

    def __init__(self, channels: int, num_heads: int, groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.unbind(1)  # [B, heads, d, N]
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """ε-prediction U-Net: ``forward(x [B, C, H, W], t [B]) -> ε̂ [B, C, H, W]``.

    ``forward(x, t, raw=True)`` returns the head's output (ε̂ or v̂, see ``prediction``)
    and :meth:`target` what it is trained to match.
    """

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        cfg = config or UNetConfig()
        self.config = cfg
        ch, g = cfg.model_channels, cfg.num_groups
        emb = 4 * ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_conv = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips = [ch]
        cur = ch
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                blocks = [ResBlock(cur, emb, mult * ch, g, cfg.dropout)]
                cur = mult * ch
                if level in cfg.attention_levels:
                    blocks.append(AttentionBlock(cur, cfg.num_heads, g))
                self.down.append(nn.ModuleList(blocks))
                skips.append(cur)
            if level != len(cfg.channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(cur)]))
                skips.append(cur)

        self.middle = nn.ModuleList([ResBlock(cur, emb, cur, g, cfg.dropout), AttentionBlock(cur, cfg.num_heads, g),
                                     ResBlock(cur, emb, cur, g, cfg.dropout)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                blocks = [ResBlock(cur + skips.pop(), emb, mult * ch, g, cfg.dropout)]
                cur = mult * ch
                if level in cfg.attention_levels:
                    blocks.append(AttentionBlock(cur, cfg.num_heads, g))
                if level != 0 and i == cfg.num_res_blocks:
                    blocks.append(Upsample(cur))
                self.up.append(nn.ModuleList(blocks))

        self.out_norm = nn.GroupNorm(g, cur)
        self.out_conv = nn.Conv2d(cur, cfg.out_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)
        if cfg.prediction == "v":  # the fixed schedule: a plain attribute, so .half() or a state dict never touch it
            from d3ip_cli.prior.schedule import alphas_cumprod

            self._abar = alphas_cumprod().float()

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`(\sqrt{\bar\alpha_t}, \sqrt{1-\bar\alpha_t})` in float32, shaped to broadcast against ``like``."""
        abar = self._abar.to(t.device)
        t = t.reshape(-1).expand(like.shape[0]) if t.numel() == 1 else t.reshape(-1)
        idx = t.long()
        if not torch.equal(idx.to(t.dtype), t) or idx.min() < 0 or idx.max() >= abar.numel():
            raise ValueError(f"a v-head network needs whole timesteps in [0, {abar.numel() - 1}]")
        a = abar[idx].view(-1, *([1] * (like.dim() - 1)))
        return a.sqrt(), (1 - a).sqrt()

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the head (``forward(..., raw=True)``) is trained to output for ``x_t = q(x0, noise, t)``."""
        if self.config.prediction == "eps":
            return noise
        sa, s1 = self._coefficients(t, x0)
        return sa * noise.float() - s1 * x0.float()

    @staticmethod
    def _run(blocks: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, raw: bool = False) -> torch.Tensor:
        f = self.config.downsampling_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the network's downsampling factor {f}")
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels))
        h = self.input_conv(x)
        hs = [h]
        for blocks in self.down:
            h = self._run(blocks, h, emb)
            hs.append(h)
        h = self._run(self.middle, h, emb)
        for blocks in self.up:
            h = self._run(blocks, torch.cat([h, hs.pop()], dim=1), emb)
        out = self.out_conv(F.silu(self.out_norm(h)))
        if raw or self.config.prediction == "eps":
            return out
        sa, s1 = self._coefficients(t, x)  # in float32 even under autocast: ε̂ ≈ x_t at high noise
        dtype = torch.promote_types(x.dtype, torch.float32)
        return s1.to(dtype) * x.to(dtype) + sa.to(dtype) * out.to(dtype)
