"""Measurement noise models, kept apart from the operators. All randomness comes from
the ``torch.Generator`` passed in (drawn on its device, then moved to the data's).

- CT photon counts: :math:`N \\sim \\mathrm{Poisson}(I_0 e^{-\\mu p})`, then
  :math:`\\tilde p = -\\log(\\max(N, 1)/I_0)/\\mu` where ``p`` is the noiseless sinogram in
  normalised units x mm and ``mu`` (per mm per unit) converts it to attenuation.
- Gaussian: :math:`\\tilde y = y + \\sigma n` on the sinogram.
- MRI: complex Gaussian on the sampled k-space entries,
  :math:`\\tilde y = y + M\\,\\sigma\\,(n_r + i\\,n_i)/\\sqrt 2` (so :math:`E|\\cdot|^2 = \\sigma^2`).

``relative_sigma`` converts a user-facing noise level relative to the RMS of the
noiseless (sampled) data into an absolute standard deviation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from d3ip_cli.core.errors import UsageError


def _randn(shape: torch.Size, dtype: torch.dtype, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gdev = generator.device if generator is not None else device
    return torch.randn(shape, dtype=dtype, generator=generator, device=gdev).to(device)


def relative_sigma(y: torch.Tensor, level: float, mask: torch.Tensor | None = None) -> float:
    """``level`` times the RMS of ``y`` (over sampled entries when ``mask`` is given)."""
    a = y.abs().double() ** 2
    if mask is not None:
        m = mask.to(a.device, a.dtype)
        m = m[:, None] if a.ndim == m.ndim + 1 else m
        rms = math.sqrt(float((a * m).sum()) / max(float(m.expand_as(a).sum()), 1.0))
    else:
        rms = math.sqrt(float(a.mean()))
    return level * rms


def gaussian(y: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Additive white Gaussian noise of standard deviation ``sigma`` (real ``y``)."""
    if sigma < 0:
        raise UsageError(f"--sigma must be >= 0, got {sigma}")
    return y + sigma * _randn(y.shape, y.dtype, generator, y.device)


def complex_gaussian(y: torch.Tensor, sigma: float, mask: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Complex Gaussian noise (``E|n|^2 = sigma^2``) on ``y [Z, C, H, W]``, only where ``mask [Z, H, W]`` samples."""
    if sigma < 0:
        raise UsageError(f"--sigma must be >= 0, got {sigma}")
    real = y.real.dtype
    n = torch.complex(_randn(y.shape, real, generator, y.device), _randn(y.shape, real, generator, y.device))
    n = n * (sigma / math.sqrt(2.0))
    if mask is not None:
        m = mask.to(device=y.device, dtype=real)
        n = n * (m[:, None] if y.ndim == m.ndim + 1 else m)
    return y + n


def ct_poisson(sino: torch.Tensor, i0: float, mu_per_unit: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Photon-count noise on a sinogram of line integrals (normalised units x mm).

    Args:
        sino: noiseless line integrals ``p`` (``[Z, V, K]``).
        i0: incident photons per detector bin (e.g. ``1e5``; fewer means noisier).
        mu_per_unit: attenuation per mm of one normalised image unit (so ``mu * p`` is
            dimensionless).
    """
    if not i0 > 0:
        raise UsageError(f"--i0 must be > 0, got {i0}")
    gdev = generator.device if generator is not None else sino.device
    expected = i0 * torch.exp(-(sino.double().clamp_min(0) * mu_per_unit))
    counts = torch.poisson(expected.to(gdev), generator=generator).to(sino.device)
    return (-torch.log(counts.clamp_min(1.0) / i0) / mu_per_unit).to(sino.dtype)



def measured_entries(y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The count of measured entries in each slice of ``y`` (``[Z]``, float64): every bin of a
    sinogram; for MRI the sampled k-space entries of ``mask [Z, H, W]`` times the coils."""
    z = y.shape[0]
    if mask is not None:
        coils = y.shape[1] if y.ndim == mask.ndim + 1 else 1
        return mask.double().reshape(z, -1).sum(1).cpu() * coils
    return torch.full((z,), float(y[0].numel()), dtype=torch.float64)


def noise_energy(y: torch.Tensor, record: dict | None, mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """The expected energy of the noise in each slice of ``y``, :math:`E\\|n_i\\|^2` (``[Z]``, float64).

    ``record`` is a measurement's noise record (what :func:`~d3ip_cli.engine.recon.simulate_measurement`
    writes): ``{"model": "none"}`` gives zeros; ``"gaussian"`` gives ``sigma_absolute²`` times the
    measured entries of the slice (:func:`measured_entries`); ``"poisson"`` the photon-count variance
    of each log-transformed bin, :math:`\\mathrm{Var}\\,\\tilde p \\approx e^{\\mu \\tilde p}/(\\mu^2 I_0)`,
    summed. ``None`` when the record is missing or names another model (the noise is unknown).
    """
    model = (record or {}).get("model")
    z = y.shape[0]
    if model == "none":
        return torch.zeros(z, dtype=torch.float64)
    if model == "gaussian" and record.get("sigma_absolute") is not None:
        return measured_entries(y, mask) * float(record["sigma_absolute"]) ** 2
    if model == "poisson" and record.get("i0") and record.get("mu_per_unit"):
        i0, mu = float(record["i0"]), float(record["mu_per_unit"])
        var = torch.exp(y.double().cpu() * mu) / (mu * mu * i0)
        return var.reshape(z, -1).sum(1)
    return None


@dataclasses.dataclass
class NoiseLevel:
    """How much noise each slice's data hold: ``energy [Z]`` (:math:`E\\|n_i\\|^2`) spread over
    ``measured [Z]`` entries (:func:`measured_entries`)."""

    energy: torch.Tensor
    measured: torch.Tensor

    def select(self, index: Any) -> "NoiseLevel":
        """The slices ``index`` (a slice, or a list of indices, repeats allowed)."""
        return NoiseLevel(self.energy[index], self.measured[index])

    def target(self, unknowns: int, tau: float) -> torch.Tensor:
        """The squared residual norm at which :math:`\\tau^2` of the noise the data can be fitted to is left.

        Of ``m`` measured entries at most ``r = min(m, unknowns)`` lie in the operator's range (a
        full-rank estimate): the noise outside it, :math:`(1 - r/m)\\,E\\|n\\|^2`, stays in any
        residual (an over-determined multi-coil MRI slice); the part inside is fitted down to
        :math:`\\tau^2` of it. ``tau = 1`` is Morozov's discrepancy principle, ``0`` the least-squares fit."""
        frac = torch.clamp(float(unknowns) / self.measured.clamp_min(1.0), max=1.0)
        return self.energy * (1.0 - (1.0 - tau * tau) * frac)


def noise_level(y: torch.Tensor, record: dict | None, mask: torch.Tensor | None = None) -> NoiseLevel | None:
    """:class:`NoiseLevel` of ``y`` from its noise record (``None`` when unknown)."""
    energy = noise_energy(y, record, mask)
    return None if energy is None else NoiseLevel(energy, measured_entries(y, mask))
