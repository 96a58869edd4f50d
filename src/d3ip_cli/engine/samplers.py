"""The one sampler: DDIM steps along the probability-flow trajectory (DESIGN §6).

Written once for every task and method. Data consistency and test-time adaptation
are injected as callables, never branches (k-diffusion / deepinv style):

* ``eps_model(x, t) -> ε̂`` predicts the noise at integer step ``t``;
* ``dc(x0_hat, t) -> x̃0`` maps the Tweedie estimate to a data-consistent one;
* ``adapt(x, t)`` runs before the denoiser at step ``t`` (e.g. LoRA updates; it
  enables gradients itself — the sampler itself runs under ``no_grad``);
* ``callback(info)`` receives ``{"i", "t", "x", "x0", "x0_dc"}`` after each step.

Update (DDS / DDIM with :math:`\\sigma_{t'} = \\eta\\sqrt{1-\\bar\\alpha_{t'}}`)::

    x̂0   = (x_t - sqrt(1-ᾱ_t) ε̂) / sqrt(ᾱ_t)
    x̃0   = dc(x̂0)
    x_t' = sqrt(ᾱ_t') x̃0 + η sqrt(1-ᾱ_t') z + sqrt(1-η²) sqrt(1-ᾱ_t') ε̂

``η = 0`` is the deterministic probability-flow ODE; after the last step (``t' = -1``,
``ᾱ = 1``) the result is ``x̃0``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

EpsModel = Callable[[torch.Tensor, int], torch.Tensor]
Hook = Callable[[torch.Tensor, int], torch.Tensor]


@torch.no_grad()
def ddim_sample(
    eps_model: EpsModel,
    x: torch.Tensor,
    timesteps: Sequence[int],
    abar: torch.Tensor,
    *,
    eta: float = 0.85,
    dc: Hook | None = None,
    adapt: Callable[[torch.Tensor, int], None] | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    start: int = 0,
) -> torch.Tensor:
    """Run DDIM from ``x`` (at ``timesteps[start]``) to a clean sample.

    Args:
        eps_model: noise predictor ``(x [B, C, H, W], t) -> ε̂``.
        x: the starting state at step ``timesteps[start]``.
        timesteps: descending step indices, e.g. :func:`~d3ip_cli.prior.schedule.ddim_timesteps`.
        abar: :math:`\\bar\\alpha` for every training step (``[1000]``).
        eta: stochasticity, in ``[0, 1]``.
        dc: data-consistency map applied to the Tweedie estimate.
        adapt: hook run before the denoiser at each step (test-time adaptation).
        generator: source of the fresh noise ``z``.
        callback: progress/checkpoint hook.
        start: index into ``timesteps`` to resume from.
    """
    abar = abar.to(device=x.device, dtype=torch.float64)
    for i in range(start, len(timesteps)):
        t = int(timesteps[i])
        t_next = int(timesteps[i + 1]) if i + 1 < len(timesteps) else -1
        if adapt is not None:
            adapt(x, t)
        eps = eps_model(x, t)
        a_t = float(abar[t])
        a_next = float(abar[t_next]) if t_next >= 0 else 1.0
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        x0_dc = dc(x0, t) if dc is not None else x0
        if t_next < 0:
            x = x0_dc
        else:
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if eta > 0 else 0.0
            s = (1 - a_next) ** 0.5
            x = a_next**0.5 * x0_dc + eta * s * z + (1 - eta**2) ** 0.5 * s * eps
        if callback is not None:
            callback({"i": i, "t": t, "t_next": t_next, "x": x, "x0": x0, "x0_dc": x0_dc})
    return x


def diffuse(x0: torch.Tensor, t: int, abar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """:math:`x_t = \\sqrt{\\bar\\alpha_t} x_0 + \\sqrt{1-\\bar\\alpha_t} z` with independent noise per element/slice."""
    a = float(abar[t])
    z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return a**0.5 * x0 + (1 - a) ** 0.5 * z


@torch.no_grad()
def prior_samples(model: torch.nn.Module, n: int, size: int, *, steps: int = 50, batch: int = 16,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` unconditional DDIM (η = 0) samples of a prior, ``[n, size, size]`` in ``[0, 1]``.

    x̂0 is clipped to the data range ``[-1, 1]`` at every step (guided-diffusion's
    ``clip_denoised``; without it a young prior's early estimates overshoot and some
    samples saturate). Samples are drawn ``batch`` at a time (bounded memory).
    """
    from d3ip_cli.prior import schedule

    dev = next(model.parameters()).device
    abar = schedule.alphas_cumprod()
    x = torch.randn(n, 1, size, size, generator=generator, device=dev)

    def eps(xt: torch.Tensor, t: int) -> torch.Tensor:
        return model(xt, torch.full((xt.shape[0],), t, device=dev, dtype=torch.long))

    def clip(x0: torch.Tensor, t: int) -> torch.Tensor:
        return x0.clamp(-1, 1)

    outs = [ddim_sample(eps, x[i:i + batch], schedule.ddim_timesteps(steps), abar, eta=0.0, dc=clip)
            for i in range(0, n, batch)]
    return (torch.cat(outs, 0)[:, 0].clamp(-1, 1) + 1) / 2
