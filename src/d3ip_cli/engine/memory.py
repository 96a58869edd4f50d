"""Memory planning (DESIGN §6): slice chunks sized from free memory; clear refusals.

Everything the engine keeps per slice (the sampler state, the measurement, the initial
estimate, CG temporaries) grows linearly with the number of slices; network activations
depend only on the chunk of slices evaluated at once. :func:`plan` sizes that chunk from
the device's free memory and refuses, *before* any work, a volume that cannot fit,
saying how many slices would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from d3ip_cli.core.errors import ResourceError

GiB = 1024**3


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free memory, or ``MemAvailable`` on Linux CPUs."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GiB


@dataclass
class MemoryPlan:
    chunk: int
    per_slice_bytes: int
    per_image_activation_bytes: int
    fixed_bytes: int
    available_bytes: int
    max_slices: int

    def to_dict(self) -> dict:
        return {"chunk": self.chunk, "per_slice_mb": round(self.per_slice_bytes / 2**20, 2),
                "activation_per_image_mb": round(self.per_image_activation_bytes / 2**20, 2),
                "available_gb": round(self.available_bytes / GiB, 2), "max_slices": self.max_slices}


def plan(n_slices: int, image_shape: tuple[int, int], meas_numel_per_slice: int, *, model_channels: int,
         complex_: bool, adapt_batch: int, device: torch.device, n_samples: int = 1,
         available: int | None = None, budget_fraction: float = 0.7) -> MemoryPlan:
    """Choose the network chunk and check that ``n_slices`` fit.

    The estimates are deliberately conservative: ~14 image-sized float32 buffers per
    slice (state, estimates, CG vectors), 4 measurement-sized buffers, activations of
    ~24 feature maps of ``model_channels`` per evaluated image (x3 with gradients, for the
    ``adapt_batch`` slices of an adaptation step), plus the network itself.
    """
    h, w = image_shape
    cplx = 2 if complex_ else 1
    per_slice = (14 * h * w + 4 * meas_numel_per_slice) * 4 * cplx * max(1, n_samples)
    act = 24 * model_channels * h * w * 4
    fixed = 3 * act * adapt_batch * cplx + 256 * 2**20
    avail = available_bytes(device) if available is None else int(available)
    budget = int(avail * budget_fraction)
    max_slices = max(0, (budget - fixed - act) // per_slice)
    if n_slices > max_slices:
        need = (n_slices * per_slice + fixed + act) / GiB
        raise ResourceError(
            f"{n_slices} slices of {h}x{w} need about {need:.1f} GiB but {avail / GiB:.1f} GiB is free on {device}; "
            f"at most {max_slices} slices fit: use --slices A:B (or a smaller --grid)")
    room = budget - fixed - n_slices * per_slice
    chunk = int(max(1, min(64, room // act, n_slices * cplx)))
    return MemoryPlan(chunk, per_slice, act, fixed, avail, int(max_slices))
