"""Synthetic phantoms: the only images the prior ever sees.

Two seeded, vectorised generators, both returning intensities in ``[0, 1]``:

* :func:`ellipses_2d` — random overlapping ellipses, the recipe of the "ellipses"
  training set used for the paper's CT prior: a Poisson number of ellipses (mean
  ``mean_count``), additive intensities :math:`\\sim U[-0.4, 1]`, semi-axes
  :math:`a, b \\sim s\\,\\mathrm{Exp}(1)` with :math:`s = 0.2 \\cdot 0.47` (in units of
  the half field of view), centres uniform on a disk, uniform rotation; each image is
  then shifted and scaled to ``[0, 1]``.
* :func:`ellipsoid_slices` — axial slices of random 3D ellipsoid volumes (same
  recipe in 3D). Evaluating the volume only on the requested planes makes neighbouring
  slices consistent without building whole volumes; :func:`ellipsoid_volume` builds a
  stack of ``Z`` consecutive slices for in-distribution 3D tests.

Coordinates span ``[-1, 1]`` across the image. Everything is driven by a
:class:`torch.Generator`, so a seed fixes the data exactly.
"""

from __future__ import annotations

import math

import torch

SIZE_SCALE = 0.2 * 0.47


def _grid(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    c = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n * 2 - 1
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return yy, xx


def _window_coords(batch: int, size: int, crop: int | None, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates ``[batch, n]`` (x and y) of a full image or a random crop window."""
    dev = generator.device
    full = (torch.arange(size, device=dev, dtype=torch.float32) + 0.5) / size * 2 - 1
    if crop is None or crop >= size:
        return full.expand(batch, size), full.expand(batch, size)
    ox = torch.randint(0, size - crop + 1, (batch, 1), generator=generator, device=dev)
    oy = torch.randint(0, size - crop + 1, (batch, 1), generator=generator, device=dev)
    idx = torch.arange(crop, device=dev)[None]
    return full[ox + idx], full[oy + idx]


def _normalise(img: torch.Tensor) -> torch.Tensor:
    flat = img.flatten(1)
    lo = flat.min(dim=1).values.view(-1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1)
    return (img - lo) / (hi - lo).clamp_min(1e-6)


def _counts(batch: int, mean_count: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    rate = torch.full((batch,), float(mean_count), device=device)
    return torch.poisson(rate, generator=generator).long().clamp_min(1)


def ellipses_2d(
    batch: int,
    size: int,
    *,
    generator: torch.Generator,
    mean_count: float = 140.0,
    size_scale: float = SIZE_SCALE,
    disk_radius: float = 0.9,
    chunk: int = 32,
    crop: int | None = None,
) -> torch.Tensor:
    """Random-ellipse phantoms ``[batch, size, size]`` in ``[0, 1]``.

    With ``crop`` only a random ``crop x crop`` window of each ``size x size`` phantom is
    rasterised (cheap training on crops at the full phantom's pixel scale).

    Args:
        batch: number of images.
        size: image side in pixels.
        generator: the seeded source of randomness (its device is used).
        mean_count: Poisson mean of the number of ellipses per image.
        size_scale: semi-axes are ``size_scale * Exp(1)`` half-FOV units.
        disk_radius: centres are uniform on a disk of this radius.
    """
    dev = generator.device
    counts = _counts(batch, mean_count, generator, dev)
    n_max = int(counts.max())
    u = lambda *s: torch.rand(*s, generator=generator, device=dev)  # noqa: E731
    valid = (torch.arange(n_max, device=dev)[None, :] < counts[:, None]).float()
    value = (u(batch, n_max) * 1.4 - 0.4) * valid
    a = -torch.log(u(batch, n_max).clamp_min(1e-12)) * size_scale
    b = -torch.log(u(batch, n_max).clamp_min(1e-12)) * size_scale
    r = disk_radius * torch.sqrt(u(batch, n_max))
    phi = 2 * math.pi * u(batch, n_max)
    cx, cy = r * torch.cos(phi), r * torch.sin(phi)
    theta = math.pi * u(batch, n_max)
    ct, st = torch.cos(theta), torch.sin(theta)
    qa = (ct / a) ** 2 + (st / b) ** 2
    qb = 2 * ct * st * (1 / a**2 - 1 / b**2)
    qc = (st / a) ** 2 + (ct / b) ** 2
    xs, ys = _window_coords(batch, size, crop, generator)
    n = xs.shape[1]
    img = torch.zeros(batch, n, n, device=dev)
    for s in range(0, n_max, chunk):
        sl = slice(s, s + chunk)
        dx = xs[:, None, None, :] - cx[:, sl, None, None]  # [B, n, 1, W]
        dy = ys[:, None, :, None] - cy[:, sl, None, None]  # [B, n, H, 1]
        q = qa[:, sl, None, None] * dx * dx + qb[:, sl, None, None] * dx * dy + qc[:, sl, None, None] * dy * dy
        img += torch.where(q <= 1.0, value[:, sl, None, None], 0.0).sum(1)
    return _normalise(img)


def _random_rotations(n: torch.Size | tuple, generator: torch.Generator) -> torch.Tensor:
    """Uniform random rotation matrices ``[*n, 3, 3]`` from random unit quaternions."""
    dev = generator.device
    q = torch.randn(*n, 4, generator=generator, device=dev)
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rot = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
            2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
            2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    )
    return rot.view(*n, 3, 3)


def _ellipsoid_params(batch: int, mean_count: float, size_scale: float, generator: torch.Generator) -> dict:
    dev = generator.device
    counts = _counts(batch, mean_count, generator, dev)
    n_max = int(counts.max())
    u = lambda *s: torch.rand(*s, generator=generator, device=dev)  # noqa: E731
    valid = (torch.arange(n_max, device=dev)[None, :] < counts[:, None]).float()
    value = (u(batch, n_max) * 1.4 - 0.4) * valid
    axes = -torch.log(u(batch, n_max, 3).clamp_min(1e-12)) * size_scale * 1.6
    direction = torch.randn(batch, n_max, 3, generator=generator, device=dev)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    centre = direction * 0.9 * u(batch, n_max, 1) ** (1 / 3)
    rot = _random_rotations((batch, n_max), generator)
    return {"value": value, "axes": axes, "centre": centre, "rot": rot, "n": n_max}


def _eval_planes(p: dict, z: torch.Tensor, size: int, chunk: int = 32,
                 coords: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    r"""Evaluate ellipsoid sums on planes ``z [batch, S]`` -> ``[batch, S, size, size]``.

    An ellipsoid :math:`(p-c)^T M (p-c) \le 1`, :math:`M = R\,\mathrm{diag}(a^{-2})R^T`,
    cut by the plane :math:`z = z_0` is the 2D conic
    :math:`M_{00}d_x^2 + 2M_{01}d_xd_y + M_{11}d_y^2 + 2d_z(M_{02}d_x + M_{12}d_y) + M_{22}d_z^2 \le 1`.
    """
    dev = z.device
    batch, n_slices = z.shape
    rot, ax = p["rot"], p["axes"]
    m = rot @ torch.diag_embed(ax.pow(-2)) @ rot.transpose(-1, -2)  # [B, n, 3, 3]
    if coords is None:
        full = (torch.arange(size, device=dev, dtype=torch.float32) + 0.5) / size * 2 - 1
        coords = (full.expand(batch, size), full.expand(batch, size))
    xs, ys = coords
    n = xs.shape[1]
    out = torch.zeros(batch, n_slices, n, n, device=dev)
    for s in range(0, p["n"], chunk):
        sl = slice(s, s + chunk)
        mm = m[:, sl, None, None, None]  # [B, n, 1, 1, 1, 3, 3]
        c = p["centre"][:, sl]
        dz = z[:, None, :] - c[..., 2, None]  # [B, n, S]
        dz = dz[..., None, None]
        dx = xs[:, None, None, None, :] - c[..., 0, None, None, None]  # [B, n, 1, 1, W]
        dy = ys[:, None, None, :, None] - c[..., 1, None, None, None]  # [B, n, 1, H, 1]
        q = (mm[..., 0, 0] * dx * dx + 2 * mm[..., 0, 1] * dx * dy + mm[..., 1, 1] * dy * dy
             + 2 * dz * (mm[..., 0, 2] * dx + mm[..., 1, 2] * dy) + mm[..., 2, 2] * dz * dz)
        out += torch.where(q <= 1.0, p["value"][:, sl, None, None, None], 0.0).sum(1)
    return out


def ellipsoid_slices(
    batch: int,
    size: int,
    *,
    generator: torch.Generator,
    mean_count: float = 250.0,
    size_scale: float = SIZE_SCALE,
    crop: int | None = None,
) -> torch.Tensor:
    """One random axial slice from each of ``batch`` random ellipsoid volumes: ``[batch, size, size]``
    (or a random ``crop`` window of it)."""
    p = _ellipsoid_params(batch, mean_count, size_scale, generator)
    z = (torch.rand(batch, 1, generator=generator, device=generator.device) * 1.2 - 0.6)
    coords = _window_coords(batch, size, crop, generator)
    return _normalise(_eval_planes(p, z, size, coords=coords)[:, 0])


def ellipsoid_volume(
    n_slices: int,
    size: int,
    *,
    generator: torch.Generator,
    slice_step: float | None = None,
    mean_count: float = 250.0,
    size_scale: float = SIZE_SCALE,
) -> torch.Tensor:
    """A random 3D ellipsoid phantom ``[n_slices, size, size]`` in ``[0, 1]`` (isotropic by default)."""
    p = _ellipsoid_params(1, mean_count, size_scale, generator)
    step = 2.0 / size if slice_step is None else slice_step
    z = (torch.arange(n_slices, device=generator.device, dtype=torch.float32) - (n_slices - 1) / 2) * step
    vol = _eval_planes(p, z[None], size)[0]
    lo, hi = vol.min(), vol.max()
    return (vol - lo) / (hi - lo).clamp_min(1e-6)


def training_batch(batch: int, size: int, *, generator: torch.Generator, recipe: dict) -> torch.Tensor:
    """A mixed batch ``[batch, 1, n, n]`` in ``[0, 1]``: 2D ellipses and 3D-ellipsoid slices.

    ``recipe`` keys: ``frac_3d`` (share of ellipsoid slices), ``mean_count_2d``,
    ``mean_count_3d``, ``size_scale``, ``crop`` (train on random ``crop``-pixel windows
    of ``size``-pixel phantoms; ``n = crop`` then).
    """
    crop = recipe.get("crop")
    n3 = int(round(batch * float(recipe.get("frac_3d", 0.5))))
    parts = []
    if batch - n3 > 0:
        parts.append(ellipses_2d(batch - n3, size, generator=generator,
                                 mean_count=recipe.get("mean_count_2d", 140.0),
                                 size_scale=recipe.get("size_scale", SIZE_SCALE), crop=crop))
    if n3 > 0:
        parts.append(ellipsoid_slices(n3, size, generator=generator,
                                      mean_count=recipe.get("mean_count_3d", 250.0),
                                      size_scale=recipe.get("size_scale", SIZE_SCALE), crop=crop))
    return torch.cat(parts, 0)[:, None]
