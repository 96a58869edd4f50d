"""Variance-preserving noise schedule as pure functions (DESIGN §5).

Forward process :math:`x_t = \\sqrt{\\bar\\alpha_t}\\,x_0 + \\sqrt{1-\\bar\\alpha_t}\\,\\epsilon`
with linear :math:`\\beta_t` from ``1e-4`` to ``0.02`` over ``T = 1000`` steps and
:math:`\\bar\\alpha_t = \\prod_{s \\le t}(1-\\beta_s)`. Indices ``t`` run ``0 .. T-1``.
"""

from __future__ import annotations

import torch

NUM_STEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02


def linear_betas(num_steps: int = NUM_STEPS, beta_start: float = BETA_START, beta_end: float = BETA_END) -> torch.Tensor:
    """:math:`\\beta_t`, ``float64 [num_steps]``."""
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)


def alphas_cumprod(num_steps: int = NUM_STEPS, beta_start: float = BETA_START, beta_end: float = BETA_END) -> torch.Tensor:
    """:math:`\\bar\\alpha_t`, ``float64 [num_steps]``."""
    return torch.cumprod(1.0 - linear_betas(num_steps, beta_start, beta_end), dim=0)


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """Diffuse ``x0 [B, ...]`` to steps ``t [B]``."""
    a = abar.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def ddim_timesteps(num_sampling_steps: int, num_steps: int = NUM_STEPS, t_start: int | None = None) -> list[int]:
    """Descending DDIM step indices, evenly spaced, ending at 0: e.g. 50 -> [980, 960, ..., 0].

    ``t_start`` (default ``num_steps``) truncates the trajectory: the steps are spread over
    ``[0, t_start)`` instead, so a sampler started from a diffused initial estimate spends
    all its steps at low noise (Chung et al., "Come-Closer-Diffuse-Faster", CVPR 2022):
    e.g. 20 steps with ``t_start=400`` -> [380, 360, ..., 0].
    """
    span = num_steps if t_start is None else int(t_start)
    if not 1 <= span <= num_steps:
        raise ValueError(f"t_start must be in [1, {num_steps}], got {t_start}")
    if not 1 <= num_sampling_steps <= span:
        raise ValueError(f"sampling steps must be in [1, {span}], got {num_sampling_steps}")
    stride = span // num_sampling_steps
    return list(range(0, span, stride))[:num_sampling_steps][::-1]


def schedule_metadata() -> dict:
    return {"type": "vp-linear", "beta_start": BETA_START, "beta_end": BETA_END, "num_steps": NUM_STEPS}
