"""Seeded Cartesian sampling masks, one per slice: ``[Z, H, W]`` float32 in {0, 1}.

1D masks sample whole k-space *columns* (the last axis is the phase-encoding
direction, as in fastMRI) and always include a fully sampled centre of
``round(center_fraction * W)`` columns (the calibration region for ESPIRiT):

- ``uniform1d``: equispaced columns with a random offset per slice, spacing adjusted
  so that centre + equispaced columns give an overall acceleration of about ``R``;
- ``gaussian1d``: the remaining ``W/R - centre`` columns drawn without replacement with a
  Gaussian density around the centre (std ``W/4``);
- ``poisson2d``: variable-density Poisson-disc sampling in 2D (``sigpy.mri.poisson``)
  with a calibration rectangle of ``round(cf*H) x round(cf*W)`` rounded up to even sizes.

All randomness comes from the ``torch.Generator`` passed in (a different mask per slice).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from d3ip_cli.core.errors import UsageError

MASKS = ("uniform1d", "gaussian1d", "poisson2d")


def _center(n: int, center_fraction: float) -> tuple[int, int]:
    num_low = int(round(n * center_fraction))
    if center_fraction > 0:
        num_low = max(num_low, 1)
    start = (n - num_low + 1) // 2
    return start, num_low


def _randint(high: int, generator: torch.Generator | None) -> int:
    dev = generator.device if generator is not None else None
    return int(torch.randint(0, max(int(high), 1), (1,), generator=generator, device=dev).item())


def uniform1d(shape: tuple[int, int, int], acceleration: float, center_fraction: float = 0.08,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Equispaced column masks ``[Z, H, W]`` with a fully sampled centre (see module docstring)."""
    z, h, w = shape
    mask = np.zeros((z, w), dtype=np.float32)
    start, num_low = _center(w, center_fraction)
    if acceleration <= 1:
        return torch.ones(shape)
    if num_low * acceleration < w:
        spacing = acceleration * (num_low - w) / (num_low * acceleration - w)
    else:
        spacing = float("inf")
    for i in range(z):
        mask[i, start:start + num_low] = 1
        if np.isfinite(spacing):
            offset = _randint(round(spacing), generator)
            cols = np.round(np.arange(offset, w - 1, spacing)).astype(np.int64)
            mask[i, cols[cols < w]] = 1
    return torch.from_numpy(np.array(np.broadcast_to(mask[:, None, :], (z, h, w))))  # a copy: writable for any z


def gaussian1d(shape: tuple[int, int, int], acceleration: float, center_fraction: float = 0.08,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian-density random column masks ``[Z, H, W]`` with a fully sampled centre."""
    z, h, w = shape
    if acceleration <= 1:
        return torch.ones(shape)
    start, num_low = _center(w, center_fraction)
    target = max(int(round(w / acceleration)), num_low)
    k = torch.arange(w, dtype=torch.float64)
    density = torch.exp(-0.5 * ((k - (w - 1) / 2) / (w / 4)) ** 2)
    density[start:start + num_low] = 0
    mask = torch.zeros(z, w)
    for i in range(z):
        mask[i, start:start + num_low] = 1
        extra = min(target - num_low, int((density > 0).sum()))
        if extra > 0:
            dev = generator.device if generator is not None else density.device
            mask[i, torch.multinomial(density.to(dev), extra, replacement=False, generator=generator).cpu()] = 1
    return mask[:, None, :].expand(z, h, w).contiguous()


def poisson2d(shape: tuple[int, int, int], acceleration: float, center_fraction: float = 0.08,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Variable-density Poisson-disc masks ``[Z, H, W]`` from ``sigpy.mri.poisson`` (seed per slice)."""
    import sigpy.mri

    z, h, w = shape
    if acceleration <= 1:
        return torch.ones(shape)
    calib = tuple(2 * int(math.ceil(_center(n, center_fraction)[1] / 2)) for n in (h, w))  # even: centred like the FFT
    out = np.zeros(shape, dtype=np.float32)
    for i in range(z):
        seed = _randint(2**31 - 1, generator)
        out[i] = np.abs(sigpy.mri.poisson((h, w), acceleration, calib=calib, dtype=np.float32, seed=seed))
    return torch.from_numpy((out > 0).astype(np.float32))


MASK_FUNCTIONS = {"uniform1d": uniform1d, "gaussian1d": gaussian1d, "poisson2d": poisson2d}


def make_mask(kind: str, shape: tuple[int, int, int], acceleration: float = 4.0, center_fraction: float = 0.08,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Dispatch on ``kind`` (one of :data:`MASKS`); validates the options."""
    if kind not in MASK_FUNCTIONS:
        raise UsageError(f"--mask {kind!r}: choose one of {', '.join(MASKS)}")
    if not acceleration >= 1:
        raise UsageError(f"--acceleration must be >= 1, got {acceleration}")
    if not 0 <= center_fraction < 1:
        raise UsageError(f"--center-fraction must be in [0, 1), got {center_fraction}")
    return MASK_FUNCTIONS[kind](tuple(int(s) for s in shape), float(acceleration), float(center_fraction),
                                generator)


def acceleration_of(mask: torch.Tensor | np.ndarray) -> float:
    """Achieved acceleration ``numel / sampled`` of a mask."""
    m = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask)
    return float(m.size / max(float((m > 0).sum()), 1.0))


def calibration_width(mask: torch.Tensor | np.ndarray) -> int:
    """Side of the largest centred square fully sampled in every slice (ESPIRiT calibration)."""
    m = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask) > 0
    m = m.reshape((-1,) + m.shape[-2:]).all(axis=0)
    h, w = m.shape
    best = 0
    for width in range(1, min(h, w) + 1):
        r0, c0 = h // 2 - width // 2, w // 2 - width // 2
        if not m[r0:r0 + width, c0:c0 + width].all():
            break
        best = width
    return best
